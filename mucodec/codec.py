"""The codec: loads the three checkpoints, runs the official encoder window schedule and the decoder's stages.

``sound2code``: 48 kHz stereo -> one stream of 14-bit codes at 25 Hz.
``code2sound``: codes -> 48 kHz stereo, 40.96 s windows of flow-matching latents, VAE, vocoder. The windows'
schedule lives in ``decoding.py``, which runs the stage calls here (``decode_window``, ``latents_to_wave``).
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from . import audio, decoding
from .settings import DTYPES, DecodingOptions, EncodingOptions, build  # noqa: F401  (DTYPES: its old home)
from .checkpoint import DEFAULT_REPO, resolve_files
from .errors import ArgumentError, CheckpointError, NumericalError
from .stages import DECODER_STAGES, ENCODER_STAGES, Checkpoints, roles_of


# The precisions a codec runs in, by the names the command line, fingerprints and messages use.


def dtype_name(dtype) -> str:
    """torch.bfloat16 (or its name) -> 'bfloat16'."""
    return str(dtype).removeprefix("torch.")


@dataclass
class CodecConfig:
    """Time structure of the codec (the official values; tiny test models keep them)."""

    sample_rate: int = audio.CODEC_SAMPLE_RATE
    frame_rate: int = 25  # codes per second
    input_peak: float = 0.8  # sound2code: items louder than this are scaled down to it
    channel_peak: float = 0.9  # per-channel limit inside each encoder window
    encoder_window: int = 1966080  # 40.96 s of audio -> 1024 codes
    encoder_window_extra: int = 480  # the official encoder windows are 480 samples longer (quirk: 10 ms slip)
    layer: int = 6  # MuQ hidden_states index the quantizer reads (official layer_num=7 minus one)
    window_codes: int = 1024  # decoder window: 40.96 s, 512 latent frames
    hop_codes: int = 768
    codes_per_latent: int = 2
    prompt_seconds: float = 10.24  # longest prompt used
    prompt_long_start: float = 20.48  # prompts longer than prompt_long_limit are read from here
    prompt_long_limit: float = 30.76

    @property
    def samples_per_code(self) -> int:
        return self.sample_rate // self.frame_rate

    @property
    def overlap_codes(self) -> int:
        return self.window_codes - self.hop_codes

    @property
    def window_latents(self) -> int:
        return self.window_codes // self.codes_per_latent

    @property
    def overlap_latents(self) -> int:
        return self.overlap_codes // self.codes_per_latent

    def padded_codes(self, n: int) -> int:
        """Codes a decode of ``n`` codes runs on: >= one window, then whole hops after the overlap.

        The official test ``(n - 128) % 768`` mixes latent frames with codes and leaves a short or
        missing last window for e.g. n = 1664; this uses the overlap in codes, so every code is decoded.
        """
        n = max(n, self.window_codes)
        return math.ceil((n - self.overlap_codes) / self.hop_codes) * self.hop_codes + self.overlap_codes


def pick_device(name: str | None = "auto") -> str:
    """'auto' (or None) -> cuda if available, else mps, else cpu; other names are checked and returned."""
    if name is None or name == "auto":
        return default_device()
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ArgumentError(f"Unknown device {name!r}; use cuda, cuda:N, mps, cpu or auto.") from None
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ArgumentError(f"Device {name!r} is not supported; use cuda, cuda:N, mps, cpu or auto.")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ArgumentError(f"Device {name!r}: CUDA is not available on this machine; use cpu.")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ArgumentError(f"Device {name!r} does not exist: this machine has {torch.cuda.device_count()} GPU(s).")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ArgumentError(f"Device {name!r}: MPS is not available on this machine; use cpu.")
    return str(name)


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


class MuCodec:
    """MuCodec inference: ``sound2code``, ``code2sound``, ``sound2sound``.

    Build it with :meth:`from_pretrained`. All audio is float32 at 48 kHz, shape (2, N).
    """

    def __init__(self, muq, quantizer, flow=None, vae=None, vocoder=None, *,
                 config: CodecConfig | None = None, device="cpu", dtype=torch.float32,
                 audioldm_path=None, progress=False, offload=False, audioldm_dtype=torch.float32):
        self.config = config or CodecConfig()
        self.device = torch.device(device)
        self.dtype = dtype
        # the VAE and vocoder (the AudioLDM file) decode in float32 unless asked: reduced precision makes them
        # faster on a CPU with native bf16 but moves the audio further than a bf16 DiT does (docs/speed.md)
        self.audioldm_dtype = audioldm_dtype
        self.progress = progress
        # offload: the flow decoder, VAE and vocoder wait in CPU memory and visit the device only while they
        # run, so the device holds one stage's weights at a time (what lets a decode fit a small GPU)
        self.offload = bool(offload) and self.device.type != "cpu"
        home = torch.device("cpu") if self.offload else self.device
        self._sources: dict[str, str] = {}  # stage -> checkpoint file it was loaded from, for error messages
        self.muq = muq.eval().to(self.device) if muq is not None else None
        self.quantizer = quantizer.eval().to(self.device)
        self.flow = flow.eval().to(home) if flow is not None else None
        if self.flow is not None and self._autocasts():
            self.flow.estimator.store_linears_in(dtype)
        self.vae = vae.eval().to(home) if vae is not None else None
        self.vocoder = vocoder.eval().to(home) if vocoder is not None else None
        self._audioldm_path = audioldm_path
        self._encoder_vae = None  # the VAE encoder half, loaded on the first prompt

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    @property
    def frame_rate(self) -> int:
        return self.config.frame_rate

    @property
    def codebook_size(self) -> int:
        return self.quantizer.cfg.codebook_size

    @property
    def layer(self) -> int:
        return self.config.layer

    @classmethod
    def from_pretrained(cls, path_or_repo: str | os.PathLike | None = None, device: str | None = None,
                        dtype: torch.dtype = torch.float32, encoder_only: bool = False, layer: int | None = None,
                        progress: bool = False, revision: str | None = None, decoder_only: bool = False,
                        offload: bool = False, audioldm_dtype: torch.dtype = torch.float32) -> "MuCodec":
        """Load the official checkpoints.

        ``path_or_repo``: a folder laid out like the official release (``tools/audioldm_48k.pth``,
        ``muq_dev/muq.pt``, ``ckpt/mucodec.pt``) or a hub repo id (default ``MuCodec/mucodec``,
        downloaded into the huggingface_hub cache; ``revision`` picks a branch, tag or commit of it).
        ``encoder_only`` loads MuQ and the quantizer only (no DiT, VAE or vocoder weights are read);
        ``decoder_only`` everything but MuQ (decoding a token library; no prompts, which need the encoder).
        ``offload`` keeps the decoder's stages in CPU memory except while each runs on the device.
        ``dtype``: precision of the flow decoder's DiT (autocast); ``audioldm_dtype``: of the VAE and vocoder.
        ``layer``: MuQ hidden state the codes are taken from (the official checkpoint was trained on 6).
        How each stage is read from the files is the table ``stages.STAGES``.
        """
        if path_or_repo is not None and not isinstance(path_or_repo, (str, os.PathLike)):
            raise ArgumentError(f"path_or_repo must be a folder or a hub repo id, got {path_or_repo!r}.")
        device = pick_device(device)
        if encoder_only and decoder_only:
            raise ArgumentError("Pass encoder_only or decoder_only, not both.")
        stages = ENCODER_STAGES if encoder_only else ENCODER_STAGES + DECODER_STAGES
        if decoder_only:
            stages = tuple(s for s in stages if s != "muq")
        files = resolve_files(path_or_repo if path_or_repo is not None else DEFAULT_REPO, roles_of(stages), revision)
        ckpts = Checkpoints(files)
        config = ckpts.sizes("mucodec", "codec", CodecConfig)
        if layer is not None:
            config.layer = layer
        ckpts.layer = config.layer
        m = ckpts.load(stages)
        codec = cls(m.get("muq"), m["quantizer"], m.get("flow"), m.get("vae"), m.get("vocoder"), config=config,
                    device=device, dtype=dtype, audioldm_path=files.get("audioldm"), progress=progress,
                    offload=offload, audioldm_dtype=audioldm_dtype)
        codec._sources = ckpts.sources(stages)
        return codec

    # ---- encoding --------------------------------------------------------------------------------
    @torch.inference_mode()
    def sound2code(self, audio, *, sample_rate: int | None = None, batch_size: int | None = None) -> torch.Tensor:
        """Audio -> codes, exactly as the official ``sound2code``.

        ``audio``: the path of an audio file (any format soundfile reads; resampled to 48 kHz, mono
        duplicated), or a float tensor/array (2, N), (1, N) or (N,) at ``sample_rate`` (default 48000).
        ``batch_size``: 40.96 s windows encoded at once (default 3, the official value).
        Returns a LongTensor (1, 1, T) on the CPU with ``T = int(N / 48000 * 25) + 1``: the whole clip
        is scaled to a peak of at most 0.8, cut into windows of 40.96 s + 10 ms (short clips are
        repeated), encoded ``batch_size`` windows at a time, and the codes cut to T.
        """
        wav = self.read_audio(audio, sample_rate)
        return self._encode(wav, build(EncodingOptions, batch_size=batch_size).batch_size)

    def _encode(self, wav: torch.Tensor, batch_size: int) -> torch.Tensor:
        """(2, N) float32 at 48 kHz -> LongTensor (1, 1, T): the official encoder window schedule."""
        windows, count, num_codes = self.encoder_windows(wav)
        codes = []
        bar = tqdm(total=count, desc="encode", unit="window", disable=not self.progress, leave=False)
        for i in range(0, count, batch_size):
            codes.append(self.encode_windows(windows.batch(i, min(i + batch_size, count))))
            bar.update(codes[-1].shape[0])
        bar.close()
        return torch.cat(codes, 0).reshape(1, 1, -1)[..., :num_codes].cpu()

    def require_encoder(self):
        if self.muq is None:
            raise CheckpointError("This MuCodec was loaded with decoder_only=True; load it again without it to "
                                  "encode audio or use a prompt.")

    def encoder_windows(self, wav: torch.Tensor) -> tuple["EncoderWindows", int, int]:
        """(2, N) float32 at 48 kHz -> (its encoder windows, how many of them are encoded, codes kept).

        Windows encode independently of their batch, so packing the first ``count`` windows of several
        clips into shared batches and cutting each clip's codes to ``num_codes`` equals :meth:`_encode`.
        """
        self.require_encoder()
        c = self.config
        x = wav.to(self.device, torch.float32)
        # float arithmetic exactly as the official code, so the count agrees at every length
        num_codes = int(x.shape[-1] / float(c.sample_rate) * c.frame_rate) + 1
        windows = EncoderWindows(x, c.encoder_window, c.encoder_window_extra, audio.peak_divisor(x, c.input_peak))
        # The official code encodes every window of its layout and cuts the codes to num_codes, so
        # trailing windows whose codes are all cut (e.g. the third of a 40.96 s clip) change nothing.
        count = min(len(windows), -(-num_codes // self.codes_per_window()))
        return windows, count, num_codes

    def codes_per_window(self) -> int:
        """Codes one encoder window gives (1024): its samples at the MuQ rate, in whole MuQ frames."""
        c = self.config
        step = c.encoder_window + c.encoder_window_extra
        return -(-step * self.muq.cfg.sample_rate // c.sample_rate) // self.muq.cfg.samples_per_frame

    def _encoder_chunks(self, x: torch.Tensor) -> torch.Tensor:
        """(2, N) -> (W, 2, window + extra): every window of the official layout at once."""
        windows = EncoderWindows(x, self.config.encoder_window, self.config.encoder_window_extra)
        return windows.batch(0, len(windows))

    @torch.inference_mode()
    def encode_windows(self, x: torch.Tensor) -> torch.Tensor:
        """One batch of encoder windows (B, 2, L) at 48 kHz -> codes (B, 1, T) (official ``fetch_codes_batch``)."""
        self.require_encoder()
        c = self.config
        mono = audio.prepare_muq_input(x, c.channel_peak, c.sample_rate, self.muq.cfg.sample_rate)
        hidden = self.muq(mono)  # (B, T, 1024)
        # one cheap check per stage and batch: damaged weights must not become a token file of garbage
        _check_finite(self, hidden, "muq", "The MuQ encoder")
        codes, z_e = self.quantizer.encode(hidden.transpose(1, 2))
        _check_finite(self, z_e, "quantizer", "The quantizer")
        return codes

    # ---- decoding: decoding.py runs the schedule on the stage calls below ------------------------
    # its one-song functions are methods, the notebook API (a function taking the codec first binds as one)
    code2sound = decoding.code2sound
    iter_decode = decoding.iter_decode
    sound2sound = decoding.sound2sound
    # decoding.iter_decode runs the model work through the codec, so a subclass can replace it
    decode_checked = decoding.decode_checked

    @torch.inference_mode()
    def decode_window(self, codes: torch.Tensor, true_latents: torch.Tensor, incontext: int, x0: torch.Tensor,
                      opts: DecodingOptions, callback=None, check: bool = True) -> torch.Tensor:
        """One window of B songs: codes (B, 1, 1024), in-context latents and initial noise (B, 32, 512, 32),
        ``incontext`` prefix frames (one int, or one per song) -> latents (B, 32, 512, 32).
        ``check=False``: the caller checks each song's latents (:meth:`check_latents`), so that a NaN in one
        song fails that song only."""
        z_q, _ = self.quantizer.from_codes(codes)
        with self._autocast(), self._visiting(self.flow):
            latents = self.flow.sample(z_q, true_latents, self.config.window_latents, incontext, x0, opts.num_steps,
                                       opts.guidance_scale, callback=callback, sampler=opts.sampler,
                                       guidance_interval=opts.guidance_interval, schedule=opts.schedule).float()
        if check:
            self.check_latents(latents)
        return latents

    def check_latents(self, latents: torch.Tensor) -> None:
        """NumericalError if the flow decoder's ``latents`` hold NaN or infinite values."""
        _check_finite(self, latents, "flow", "The flow decoder")

    @torch.inference_mode()
    def latents_to_wave(self, latents: torch.Tensor, fast_vocoder: bool = True,
                        num_samples: int | None = None) -> torch.Tensor:
        """Latents (1, 32, F, 32) -> (2, 480 * 8F) waveform: channels 0-15 left, 16-31 right.

        ``num_samples``: only that many leading samples are wanted (:meth:`HiFiGAN.vocode`); the VAE
        still decodes every frame, as its attention and group norms see the whole window."""
        b, ch, t, f = latents.shape
        with self._autocast(self.audioldm_dtype):
            with self._visiting(self.vae):
                mel = self.vae.decode(latents.reshape(b * 2, ch // 2, t, f).float())
            with self._visiting(self.vocoder):
                wav = self.vocoder.vocode(mel, share_overlaps=fast_vocoder, num_samples=num_samples).float()
        _check_finite(self, wav, "audioldm", "The VAE and vocoder")
        return wav

    def vae_encoder(self):
        """The VAE's encoder half, which only prompts need: loaded from the AudioLDM file on first use."""
        if self._encoder_vae is None:
            if self._audioldm_path is None:
                raise CheckpointError("prompting needs the VAE encoder of tools/audioldm_48k.pth, which was not loaded.")
            ckpts = Checkpoints({"audioldm": self._audioldm_path})
            self._encoder_vae = ckpts.load(["vae_encoder"])["vae_encoder"].eval().to(self.device)
            self._sources.update(ckpts.sources(["vae_encoder"]))
        return self._encoder_vae

    @contextlib.contextmanager
    def _visiting(self, module):
        """With ``offload``: ``module`` on the device for the block, back in CPU memory after it."""
        if not self.offload:
            yield
            return
        module.to(self.device)
        try:
            yield
        finally:
            module.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def _autocasts(self, dtype: torch.dtype | None = None) -> bool:
        return (dtype or self.dtype) != torch.float32 and self.device.type in ("cuda", "cpu")

    def _autocast(self, dtype: torch.dtype | None = None):
        """Autocast to ``dtype`` (default: the flow decoder's) where it applies; float32 runs as it is."""
        if self._autocasts(dtype):
            return torch.autocast(self.device.type, dtype=dtype or self.dtype)
        return contextlib.nullcontext()

    # ---- inputs ----------------------------------------------------------------------------------
    def read_audio(self, x, sample_rate: int | None = None) -> torch.Tensor:
        """A path or a waveform -> (2, N) float32 at the codec rate, by the rules of ``audio.load_audio``."""
        if isinstance(x, (str, os.PathLike)):
            if sample_rate is not None:
                raise ArgumentError(f"sample_rate is for waveforms; the file {os.fspath(x)} carries its own rate, "
                                    f"so leave sample_rate out.")
            return audio.load_audio(x, self.sample_rate)
        return audio.to_stereo(x, sample_rate, self.sample_rate)

    @property
    def token_spec(self) -> dict:
        """What a token file must have been made with to be decoded by this model."""
        return {"frame_rate": self.frame_rate, "codebook_size": self.codebook_size, "sample_rate": self.sample_rate,
                "layer": self.layer, "num_codebooks": 1}


class EncoderWindows:
    """The official encoder windows of a clip, cut out one batch at a time.

    Officially a short clip is doubled until it holds one window of ``window + extra`` samples, then
    the clip is joined to itself once and cut into ``len // window + 1`` windows of ``window + extra``
    samples laid end to end (each window starts 10 ms later than a multiple of 40.96 s: the slip).
    Here the doubled-and-joined signal is never built: a window is sliced from the clip, wrapping
    around to its start, so encoding holds one batch of windows beside the clip, whatever its length.
    The clip's peak normalisation (a division by ``divisor``) is applied per batch: elementwise, so
    the result is the same as dividing the whole clip first.
    """

    def __init__(self, x: torch.Tensor, window: int, extra: int, divisor: torch.Tensor | float = 1.0):
        self.step, self.divisor = window + extra, divisor
        self.x = decoding.repeat_to(x, self.step)  # only short clips grow: to at most twice one window
        self.count = self.x.shape[-1] // window + 1
        if self.count * self.step > 2 * self.x.shape[-1]:  # cannot happen for extra < window
            raise ValueError("encoder windows would run past the doubled clip")

    def __len__(self) -> int:
        return self.count

    def window(self, k: int) -> torch.Tensor:
        """Window ``k`` (2, window + extra)."""
        n = self.x.shape[-1]
        a, b = k * self.step % n, k * self.step % n + self.step
        return self.x[:, a:b] if b <= n else torch.cat([self.x[:, a:], self.x[:, : b - n]], -1)

    def batch(self, first: int, stop: int) -> torch.Tensor:
        """Windows ``first .. stop - 1`` as (B, 2, window + extra)."""
        return torch.stack([self.window(k) for k in range(first, stop)]) / self.divisor


def _check_finite(codec: MuCodec, x: torch.Tensor, source: str, stage: str) -> None:
    """NumericalError naming ``stage``, its checkpoint and the likely fix, if ``x`` holds NaN or infinities."""
    if not bool(torch.isfinite(x).all()):
        where = codec._sources.get(source, f"the {source} checkpoint")
        dtype = {"flow": codec.dtype, "audioldm": codec.audioldm_dtype}.get(source, torch.float32)
        hint = (f"run in float32 (this run uses {dtype_name(dtype)}), or check {where}"
                if dtype != torch.float32 else f"{where} is damaged; download it again")
        raise NumericalError(f"{stage} produced NaN or infinite values; {hint}.")
