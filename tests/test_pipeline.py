"""The whole official pipeline at full size (``pipeline_small.npz``), through real checkpoint files.

The reference ran ``MuCodec.sound2code`` on a 5 s clip and ``code2sound(num_steps=2)`` on its 126 codes
(one full 40.96 s window). Noise arrays are the exact normals the reference drew; ``noise_1`` is the
window's initial noise (``noise_0``, the fully masked first latent, cannot change the result; tests/data
does not keep it).

The decode runs the default vocoder (``fast_vocoder=True``: each mel frame once plus the chunk edges, 5392
frames through the full-size HiFi-GAN instead of the official 13 overlapping chunks of 1024 = 13312 frames)
and is held to the same golden ``wav`` at the same tolerance. The official chunk schedule itself is pinned at
full size by ``test_vocoder.py::test_wav_long_golden[official_chunks]`` (2e-5, tighter than 1e-4 here), the
shared-overlap schedule by ``[shared_overlaps]`` (2e-5), and that ``fast_vocoder`` reaches the vocoder by
``test_decode_windows.py::test_fast_vocoder_flag_reaches_the_vocoder``.
"""
import numpy as np
import pytest
import torch

from helpers import golden, max_err

# README "Suggested tolerances" (30-100x the reference's own thread-count noise):
LATENT_TOL = 1e-3  # cfm latents after 2 Euler steps of a 24-layer DiT
MEL_TOL = 1e-4  # VAE mel
WAV_TOL = 1e-4  # pipeline_small wav


@pytest.fixture(scope="module")
def ref():
    return golden("pipeline_small")


def test_sound2code_matches_official(encoder_codec, ref, monkeypatch):
    windows = []
    real = encoder_codec.encode_windows

    def spy(x):
        codes = real(x)
        windows.append((x.clone(), codes))
        return codes

    monkeypatch.setattr(encoder_codec, "encode_windows", spy)
    signal = torch.from_numpy(ref["signal_48k"])
    codes = encoder_codec.sound2code(signal)
    assert torch.equal(codes, torch.from_numpy(ref["codes"]))
    # 5 s is repeated to two MuQ windows of 40.97 s, but the 126 codes all come from the first: only it runs
    x = torch.cat([w for w, _ in windows])
    assert x.shape[0] == 1
    np.testing.assert_allclose(x.abs().amax(-1).numpy(), ref["window_peaks"][:1], rtol=0, atol=1e-7)
    assert torch.equal(windows[0][1], torch.from_numpy(ref["window_codes"][:1]))

    # the whole official layout, both windows in one batch, as the reference ran it
    windows.clear()
    peak = signal.abs().max()
    layout = encoder_codec._encoder_chunks(signal / (peak / 0.8) if peak > 0.8 else signal)
    assert layout.shape[0] == 2
    np.testing.assert_allclose(layout.abs().amax(-1).numpy(), ref["window_peaks"], rtol=0, atol=1e-7)
    assert torch.equal(encoder_codec.encode_windows(layout), torch.from_numpy(ref["window_codes"]))


@pytest.mark.slow
def test_code2sound_matches_official(full_codec, ref, monkeypatch):
    seen = {}
    real_sample, real_decode = full_codec.flow.sample, full_codec.vae.decode

    def sample(z_q, true_latents, latent_length, incontext_length, noise, *a, **k):
        out = real_sample(z_q, true_latents, latent_length, incontext_length, noise, *a, **k)
        seen["latents"] = out.clone()
        return out

    def decode(z):
        mel = real_decode(z)
        seen["mel"] = mel.clone()
        return mel

    monkeypatch.setattr(full_codec.flow, "sample", sample)
    monkeypatch.setattr(full_codec.vae, "decode", decode)
    codes = torch.from_numpy(ref["codes"])
    wav = full_codec.code2sound(codes, num_steps=int(ref["num_steps"]), guidance_scale=1.5,
                                noise=[torch.from_numpy(ref["noise_1"])])  # default vocoder (module docstring)
    # window0_latents, window0_mel and wav are stored as a fixed subset of 100 000 elements plus statistics
    # of the whole array (helpers.Sampled): max_err checks both at the same tolerance, which every full
    # array within it satisfies.
    assert max_err(seen["latents"], ref["window0_latents"]) <= LATENT_TOL
    assert max_err(seen["mel"], ref["window0_mel"]) <= MEL_TOL
    assert wav.shape == ref["wav"].shape == (2, 126 * 1920)
    assert max_err(wav, ref["wav"]) <= WAV_TOL
