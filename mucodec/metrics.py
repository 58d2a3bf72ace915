"""How close a reconstruction is to its reference: the metrics of one song, no model weights needed.

Inputs are (C, N) float32 tensors at 48 kHz, C = 2 (what :func:`mucodec.audio.load_audio` returns).

Alignment (:func:`align`), applied before every metric:
    * rate and channels: both are read by ``load_audio`` (48 kHz, stereo; mono is duplicated);
    * lag: the lag of the reconstruction within +-10 ms that maximises the cross-correlation of the channel
      means (over at most 2**20 samples from the middle) is undone, but only where the waveforms are
      clearly related there (normalised correlation >= 0.5); a generative decoder need not follow the
      waveform, and a lag picked from noise would only add error. A one-sample shift is thus undone;
    * length: both are cut to the shorter one (the durations of both are reported).
Level: no gain is matched. A level error is an error of the codec; :func:`loudness` reports it in LU.
SI-SDR and ViSQOL are level-invariant by their own definitions; the spectral distances grow with it.

Metrics (lower is better unless stated):
    visqol           ViSQOL v3, audio mode, 48 kHz, on the channel mean (visqol-python), MOS-LQO 1-5, higher
                     is better; identical signals score its ceiling, about 4.73, a silent reconstruction 1
                     (a silent reference is refused: nothing to compare with)
    mel_distance     multi-scale mel distance as in DAC's evaluation: the sum over 7 scales, window w in
                     32, 64, ..., 2048 samples (Hann, hop w/4, FFT w, centred with reflection) with
                     5, 10, ..., 320 slaney mel bands (0-24 kHz) of mag spectra, of the mean absolute
                     difference of log10(max(mel, 1e-5))
    stft_distance    multi-resolution STFT distance as in Parallel WaveGAN: the mean over three resolutions
                     (FFT 512, 1024, 2048; Hann windows 240, 600, 1200; hops 50, 120, 240) of spectral
                     convergence ||R| - |D||_F / ||R||_F plus the mean absolute difference of
                     ln(max(|.|, 1e-7)), over both channels
    mid_side_stft_distance   the mean of stft_distance of mid (L+R)/2 and of side (L-R)/2: the stereo image;
                     empty when the reference has no side signal (60 dB below mid: a mono reference)
    si_sdr_db        scale-invariant SDR in dB, the mean over channels, higher is better; finite (about
                     150 dB and more) for identical signals. Near meaningless for a generative codec, which
                     does not reproduce the waveform; reported for comparison with other codecs
    loudness_diff_lu integrated loudness (ITU-R BS.1770-4, torchaudio) of the reconstruction minus that of the
                     reference, in LU; best is 0
    bitrate_bps      bits of token payload per second of audio (:func:`token_bitrate`)
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

from . import tokens
from .audio import CODEC_SAMPLE_RATE, slaney_mel_basis
from .errors import AudioError

MEL_SCALES = tuple((32 << k, 5 << k) for k in range(7))  # (window = FFT samples, mel bands); hop = window / 4
STFT_RESOLUTIONS = ((512, 240, 50), (1024, 600, 120), (2048, 1200, 240))  # (FFT, window, hop)
MEL_FLOOR, MAG_FLOOR = 1e-5, 1e-7
MAX_LAG = CODEC_SAMPLE_RATE // 100  # 10 ms
LAG_WINDOW = 1 << 20
MIN_CORRELATION = 0.5
SIDE_FLOOR_DB = -60.0
SDR_EPS = 1e-12
BLOCK_VALUES = 1 << 22  # spectrum values computed at once, per signal: bounds memory at the finest scales
MIN_SECONDS = 0.5  # ViSQOL and BS.1770's 400 ms blocks need about this much

# name -> (higher is better, unit)
METRICS = {
    "visqol": (True, "MOS"), "mel_distance": (False, ""), "stft_distance": (False, ""),
    "mid_side_stft_distance": (False, ""), "si_sdr_db": (True, "dB"), "loudness_diff_lu": (False, "LU"),
    "bitrate_bps": (False, "bit/s"),
}


# ---- alignment ----------------------------------------------------------------------------------
def find_lag(ref: torch.Tensor, deg: torch.Tensor, max_lag: int = MAX_LAG) -> int:
    """Samples by which ``deg`` lags ``ref`` (deg[n + lag] ~ ref[n]), or 0 if no clear lag (see module)."""
    n = min(ref.shape[-1], deg.shape[-1])
    if n <= 2 * max_lag + 1:
        return 0
    take = min(LAG_WINDOW, n - 2 * max_lag)
    start = (n - take) // 2
    r = ref.double().mean(0)[start:start + take]
    d = deg.double().mean(0)[start - max_lag:start + take + max_lag]  # start >= max_lag: take is short enough
    size = 1 << (take + d.shape[-1]).bit_length()
    corr = torch.fft.irfft(torch.fft.rfft(d, size) * torch.fft.rfft(r, size).conj(), size)[:2 * max_lag + 1]
    best = int(torch.argmax(corr))
    energy = torch.sqrt((r * r).sum() * (d[best:best + take] ** 2).sum())
    if energy <= 0 or corr[best] / energy < MIN_CORRELATION:
        return 0
    return best - max_lag


def align(ref: torch.Tensor, deg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(ref, deg) with the lag undone and cut to the same length, and the lag in samples (module docstring)."""
    lag = find_lag(ref, deg)
    if lag > 0:
        deg = deg[:, lag:]
    elif lag < 0:
        ref = ref[:, -lag:]
    n = min(ref.shape[-1], deg.shape[-1])
    return ref[:, :n], deg[:, :n], lag


# ---- spectral distances -------------------------------------------------------------------------
def _spectra(x: torch.Tensor, n_fft: int, win: int, hop: int):
    """STFT of (C, N) ``x`` (periodic Hann of ``win`` centred in ``n_fft``, frames centred by reflection),
    in blocks of frames, so a long song never holds its whole spectrogram at the finest scale."""
    pad = n_fft // 2
    mode = "reflect" if x.shape[-1] > pad else "constant"
    x = F.pad(x[None], (pad, pad), mode=mode)[0]
    frames = 1 + (x.shape[-1] - n_fft) // hop
    window = torch.hann_window(win, dtype=x.dtype)
    block = max(16, BLOCK_VALUES // n_fft)
    for s in range(0, frames, block):
        e = min(frames, s + block)
        seg = x[:, s * hop:(e - 1) * hop + n_fft]
        yield torch.stft(seg, n_fft, hop, win, window, center=False, return_complex=True)


def mel_distance(ref: torch.Tensor, deg: torch.Tensor, sample_rate: int = CODEC_SAMPLE_RATE) -> float:
    """Multi-scale mel distance (module docstring): sum over :data:`MEL_SCALES` of mean |log10 mel diff|."""
    total = 0.0
    channels = ref.shape[0]
    both = torch.cat([ref, deg]).float()
    for win, bands in MEL_SCALES:
        basis = slaney_mel_basis(sample_rate, win, bands, 0.0, sample_rate / 2)
        diff, count = 0.0, 0
        for spec in _spectra(both, win, win, win // 4):
            mel = torch.log10(torch.clamp(torch.einsum("mf,cft->cmt", basis, spec.abs()), min=MEL_FLOOR))
            diff += float((mel[:channels] - mel[channels:]).abs().sum(dtype=torch.float64))
            count += mel[:channels].numel()
        total += diff / count
    return total


class _Distance:
    """Sums for one STFT distance at one resolution, accumulated over blocks of frames."""

    def __init__(self):
        self.err = self.energy = self.logdiff = 0.0
        self.count = 0

    def add(self, r: torch.Tensor, d: torch.Tensor) -> None:
        """Magnitudes of reference and reconstruction."""
        self.err += float(((r - d) ** 2).sum(dtype=torch.float64))
        self.energy += float((r * r).sum(dtype=torch.float64))
        self.logdiff += float((torch.log(r.clamp(min=MAG_FLOOR)) - torch.log(d.clamp(min=MAG_FLOOR))).abs()
                              .sum(dtype=torch.float64))
        self.count += r.numel()

    def value(self) -> float:
        convergence = math.sqrt(self.err / self.energy) if self.energy > 0 else (0.0 if self.err == 0 else math.inf)
        return convergence + self.logdiff / self.count


def stft_distances(ref: torch.Tensor, deg: torch.Tensor) -> tuple[float, float]:
    """(stft_distance, mid_side_stft_distance) from one STFT per resolution: the STFT is linear, so mid and
    side spectra are the half sum and half difference of the channels' (module docstring for the terms)."""
    channels = ref.shape[0]
    stereo = channels == 2 and _has_side(ref)
    both = torch.cat([ref, deg]).float()
    plain, mid_side = [], []
    for n_fft, win, hop in STFT_RESOLUTIONS:
        lr, mid, side = _Distance(), _Distance(), _Distance()
        for spec in _spectra(both, n_fft, win, hop):
            mag = spec.abs()
            lr.add(mag[:channels], mag[channels:])
            if stereo:
                mid.add(((spec[0] + spec[1]) / 2).abs(), ((spec[2] + spec[3]) / 2).abs())
                side.add(((spec[0] - spec[1]) / 2).abs(), ((spec[2] - spec[3]) / 2).abs())
        plain.append(lr.value())
        mid_side.append((mid.value() + side.value()) / 2 if stereo else math.nan)
    return sum(plain) / len(plain), sum(mid_side) / len(mid_side)


def _has_side(ref: torch.Tensor) -> bool:
    """Whether a stereo reference has a side signal above :data:`SIDE_FLOOR_DB` of its mid."""
    mid, side = ref[0].double() + ref[1].double(), ref[0].double() - ref[1].double()
    return float((side ** 2).sum()) > float((mid ** 2).sum()) * 10 ** (SIDE_FLOOR_DB / 10)


def stft_distance(ref: torch.Tensor, deg: torch.Tensor) -> float:
    """Multi-resolution STFT distance (module docstring): mean over :data:`STFT_RESOLUTIONS` of spectral
    convergence plus mean |ln magnitude difference|, over all channels."""
    return stft_distances(ref, deg)[0]


def mid_side_stft_distance(ref: torch.Tensor, deg: torch.Tensor) -> float:
    """Mean of :func:`stft_distance` of mid and side; NaN for a reference without side signal (module)."""
    return stft_distances(ref, deg)[1]


# ---- waveform and level -------------------------------------------------------------------------
def si_sdr(ref: torch.Tensor, deg: torch.Tensor) -> float:
    """Scale-invariant SDR in dB, the mean over channels (each zero-mean; the target is the projection of
    ``deg`` on ``ref``)."""
    r = ref.double() - ref.double().mean(-1, keepdim=True)
    d = deg.double() - deg.double().mean(-1, keepdim=True)
    alpha = (r * d).sum(-1, keepdim=True) / ((r * r).sum(-1, keepdim=True) + SDR_EPS)
    target = alpha * r
    ratio = ((target ** 2).sum(-1) + SDR_EPS) / (((d - target) ** 2).sum(-1) + SDR_EPS)
    return float((10 * torch.log10(ratio)).mean())


def loudness(wav: torch.Tensor, sample_rate: int = CODEC_SAMPLE_RATE) -> float:
    """Integrated loudness in LUFS (ITU-R BS.1770-4 via torchaudio); NaN for silence (every block gated)."""
    import torchaudio

    value = float(torchaudio.functional.loudness(wav.float(), sample_rate))
    return value if math.isfinite(value) else math.nan


# ---- ViSQOL and bitrate -------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _visqol_api():
    from visqol import VisqolApi

    api = VisqolApi()
    api.create(mode="audio")
    return api


def visqol(ref: torch.Tensor, deg: torch.Tensor, sample_rate: int = CODEC_SAMPLE_RATE) -> float:
    """ViSQOL v3 MOS-LQO in audio mode (48 kHz) of the channel means, as the C++ tool mixes to mono."""
    r = ref.double().mean(0).numpy()
    d = deg.double().mean(0).numpy()
    if not d.any():  # ViSQOL would scale silence up to the reference's level: NaN. Nothing is heard: the floor
        return 1.0
    return float(_visqol_api().measure_from_arrays(r, d, sample_rate=sample_rate).moslqo)


def token_bitrate(path) -> float:
    """Bits of the token payload of token file ``path`` per second of the audio it stands for."""
    codes, header = tokens.load_codes(path)
    bits = 8 * tokens.payload_size(codes.numel(), tokens.bits_per_code(header["codebook_size"]))
    return bits / (header["num_samples"] / header["sample_rate"])


# ---- everything for one song --------------------------------------------------------------------
def measure(ref: torch.Tensor, deg: torch.Tensor, sample_rate: int = CODEC_SAMPLE_RATE) -> dict:
    """Every audio metric of one pair (aligned first) plus what the alignment did; no bitrate."""
    ref_seconds, deg_seconds = ref.shape[-1] / sample_rate, deg.shape[-1] / sample_rate
    ref, deg, lag = align(ref, deg)
    if ref.shape[-1] < MIN_SECONDS * sample_rate:
        raise AudioError(f"The pair overlaps by {ref.shape[-1] / sample_rate:.2f} s only; metrics need at least "
                         f"{MIN_SECONDS} s of both files.")
    loud_r, loud_d = loudness(ref, sample_rate), loudness(deg, sample_rate)
    if math.isnan(loud_r):
        raise AudioError("The reference is silent (below BS.1770's -70 LUFS gate), so there is nothing to compare "
                         "its reconstruction with; leave it out.")
    return {
        "ref_seconds": ref_seconds, "deg_seconds": deg_seconds, "compared_seconds": ref.shape[-1] / sample_rate,
        "lag_samples": lag,
        "visqol": visqol(ref, deg, sample_rate),
        "mel_distance": mel_distance(ref, deg, sample_rate),
        **dict(zip(("stft_distance", "mid_side_stft_distance"), stft_distances(ref, deg))),
        "si_sdr_db": si_sdr(ref, deg),
        "loudness_ref_lufs": loud_r, "loudness_deg_lufs": loud_d, "loudness_diff_lu": loud_d - loud_r,
    }


def log_mel(wav: torch.Tensor, sample_rate: int = CODEC_SAMPLE_RATE, n_fft: int = 2048, bands: int = 128):
    """(bands, frames) numpy log10 mel spectrogram of the channel mean, for the report's pictures
    (hop n_fft / 4, the finest-but-one scale of :func:`mel_distance`)."""
    basis = slaney_mel_basis(sample_rate, n_fft, bands, 0.0, sample_rate / 2)
    mono = wav.float().mean(0, keepdim=True)
    mel = torch.cat([torch.einsum("mf,cft->cmt", basis, m.abs()) for m in _spectra(mono, n_fft, n_fft, n_fft // 4)], -1)
    return np.log10(np.maximum(mel[0].numpy(), MEL_FLOOR))
