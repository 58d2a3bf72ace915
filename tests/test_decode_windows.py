"""code2sound's window schedule, on a tiny model of the same code.

Expectations derived by hand from SPEC.md "Decoding" step 2 and 6: windows of 1024 codes (512 latent
frames) every 768 codes; short inputs repeated to 1024 codes, longer ones repeated until
``(len - 256) % 768 == 0`` (the official test uses 128 there: the defect we fix); window k > 0 takes the
last 128 latent frames of window k-1 as in-context prefix; waveforms crossfade linearly over 10.24 s
and the output is cut to ``len(codes) / 25`` seconds.
"""
import math

import numpy as np
import pytest
import torch

from mucodec.codec import MuCodec

SPC = 1920  # samples per code at 48 kHz / 25 Hz
WINDOW, HOP, OVERLAP = 1024, 768, 256


def padded_len(n):
    n = max(n, WINDOW)
    return math.ceil((n - OVERLAP) / HOP) * HOP + OVERLAP


def repeat_codes(codes, n):
    while codes.shape[-1] < n:
        codes = torch.cat([codes, codes], -1)
    return codes[..., :n]


@pytest.fixture
def recorder(tiny_codec, monkeypatch):
    """Record what each window receives; replace the (slow) VAE + vocoder by a constant per window."""
    rec = {"codes": [], "sample": [], "wave_calls": 0}
    from_codes, sample = tiny_codec.quantizer.from_codes, tiny_codec.flow.sample

    def spy_from_codes(codes):
        rec["codes"].append(codes.clone())
        return from_codes(codes)

    def spy_sample(z_q, true_latents, latent_length, incontext_length, noise, *a, **k):
        out = sample(z_q, true_latents, latent_length, incontext_length, noise, *a, **k)
        rec["sample"].append((true_latents.clone(), latent_length, incontext_length, out.clone()))
        return out

    def fake_wave(latents, fast_vocoder=False, num_samples=None):
        rec["wave_calls"] += 1
        return torch.full((2, latents.shape[2] * 8 * 480), float(rec["wave_calls"]))

    monkeypatch.setattr(tiny_codec.quantizer, "from_codes", spy_from_codes)
    monkeypatch.setattr(tiny_codec.flow, "sample", spy_sample)
    monkeypatch.setattr(tiny_codec, "latents_to_wave", fake_wave)
    return rec


@pytest.mark.parametrize("n,windows", [(1, 1), (100, 1), (1024, 1), (1025, 2), (1664, 2), (2432, 3), (5000, 7)])
def test_window_schedule(tiny_codec, recorder, n, windows):
    codes = torch.randint(0, 16384, (1, 1, n), generator=torch.Generator().manual_seed(n))
    wav = tiny_codec.code2sound(codes, num_steps=1, generator=torch.Generator().manual_seed(0))

    # exact output length: 1920 samples per code
    assert wav.shape == (2, n * SPC) and wav.dtype == torch.float32
    # window count and the codes each window decodes (every code of the input is decoded)
    assert (padded_len(n) - OVERLAP) // HOP == windows == len(recorder["codes"]) == len(recorder["sample"])
    padded = repeat_codes(codes, padded_len(n))
    for k, got in enumerate(recorder["codes"]):
        assert torch.equal(got.cpu(), padded[..., k * HOP:k * HOP + WINDOW]), f"window {k}"
    assert (windows - 1) * HOP + WINDOW >= n

    # in-context hand-over: the last 128 latent frames of window k-1 start window k
    for k, (true_latents, latent_length, incontext, _) in enumerate(recorder["sample"]):
        assert true_latents.shape == (1, 32, 512, 32) and latent_length == 512
        if k == 0:
            assert incontext == 0
        else:
            assert incontext == 128
            prev_out = recorder["sample"][k - 1][3]
            assert torch.equal(true_latents[:, :, :128], prev_out[:, :, -128:])

    # crossfades: window k is the constant k+1 here, so each overlap is a linear ramp between k and k+1
    ov = OVERLAP * SPC
    ramp = np.linspace(0, 1, ov)
    for k in range(1, windows):
        start = k * HOP * SPC
        if start >= n * SPC:
            break
        expected = torch.from_numpy((k * (1 - ramp) + (k + 1) * ramp).astype(np.float32))
        seg = wav[0, start:start + ov]
        assert torch.equal(seg, expected[: seg.shape[0]]), f"crossfade {k}"
        if start + ov < n * SPC:
            assert float(wav[0, start + ov]) == k + 1


def test_official_defect_lengths_are_padded():
    """(len - 128) % 768 == 0 left the official last window short; those lengths now get whole windows."""
    from mucodec.codec import CodecConfig

    cfg = CodecConfig()
    for n in (1664, 2432, 3200):
        assert (n - 128) % 768 == 0
        p = cfg.padded_codes(n)
        assert (p - 256) % 768 == 0 and n <= p < n + 768
    assert cfg.padded_codes(1792) == 1792 and cfg.padded_codes(1025) == 1792 and cfg.padded_codes(1) == 1024


def test_noise_injection_and_generator_reproducibility(tiny_codec, recorder):
    codes = torch.randint(0, 16384, (1, 1, 1025), generator=torch.Generator().manual_seed(5))
    a = tiny_codec.code2sound(codes, num_steps=1, generator=torch.Generator().manual_seed(1))
    lat_a = [s[3] for s in recorder["sample"]]
    recorder["sample"].clear()
    tiny_codec.code2sound(codes, num_steps=1, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(x, s[3]) for x, s in zip(lat_a, recorder["sample"]))
    recorder["sample"].clear()
    noise = [torch.zeros(1, 32, 512, 32), torch.ones(1, 32, 512, 32)]
    tiny_codec.code2sound(codes, num_steps=1, noise=noise)
    first = recorder["sample"][0]
    assert not torch.equal(first[3], lat_a[0])  # the injected noise, not the generator's, was used
    with pytest.raises(ValueError):
        tiny_codec.code2sound(codes, num_steps=1, noise=noise[:1])
    assert a.shape == (2, 1025 * SPC)


@pytest.mark.parametrize("bad", [torch.tensor([[[16384]]]), torch.tensor([[[-1]]]), torch.zeros(1, 1, 0, dtype=torch.long),
                                 torch.zeros(1, 1, 4), torch.zeros(2, 1, 4, dtype=torch.long)])
def test_bad_codes_are_clear_errors(tiny_codec, bad):
    from mucodec.errors import CodesError

    with pytest.raises(CodesError, match=r"^codes .*\.$"):
        tiny_codec.code2sound(bad, num_steps=1)


@pytest.mark.slow
def test_real_decode_of_two_windows(tiny_codec):
    """The real tiny VAE + vocoder: exact length, finite output, reproducible with a seed."""
    codes = torch.randint(0, 16384, (1, 1, 1025), generator=torch.Generator().manual_seed(7))
    a = tiny_codec.code2sound(codes, num_steps=2, generator=torch.Generator().manual_seed(3), fast_vocoder=False)
    b = tiny_codec.code2sound(codes, num_steps=2, generator=torch.Generator().manual_seed(3), fast_vocoder=False)
    assert a.shape == (2, 1025 * SPC) and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert float(a.abs().max()) > 0
    fast = tiny_codec.code2sound(codes, num_steps=2, generator=torch.Generator().manual_seed(3), fast_vocoder=True)
    torch.testing.assert_close(fast, a, rtol=0, atol=1e-5)  # same chunks up to float rounding


def test_the_vocoder_stops_at_the_end_of_the_song(tiny_codec, monkeypatch, n=100):
    """A song ending inside its last window: the vocoder runs only the chunks that reach its end, and the
    audio is what vocoding the whole window gives (bit for bit with the official chunks)."""
    codes = torch.randint(0, 16384, (1, 1, n), generator=torch.Generator().manual_seed(n))
    frames = []
    forward = type(tiny_codec.vocoder).forward
    monkeypatch.setattr(type(tiny_codec.vocoder), "forward", lambda self, x: frames.append(x.shape[-1]) or forward(self, x))
    cut = tiny_codec.code2sound(codes, num_steps=1, seed=5, fast_vocoder=False)
    cut_frames, frames[:] = sum(frames), []
    vocode = tiny_codec.vocoder.vocode
    monkeypatch.setattr(tiny_codec.vocoder, "vocode", lambda mel, **k: vocode(mel, **{**k, "num_samples": None}))
    whole = tiny_codec.code2sound(codes, num_steps=1, seed=5, fast_vocoder=False)
    assert torch.equal(cut, whole) and cut.shape == (2, n * SPC)
    # a window's 4096 mel frames are 13 chunks of 1024 every 256; after K chunks the first K * 122880
    # samples are final (each chunk's last 768 frames are crossfaded with the next)
    assert sum(frames) == 13 * 1024
    assert cut_frames == -(-n * SPC // 122880) * 1024


@pytest.mark.parametrize("fast", [False, True])
def test_fast_vocoder_flag_reaches_the_vocoder(tiny_codec, monkeypatch, fast):
    """code2sound(fast_vocoder=...) picks the vocoder's schedule: official chunks, or shared overlaps.
    (The VAE and the vocoder are stand-ins here: only the flag the vocoder receives is checked.)"""
    seen = []

    def decode(z):
        return torch.zeros(z.shape[0], 1, z.shape[2] * 8, 256)

    def vocode(mel, *a, **k):
        seen.append(k.get("share_overlaps"))
        return torch.zeros(mel.shape[0], mel.shape[2] * 480)

    monkeypatch.setattr(tiny_codec.vae, "decode", decode)
    monkeypatch.setattr(tiny_codec.vocoder, "vocode", vocode)
    codes = torch.randint(0, 16384, (1, 1, 30), generator=torch.Generator().manual_seed(4))
    wav = tiny_codec.code2sound(codes, num_steps=1, seed=0, fast_vocoder=fast)
    assert wav.shape == (2, 30 * SPC) and seen == [fast]
    if fast:  # the default
        seen.clear()
        tiny_codec.code2sound(codes, num_steps=1, seed=0)
        assert seen == [True]


def test_prompt_starts_the_first_window(tiny_codec, recorder):
    """A 3 s prompt: its VAE latents (37 frames) are window 0's prefix, its 74 codes are prepended,
    and the output still covers exactly the given codes (official code2sound(prompt=...))."""
    n = 300
    codes = torch.randint(0, 16384, (1, 1, n), generator=torch.Generator().manual_seed(9))
    t = torch.arange(3 * 48000) / 48000
    prompt = 0.5 * torch.sin(2 * np.pi * 330 * t).repeat(2, 1)
    wav = tiny_codec.code2sound(codes, num_steps=1, prompt=prompt, generator=torch.Generator().manual_seed(0))
    assert wav.shape == (2, n * SPC)
    # mel frames 3 s / 10 ms + 1 = 301 -> VAE encoder: 150 -> 75 -> 37 latent frames
    true_latents, _, incontext, _ = recorder["sample"][0]
    assert incontext == 37
    prompt_codes = tiny_codec.sound2code(prompt)[..., :74]
    window = recorder["codes"][0]
    assert torch.equal(window[..., :74].cpu(), prompt_codes)
    assert torch.equal(window[..., 74:74 + n].cpu(), codes)
    # the prefix frames are the prompt's latents (not noise): they stay identical in the sampler output
    out = recorder["sample"][0][3]
    assert torch.allclose(out[:, :, :37], true_latents[:, :, :37], atol=1e-5)


def test_reduced_precision_vae_and_vocoder(tiny_ckpt_dir):
    """audioldm_dtype runs the VAE and vocoder's convolutions under autocast and nothing else: the DiT keeps
    its float32 weights, the audio stays float32 and moves a little (measured on the full-size models: 2.4 %)."""
    codes = torch.randint(0, 16384, (1, 1, 60), generator=torch.Generator().manual_seed(0))
    exact = MuCodec.from_pretrained(tiny_ckpt_dir, device="cpu")
    reduced = MuCodec.from_pretrained(tiny_ckpt_dir, device="cpu", audioldm_dtype=torch.bfloat16)
    assert reduced.flow.estimator.proj_out.weight.dtype == torch.float32
    convs = []
    for stage in (reduced.vae, reduced.vocoder):
        conv = next(m for m in stage.modules() if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d)))
        conv.register_forward_hook(lambda m, i, o: convs.append(o.dtype))
    want = exact.code2sound(codes, num_steps=2, seed=3)
    got = reduced.code2sound(codes, num_steps=2, seed=3)
    assert convs and set(convs) == {torch.bfloat16}
    assert got.dtype == torch.float32 and got.shape == want.shape and not torch.equal(got, want)
    # bf16 keeps 8 significant bits: about 0.4 % per rounding, a few percent through a network of them
    assert float((got - want).norm() / want.norm()) < 0.1
