"""The codec: loads the three checkpoints and runs the official window schedules.

``sound2code``: 48 kHz stereo -> one stream of 14-bit codes at 25 Hz.
``code2sound``: codes -> 48 kHz stereo, 40.96 s windows of flow-matching latents, VAE, vocoder.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import audio, tokens
from .checks import MAX_BATCH, MAX_STEPS, check_count, check_generator, check_guidance
from .checkpoint import DECODER_STAGES, DEFAULT_REPO, ENCODER_STAGES, Checkpoints, resolve_files, roles_of
from .errors import ArgumentError, AudioError, CheckpointError, NumericalError


# The precisions a codec runs in, by the names the command line, fingerprints and messages use.
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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
    encoder_batch_size: int = 3
    layer: int = 6  # MuQ hidden_states index the quantizer reads (official layer_num=7 minus one)
    window_codes: int = 1024  # decoder window: 40.96 s, 512 latent frames
    hop_codes: int = 768
    codes_per_latent: int = 2
    prompt_seconds: float = 10.24  # longest prompt used
    prompt_long_start: float = 20.48  # prompts longer than prompt_long_limit are read from here
    prompt_long_limit: float = 30.76
    code2sound_steps: int = 20
    sound2sound_steps: int = 50
    guidance_scale: float = 1.5

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


def _repeat_to(x: torch.Tensor, n: int) -> torch.Tensor:
    """Concatenate ``x`` with itself (doubling, as the official code does) until it is >= n long."""
    while x.shape[-1] < n:
        x = torch.cat([x, x], -1)
    return x


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

    # ------------------------------------------------------------------------------------------
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
        How each stage is read from the files is the table ``checkpoint.STAGES``.
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

    # ------------------------------------------------------------------------------------------
    # Encoding
    # ------------------------------------------------------------------------------------------
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
        wav = self._audio(audio, sample_rate)
        return self._encode(wav, check_count("batch_size", batch_size, self.config.encoder_batch_size, MAX_BATCH))

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

    def _require_encoder(self):
        if self.muq is None:
            raise CheckpointError("This MuCodec was loaded with decoder_only=True; load it again without it to "
                                  "encode audio or use a prompt.")

    def encoder_windows(self, wav: torch.Tensor) -> tuple["EncoderWindows", int, int]:
        """(2, N) float32 at 48 kHz -> (its encoder windows, how many of them are encoded, codes kept).

        Windows encode independently of their batch, so packing the first ``count`` windows of several
        clips into shared batches and cutting each clip's codes to ``num_codes`` equals :meth:`_encode`.
        """
        self._require_encoder()
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
        self._require_encoder()
        c = self.config
        mono = audio.prepare_muq_input(x, c.channel_peak, c.sample_rate, self.muq.cfg.sample_rate)
        hidden = self.muq(mono)  # (B, T, 1024)
        # one cheap check per stage and batch: damaged weights must not become a token file of garbage
        self._check_finite(hidden, "muq", "The MuQ encoder")
        codes, z_e = self.quantizer.encode(hidden.transpose(1, 2))
        self._check_finite(z_e, "quantizer", "The quantizer")
        return codes

    # ------------------------------------------------------------------------------------------
    # Decoding
    # ------------------------------------------------------------------------------------------
    def _require_decoder(self):
        if self.flow is None:
            raise CheckpointError("This MuCodec was loaded with encoder_only=True; load it again without it to decode.")

    @torch.inference_mode()
    def code2sound(self, codes, *, num_steps: int | None = None, guidance_scale: float | None = None,
                   prompt=None, prompt_sample_rate: int | None = None, seed: int | None = None,
                   generator: torch.Generator | None = None, noise=None,
                   fast_vocoder: bool = True) -> torch.Tensor:
        """Codes -> audio (2, T * 1920) float32 at 48 kHz on the CPU, as the official ``code2sound``.

        ``codes``: LongTensor (1, 1, T), (1, T) or (T,) of integers in [0, 16384), or the path of a
        ``.mct`` token file (the output is then cut to the length of the audio it was made from).
        ``num_steps`` Euler steps per window (default 20, the official value); classifier-free
        ``guidance_scale`` >= 1 (default 1.5; 1 turns guidance off; the official code ignores its
        argument and always uses 1.5). ``prompt``: reference audio (a path, or a waveform at
        ``prompt_sample_rate``, default 48 kHz) whose first 10.24 s start the first window.
        ``seed`` (or a CPU ``generator``) makes decoding reproducible; draws follow the official
        order. ``noise``: one (1, 32, 512, 32) tensor per window, the initial noise of each window,
        for bit-exact comparison with the official code. ``fast_vocoder`` (default) computes each mel
        frame once (plus the chunk edges) instead of running the official overlapping vocoder chunks:
        ~2.5x less vocoder work, equal to the official chunks up to float rounding (~1e-6);
        ``fast_vocoder=False`` runs the official schedule.
        """
        return torch.cat(list(self.iter_decode(
            codes, num_steps=num_steps, guidance_scale=guidance_scale, prompt=prompt,
            prompt_sample_rate=prompt_sample_rate, seed=seed, generator=generator, noise=noise,
            fast_vocoder=fast_vocoder)), -1)

    def iter_decode(self, codes, *, num_samples: int | None = None, num_steps: int | None = None,
                    guidance_scale: float | None = None, prompt=None, prompt_sample_rate: int | None = None,
                    seed: int | None = None, generator: torch.Generator | None = None, noise=None,
                    fast_vocoder: bool = True):
        """:meth:`code2sound` as a stream: yields (2, n) float32 CPU pieces of the output in order, one per
        decoder window, so a long song never has to be held whole (``decode_file`` writes them as they
        come). ``num_samples`` cuts the output shorter (a token file's own length is applied anyway).
        Arguments are checked before any work starts.
        """
        self._require_decoder()
        c = self.config
        codes, limit = self._codes(codes)
        if num_samples is not None:
            limit = min(limit, check_count("num_samples", num_samples, None, None))
        opts = DecodeOptions(
            num_steps=check_count("num_steps", num_steps, c.code2sound_steps, MAX_STEPS),
            guidance_scale=check_guidance(guidance_scale, c.guidance_scale),
            generator=check_generator(seed, generator),
            fast_vocoder=bool(fast_vocoder))
        if prompt is not None:
            self._require_encoder()
            prompt = self.prepare_prompt(prompt, sample_rate=prompt_sample_rate)
        windows = self.decode_windows(codes.shape[-1] + (self._prompt_codes(prompt) if prompt is not None else 0))
        noise = self._check_noise(noise, len(windows))
        return self._decode(codes, limit, opts, prompt, noise)

    def _decode(self, codes: torch.Tensor, limit: int, opts: "DecodeOptions", prompt, noise):
        """Generator behind :meth:`iter_decode`; arguments are already checked.

        Model work runs in inference mode window by window (a mode held across ``yield`` would leak
        into the caller's code between pieces).
        """
        song = SongDecode(self, codes, limit, opts.generator, prompt, noise)
        bar = tqdm(total=len(song.starts) * opts.num_steps, desc="decode", unit="step", disable=not self.progress,
                   leave=False)
        while not song.done:
            for pieces in self.decode_step([song], opts, callback=lambda *a: bar.update(1)):
                yield from pieces
        bar.close()

    def start_decode(self, codes, *, num_samples: int | None = None, seed: int | None = None,
                     generator: torch.Generator | None = None, where: str = "codes") -> "SongDecode":
        """One song's decode as a :class:`SongDecode`, for :meth:`decode_step` batches of several songs.

        Arguments as :meth:`iter_decode` (no prompt or injected noise); ``where`` names the codes in errors.
        A song stepped in any batch gives
        what ``code2sound(codes, seed=seed)`` gives alone, up to the batch-size dependence of the matrix
        kernels (see ``tests/test_batch_decode.py``)."""
        self._require_decoder()
        codes, limit = self._codes(codes, where)
        if num_samples is not None:
            limit = min(limit, check_count("num_samples", num_samples, None, None))
        return SongDecode(self, codes, limit, check_generator(seed, generator))

    def decode_options(self, *, num_steps: int | None = None, guidance_scale: float | None = None,
                       fast_vocoder: bool = True) -> "DecodeOptions":
        """Checked settings shared by every song of a :meth:`decode_step` batch."""
        return DecodeOptions(num_steps=check_count("num_steps", num_steps, self.config.code2sound_steps, MAX_STEPS),
                             guidance_scale=check_guidance(guidance_scale, self.config.guidance_scale),
                             generator=None, fast_vocoder=bool(fast_vocoder))

    def decode_step(self, songs: list["SongDecode"], opts: "DecodeOptions", callback=None) -> list[list[torch.Tensor]]:
        """The next window of each unfinished song, as one batch through the flow decoder (batch 2B with
        guidance), then each song's window through the VAE and vocoder on its own (one window's VAE
        activations are GBs; a batch would multiply the peak for no gain on a device one window already
        fills). Returns, per song, the (2, n) float32 CPU pieces of its output that became final."""
        inputs = [s.window_inputs() for s in songs]
        codes, true_latents, x0 = (torch.cat([i[j] for i in inputs]) for j in (0, 1, 3))
        incontext = [i[2] for i in inputs]
        latents = self.decode_window(codes, true_latents, incontext[0] if len(songs) == 1 else incontext, x0, opts,
                                     callback=callback)
        out = []
        for song, lat in zip(songs, latents.split(1)):
            # the song's end can lie inside the window: the vocoder skips what cannot reach it
            wav = self.latents_to_wave(song.audible(lat), opts.fast_vocoder, num_samples=song.remaining).cpu()
            out.append(song.take(lat, wav))
        return out

    def decode_windows(self, n: int) -> list[int]:
        """Start (in codes) of each decoder window for ``n`` codes: windows of 1024 codes every 768."""
        c = self.config
        return list(range(0, c.padded_codes(n) - c.hop_codes, c.hop_codes))

    @torch.inference_mode()
    def decode_window(self, codes: torch.Tensor, true_latents: torch.Tensor, incontext: int, x0: torch.Tensor,
                      opts: "DecodeOptions", callback=None) -> torch.Tensor:
        """One window of B songs: codes (B, 1, 1024), in-context latents and initial noise (B, 32, 512, 32),
        ``incontext`` prefix frames (one int, or one per song) -> latents (B, 32, 512, 32)."""
        z_q, _ = self.quantizer.from_codes(codes)
        with self._autocast(), self._visiting(self.flow):
            latents = self.flow.sample(z_q, true_latents, self.config.window_latents, incontext, x0, opts.num_steps,
                                       opts.guidance_scale, callback=callback).float()
        self._check_finite(latents, "flow", "The flow decoder")
        return latents

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
        self._check_finite(wav, "audioldm", "The VAE and vocoder")
        return wav

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

    def _check_finite(self, x: torch.Tensor, source: str, stage: str) -> None:
        if not bool(torch.isfinite(x).all()):
            where = self._sources.get(source, f"the {source} checkpoint")
            dtype = {"flow": self.dtype, "audioldm": self.audioldm_dtype}.get(source, torch.float32)
            hint = (f"run in float32 (this run uses {dtype_name(dtype)}), or check {where}"
                    if dtype != torch.float32 else f"{where} is damaged; download it again")
            raise NumericalError(f"{stage} produced NaN or infinite values; {hint}.")

    # ------------------------------------------------------------------------------------------
    # Inputs: audio, codes, prompt, noise
    # ------------------------------------------------------------------------------------------
    def _audio(self, x, sample_rate) -> torch.Tensor:
        """A path or a waveform -> (2, N) float32 at the codec rate, by the rules of ``audio.load_audio``."""
        if isinstance(x, (str, os.PathLike)):
            if sample_rate is not None:
                raise ArgumentError(f"sample_rate is for waveforms; the file {os.fspath(x)} carries its own rate, "
                                    f"so leave sample_rate out.")
            return audio.load_audio(x, self.sample_rate)
        return audio.to_stereo(x, sample_rate, self.sample_rate)

    def _codes(self, codes, where: str = "codes") -> tuple[torch.Tensor, int]:
        """Codes or a token file -> (LongTensor (1, 1, T), output length limit in samples)."""
        if isinstance(codes, (str, os.PathLike)):
            codes, header = tokens.load_codes(codes, expect=self.token_spec)
            return codes, header["num_samples"]
        codes = tokens.validate_codes(codes, self.codebook_size, where=where, num_codebooks=1)
        return codes, codes.shape[-1] * self.config.samples_per_code

    @property
    def token_spec(self) -> dict:
        """What a token file must have been made with to be decoded by this model."""
        return {"frame_rate": self.frame_rate, "codebook_size": self.codebook_size, "sample_rate": self.sample_rate,
                "layer": self.layer, "num_codebooks": 1}

    def prepare_prompt(self, prompt, *, sample_rate: int | None = None) -> "Prompt":
        """Check a prompt once (path or waveform) -> the :class:`Prompt` :meth:`code2sound` accepts as well.

        Only the part the decoder reads is kept (10.24 s, from 20.48 s on for prompts over 30.76 s,
        as the official code). Too short a prompt (under 2 codes' worth) is an error naming it.
        """
        if isinstance(prompt, Prompt):
            return prompt
        c = self.config
        what = f"The prompt {os.fspath(prompt)}" if isinstance(prompt, (str, os.PathLike)) else "The prompt waveform"
        x = self._audio(prompt, sample_rate)
        sr = c.sample_rate
        if x.shape[-1] < int(c.prompt_long_limit * sr):
            x = x[:, : int(c.prompt_seconds * sr)]
        else:
            x = x[:, int(c.prompt_long_start * sr): int((c.prompt_long_start + c.prompt_seconds) * sr)]
        shortest = c.codes_per_latent * c.samples_per_code  # one latent frame
        if x.shape[-1] < shortest:
            raise AudioError(f"{what} is {x.shape[-1] / sr:.3f} s long; a prompt needs at least "
                             f"{shortest / sr:.2f} s of audio.")
        return Prompt(x.contiguous())

    def _mel_frames_per_latent(self) -> int:
        return self.vae.cfg.downsampling if self.vae is not None else 1

    def _prompt_codes(self, prompt: "Prompt") -> int:
        """Codes the prompt adds in front of the stream (2 per prompt latent frame)."""
        frames = prompt.wav.shape[-1] // audio.TacotronConfig().hop_length + 1
        return self.config.codes_per_latent * (frames // self._mel_frames_per_latent())

    @torch.inference_mode()
    def _prompt_latents(self, prompt: "Prompt", generator):
        """Prompt -> (latents (1, 32, Tp, 32), codes (1, 1, 2 Tp)) as the official code2sound."""
        c = self.config
        x = prompt.wav.to(self.device, torch.float32)
        log_mel, _ = audio.tacotron_log_mel(x)  # (2, frames, 256)
        encoder = self._vae_encoder()
        latents = []
        for ch in range(log_mel.shape[0]):  # one channel at a time, as the official code
            mean, logvar = encoder.encode(log_mel[ch][None, None])
            eps = _randn(mean.shape, generator=generator, device=self.device)
            latents.append(encoder.sample_latent(mean, logvar, eps))
        lat = torch.cat(latents, 0)
        lat = lat.reshape(lat.shape[0] // 2, -1, lat.shape[2], lat.shape[3])
        codes = self._encode(x, c.encoder_batch_size)[..., : c.codes_per_latent * lat.shape[2]]
        return lat, codes

    def _check_noise(self, noise, windows: int):
        if noise is None:
            return None
        if isinstance(noise, torch.Tensor) or not isinstance(noise, (list, tuple)):
            raise ArgumentError("noise must be a list with one tensor per decoder window.")
        shape = (1, self.flow.cfg.latent_channels, self.config.window_latents, self.flow.cfg.freq_bins)
        if len(noise) < windows:
            raise ArgumentError(f"noise holds {len(noise)} tensors but this decode runs {windows} windows; "
                                f"pass one per window.")
        for k, t in enumerate(noise[:windows]):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point() or tuple(t.shape) != shape:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ArgumentError(f"noise[{k}] must be a float tensor of shape {shape}, got {got}.")
        return list(noise)

    def _vae_encoder(self):
        if self._encoder_vae is None:
            if self._audioldm_path is None:
                raise CheckpointError("prompting needs the VAE encoder of tools/audioldm_48k.pth, which was not loaded.")
            ckpts = Checkpoints({"audioldm": self._audioldm_path})
            self._encoder_vae = ckpts.load(["vae_encoder"])["vae_encoder"].eval().to(self.device)
            self._sources.update(ckpts.sources(["vae_encoder"]))
        return self._encoder_vae

    @torch.inference_mode()
    def sound2sound(self, audio_in, *, sample_rate: int | None = None, batch_size: int | None = None,
                    num_steps: int | None = None, guidance_scale: float | None = None, prompt=None,
                    prompt_sample_rate: int | None = None, seed: int | None = None,
                    generator: torch.Generator | None = None, noise=None, fast_vocoder: bool = True) -> torch.Tensor:
        """The official round trip ``code2sound(sound2code(audio))`` with 50 steps by default, cut to the
        input's length: (2, N) float32 at 48 kHz. Arguments as in :meth:`sound2code` and :meth:`code2sound`."""
        wav = self._audio(audio_in, sample_rate)
        codes = self.sound2code(wav, batch_size=batch_size)
        steps = self.config.sound2sound_steps if num_steps is None else num_steps
        return torch.cat(list(self.iter_decode(
            codes, num_samples=wav.shape[-1], num_steps=steps, guidance_scale=guidance_scale, prompt=prompt,
            prompt_sample_rate=prompt_sample_rate, seed=seed, generator=generator, noise=noise,
            fast_vocoder=fast_vocoder)), -1)

    # ------------------------------------------------------------------------------------------
    # Files
    # ------------------------------------------------------------------------------------------
    def encode_file(self, src, dst, *, batch_size: int | None = None) -> Path:
        """Audio file ``src`` -> token file ``dst`` (``.mct``, written atomically). Returns ``dst``.

        The token file records the length of the audio at 48 kHz (decoders cut to it) and the rate
        and channel count of ``src`` as stored.
        """
        info = audio.audio_info(src)
        wav = audio.load_audio(src, self.sample_rate)
        codes = self.sound2code(wav, batch_size=batch_size)
        return tokens.save_codes(dst, codes, num_samples=wav.shape[-1], original_sample_rate=info.sample_rate,
                                 original_channels=info.channels, **self._token_fields())

    def decode_file(self, src, dst, **options) -> Path:
        """Token file ``src`` -> 48 kHz stereo ``dst`` (32-bit float WAV; 24-bit FLAC when it ends in .flac),
        written window by window into a temporary file renamed at the end (a failure leaves nothing).
        ``options`` as :meth:`code2sound`."""
        return self._write(dst, self.iter_decode(src, **options))

    def reconstruct_file(self, src, dst, *, batch_size: int | None = None, num_steps: int | None = None,
                         **options) -> Path:
        """Audio file ``src`` -> encoded and decoded (the official ``sound2sound``, 50 steps) -> WAV ``dst``,
        cut to the input's length and written as :meth:`decode_file` does."""
        wav = audio.load_audio(src, self.sample_rate)
        codes = self.sound2code(wav, batch_size=batch_size)
        n = wav.shape[-1]
        del wav  # the decoder never needs the input again: hold only the codes
        steps = self.config.sound2sound_steps if num_steps is None else num_steps
        return self._write(dst, self.iter_decode(codes, num_samples=n, num_steps=steps, **options))

    def _write(self, dst, pieces) -> Path:
        # the name says the format: .flac is FLAC (24-bit), anything else float WAV
        fmt = "flac" if Path(dst).suffix.lower() == ".flac" else "wav"
        with audio.audio_writer(dst, self.sample_rate, 2, fmt) as write:
            for piece in pieces:
                write(piece)
        return Path(dst)

    def _token_fields(self) -> dict:
        return {k: v for k, v in self.token_spec.items() if k != "num_codebooks"}


class SongDecode:
    """One song's decode as a sequence of windows: what :meth:`MuCodec.code2sound` carries from one window
    to the next (codes, the song's own generator, the previous window's latents, the crossfade).

    Noise is drawn from the song's generator in the official order (the first window's in-context
    latents, the prompt's VAE samples, then per window its fresh in-context frames and its initial
    noise), so batching songs together never changes what any song draws.
    """

    def __init__(self, codec: MuCodec, codes: torch.Tensor, limit: int, generator=None, prompt=None, noise=None):
        c = codec.config
        self.codec, self.generator, self.noise = codec, generator, noise
        self.shape = (1, codec.flow.cfg.latent_channels, c.window_latents, codec.flow.cfg.freq_bins)
        codes = codes.to(codec.device)
        self._first = self._randn(self.shape)
        self.prompt_frames = prompt_codes = 0
        if prompt is not None:
            prompt_latent, prompt_code = codec._prompt_latents(prompt, generator)
            self.prompt_frames = prompt_latent.shape[2]
            self._first = torch.cat([prompt_latent, self._first[:, :, self.prompt_frames:]], 2)
            prompt_codes = prompt_code.shape[-1]
            codes = torch.cat([prompt_code.to(codec.device), codes], -1)
        # the official expression (1920 samples per code), kept in float arithmetic
        self.remaining = min(limit, int((codes.shape[-1] - prompt_codes) / (4 * c.frame_rate) * 4 * c.sample_rate))
        self.num_samples = self.remaining
        self.starts = codec.decode_windows(codes.shape[-1])
        padded = c.padded_codes(codes.shape[-1])
        self.codes = _repeat_to(codes, padded)[..., :padded]
        self.joiner = OverlapAdd(c.window_codes * c.samples_per_code, c.hop_codes * c.samples_per_code)
        self.window, self.prev, self.done = 0, None, False

    def _randn(self, shape) -> torch.Tensor:
        return _randn(shape, generator=self.generator, device=self.codec.device)

    def window_inputs(self):
        """(codes (1, 1, 1024), in-context latents (1, 32, 512, 32), prefix frames, initial noise) of the
        next window; draws that window's noise."""
        c, k = self.codec.config, self.window
        if k == 0:
            true_latents, incontext = self._first, self.prompt_frames
        else:
            overlap = c.overlap_latents
            fresh = self._randn(self.shape[:2] + (self.shape[2] - overlap, self.shape[3]))
            true_latents, incontext = torch.cat([self.prev[:, :, -overlap:], fresh], 2), overlap
        x0 = self.noise[k].to(self.codec.device, torch.float32) if self.noise is not None else self._randn(self.shape)
        start = self.starts[k]
        return self.codes[..., start:start + c.window_codes], true_latents, incontext, x0

    def audible(self, latents: torch.Tensor) -> torch.Tensor:
        """The part of a window's latents that becomes sound (the prompt's frames do not)."""
        return latents[:, :, self.prompt_frames:] if self.window == 0 else latents

    def take(self, latents: torch.Tensor, wav: torch.Tensor) -> list[torch.Tensor]:
        """Record the finished window; returns the pieces of output that became final."""
        last = self.window == len(self.starts) - 1
        pieces = []
        for piece in self.joiner.add(wav, last=last):
            piece = piece[:, :self.remaining]
            self.remaining -= piece.shape[-1]
            if piece.shape[-1]:
                pieces.append(piece)
        self.prev, self.window = latents, self.window + 1
        # later windows cannot change what was already given out
        self.done = last or self.remaining <= 0
        return pieces

    @property
    def windows(self) -> int:
        return len(self.starts)


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
        self.x = _repeat_to(x, self.step)  # only short clips grow: to at most twice one window
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


@dataclass(frozen=True)
class DecodeOptions:
    """Checked decoding settings of one call."""

    num_steps: int
    guidance_scale: float
    generator: torch.Generator | None
    fast_vocoder: bool


@dataclass(frozen=True)
class Prompt:
    """A checked prompt: the part of the reference audio the decoder reads, (2, N) float32 at 48 kHz."""

    wav: torch.Tensor


class OverlapAdd:
    """Joins decoder windows of ``window`` samples placed every ``hop`` samples, as the official code.

    Each overlap is crossfaded (:func:`audio.crossfade`); a window shorter than ``window`` counts as
    zero-padded (the official output buffer starts as zeros). Samples are given out as soon as no
    later window can change them, so a decode holds at most one window of audio.
    """

    def __init__(self, window: int, hop: int):
        if not window - hop <= hop <= window:
            raise ValueError(f"hop {hop} must lie in [{window - hop}, {window}]: overlaps may not span two windows")
        self.window, self.hop = window, hop
        self._tail = None  # the part of the last window the next one crossfades into

    def add(self, wav: torch.Tensor, last: bool):
        """Add the next window (C, <= window); yields the pieces that became final."""
        wav = wav[:, : self.window]
        if wav.shape[-1] < self.window:
            wav = torch.nn.functional.pad(wav, (0, self.window - wav.shape[-1]))
        if self._tail is not None:
            ov = self._tail.shape[-1]
            wav = torch.cat([audio.crossfade(self._tail, wav[:, :ov]), wav[:, ov:]], -1)
        if last:
            self._tail = None
            yield wav
            return
        self._tail = wav[:, self.hop:]
        yield wav[:, : self.hop]


def _randn(shape, generator, device) -> torch.Tensor:
    """Standard normals drawn on the CPU (the official draw order and values), then moved."""
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device)
