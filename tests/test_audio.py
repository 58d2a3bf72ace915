"""Audio input rules, the peak limiter, the MuQ front end and the TacotronSTFT prompt features."""
import math

import numpy as np
import pytest
import soundfile
import torch
import torch.nn.functional as F
import torchaudio

from mucodec.audio import (
    MelSpectrogramDB,
    TacotronConfig,
    limit_and_mix,
    load_audio,
    peak_normalize,
    prepare_muq_input,
    resample_transform,
    slaney_mel_basis,
    tacotron_log_mel,
    to_stereo,
)
from mucodec.errors import ArgumentError, AudioError
from helpers import golden

# README "Suggested tolerances": front end <= 1e-4 abs on normalised values / 1e-3 dB.
WAV_TOL = 1e-4


@pytest.fixture(scope="module")
def muq_layer():
    return golden("muq_layer")


@pytest.fixture(scope="module")
def computed_buffers():
    return golden("computed_buffers")


def _tone(n, channels, sr):
    t = np.arange(n) / sr
    return np.stack([0.1 * (c + 1) * np.sin(2 * np.pi * 440 * (c + 1) * t) for c in range(channels)], 1)


# ------------------------------------------------------------------------------------------------
# load_audio / to_stereo
# ------------------------------------------------------------------------------------------------
def test_load_mono_is_duplicated(tmp_path):
    path = tmp_path / "mono.wav"
    data = _tone(4800, 1, 48000).astype(np.float32)
    soundfile.write(path, data, 48000, subtype="FLOAT")
    wav = load_audio(path)
    assert wav.dtype == torch.float32 and wav.shape == (2, 4800)
    assert torch.equal(wav[0], wav[1])
    assert torch.equal(wav[0], torch.from_numpy(data[:, 0]))


def test_load_resamples_44k1(tmp_path):
    path = tmp_path / "cd.flac"
    data = _tone(44100, 2, 44100)
    soundfile.write(path, data, 44100, subtype="PCM_24")
    wav = load_audio(path)
    assert wav.shape == (2, 48000)  # ceil(44100 * 48000 / 44100)
    raw = torch.from_numpy(soundfile.read(path, dtype="float32")[0].T.copy())
    # same resampler as the official file2code (torchaudio.functional.resample)
    assert torch.equal(wav, torchaudio.functional.resample(raw, 44100, 48000))


def test_load_five_channels_keeps_front_left_right(tmp_path):
    path = tmp_path / "surround.wav"
    data = _tone(2000, 5, 48000).astype(np.float32)
    soundfile.write(path, data, 48000, subtype="FLOAT")
    wav = load_audio(path)
    assert wav.shape == (2, 2000)
    assert torch.equal(wav, torch.from_numpy(data[:, :2].T.copy()))


@pytest.mark.parametrize("case", ["missing", "empty", "nan", "garbage"])
def test_load_user_errors_name_the_file(tmp_path, case):
    path = tmp_path / f"{case}.wav"
    if case == "empty":
        soundfile.write(path, np.zeros((0, 2), np.float32), 48000, subtype="FLOAT")
    elif case == "nan":
        data = _tone(100, 2, 48000).astype(np.float32)
        data[50, 1] = np.nan
        soundfile.write(path, data, 48000, subtype="FLOAT")
    elif case == "garbage":
        path.write_bytes(bytes(range(256)) * 10)
    with pytest.raises(AudioError) as e:
        load_audio(path)
    msg = str(e.value)
    assert str(path) in msg and msg.count(". ") == 0 and msg.endswith(".")  # one sentence naming the file


@pytest.mark.parametrize("shape", [(300,), (1, 300), (2, 300), (3, 300)])
def test_to_stereo_shapes(shape):
    wav = torch.randn(shape, dtype=torch.float64)
    out = to_stereo(wav, 48000)
    assert out.shape == (2, 300) and out.dtype == torch.float32
    rows = wav.reshape(-1, 300).float()
    assert torch.equal(out[0], rows[0]) and torch.equal(out[1], rows[min(1, rows.shape[0] - 1)])


def test_to_stereo_resamples():
    out = to_stereo(torch.randn(2, 16000), 16000)
    assert out.shape == (2, 48000)


@pytest.mark.parametrize(
    "wav, rate",
    [
        (torch.zeros(2, 0), 48000),
        (torch.tensor([[0.0, float("inf")]]), 48000),
        (torch.tensor([0.0, float("nan")]), 48000),
        (torch.zeros(2, 10, dtype=torch.int16), 48000),
        (torch.zeros(2, 2, 10), 48000),
    ],
)
def test_to_stereo_rejects(wav, rate):
    with pytest.raises(AudioError):
        to_stereo(wav, rate)


@pytest.mark.parametrize("rate", [44100.5, 0, -48000, True, "48000", 10 ** 9])
def test_to_stereo_rejects_sample_rates(rate):
    with pytest.raises(ArgumentError, match="sample_rate"):  # an argument mistake, and a ValueError
        to_stereo(torch.zeros(2, 10), rate)


# ------------------------------------------------------------------------------------------------
# peak limiter and MuQ input
# ------------------------------------------------------------------------------------------------
def test_peak_normalize_per_item_over_channels():
    x = torch.tensor([[[0.5, -1.6], [0.2, 0.1]], [[0.3, 0.2], [-0.7, 0.1]]])  # (B=2, 2, N=2)
    y = peak_normalize(x, 0.8)
    assert torch.allclose(y[0], x[0] / 2.0)  # peak 1.6 over both channels -> 0.8
    assert torch.equal(y[1], x[1])  # peak 0.7 <= 0.8: untouched, never amplified


def test_peak_normalize_per_row():
    x = torch.tensor([[0.45, -1.8], [0.1, 0.3]])
    y = peak_normalize(x, 0.9)
    assert torch.allclose(y[0], torch.tensor([0.225, -0.9]))
    assert torch.equal(y[1], x[1])


def test_muq_input_matches_golden(muq_layer):
    x = torch.from_numpy(muq_layer["signal_48k"])[None]
    # same float32 arithmetic as the reference (x / (peak / 0.9)): exact
    for c in (0, 1):
        assert torch.equal(peak_normalize(x[:, c], 0.9), torch.from_numpy(muq_layer[f"preproc_ch{c}"]))
    assert torch.equal(limit_and_mix(x), torch.from_numpy(muq_layer["wav_mean_48k"]))
    wav_24k = prepare_muq_input(x)
    assert wav_24k.shape == muq_layer["wav_24k"].shape
    assert np.abs(wav_24k.numpy() - muq_layer["wav_24k"]).max() <= WAV_TOL


def test_resample_transform_uses_reference_kernel(computed_buffers):
    kernel = torch.from_numpy(computed_buffers["rsq48tomuencoder.kernel"])  # (1, 1, 28)
    x = torch.randn(3, 1001)
    width = (kernel.shape[-1] - 2) // 2
    expect = F.conv1d(F.pad(x, (width, width + 2))[:, None], kernel, stride=2)[:, 0, : math.ceil(1001 / 2)]
    assert torch.equal(resample_transform(x, 48000, 24000), expect)


# ------------------------------------------------------------------------------------------------
# MuQ mel front end
# ------------------------------------------------------------------------------------------------
def test_muq_mel_buffers_are_computed_and_exact(computed_buffers):
    mel = MelSpectrogramDB(24000, 2048, 240, 128)
    p = "muencoder.model.preprocessor_melspec_2048.mel_stft."
    assert torch.equal(mel.window, torch.from_numpy(computed_buffers[p + "spectrogram.window"]))
    assert torch.equal(mel.fb, torch.from_numpy(computed_buffers[p + "mel_scale.fb"]))
    assert len(mel.state_dict()) == 0


def test_muq_mel_db_matches_golden(muq_layer):
    mel = MelSpectrogramDB(24000, 2048, 240, 128)
    out = mel(torch.from_numpy(muq_layer["muq_source_24k"]))
    assert out.shape == muq_layer["mel_db"].shape  # (1, 128, 301): N / hop + 1 centred frames
    assert np.abs(out.numpy() - muq_layer["mel_db"]).max() <= 1e-3  # README: 1e-3 dB


# ------------------------------------------------------------------------------------------------
# TacotronSTFT prompt features
# ------------------------------------------------------------------------------------------------
def test_slaney_basis_matches_librosa(computed_buffers):
    ref = computed_buffers["tacotron_stft.mel_basis"]  # librosa float32, (256, 1025)
    ours = slaney_mel_basis(48000, 2048, 256, 20.0, 24000.0).numpy()
    # Built in float64 like librosa; differences are last-ulp libm effects (observed 2.4e-17 on one
    # entry whose true value is ~0), far below float32 resolution of the 0.06-scale weights.
    assert ours.shape == ref.shape and np.abs(ours - ref).max() <= 1e-12


def test_tacotron_log_mel_matches_golden():
    ref = golden("vae_vocoder")
    log_mel, log_mag = tacotron_log_mel(torch.from_numpy(ref["prompt_wav"]))
    assert log_mel.shape == (2, 65, 256) and log_mag.shape == (2, 65, 1025)  # 30720 / 480 + 1 frames
    # Same DFT-basis convolution as the reference -> observed bit-exact; 1e-4 is the README's
    # front-end bound. (An FFT-based STFT misses by ~2e-3 in the log of near-silent bins.)
    assert np.abs(log_mel.numpy() - ref["prompt_fbank"]).max() <= 1e-4
    assert np.abs(log_mag.numpy() - ref["prompt_log_magnitudes"]).max() <= 1e-4


def test_tacotron_clips_and_rejects_short():
    x = torch.randn(1, 4800)
    a, _ = tacotron_log_mel(x * 10)
    b, _ = tacotron_log_mel((x * 10).clamp(-1, 1))
    assert torch.equal(a, b)
    with pytest.raises(AudioError):
        tacotron_log_mel(torch.zeros(2, TacotronConfig().n_fft // 2))
