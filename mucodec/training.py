"""The fine-tuning objective: conditional flow matching on the inputs the official sampler builds.

:meth:`FlowDecoder.sample` decodes a window from noise x0 (t = 0) to normalised latents x1 (t = 1) along
``x_t = (1 - (1 - sigma_min) t) x0 + t x1``; the DiT reads ``[x_t, prefix, condition]`` where the prefix is
the first ``incontext`` frames of the normalised true latents (zeros after them) and the condition is the
codes' embedding (``zero_cond_embedding1`` past ``latent_length``; all zeros for the unconditional branch
of classifier-free guidance). Training builds exactly that input for a random time, prefix length and
condition drop, and regresses the DiT's output on the path's velocity ``x1 - (1 - sigma_min) x0`` over the
generated frames only (frame mask 2: past the prefix, before the window's end of real audio).

A batch is codes (B, 1, T) with the window's latents (B, C, T / 2, W) as the VAE gives them (un-normalised)
and ``valid`` (B,), the frames of each window that hold real audio (a song's last window is padded).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import ArgumentError

# What fine-tuning changes by default (names of FlowDecoder's state dict): the DiT, the projection of the
# codes' embedding into the condition, and the condition of frames past the song's end. MuQ and the
# quantizer stay frozen, so every token already made stays valid; the VAE and vocoder are not in the flow.
TRAINABLE = ("estimator.", "cond_muencoder_emb.", "zero_cond_embedding1")
SEED_STRIDE = 1_000_003  # seeds of the data order of successive epochs and of validation windows


@dataclass(frozen=True)
class Objective:
    """The random parts of a training example.

    ``cond_drop``: probability that an item's condition is replaced by zeros (the sampler's unconditional
    branch), so guidance keeps working. ``max_prefix``: the longest in-context prefix, in latent frames;
    prefix lengths are uniform in [0, max_prefix] (decoding uses 0 for a song's first window and the
    128-frame overlap for the others). ``latent_length``: frames that keep their condition (None: the whole
    window, as decoding passes); frames past it get the padding embedding (mask 0).
    """

    cond_drop: float = 0.1
    max_prefix: int = 128
    latent_length: int | None = None

    def __post_init__(self):
        if not 0.0 <= self.cond_drop <= 1.0:
            raise ArgumentError(f"cond_drop must lie in [0, 1], got {self.cond_drop}.")
        if self.max_prefix < 0 or (self.latent_length is not None and self.latent_length < 0):
            raise ArgumentError("max_prefix and latent_length must be >= 0.")


@dataclass
class Draws:
    """One batch's random draws: time t (B,), noise x0 (B, C, F, W), prefix frames (B,), dropped (B,) bool."""

    t: torch.Tensor
    noise: torch.Tensor
    prefix: torch.Tensor
    dropped: torch.Tensor


def draw(objective: Objective, shape: tuple, generator: torch.Generator) -> Draws:
    """The draws of one batch of latents ``shape`` (B, C, F, W), in a fixed order from ``generator`` (CPU),
    so a resumed run draws what an uninterrupted one would."""
    b, _, f, _ = shape
    t = torch.rand(b, generator=generator)
    noise = torch.randn(shape, generator=generator)
    prefix = torch.randint(0, min(objective.max_prefix, f - 1) + 1, (b,), generator=generator)
    dropped = torch.rand(b, generator=generator) < objective.cond_drop
    return Draws(t, noise, prefix, dropped)


def set_trainable(codec, names=TRAINABLE) -> list[str]:
    """Make the flow decoder's parameters whose names start with one of ``names`` trainable and every other
    parameter of ``codec`` (MuQ, quantizer, VAE, vocoder included) frozen; returns the trainable names."""
    for stage in (codec.muq, codec.quantizer, codec.vae, codec.vocoder):
        if stage is not None:
            stage.requires_grad_(False)
    chosen = []
    for name, p in codec.flow.named_parameters():
        p.requires_grad_(name.startswith(tuple(names)))
        if p.requires_grad:
            chosen.append(name)
    if not chosen:
        raise ArgumentError(f"no parameter of the flow decoder starts with {', '.join(names)}.")
    return chosen


def dit_inputs(flow, z_q: torch.Tensor, latents: torch.Tensor, valid: torch.Tensor, d: Draws,
               objective: Objective):
    """(DiT input (B, 3C, F, W), target velocity (B, C, F, W), loss mask (B, 1, F, 1) bool) of a batch.

    z_q: the quantizer's embedding of the codes (B, cond_dim, 2F); latents as the VAE gives them."""
    cond = flow.condition(z_q)
    b, c, f, w = cond.shape
    if latents.shape != cond.shape or d.noise.shape != cond.shape:
        raise ValueError(f"latents {tuple(latents.shape)} and noise {tuple(d.noise.shape)} must match the "
                         f"condition's shape {tuple(cond.shape)}")
    length = f if objective.latent_length is None else objective.latent_length
    keep, in_prefix = flow.frame_masks(f, length, d.prefix.to(cond.device), cond.device)
    keep, in_prefix = keep.reshape(b, 1, f, 1), in_prefix.reshape(b, 1, f, 1)
    cond = torch.where(keep, cond, flow.zero_cond_embedding1.reshape(1, c, 1, w).to(cond.dtype))
    cond = cond * (~d.dropped.to(cond.device)).reshape(b, 1, 1, 1).to(cond.dtype)
    x1 = flow.normfeat.project(latents.float())
    x0 = d.noise.to(x1.device)
    t = d.t.to(x1.device).reshape(b, 1, 1, 1)
    sigma = flow.cfg.sigma_min
    x_t = (1 - (1 - sigma) * t) * x0 + t * x1
    prefix = x1 * in_prefix.to(x1.dtype)
    frames = torch.arange(f, device=x1.device).reshape(1, 1, f, 1)
    generated = ~in_prefix & (frames < valid.to(x1.device).reshape(b, 1, 1, 1))
    return torch.cat([x_t, prefix, cond.to(x1.dtype)], 1), x1 - (1 - sigma) * x0, generated


def cfm_loss(flow, z_q: torch.Tensor, latents: torch.Tensor, valid: torch.Tensor, d: Draws,
             objective: Objective) -> torch.Tensor:
    """Mean squared error of the DiT's velocity over the values of each item's generated frames, averaged over
    the items (an item without generated frames counts 0). Every window weighs the same whatever its prefix,
    so the mean over a batch split across processes is the mean of the processes' means (DDP's average)."""
    x, target, generated = dit_inputs(flow, z_q, latents, valid, d, objective)
    v = flow.estimator(x, d.t.to(x.device)).float()
    mask = generated.expand_as(target).to(target.dtype)
    per_item = ((v - target) ** 2 * mask).sum((1, 2, 3)) / mask.sum((1, 2, 3)).clamp(min=1)
    return per_item.mean()


@dataclass
class Windows:
    """Training windows in memory: codes (N, 1, T) int, latents (N, C, T / 2, W) (bf16 or float32), valid (N,)."""

    codes: torch.Tensor
    latents: torch.Tensor
    valid: torch.Tensor

    def __len__(self) -> int:
        return self.codes.shape[0]

    def order(self, epoch: int, seed: int) -> torch.Tensor:
        return torch.randperm(len(self), generator=torch.Generator().manual_seed(seed * SEED_STRIDE + epoch))

    def batch(self, position: int, size: int, seed: int) -> tuple:
        """The ``size`` windows from ``position`` of the endless shuffled stream (a new order every epoch)."""
        n, orders, idx = len(self), {}, []
        for p in range(position, position + size):
            if p // n not in orders:
                orders[p // n] = self.order(p // n, seed)
            idx.append(int(orders[p // n][p % n]))
        return self.codes[idx], self.latents[idx].float(), self.valid[idx]
