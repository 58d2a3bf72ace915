"""Audio input and the signal-processing front ends of MuCodec.

* ``load_audio`` / ``to_stereo``: any file or tensor -> float32 stereo at the codec rate.
* ``peak_normalize``: the official peak limiter (both ``preprocess_audio`` variants).
* ``limit_and_mix`` / ``prepare_muq_input``: what ``fetch_codes_batch`` feeds MuQ (per-channel
  limiter, channel mean, 48 kHz -> 24 kHz with the ``torchaudio.transforms.Resample`` kernel).
* ``MelSpectrogramDB``: MuQ's torchaudio ``MelSpectrogram`` + ``AmplitudeToDB`` front end.
* ``tacotron_log_mel``: the AudioLDM-48k TacotronSTFT log mel used for prompts.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile
import torch
import torch.nn.functional as F
import torchaudio
from torch import nn

from .errors import ArgumentError, AudioError, NumericalError, OutputError
from .files import NotRegularFile, open_atomic, open_regular, os_reason
from .tokens import EXTENSION as TOKEN_EXTENSION

CODEC_SAMPLE_RATE = 48000
MAX_SAMPLE_RATE = 1_000_000  # above any real recording; a larger value is a mistake, not a file


# ------------------------------------------------------------------------------------------------
# files: reading, writing, formats
# ------------------------------------------------------------------------------------------------
# soundfile format names whose files users name differently (or not at all, for RAW / MATLAB).
_EXTRA_EXTENSIONS = {"AIFF": ("aif", "aifc"), "AU": ("snd",), "OGG": ("oga", "opus"), "SVX": ("iff", "8svx"),
                     "IRCAM": ("sf",), "NIST": ("sph",), "WAVEX": ("wav",)}
_NO_EXTENSION = {"RAW", "MAT4", "MAT5", "MPC2K", "WAVEX", "IRCAM"}


def audio_extensions() -> set[str]:
    """File extensions (lower case, with the dot) of every format soundfile can read here."""
    exts = set()
    for name in soundfile.available_formats():
        if name not in _NO_EXTENSION:
            exts.add("." + name.lower())
        exts.update("." + e for e in _EXTRA_EXTENSIONS.get(name, ()))
    return exts


@dataclass(frozen=True)
class AudioInfo:
    """What an audio file holds, as stored (before any resampling or channel change)."""

    sample_rate: int
    channels: int
    frames: int

    @property
    def duration(self) -> float:
        return self.frames / self.sample_rate


def check_input_file(path, what: str = "Audio file", error=AudioError) -> str:
    """``path`` as a string if it names a regular, readable file; else ``error`` with the OS's reason.

    Non-regular files (folders, devices such as /dev/zero, named pipes) are refused before they are
    opened: reading them would never end or block forever.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise error(f"{what} must be given as a path, got {type(path).__name__}.")
    path = os.fspath(path)
    try:
        open_regular(path).close()
    except FileNotFoundError:
        raise error(f"{what} '{path}' does not exist; check the path.") from None
    except NotRegularFile as e:
        kind = "a folder" if e.kind == "a folder" else "not a regular file"
        raise error(f"{what} '{path}' is {kind}; give the path of a file.") from None
    except OSError as e:
        raise error(f"Cannot open {what.lower()} '{path}': {os_reason(e)}.") from None
    return path


def audio_info(path) -> AudioInfo:
    """Sample rate, channels and length of an audio file, read from its header."""
    path = check_input_file(path)
    try:
        info = soundfile.info(path)
    except Exception as e:  # libsndfile reports every format problem the same way
        raise AudioError(_unreadable(path, e)) from None
    return AudioInfo(int(info.samplerate), int(info.channels), int(info.frames))


def _unreadable(path: str, e: Exception) -> str:
    if path.lower().endswith(TOKEN_EXTENSION):
        return f"'{path}' is named like a MuCodec token file, not audio; decode it with code2sound."
    reason = str(getattr(e, "error_string", e)).rstrip(".")
    return f"Cannot read audio file '{path}' ({reason}); convert it to WAV or FLAC."


def load_audio(path, sample_rate: int = CODEC_SAMPLE_RATE) -> torch.Tensor:
    """Read an audio file as float32 stereo at ``sample_rate``.

    Any format libsndfile reads (WAV, FLAC, OGG, MP3 with recent libsndfile, ...) is accepted.
    Channel rule: mono is duplicated to both channels; a file with more than two channels keeps
    its first two, which in WAV/FLAC channel order are front left and front right (the other
    channels are dropped, not mixed in). A different sample rate is converted with torchaudio's
    default windowed-sinc resampler.

    Returns:
        (2, N) float32 tensor on the CPU.

    Raises:
        AudioError: missing, unreadable, non-regular or empty file, or NaN/infinite samples.
    """
    path = check_input_file(path)
    try:
        with soundfile.SoundFile(path) as f:
            rate, channels, frames = f.samplerate, f.channels, f.frames
            # Read in blocks straight into channel-first memory: one copy of the song, not three
            # (soundfile's frame-major array, its transpose, the stereo result).
            wav = torch.empty(min(channels, 2), frames)
            done = 0
            for block in f.blocks(blocksize=1 << 18, dtype="float32", always_2d=True):
                wav[:, done:done + block.shape[0]] = torch.from_numpy(block[:, :2].T)
                done += block.shape[0]
    except Exception as e:  # libsndfile reports every format problem the same way
        raise AudioError(_unreadable(path, e)) from None
    return _to_stereo(wav[:, :done], rate, sample_rate, f"Audio file '{path}'")


# Output formats: soundfile (format, subtype). FLAC holds 24-bit integers (lossless for them, about half the
# size of float WAV); float WAV keeps the decoder's output exactly, including samples beyond +-1.
AUDIO_FORMATS = {"wav": ("WAV", "FLOAT"), "flac": ("FLAC", "PCM_24")}


def write_wav(path, wav: torch.Tensor, sample_rate: int = CODEC_SAMPLE_RATE) -> None:
    """Write (C, N) audio as 32-bit float WAV, atomically (see :func:`audio_writer`)."""
    with wav_writer(path, sample_rate, wav.shape[0]) as write:
        write(wav)


def wav_writer(path, sample_rate: int = CODEC_SAMPLE_RATE, channels: int = 2):
    """:func:`audio_writer` for 32-bit float WAV."""
    return audio_writer(path, sample_rate, channels, "wav")


@contextlib.contextmanager
def audio_writer(path, sample_rate: int = CODEC_SAMPLE_RATE, channels: int = 2, fmt: str = "wav",
                 before_commit=None):
    """Stream (C, n) pieces into an audio file (``fmt`` in :data:`AUDIO_FORMATS`) that appears at ``path``
    only when complete.

    Yields ``write(piece)``. The samples go to a hidden temporary file beside ``path``; when the block ends
    without an exception the file is synced, its header is read back (frames, rate and channels must be
    those written) and it is renamed over ``path``. On any failure (a full disk, Ctrl-C) nothing is left
    behind. Non-finite samples are refused (:class:`NumericalError`) before anything of them is written.
    FLAC stores 24-bit integers, so samples beyond +-1 are clipped to full scale (float WAV keeps them).
    ``before_commit``: see :func:`files.open_atomic`; it also gets ``frames``.
    """
    path = Path(path)
    if fmt not in AUDIO_FORMATS:
        raise ArgumentError(f"audio format {fmt!r} is not one of {', '.join(AUDIO_FORMATS)}.")
    container, subtype = AUDIO_FORMATS[fmt]
    clip = subtype != "FLOAT"
    frames = 0

    def write(piece: torch.Tensor) -> None:
        nonlocal frames
        data = piece.detach().float().cpu()
        if not torch.isfinite(data).all():
            raise NumericalError(f"The decoder produced NaN or infinite samples for {path}; nothing was written.")
        if clip:  # libsndfile would wrap out-of-range floats around instead
            data = data.clamp(-1.0, 1.0)
        with _writing(path, raw):
            f.write(data.numpy().T)
        frames += data.shape[-1]

    def check(tmp: Path) -> None:
        try:
            with soundfile.SoundFile(str(tmp)) as back:
                got = (back.frames, back.samplerate, back.channels)
        except Exception as e:  # libsndfile reports every problem the same way
            raise OutputError(f"Cannot write {path}: the file written does not read back ({e}); check the disk "
                              f"holding {path.parent} and run the same command again.") from None
        if got != (frames, sample_rate, channels):
            raise OutputError(f"Cannot write {path}: the file written holds {got[0]} frames at {got[1]} Hz in "
                              f"{got[2]} channels, not the {frames} at {sample_rate} Hz in {channels} written; "
                              f"check the disk holding {path.parent} and run the same command again.")

    def commit(dst, info) -> None:
        if before_commit is not None:
            before_commit(dst, {**info, "frames": frames})

    with open_atomic(path, check=check, before_commit=commit, deferred=True) as raw:
        with _writing(path, raw):
            f = soundfile.SoundFile(raw, "w", sample_rate, channels, subtype=subtype, format=container)
            if subtype == "FLOAT":
                drop_peak_chunk(f)
        try:
            yield write
        except BaseException:
            with contextlib.suppress(Exception):
                f.close()
            raise
        with _writing(path, raw):
            f.close()  # writes the header's sizes (and FLAC's last frame): checked like any write


_SFC_SET_ADD_PEAK_CHUNK = 0x1050  # libsndfile's command number (sndfile.h)


def drop_peak_chunk(f) -> None:
    """Leave out libsndfile's PEAK chunk of float WAVs: it holds the time of writing, so the same audio written
    twice would differ in its bytes (and in its checksum, which a resumed job compares)."""
    with contextlib.suppress(AttributeError):  # a soundfile without its libsndfile handle: the chunk stays
        soundfile._snd.sf_command(f._file, _SFC_SET_ADD_PEAK_CHUNK, soundfile._ffi.NULL, 0)


@contextlib.contextmanager
def _writing(path: Path, raw):
    """A soundfile call on ``raw``: its writes are checked by ``raw``, whose error (a full disk) is the cause of
    whatever soundfile makes of the short write; libsndfile's own errors become an OutputError."""
    try:
        yield
    except (NumericalError, KeyboardInterrupt):
        raise
    except Exception as e:
        raw.raise_deferred()
        if isinstance(e, OutputError):
            raise
        raise OutputError(f"Cannot write {path}: {getattr(e, 'strerror', None) or e}.") from None
    raw.raise_deferred()


# ------------------------------------------------------------------------------------------------
# waveforms
# ------------------------------------------------------------------------------------------------
def to_stereo(wav, sample_rate: int | None = None, target_rate: int = CODEC_SAMPLE_RATE) -> torch.Tensor:
    """Bring a waveform to float32 stereo at ``target_rate`` (same rules as ``load_audio``).

    Args:
        wav: float tensor or array (N,) or (C, N).
        sample_rate: rate of ``wav`` in Hz, a positive integer (None: ``target_rate``).

    Returns:
        (2, N') float32 tensor on ``wav``'s device.
    """
    return _to_stereo(wav, target_rate if sample_rate is None else sample_rate, target_rate, "The input waveform")


def _to_stereo(wav, sample_rate, target_rate: int, what: str) -> torch.Tensor:
    if isinstance(wav, np.ndarray) and wav.dtype.kind == "f":
        wav = torch.from_numpy(wav)
    if not isinstance(wav, torch.Tensor) or not wav.is_floating_point():
        raise AudioError(f"{what} is not a floating-point tensor; pass float samples in [-1, 1], e.g. int16 samples / 32768.")
    if wav.dim() == 1:
        wav = wav[None]
    if wav.dim() != 2:
        raise AudioError(f"{what} has shape {tuple(wav.shape)}; pass (samples,) or (channels, samples).")
    if wav.shape[0] == 0 or wav.shape[1] == 0:
        raise AudioError(f"{what} contains no samples; use a non-empty recording.")
    if (isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, float, np.integer))
            or not 0 < sample_rate <= MAX_SAMPLE_RATE or int(sample_rate) != sample_rate):
        raise ArgumentError(f"sample_rate {sample_rate!r} is not a sample rate; give a positive whole number of Hz "
                            f"(at most {MAX_SAMPLE_RATE}).")
    if not all_finite(wav):
        raise AudioError(f"{what} contains NaN or infinite samples; repair or re-export the audio.")
    wav = wav[:2].float()
    if int(sample_rate) != target_rate:
        wav = resample(wav, int(sample_rate), target_rate)
    # mono is shared by both channels (a view, not a copy: long songs stay one copy in memory)
    return wav.expand(2, -1) if wav.shape[0] == 1 else wav.contiguous()


def all_finite(x: torch.Tensor, block: int = 1 << 18) -> bool:
    """Whether every value is finite, checked in blocks of the last dim so a long song needs no
    song-sized mask."""
    return all(bool(torch.isfinite(x[..., i:i + block]).all()) for i in range(0, x.shape[-1], block))


def crossfade(fading_out: torch.Tensor, fading_in: torch.Tensor) -> torch.Tensor:
    """Linear crossfade over the last dim, as the official code joins overlapping pieces.

    The ramp is numpy's float64 ``linspace(0, 1, n)`` (torch's differs in the last bit) and the mix is
    computed in float64, then stored in the inputs' dtype.
    """
    n = fading_out.shape[-1]
    ramp = _ramp(n).to(fading_out.device)
    return (fading_out.double() * (1 - ramp) + fading_in.double() * ramp).to(fading_out.dtype)


@functools.lru_cache(maxsize=8)
def _ramp(n: int) -> torch.Tensor:
    return torch.from_numpy(np.linspace(0, 1, n))


def resample(wav: torch.Tensor, orig_rate: int, new_rate: int) -> torch.Tensor:
    """Input-rate conversion as the official ``file2code``: ``torchaudio.functional.resample``
    (sinc_interp_hann, width 6, rolloff 0.99, kernel computed in the waveform's dtype)."""
    return torchaudio.functional.resample(wav, orig_rate, new_rate)


def resample_transform(wav: torch.Tensor, orig_rate: int, new_rate: int) -> torch.Tensor:
    """``torchaudio.transforms.Resample(orig_rate, new_rate)`` with its defaults, over the last dim.

    Unlike the functional form, the transform computes its kernel in float64 and stores it as
    float32 (for 48 kHz -> 24 kHz: (1, 1, 28), the reference's ``rsq48tomuencoder.kernel``); the
    output has ``ceil(N * new / orig)`` samples and zero-padded edges.
    """
    return _resampler(orig_rate, new_rate, wav.device)(wav)


@functools.lru_cache(maxsize=8)
def _resampler(orig_rate: int, new_rate: int, device: torch.device) -> nn.Module:
    return torchaudio.transforms.Resample(orig_rate, new_rate).to(device)


def peak_normalize(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Scale down each item of a batch whose peak exceeds ``threshold`` so its peak equals it.

    The peak is taken over everything after dim 0: with (B, 2, N) it spans both channels
    (official ``MuCodec.preprocess_audio``, threshold 0.8); with (B, N) rows it is per row
    (``PromptCondAudioDiffusion.preprocess_audio``, threshold 0.9). Items at or below the
    threshold are returned unchanged (quiet audio is never amplified).
    """
    peak = x.reshape(x.shape[0], -1).abs().amax(dim=-1)
    # Same arithmetic as the official code: x / (peak / threshold).
    norm = torch.where(peak > threshold, peak / threshold, torch.ones_like(peak))
    return x / norm.reshape((-1,) + (1,) * (x.dim() - 1))


def peak_divisor(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """What :func:`peak_normalize` divides one item ``x`` by (its peak over ``threshold``, or 1), found
    without a temporary copy of ``x`` (``abs()`` of an hour of audio would be another 1.4 GB)."""
    lo, hi = torch.aminmax(x)
    peak = torch.maximum(-lo, hi)
    return torch.where(peak > threshold, peak / threshold, torch.ones_like(peak))


def limit_and_mix(stereo: torch.Tensor, threshold: float = 0.9) -> torch.Tensor:
    """``fetch_codes_batch``'s channel mix: each channel row peak-limited on its own, then averaged.

    Args:
        stereo: (B, 2, N). Returns (B, N).
    """
    left = peak_normalize(stereo[:, 0, :], threshold)
    right = peak_normalize(stereo[:, 1, :], threshold)
    return (left + right) / 2.0


def prepare_muq_input(
    stereo: torch.Tensor, threshold: float = 0.9, sample_rate: int = CODEC_SAMPLE_RATE, muq_rate: int = 24000
) -> torch.Tensor:
    """What ``fetch_codes_batch`` feeds MuQ: ``limit_and_mix`` then the Resample transform.

    Args:
        stereo: (B, 2, N) at ``sample_rate``.

    Returns:
        (B, ceil(N * muq_rate / sample_rate)) mono at ``muq_rate``.
    """
    return resample_transform(limit_and_mix(stereo, threshold), sample_rate, muq_rate)


# ------------------------------------------------------------------------------------------------
# MuQ mel front end (torchaudio MelSpectrogram + AmplitudeToDB with their defaults)
# ------------------------------------------------------------------------------------------------
class MelSpectrogramDB(nn.Module):
    """Power mel spectrogram in dB, as MuQ's ``MelSTFT(is_db=True)``.

    torchaudio semantics: periodic Hann window of ``n_fft``, centred frames with reflect padding,
    power 2, HTK mel filters from 0 Hz to ``sample_rate // 2`` without normalisation, then
    ``10 * log10(clamp(x, 1e-10))``. Window and filterbank are computed, not loaded.
    """

    def __init__(self, sample_rate: int, n_fft: int, hop_length: int, n_mels: int):
        super().__init__()
        self.n_fft, self.hop_length = n_fft, hop_length
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        fb = torchaudio.functional.melscale_fbanks(
            n_fft // 2 + 1, 0.0, float(sample_rate // 2), n_mels, sample_rate, norm=None, mel_scale="htk"
        )
        self.register_buffer("fb", fb, persistent=False)  # (n_freqs, n_mels)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        """(B, N) -> (B, n_mels, N // hop_length + 1) in dB, always computed in float32."""
        spec = torch.stft(
            wav.float(), self.n_fft, self.hop_length, window=self.window.float(), center=True,
            pad_mode="reflect", return_complex=True,
        ).abs().pow_(2.0)
        mel = torch.matmul(spec.transpose(-1, -2), self.fb.float()).transpose(-1, -2)
        return torch.log10(mel.clamp_(min=1e-10)).mul_(10.0)


# ------------------------------------------------------------------------------------------------
# TacotronSTFT log mel (AudioLDM-48k prompt features)
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TacotronConfig:
    """``build_pretrained_models``' preprocessing config of AudioLDM-48k."""

    sample_rate: int = 48000
    n_fft: int = 2048
    hop_length: int = 480
    win_length: int = 2048
    n_mels: int = 256
    f_min: float = 20.0
    f_max: float = 24000.0
    log_floor: float = 1e-5


def tacotron_log_mel(wav: torch.Tensor, cfg: TacotronConfig = TacotronConfig()):
    """Official ``wav_to_fbank2`` (TacotronSTFT) features of a multi-channel 48 kHz waveform.

    Samples are clipped to [-1, 1] (NaN -> 0), reflect-padded by ``n_fft // 2`` on both sides and
    framed every ``hop_length`` samples (``N // hop + 1`` frames, nothing trimmed); the STFT is a
    convolution with the same float32 windowed DFT basis the reference builds, so results match
    it bit for bit rather than only to FFT rounding (which would matter in the log of near-silent
    bins).

    Args:
        wav: (C, N) with N > n_fft // 2.

    Returns:
        log_mel (C, frames, n_mels) = log(clamp(slaney_mel @ |STFT|, 1e-5)) and
        log_magnitudes (C, frames, n_fft // 2 + 1) = log(clamp(|STFT|, 1e-5)).
    """
    if wav.dim() != 2 or wav.shape[-1] <= cfg.n_fft // 2:
        raise AudioError(
            f"The prompt waveform has shape {tuple(wav.shape)}; pass (channels, samples) with more than "
            f"{cfg.n_fft // 2} samples."
        )
    basis, mel_basis = (t.to(wav.device) for t in _tacotron_buffers(cfg))
    x = torch.nan_to_num(wav.float().clamp(-1.0, 1.0))
    x = F.pad(x[:, None, :], (cfg.n_fft // 2, cfg.n_fft // 2), mode="reflect")
    spec = F.conv1d(x, basis, stride=cfg.hop_length)  # (C, 2 * n_freqs, frames): real then imaginary
    n_freqs = cfg.n_fft // 2 + 1
    real, imag = spec[:, :n_freqs], spec[:, n_freqs:]
    magnitude = torch.sqrt(real**2 + imag**2)
    log_mel = torch.log(torch.matmul(mel_basis, magnitude).clamp_(min=cfg.log_floor))
    log_magnitudes = torch.log(magnitude.clamp(min=cfg.log_floor))
    return log_mel.transpose(1, 2).contiguous(), log_magnitudes.transpose(1, 2).contiguous()


@functools.lru_cache(maxsize=4)
def _tacotron_buffers(cfg: TacotronConfig):
    """(windowed DFT basis (2 * n_freqs, 1, n_fft), slaney mel basis (n_mels, n_freqs)), float32 CPU."""
    n = cfg.n_fft
    k = torch.arange(n // 2 + 1, dtype=torch.float64)[:, None]
    t = torch.arange(n, dtype=torch.float64)[None, :]
    # (k * t) mod n keeps the angles exact for every k, t.
    angle = (2.0 * math.pi / n) * torch.remainder(k * t, n)
    basis = torch.cat([torch.cos(angle), -torch.sin(angle)]).float()
    window = torch.hann_window(cfg.win_length, periodic=True, dtype=torch.float64)
    pad = (n - cfg.win_length) // 2
    window = F.pad(window, (pad, n - cfg.win_length - pad)).float()
    basis = (basis * window)[:, None, :]
    return basis, slaney_mel_basis(cfg.sample_rate, n, cfg.n_mels, cfg.f_min, cfg.f_max)


def slaney_mel_basis(sample_rate: int, n_fft: int, n_mels: int, f_min: float, f_max: float) -> torch.Tensor:
    """librosa's default ``filters.mel`` (slaney scale, slaney area norm) as (n_mels, n_fft//2+1).

    Computed in float64 like librosa, with its float32 rounding of the triangles before the area
    normalisation, so the result equals librosa's float32 matrix to ~1e-16.
    """
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0

    def hz_to_mel(f: float) -> float:
        return min_log_mel + math.log(f / min_log_hz) / logstep if f >= min_log_hz else f / f_sp

    def mel_to_hz(m: torch.Tensor) -> torch.Tensor:
        return torch.where(m >= min_log_mel, min_log_hz * torch.exp(logstep * (m - min_log_mel)), f_sp * m)

    fft_freqs = torch.arange(n_fft // 2 + 1, dtype=torch.float64) * (1.0 / (n_fft * (1.0 / sample_rate)))
    lo, hi = hz_to_mel(f_min), hz_to_mel(f_max)
    mels = torch.arange(n_mels + 2, dtype=torch.float64) * ((hi - lo) / (n_mels + 1)) + lo
    mels[-1] = hi  # numpy.linspace pins the end point
    edges = mel_to_hz(mels)
    width = edges[1:] - edges[:-1]
    ramps = edges[:, None] - fft_freqs[None, :]
    rising = -ramps[:-2] / width[:-1, None]
    falling = ramps[2:] / width[1:, None]
    triangles = torch.clamp(torch.minimum(rising, falling), min=0.0).float()
    area_norm = 2.0 / (edges[2:] - edges[:-2])
    return (triangles.double() * area_norm[:, None]).float()
