"""Flow-matching latent decoder: codes' quantized embeddings -> normalised VAE latents -> latents.

Mirrors the official ``PromptCondAudioDiffusion.inference_codes`` (scenario 'other_seg') and
``BASECFM.solve_euler``. Latents are (B, C, F, W) = (batch, 32 channels = 2 audio channels x 16
VAE channels, F latent frames at 12.5 Hz, 32 mel-latent bins). State-dict names equal the
checkpoint names, with ``cfm_wrapper.estimator.`` mapped to ``estimator.``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from . import samplers
from .dit import DiT, DiTConfig
from .kernels import Linear


@dataclass
class FlowDecoderConfig:
    latent_channels: int = 32     # 2 audio channels x 16 VAE latent channels
    freq_bins: int = 32           # VAE latent frequency bins
    cond_dim: int = 1024          # width of the quantizer's z_q
    codes_per_frame: int = 2      # 25 Hz codes -> 12.5 Hz latent frames
    sigma_min: float = 1e-4
    dit: DiTConfig = field(default_factory=DiTConfig)

    @property
    def cond_features(self) -> int:
        """Output width of ``cond_muencoder_emb`` (512 = 16 channels x 32 bins per code frame)."""
        return self.latent_channels // self.codes_per_frame * self.freq_bins


class NormFeat(nn.Module):
    """Per-(channel, bin) latent standardisation (official ``Feature2DProcessor``).

    mean = sum_x / counts, std = sqrt(max(sum_x2 / counts - mean^2, 0)). Read-only: unlike the
    official module, which keeps accumulating statistics while ``counts < 100000``, this never
    changes its buffers (released checkpoints are past that threshold).
    """

    def __init__(self, channels: int, freq_bins: int):
        super().__init__()
        self.register_buffer("counts", torch.zeros(1))
        self.register_buffer("sum_x", torch.zeros(channels, freq_bins))
        self.register_buffer("sum_x2", torch.zeros(channels, freq_bins))
        self.register_buffer("sum_target_x2", torch.zeros(channels, freq_bins))  # unused (target std is 1)

    @property
    def mean(self) -> torch.Tensor:
        return self.sum_x / self.counts

    @property
    def std(self) -> torch.Tensor:
        return (self.sum_x2 / self.counts - self.mean ** 2).clamp(min=0).sqrt()

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, F, W) -> normalised space."""
        c, w = self.sum_x.shape
        rescale = torch.reciprocal(self.std.clamp(min=1e-12))
        return (x - self.mean.view(1, c, 1, w)) * rescale.view(1, c, 1, w)

    def unproject(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised space (B, C, F, W) -> latents."""
        c, w = self.sum_x.shape
        return x * self.std.view(1, c, 1, w) + self.mean.view(1, c, 1, w)


class FlowDecoder(nn.Module):
    """Conditioning, masking and the flow solvers (:mod:`samplers`) around the DiT ``estimator``."""

    def __init__(self, cfg: FlowDecoderConfig = None):
        super().__init__()
        self.cfg = cfg = cfg or FlowDecoderConfig()
        if cfg.latent_channels % cfg.codes_per_frame:
            raise ValueError("latent_channels must be a multiple of codes_per_frame")
        if cfg.dit.in_channels != 3 * cfg.latent_channels or cfg.dit.out_channels != cfg.latent_channels:
            raise ValueError(f"DiT must map {3 * cfg.latent_channels} to {cfg.latent_channels} channels")
        self.normfeat = NormFeat(cfg.latent_channels, cfg.freq_bins)
        self.cond_muencoder_emb = Linear(cfg.cond_dim, cfg.cond_features)
        # Condition of frames past latent_length (the CFG unconditional branch uses zeros instead).
        self.zero_cond_embedding1 = nn.Parameter(torch.randn(cfg.latent_channels * cfg.freq_bins))
        self.estimator = DiT(cfg.dit)
        self.requires_grad_(False)  # inference only

    def condition(self, z_q: torch.Tensor) -> torch.Tensor:
        """Quantized embeddings (B, cond_dim, T) -> condition (B, C, T / 2, W).

        Code frames 2k and 2k+1 fill channels [0, C/2) and [C/2, C) of latent frame k.
        """
        b, _, t = z_q.shape
        k, c, w = self.cfg.codes_per_frame, self.cfg.latent_channels, self.cfg.freq_bins
        if t % k:
            raise ValueError(f"number of code frames {t} must be a multiple of {k}")
        cond = self.cond_muencoder_emb(z_q.permute(0, 2, 1))         # (B, T, C/k * W)
        return cond.reshape(b, t // k, c, w).permute(0, 2, 1, 3).contiguous()

    @staticmethod
    def frame_masks(num_frames: int, latent_length: int, incontext_length, device=None):
        """Official ``latent_masks`` (2 below latent_length, then 1 below incontext_length) as two bool
        masks: frames that keep their condition (mask > 0) and prefix frames (mask == 1).

        ``incontext_length`` is one int (masks of shape (F,)) or one per batch item (masks (B, F)): items
        of one batch may be at different windows of their songs, so their prefixes differ."""
        latent_length = int(latent_length)
        lengths = torch.as_tensor(incontext_length, dtype=torch.long, device=device)
        if latent_length < 0 or bool((lengths < 0).any()) or lengths.dim() > 1:
            raise ValueError("latent_length and incontext_length must be >= 0 (incontext: one int or one per item)")
        idx = torch.arange(num_frames, device=device)
        lengths = lengths[..., None] if lengths.dim() else lengths
        return idx < torch.clamp(lengths, min=latent_length), idx < lengths

    def sample(self, z_q: torch.Tensor, true_latents: torch.Tensor, latent_length: int, incontext_length: int,
               noise: torch.Tensor, num_steps: int, guidance_scale: float,
               callback: Optional[Callable[[int, int], None]] = None, sampler: str = samplers.DEFAULT_SAMPLER,
               guidance_interval: Optional[tuple] = None,
               schedule: str = samplers.DEFAULT_SCHEDULE) -> torch.Tensor:
        """Decode one window: z_q (B, cond_dim, 2F), true_latents / noise (B, C, F, W) -> latents (B, C, F, W).

        ``true_latents`` (un-normalised) supplies the first ``incontext_length`` frames as the
        in-context prefix; ``noise`` is x at t = 0 (the caller owns the RNG). Frames at or past
        ``max(latent_length, incontext_length)`` get ``zero_cond_embedding1`` as condition.
        ``guidance_scale > 1`` runs classifier-free guidance (only at t inside ``guidance_interval``
        (a, b) when given); ``sampler`` names the ODE solver and ``schedule`` its time grid
        (:mod:`samplers`); ``callback(step,
        num_steps)`` is called after each step.
        """
        with torch.no_grad():
            cond = self.condition(z_q)
            if true_latents.shape != cond.shape or noise.shape != cond.shape:
                raise ValueError(f"true_latents {tuple(true_latents.shape)} and noise {tuple(noise.shape)} "
                                 f"must match the condition's shape {tuple(cond.shape)}")
            b, c, f, w = cond.shape
            keep, prefix_mask = self.frame_masks(f, latent_length, incontext_length, cond.device)
            if keep.dim() == 2 and keep.shape[0] != b:
                raise ValueError(f"incontext_length has {keep.shape[0]} items but the batch has {b}")
            keep, prefix_mask = keep.reshape(-1, 1, f, 1), prefix_mask.reshape(-1, 1, f, 1)
            zero_cond = self.zero_cond_embedding1.reshape(1, c, 1, w).to(cond.dtype)
            cond = torch.where(keep, cond, zero_cond)
            prefix = self.normfeat.project(true_latents) * prefix_mask.to(true_latents.dtype)
            n_prefix = (int(prefix_mask.sum()) if prefix_mask.shape[0] == 1
                        else prefix_mask.reshape(-1, f).sum(1).tolist())
            if (sampler, schedule, guidance_interval) == (samplers.DEFAULT_SAMPLER, samplers.DEFAULT_SCHEDULE,
                                                          None):  # the official solver
                x = self.solve_euler(noise, prefix, n_prefix, cond, num_steps, guidance_scale, callback)
            else:
                x = self.solve(noise, prefix, n_prefix, cond, num_steps, guidance_scale, callback, sampler,
                               guidance_interval, schedule)
            x = torch.where(_prefix_mask(n_prefix, x), prefix, x)
            return self.normfeat.unproject(x)

    def solve_euler(self, noise: torch.Tensor, prefix: torch.Tensor, n_prefix: int, cond: torch.Tensor,
                    num_steps: int, guidance_scale: float,
                    callback: Optional[Callable[[int, int], None]] = None) -> torch.Tensor:
        """The official solver: :meth:`solve` with ``euler`` and guidance at every step."""
        return self.solve(noise, prefix, n_prefix, cond, num_steps, guidance_scale, callback)

    def solve(self, noise: torch.Tensor, prefix: torch.Tensor, n_prefix: int, cond: torch.Tensor,
              num_steps: int, guidance_scale: float, callback: Optional[Callable[[int, int], None]] = None,
              sampler: str = samplers.DEFAULT_SAMPLER, guidance_interval: Optional[tuple] = None,
              schedule: str = samplers.DEFAULT_SCHEDULE) -> torch.Tensor:
        """Integrate dx/dt = v(x, t) from t = 0 (x = noise) to 1 with ``sampler``; all (B, C, F, W).

        Every evaluation first resets the prefix frames to the straight path between noise and prefix;
        ``n_prefix`` is their count, one int or one per item (elementwise selection, so an item's result
        does not depend on its batch mates' prefixes).
        t is accumulated in float32 (t += dt; dt = t_span[k+1] - t) exactly as the official solver,
        so e.g. 3 steps evaluate at 0, 0.33333334, 0.6666666. With guidance the DiT batch is
        [B unconditional items (zero condition), B conditional items] and the timestep is repeated
        per item, so B > 1 works (the official solver supports only B = 1 with guidance). With
        ``guidance_interval`` (a, b), evaluations at t outside [a, b] run the conditional items alone.
        """
        b = noise.shape[0]
        grid = samplers.time_grid(num_steps, noise.device, schedule=schedule)
        in_prefix = _prefix_mask(n_prefix, noise)
        guided = guidance_scale > 1.0
        if guided:  # batch = [unconditional (zero condition) items, conditional items]
            prefix_in = torch.cat([prefix, prefix], 0)
            cond_in = torch.cat([torch.zeros_like(cond), cond], 0)

        def field(x: torch.Tensor, t: torch.Tensor):
            x = torch.where(in_prefix, (1 - (1 - self.cfg.sigma_min) * t) * noise + t * prefix, x)
            if guided and samplers.guided_at(t, guidance_interval):
                v = self.estimator(torch.cat([torch.cat([x, x], 0), prefix_in, cond_in], 1), t.repeat(2 * b))
                v_uncond, v_cond = v.chunk(2, 0)
                v = v_uncond + guidance_scale * (v_cond - v_uncond)
            else:
                v = self.estimator(torch.cat([x, prefix, cond], 1), t.repeat(b))
            return x, v

        return samplers.solve(sampler, field, noise.clone(), grid, callback)


def _prefix_mask(n_prefix, x: torch.Tensor) -> torch.Tensor:
    """Prefix frames of ``x`` (B, C, F, W) as a bool mask broadcastable to it: (1 or B, 1, F, 1)."""
    lengths = torch.as_tensor(n_prefix, dtype=torch.long, device=x.device).reshape(-1, 1, 1, 1)
    return torch.arange(x.shape[2], device=x.device).reshape(1, 1, -1, 1) < lengths
