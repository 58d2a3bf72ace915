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


def official_codes(codec, wav) -> torch.Tensor:
    """The official procedure, spelled out: every window of the layout, batches of 3, codes cut to T."""
    peak = wav.abs().max()  # float32 arithmetic, as the official x / (peak / 0.8)
    scaled = wav / (peak / 0.8) if peak > 0.8 else wav
    padded = scaled
    while padded.shape[-1] < STEP:
        padded = torch.cat([padded, padded], -1)
    n_win = padded.shape[-1] // WIN + 1
    padded = torch.cat([padded, padded], -1)[:, : n_win * STEP]
    windows = padded.reshape(2, n_win, STEP).transpose(0, 1)
    codes = torch.cat([codec.encode_windows(windows[i:i + 3]) for i in range(0, n_win, 3)])
    return codes.reshape(1, 1, -1)[..., : int(wav.shape[-1] / SR * 25) + 1], windows


# 40.96 s: the official layout has 3 windows for 1025 codes, 2 suffice; 81.92 s needs all 3 (2049 codes)
# while one sample less needs 2; 0.2 s and 3 s are repeated to 2 windows of which 1 suffices.
@pytest.mark.parametrize("n, official, computed", [
    (round(0.2 * SR), 2, 1), (3 * SR, 2, 1), (WIN, 3, 2), (WIN + 1, 3, 2), (round(41.0 * SR), 2, 2),
    (2 * WIN - 1, 2, 2), (2 * WIN, 3, 3), (round(125.0 * SR), 4, 4),
])
def test_only_the_windows_whose_codes_are_kept_are_computed(tiny_codec, spy, n, official, computed):
    wav = _signal(n)
    codes = tiny_codec.sound2code(wav)
    seen = list(spy)
    assert codes.dtype == torch.int64 and codes.shape == (1, 1, int(n / SR * 25) + 1)
    assert expected_windows(n) == official  # the SPEC's rule, worked by hand as well
    assert -(-codes.shape[-1] // 1024) == computed

    # windows go through the model in batches of 3, and are the first windows of the official layout
    assert [x.shape[0] for x, _ in seen] == [min(3, computed - i) for i in range(0, computed, 3)]
    ref, windows = official_codes(tiny_codec, wav)
    assert windows.shape == (official, 2, STEP)
    torch.testing.assert_close(torch.cat([x for x, _ in seen]), windows[:computed], rtol=0, atol=0)
    # codes of consecutive windows are concatenated, then cut: the same codes as the official procedure
    assert torch.equal(codes, ref)


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
