"""sound2code's window schedule, on a tiny model of the same code.

Expectations are derived by hand from SPEC.md "Encoding" (official ``MuCodec.sound2code``):
windows of 40.96 s + 480 samples laid end to end, short clips repeated by doubling, then the audio
concatenated with itself once and cut to ``len // 1966080 + 1`` windows; ``int(N/48000*25)+1`` codes.
"""
import numpy as np
import pytest
import soundfile
import torch

from mucodec.audio import load_audio

SR = 48000
WIN = 1966080
STEP = WIN + 480


def expected_windows(n: int) -> int:
    """Number of encoder windows for n samples, worked out from the SPEC's rule."""
    m = n
    while m < STEP:
        m *= 2
    return m // WIN + 1


@pytest.fixture
def spy(tiny_codec, monkeypatch):
    """Record every batch of windows the codec encodes, and stamp each window's codes with its index."""
    calls = []
    real = tiny_codec.encode_windows

    def encode_windows(x):
        codes = real(x)
        calls.append((x.clone(), codes.clone()))
        return codes

    monkeypatch.setattr(tiny_codec, "encode_windows", encode_windows)
    return calls


def _signal(n, channels=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(n) / SR
    tone = 0.5 * torch.sin(2 * np.pi * 220 * t) * (1 + torch.sin(2 * np.pi * 0.7 * t))
    return tone.repeat(channels, 1) + 0.05 * torch.randn(channels, n, generator=g)


@pytest.mark.parametrize("seconds", [0.2, 3.0, 40.96, 41.0, 125.0])
def test_window_layout_and_code_count(tiny_codec, spy, seconds):
    n = round(seconds * SR)
    wav = _signal(n)
    codes = tiny_codec.sound2code(wav)

    assert codes.dtype == torch.int64 and codes.shape == (1, 1, int(n / SR * 25) + 1)
    n_win = expected_windows(n)
    assert {40.96: 3, 41.0: 2, 0.2: 2, 3.0: 2, 125.0: 4}[seconds] == n_win  # worked by hand as well
    # windows go through the model in batches of 3
    assert [x.shape[0] for x, _ in spy] == [min(3, n_win - i) for i in range(0, n_win, 3)]
    windows = torch.cat([x for x, _ in spy])
    assert windows.shape == (n_win, 2, STEP)

    # what each window must hold: the whole clip limited to peak 0.8, repeated, laid end to end
    peak = wav.abs().max()  # float32 arithmetic, as the official x / (peak / 0.8)
    scaled = wav / (peak / 0.8) if peak > 0.8 else wav
    padded = scaled
    while padded.shape[-1] < STEP:
        padded = torch.cat([padded, padded], -1)
    padded = torch.cat([padded, padded], -1)
    for k in range(n_win):
        torch.testing.assert_close(windows[k], padded[:, k * STEP:(k + 1) * STEP], rtol=0, atol=0)

    # codes of consecutive windows are concatenated, then cut
    all_codes = torch.cat([c for _, c in spy]).reshape(-1)
    assert all_codes.numel() == n_win * 1024
    assert torch.equal(codes.reshape(-1), all_codes[: codes.shape[-1]])


def test_batch_size_does_not_change_codes(tiny_codec):
    wav = _signal(round(125.0 * SR), seed=3)
    ref = tiny_codec.sound2code(wav)
    assert torch.equal(tiny_codec.sound2code(wav, batch_size=1), ref)
    assert torch.equal(tiny_codec.sound2code(wav, batch_size=4), ref)


def test_mono_is_duplicated(tiny_codec):
    mono = _signal(SR, channels=1)[0]
    stereo = mono.repeat(2, 1)
    ref = tiny_codec.sound2code(stereo)
    assert torch.equal(tiny_codec.sound2code(mono), ref)
    assert torch.equal(tiny_codec.sound2code(mono[None]), ref)


def test_files_at_other_rates_and_channel_counts(tiny_codec, tmp_path):
    n = 44100 * 2
    data = _signal(n, channels=5, seed=1).T.numpy() * 0.5
    soundfile.write(tmp_path / "five.wav", data, 44100, subtype="FLOAT")
    wav = load_audio(tmp_path / "five.wav")
    assert wav.shape == (2, 96000)  # 2 s at 48 kHz: first two channels, resampled
    codes = tiny_codec.sound2code(wav)
    assert codes.shape == (1, 1, 51)
    # the same as resampling the first two channels ourselves
    two = torch.from_numpy(data[:, :2].T.copy())
    import torchaudio

    assert torch.equal(tiny_codec.sound2code(torchaudio.functional.resample(two, 44100, SR)), codes)
    assert torch.equal(tiny_codec.sound2code(two, sample_rate=44100), codes)


def test_loud_input_is_scaled_as_a_whole(tiny_codec, spy):
    wav = _signal(SR // 2)
    tiny_codec.sound2code(wav * 4.0)
    x = torch.cat([w for w, _ in spy])
    assert float(x.abs().max()) == pytest.approx(0.8, abs=1e-6)
    tiny_codec.sound2code(wav * 0.1)  # quiet audio is never amplified
    assert float(spy[-1][0].abs().max()) == pytest.approx(float((wav * 0.1).abs().max()), abs=1e-7)


@pytest.mark.parametrize("bad", [torch.zeros(2, 0), torch.full((2, 100), float("nan")), torch.zeros(3, 4, 5)])
def test_unusable_input_is_a_clear_error(tiny_codec, bad):
    from mucodec.errors import AudioError

    with pytest.raises(AudioError):
        tiny_codec.sound2code(bad)
