"""The codec: loads the three checkpoints and runs the official window schedules.

``sound2code``: 48 kHz stereo -> one stream of 14-bit codes at 25 Hz.
``code2sound``: codes -> 48 kHz stereo, 40.96 s windows of flow-matching latents, VAE, vocoder.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from . import audio
from .checkpoint import (
    DEFAULT_REPO,
    config_of,
    fold_weight_norm,
    load_module,
    read_checkpoint,
    resolve_files,
    skip_init,
    state_dict_of,
    subdict,
)
from .errors import CheckpointError, TokenFileError
from .flow import FlowDecoder, FlowDecoderConfig
from .muq import MuQConfig, MuQEncoder
from .quantizer import Quantizer, QuantizerConfig
from .vae import MelVAE, VAEConfig
from .vocoder import HiFiGAN, VocoderConfig


@dataclass
class CodecConfig:
    """Time structure of the codec (the official values; tiny test models keep them)."""

    sample_rate: int = 48000
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


def _config(cls, d: dict | None):
    """Build a (possibly nested) config dataclass from a plain dict, ignoring unknown keys."""
    d = d or {}
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        v = d[f.name]
        factory = None if f.default_factory is dataclasses.MISSING else f.default_factory
        if isinstance(v, dict) and factory is not None and dataclasses.is_dataclass(factory()):
            v = _config(type(factory()), v)
        elif isinstance(v, list):
            v = tuple(v)
        kwargs[f.name] = v
    return cls(**kwargs)


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

    def __init__(self, muq, quantizer, flow=None, vae=None, vocoder=None, scale_factor=1.0, *,
                 config: CodecConfig | None = None, device="cpu", dtype=torch.float32,
                 audioldm_path=None, progress=False):
        self.config = config or CodecConfig()
        self.device = torch.device(device)
        self.dtype = dtype
        self.progress = progress
        self.muq = muq.eval().to(self.device)
        self.quantizer = quantizer.eval().to(self.device)
        self.flow = flow.eval().to(self.device) if flow is not None else None
        self.vae = vae.eval().to(self.device) if vae is not None else None
        self.vocoder = vocoder.eval().to(self.device) if vocoder is not None else None
        self.scale_factor = float(scale_factor)
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
                        progress: bool = False) -> "MuCodec":
        """Load the official checkpoints.

        ``path_or_repo``: a folder laid out like the official release (``tools/audioldm_48k.pth``,
        ``muq_dev/muq.pt``, ``ckpt/mucodec.pt``) or a hub repo id (default ``MuCodec/mucodec``,
        downloaded into the huggingface_hub cache). ``encoder_only`` loads MuQ and the quantizer only
        (no DiT, VAE or vocoder weights are read). ``layer``: MuQ hidden state the codes are taken
        from (the official checkpoint was trained on 6).
        """
        device = device or default_device()
        roles = ("muq", "mucodec") if encoder_only else ("audioldm", "muq", "mucodec")
        files = resolve_files(path_or_repo if path_or_repo is not None else DEFAULT_REPO, roles)

        codec_obj = read_checkpoint(files["mucodec"], "mucodec.pt")
        codec_state = state_dict_of(codec_obj)
        sizes = config_of(codec_obj)
        config = _config(CodecConfig, sizes.get("codec"))
        if layer is not None:
            config.layer = int(layer)

        muq_obj = read_checkpoint(files["muq"], "muq.pt")
        cfg_model = muq_obj.get("cfg", {}).get("model") if isinstance(muq_obj.get("cfg"), dict) else None
        muq_cfg = MuQConfig.from_fairseq(cfg_model) if isinstance(cfg_model, dict) else MuQConfig()
        muq_state = subdict(state_dict_of(muq_obj), "model.")
        muq_source = files["muq"]
        override = subdict(codec_state, "muencoder.model.")
        if override:  # the official non-strict load of mucodec.pt overwrites MuQ with its own copy
            muq_state.update(override)
            muq_source = f"{files['muq']} / {files['mucodec']}"
        if not 0 < config.layer <= muq_cfg.encoder_depth:
            raise CheckpointError(f"layer {config.layer} does not exist in {files['muq']}: use 1..{muq_cfg.encoder_depth}.")
        with skip_init():
            muq = MuQEncoder(muq_cfg, num_layers=config.layer)
            quantizer = Quantizer(_config(QuantizerConfig, sizes.get("quantizer")))
        load_module(muq, muq_state, muq_source, "model.")
        del muq_obj, muq_state
        load_module(quantizer, fold_weight_norm(subdict(codec_state, "rvq_muencoder_emb.quantizers.0.")),
                    files["mucodec"], "rvq_muencoder_emb.quantizers.0.")
        if encoder_only:
            return cls(muq, quantizer, config=config, device=device, dtype=dtype, progress=progress)

        with skip_init():
            flow = FlowDecoder(_config(FlowDecoderConfig, sizes.get("flow")))
        flow_state = {k: v for k, v in codec_state.items()
                      if k.startswith(("normfeat.", "cond_muencoder_emb.")) or k == "zero_cond_embedding1"}
        flow_state.update(subdict(codec_state, "cfm_wrapper.estimator.", "estimator."))
        load_module(flow, flow_state, files["mucodec"],
                    lambda k: "cfm_wrapper." + k if k.startswith("estimator.") else k)
        del codec_obj, codec_state, flow_state

        vae, vocoder, scale_factor = _load_audioldm(files["audioldm"], with_encoder=False)
        return cls(muq, quantizer, flow, vae, vocoder, scale_factor, config=config, device=device, dtype=dtype,
                   audioldm_path=files["audioldm"], progress=progress)

    # ------------------------------------------------------------------------------------------
    # Encoding
    # ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def sound2code(self, wav, batch_size: int | None = None, sample_rate: int | None = None) -> torch.Tensor:
        """Audio -> codes.

        ``wav``: float tensor (2, N) at 48 kHz, or mono (N,) / (1, N) (duplicated); another
        ``sample_rate`` is resampled first. Returns a LongTensor (1, 1, T) on the CPU with
        ``T = int(N / 48000 * 25) + 1``, exactly as the official ``sound2code``: the whole clip is
        scaled to a peak of at most 0.8, cut into windows of 40.96 s + 10 ms (short clips are
        repeated), encoded ``batch_size`` windows at a time (default 3), and codes cut to T.
        """
        c = self.config
        x = audio.to_stereo(wav, sample_rate or c.sample_rate, c.sample_rate).to(self.device, torch.float32)
        x = audio.peak_normalize(x[None], c.input_peak)[0]
        n = x.shape[-1]
        # float arithmetic exactly as the official code, so the count agrees at every length
        num_codes = int(n / float(c.sample_rate) * c.frame_rate) + 1
        chunks = self._encoder_chunks(x)
        batch_size = batch_size or c.encoder_batch_size
        codes = []
        bar = tqdm(total=len(chunks), desc="encode", unit="window", disable=not self.progress, leave=False)
        for i in range(0, len(chunks), batch_size):
            codes.append(self.encode_windows(chunks[i:i + batch_size]))
            bar.update(min(batch_size, len(chunks) - i))
        bar.close()
        return torch.cat(codes, 0).reshape(1, 1, -1)[..., :num_codes].cpu()

    def _encoder_chunks(self, x: torch.Tensor) -> torch.Tensor:
        """(2, N) -> (W, 2, window + extra): the official repeat-padding and window layout."""
        c = self.config
        step = c.encoder_window + c.encoder_window_extra
        x = _repeat_to(x, step)
        n_win = x.shape[-1] // c.encoder_window + 1
        x = torch.cat([x, x], -1)[:, : n_win * step]
        return x.reshape(2, n_win, step).transpose(0, 1)

    @torch.inference_mode()
    def encode_windows(self, x: torch.Tensor) -> torch.Tensor:
        """One batch of encoder windows (B, 2, L) at 48 kHz -> codes (B, 1, T) (official ``fetch_codes_batch``)."""
        c = self.config
        mono = audio.prepare_muq_input(x, c.channel_peak, c.sample_rate, self.muq.cfg.sample_rate)
        hidden = self.muq(mono)  # (B, T, 1024)
        codes, _ = self.quantizer.encode(hidden.transpose(1, 2))
        return codes

    # ------------------------------------------------------------------------------------------
    # Decoding
    # ------------------------------------------------------------------------------------------
    def _check_codes(self, codes) -> torch.Tensor:
        codes = torch.as_tensor(codes)
        if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise TokenFileError(f"codes must be integers, got {codes.dtype}: pass the LongTensor sound2code returned.")
        if codes.ndim == 1:
            codes = codes[None, None]
        elif codes.ndim == 2:
            codes = codes[None]
        if codes.ndim != 3 or codes.shape[0] != 1 or codes.shape[1] != 1:
            raise TokenFileError(f"codes must have shape (1, 1, T), (1, T) or (T,), got {tuple(codes.shape)}.")
        if codes.shape[-1] == 0:
            raise TokenFileError("codes are empty: there is nothing to decode.")
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi >= self.codebook_size:
            raise TokenFileError(f"codes must lie in [0, {self.codebook_size}), found values in [{lo}, {hi}].")
        return codes.long()

    def _require_decoder(self):
        if self.flow is None:
            raise CheckpointError("this MuCodec was loaded with encoder_only=True: load it again without it to decode.")

    @torch.inference_mode()
    def code2sound(self, codes, num_steps: int | None = None, guidance_scale: float | None = None, prompt=None,
                   generator: torch.Generator | None = None, noise=None, prompt_sample_rate: int | None = None,
                   fast_vocoder: bool = False) -> torch.Tensor:
        """Codes (1, 1, T) -> audio (2, T * 1920) float32 at 48 kHz on the CPU.

        ``num_steps`` Euler steps per window (official default 20), classifier-free ``guidance_scale``
        (default 1.5; the official code ignores its argument and always uses 1.5). ``prompt``: up to
        10.24 s of reference audio whose latents start the first window (as the official
        ``code2sound(prompt=...)``). ``generator`` makes decoding reproducible; its draws follow the
        official order. ``noise``: a list with one (1, 32, 512, 32) tensor per window, the initial
        noise of each window, for bit-exact comparison with the official code. ``fast_vocoder``
        computes each mel frame once (plus the chunk edges) instead of running the official
        overlapping vocoder chunks: ~2.5x less vocoder work, equal up to float rounding (~1e-6).
        """
        self._require_decoder()
        c = self.config
        num_steps = c.code2sound_steps if num_steps is None else int(num_steps)
        guidance_scale = c.guidance_scale if guidance_scale is None else float(guidance_scale)
        if num_steps < 1:
            raise ValueError(f"num_steps must be at least 1, got {num_steps}.")
        codes = self._check_codes(codes).to(self.device)
        F, L = c.window_latents, c.overlap_latents
        lat_shape = (1, self.flow.cfg.latent_channels, F, self.flow.cfg.freq_bins)

        def randn(*shape):
            return torch.randn(shape, generator=generator, dtype=torch.float32).to(self.device)

        first_latent = randn(*lat_shape)
        prompt_frames = prompt_codes = 0
        if prompt is not None:
            prompt_latent, prompt_code = self._prompt(prompt, prompt_sample_rate, generator)
            prompt_frames = prompt_latent.shape[2]
            first_latent[:, :, :prompt_frames] = prompt_latent
            prompt_codes = prompt_code.shape[-1]
            codes = torch.cat([prompt_code.to(self.device), codes], -1)

        n = codes.shape[-1]
        # the official expression (1920 samples per code), kept in float arithmetic
        target_len = int((n - prompt_codes) / (4 * c.frame_rate) * 4 * c.sample_rate)
        padded = c.padded_codes(n)
        codes = _repeat_to(codes, padded)[..., :padded]
        starts = list(range(0, codes.shape[-1] - c.hop_codes, c.hop_codes))
        if noise is not None and len(noise) < len(starts):
            raise ValueError(f"noise holds {len(noise)} tensors but this decode runs {len(starts)} windows.")

        spc = c.samples_per_code
        window_samples, hop_samples = c.window_codes * spc, c.hop_codes * spc
        out = torch.zeros(2, window_samples + (len(starts) - 1) * hop_samples)
        ramp = torch.from_numpy(np.linspace(0, 1, window_samples - hop_samples))
        bar = tqdm(total=len(starts) * num_steps, desc="decode", unit="step", disable=not self.progress, leave=False)
        prev = None
        for k, start in enumerate(starts):
            if k == 0:
                true_latents, incontext = first_latent, prompt_frames
            else:
                true_latents = torch.cat([prev[:, :, -L:], randn(lat_shape[0], lat_shape[1], F - L, lat_shape[3])], 2)
                incontext = L
            x0 = noise[k].to(self.device, torch.float32) if noise is not None else randn(*lat_shape)
            z_q, _ = self.quantizer.from_codes(codes[..., start:start + c.window_codes])
            with self._autocast():
                latents = self.flow.sample(z_q, true_latents, F, incontext, x0, num_steps, guidance_scale,
                                           callback=lambda *a: bar.update(1)).float()
            prev = latents
            if k == 0:
                latents = latents[:, :, prompt_frames:]
            wav = self.latents_to_wave(latents, fast_vocoder)[:, :window_samples].cpu()
            pos = k * hop_samples
            if k == 0:
                out[:, : wav.shape[-1]] = wav
            else:
                ov = window_samples - hop_samples
                # float64 crossfade stored as float32, as the official numpy ramp does
                out[:, pos:pos + ov] = (out[:, pos:pos + ov].double() * (1 - ramp)
                                        + wav[:, :ov].double() * ramp).float()
                out[:, pos + ov:pos + wav.shape[-1]] = wav[:, ov:]
        bar.close()
        return out[:, :target_len]

    def latents_to_wave(self, latents: torch.Tensor, fast_vocoder: bool = False) -> torch.Tensor:
        """Latents (1, 32, F, 32) -> (2, 480 * 8F) waveform: channels 0-15 left, 16-31 right."""
        b, ch, t, f = latents.shape
        mel = self.vae.decode(latents.reshape(b * 2, ch // 2, t, f).float())
        return self.vocoder.vocode(mel, share_overlaps=fast_vocoder)

    def _autocast(self):
        if self.dtype != torch.float32 and self.device.type in ("cuda", "cpu"):
            return torch.autocast(self.device.type, dtype=self.dtype)
        return contextlib.nullcontext()

    def _prompt(self, prompt, sample_rate, generator):
        """Prompt audio -> (latents (1, 32, Tp, 32), codes (1, 1, 2 Tp)) as the official code2sound."""
        c = self.config
        sr = c.sample_rate
        x = audio.to_stereo(prompt, sample_rate or sr, sr).to(self.device, torch.float32)
        if x.shape[-1] < int(c.prompt_long_limit * sr):
            x = x[:, : int(c.prompt_seconds * sr)]
        else:
            x = x[:, int(c.prompt_long_start * sr): int((c.prompt_long_start + c.prompt_seconds) * sr)]
        log_mel, _ = audio.tacotron_log_mel(x)  # (2, frames, 256)
        encoder = self._vae_encoder()
        latents = []
        for ch in range(log_mel.shape[0]):  # one channel at a time, as the official code
            mean, logvar = encoder.encode(log_mel[ch][None, None])
            eps = torch.randn(mean.shape, generator=generator, dtype=torch.float32).to(self.device)
            latents.append(encoder.sample_latent(mean, logvar, eps))
        lat = torch.cat(latents, 0)
        lat = lat.reshape(lat.shape[0] // 2, -1, lat.shape[2], lat.shape[3])
        codes = self.sound2code(x)[..., : c.codes_per_latent * lat.shape[2]]
        return lat, codes

    def _vae_encoder(self):
        if self._encoder_vae is None:
            if self._audioldm_path is None:
                raise CheckpointError("prompting needs the VAE encoder of tools/audioldm_48k.pth, which was not loaded.")
            self._encoder_vae, _, _ = _load_audioldm(self._audioldm_path, with_encoder=True, with_vocoder=False)
            self._encoder_vae = self._encoder_vae.eval().to(self.device)
        return self._encoder_vae

    @torch.inference_mode()
    def sound2sound(self, wav, num_steps: int | None = None, guidance_scale: float | None = None, prompt=None,
                    generator: torch.Generator | None = None, batch_size: int | None = None,
                    sample_rate: int | None = None, fast_vocoder: bool = False) -> torch.Tensor:
        """The official round trip: ``code2sound(sound2code(wav))`` with 50 steps, cut to the input length."""
        x = audio.to_stereo(wav, sample_rate or self.sample_rate, self.sample_rate)
        codes = self.sound2code(x, batch_size=batch_size)
        steps = self.config.sound2sound_steps if num_steps is None else num_steps
        return self.code2sound(codes, steps, guidance_scale, prompt=prompt, generator=generator,
                               fast_vocoder=fast_vocoder)[:, : x.shape[-1]]


def _load_audioldm(path, with_encoder: bool, with_vocoder: bool = True):
    """(MelVAE, HiFiGAN or None, scale_factor) from an AudioLDM-48k checkpoint."""
    obj = read_checkpoint(path, "audioldm_48k.pth")
    full = state_dict_of(obj)
    sizes = config_of(obj)
    state = subdict(full, "first_stage_model.")
    if "scale_factor" not in full:
        raise CheckpointError(f"{path} lacks the tensor 'scale_factor': it is not the AudioLDM-48k checkpoint MuCodec uses.")
    scale_factor = float(full["scale_factor"])
    with skip_init():
        vae = MelVAE(_config(VAEConfig, sizes.get("vae")), scale_factor, with_encoder=with_encoder,
                     with_decoder=not with_encoder)
        vocoder = HiFiGAN(_config(VocoderConfig, sizes.get("vocoder"))) if with_vocoder else None
    load_module(vae, state, path, "first_stage_model.")
    if vocoder is not None:
        load_module(vocoder, subdict(state, "vocoder."), path, "first_stage_model.vocoder.")
    return vae, vocoder, scale_factor
