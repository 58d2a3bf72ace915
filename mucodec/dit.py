"""The flow decoder's velocity network: a PixArt-alpha style diffusion transformer (DiT).

Mirrors the official ``Transformer2DModel`` (``models/transformer_2d_flow.py``, config
``transformer2D.json``) on its only used path: patch input, ``ada_norm_single`` blocks without
cross-attention, no resolution/aspect-ratio conditioning (``sample_size != 128``).
State-dict names equal the checkpoint names minus ``cfm_wrapper.estimator.``.

Shapes: ``x`` (B, in_channels, F, W) with F frames and W frequency bins; the patch grid is
(H, Wp) = (F / patch, W / patch) and tokens are ordered row-major (time-major), N = H * Wp.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.utils.checkpoint
import torch.nn.functional as F
from torch import nn

from .kernels import Linear, linear, onednn_float32


@dataclass
class DiTConfig:
    in_channels: int = 96            # [x_t, in-context prefix, condition] x 32 latent channels
    out_channels: int = 32
    patch_size: int = 2
    num_heads: int = 22
    head_dim: int = 72
    num_layers: int = 24
    ff_mult: int = 4                 # feed-forward inner size = ff_mult * hidden_size
    sample_size: int = 384           # training grid; only sets the positional-embedding scaling
    interpolation_unit: int = 64     # diffusers: interpolation_scale = max(sample_size // 64, 1)
    norm_eps: float = 1e-6
    flow_t_size: int = 512           # width of the timestep sinusoid (cos half, then sin half)
    timestep_scale: float = 1000.0   # flow time t in [0, 1] is embedded as t * 1000
    max_period: float = 10000.0      # of both sinusoids (timestep and 2-D positions)
    # On the CPU attention runs as explicit products, one head and one block of queries at a time, whose
    # scores take at most this many bytes: 512 float32 or 1024 bf16 queries at 4096 tokens (8 MiB was the
    # fastest block in both precisions, twice as large was 1.6x slower); 0 keeps torch's fused kernel.
    cpu_attention_block: int = 8 << 20

    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def base_size(self) -> int:
        """Grid side the positions are normalised to (diffusers PatchEmbed: height // patch)."""
        return self.sample_size // self.patch_size

    @property
    def interpolation_scale(self) -> int:
        return max(self.sample_size // self.interpolation_unit, 1)


def sincos_pos_embed_2d(dim: int, height: int, width: int, base_size: int, interpolation_scale: float,
                        max_period: float = 10000.0) -> torch.Tensor:
    """diffusers 0.27.2 ``get_2d_sincos_pos_embed`` for a (height, width) grid -> (height*width, dim).

    Grid coordinates are float32 (numpy, as upstream), the sinusoids float64, the result float32.
    Upstream's meshgrid puts the *width* coordinate first, so dims [0, dim/2) encode the
    frequency axis and [dim/2, dim) the time axis; each half is [sin, cos].
    """
    if dim % 4:
        raise ValueError(f"positional embedding width {dim} must be a multiple of 4")
    grid_h = np.arange(height, dtype=np.float32) / (height / base_size) / interpolation_scale
    grid_w = np.arange(width, dtype=np.float32) / (width / base_size) / interpolation_scale
    w_coord, h_coord = np.meshgrid(grid_w, grid_h)          # each (height, width)
    quarter = dim // 4
    omega = 1.0 / max_period ** (np.arange(quarter, dtype=np.float64) / quarter)

    def sincos(pos):
        angles = np.outer(pos.reshape(-1).astype(np.float64), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    emb = np.concatenate([sincos(w_coord), sincos(h_coord)], axis=1)
    return torch.from_numpy(emb).float()


class PatchEmbed(nn.Module):
    """Conv patchify + fixed 2-D sin-cos positions: (B, C, F, W) -> (B, N, D)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        p = cfg.patch_size
        self.proj = nn.Conv2d(cfg.in_channels, cfg.hidden_size, kernel_size=p, stride=p)
        # The checkpoint's 192x192 table is never used (windows are 256x16 patches): positions are
        # recomputed per grid, as upstream does, and cached here (not part of the state dict).
        self._pos_cache: dict = {}

    def positions(self, height: int, width: int, device=None) -> torch.Tensor:
        """(height*width, D) positional embedding of a patch grid (float32, cached)."""
        key = (height, width, str(device))
        if key not in self._pos_cache:
            c = self.cfg
            pe = sincos_pos_embed_2d(c.hidden_size, height, width, c.base_size, c.interpolation_scale,
                                     c.max_period)
            self._pos_cache[key] = pe.to(device)
        return self._pos_cache[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)                                  # (B, D, H, Wp)
        _, _, height, width = h.shape
        h = h.flatten(2).transpose(1, 2)                  # (B, N, D), time-major
        return (h + self.positions(height, width, h.device)).to(x.dtype)


class TimestepMLP(nn.Module):
    """Linear -> SiLU -> Linear (diffusers ``TimestepEmbedding``)."""

    def __init__(self, in_features: int, dim: int):
        super().__init__()
        self.linear_1 = Linear(in_features, dim)
        self.linear_2 = Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class FlowTimestepEmbedding(nn.Module):
    """Flow time t in [0, 1] -> (B, D) embedding (the reference's ``flow_t_size`` override)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        if cfg.flow_t_size % 2:
            raise ValueError(f"flow_t_size {cfg.flow_t_size} must be even")
        self.cfg = cfg
        self.timestep_embedder = TimestepMLP(cfg.flow_t_size, cfg.hidden_size)

    def sinusoid(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) -> (B, flow_t_size) = [cos, sin] of t * scale * freqs (float32 like the reference)."""
        half = self.cfg.flow_t_size // 2
        k = torch.arange(half, dtype=torch.float32, device=t.device)
        freqs = torch.exp(-math.log(self.cfg.max_period) * k / half).to(t.dtype)
        args = t[:, None] * freqs[None] * self.cfg.timestep_scale
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.timestep_embedder(self.sinusoid(t).to(dtype))


class AdaLNSingle(nn.Module):
    """adaLN-single: t -> (modulation (B, 6D) shared by all blocks, embedded t (B, D))."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.emb = FlowTimestepEmbedding(cfg)
        self.linear = Linear(cfg.hidden_size, 6 * cfg.hidden_size)

    def forward(self, t: torch.Tensor, dtype: torch.dtype):
        embedded = self.emb(t, dtype)
        return self.linear(F.silu(embedded)), embedded


class SelfAttention(nn.Module):
    """Multi-head self-attention with biases, softmax(q k^T / sqrt(head_dim)): (B, N, D) -> (B, N, D)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.cpu_block = cfg.cpu_attention_block
        self.to_q = Linear(d, d)
        self.to_k = Linear(d, d)
        self.to_v = Linear(d, d)
        self.to_out = nn.ModuleList([Linear(d, d)])   # diffusers' [Linear, Dropout] -> name 'to_out.0'

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape

        def heads(y):
            return y.view(b, n, self.num_heads, -1).transpose(1, 2)

        q, k, v = heads(self.to_q(x)), heads(self.to_k(x)), heads(self.to_v(x))
        # the chunked kernel writes into a preallocated output, which autograd cannot follow (training)
        if self.cpu_block and q.device.type == "cpu" and not (torch.is_grad_enabled() and q.requires_grad) and (
                q.dtype == torch.bfloat16 or q.dtype == torch.float32 and onednn_float32()):
            o = chunked_attention(q, k, v, max(1, self.cpu_block // (n * q.element_size())))
        else:
            o = F.scaled_dot_product_attention(q, k, v)
        return self.to_out[0](o.transpose(1, 2).reshape(b, n, d))


def chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, queries: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim)) v for (B, H, N, d) tensors, one head and ``queries`` rows at a time.

    torch's CPU flash kernel runs at about 170 GFLOP/s at head size 72 in float32 and bfloat16 alike,
    whereas two plain products around a softmax run faster in float32 (through oneDNN) and faster still in
    bf16 on a CPU with native bf16 (docs/speed.md): the score block stays small enough to be reused from
    cache. torch's softmax keeps its max and sum in float32 for bf16 input; the probabilities are rounded to
    bf16 for the second product.
    """
    out = torch.empty_like(q)   # q's layout, (B, N, H, d) in memory: the caller's reshape is free
    scale = q.shape[-1] ** -0.5  # applied to each block of queries while it is in cache
    # autocast would run the softmax in float32 and cast the probabilities back for every block
    with torch.autocast("cpu", enabled=False):
        for i in range(q.shape[0]):
            for h in range(q.shape[1]):
                if q.dtype == torch.float32:
                    # oneDNN reads strided operands slowly: each head is copied out contiguous first
                    qh, kh, vt = q[i, h] * scale, k[i, h].contiguous(), v[i, h].t().contiguous()
                    for s in range(0, q.shape[2], queries):
                        scores = linear(qh[s:s + queries], kh)
                        out[i, h, s:s + queries] = linear(torch.softmax(scores, -1), vt)
                    continue
                kt = k[i, h].transpose(-1, -2)
                for s in range(0, q.shape[2], queries):
                    scores = torch.matmul(q[i, h, s:s + queries] * scale, kt)
                    torch.matmul(torch.softmax(scores, -1), v[i, h], out=out[i, h, s:s + queries])
    return out


class GeluTanhProj(nn.Module):
    """Linear followed by tanh-approximated GELU (diffusers ``GELU(approximate='tanh')``)."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = Linear(dim, inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.proj.weight, self.proj.bias, "gelu_tanh")


class FeedForward(nn.Module):
    """(B, N, D) -> (B, N, D) through ff_mult * D hidden units."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        d = cfg.hidden_size
        # Keys follow diffusers' [GELU, Dropout, Linear] list: 'net.0.proj', 'net.2'.
        self.net = nn.ModuleDict({"0": GeluTanhProj(d, cfg.ff_mult * d), "2": Linear(cfg.ff_mult * d, d)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net["2"](self.net["0"](x))


def modulated_norm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """layer_norm(x) * (1 + scale) + shift: x (B, N, D), shift and scale (B, 1, D) -> (B, N, D).

    Each item's modulation is the affine weight and bias of its own layer_norm: one pass over the tokens
    instead of three, and one rounding instead of three (values differ from the separate operations' by an
    ulp at most, nearer the exact ones). Under autocast the result is stored in the autocast precision at
    once: the projections reading it would each cast it again (the attention's three would make three copies)."""
    device = x.device.type
    autocast = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
    dtype = torch.get_autocast_dtype(device) if autocast else x.dtype
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    for i in range(x.shape[0]):
        out[i] = F.layer_norm(x[i], x.shape[-1:], 1 + scale[i, 0], shift[i, 0], eps)
    return out


class DiTBlock(nn.Module):
    """PixArt block: adaLN-modulated self-attention and feed-forward with gated residuals."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        d = cfg.hidden_size
        self.eps = cfg.norm_eps
        self.scale_shift_table = nn.Parameter(torch.randn(6, d) / d ** 0.5)
        self.attn1 = SelfAttention(cfg)
        self.ff = FeedForward(cfg)

    def forward(self, x: torch.Tensor, adaln: torch.Tensor) -> torch.Tensor:
        """x (B, N, D), adaln (B, 6D) -> (B, N, D)."""
        b, d = x.shape[0], x.shape[2]
        mod = self.scale_shift_table[None] + adaln.reshape(b, 6, d)        # (B, 6, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)
        x = torch.addcmul(x, gate_msa, self.attn1(modulated_norm(x, shift_msa, scale_msa, self.eps)))
        return torch.addcmul(x, gate_mlp, self.ff(modulated_norm(x, shift_mlp, scale_mlp, self.eps)))


class DiT(nn.Module):
    """Velocity network v(x, t): x (B, in_channels, F, W), t (B,) -> (B, out_channels, F, W).

    ``forward`` is the composition of ``embed_patches``, ``embed_timestep``, the blocks and
    ``project_out``; tests call those steps one by one to compare intermediates.
    """

    def __init__(self, cfg: DiTConfig = None):
        super().__init__()
        self.cfg = cfg = cfg or DiTConfig()
        d = cfg.hidden_size
        self.pos_embed = PatchEmbed(cfg)
        self.transformer_blocks = nn.ModuleList([DiTBlock(cfg) for _ in range(cfg.num_layers)])
        self.scale_shift_table = nn.Parameter(torch.randn(2, d) / d ** 0.5)
        self.proj_out = Linear(d, cfg.patch_size ** 2 * cfg.out_channels)
        self.adaln_single = AdaLNSingle(cfg)
        self.requires_grad_(False)  # inference only: never build an autograd graph
        self.checkpoint_blocks = False  # fine-tuning's activation checkpointing (trainer.TrainOptions)

    def store_linears_in(self, dtype: torch.dtype) -> "DiT":
        """Keep the weight and bias of every Linear (nearly all the parameters) rounded to ``dtype``.

        Under autocast a Linear rounds its float32 weight to the autocast dtype anew at every call (the cast
        cache serves only weights that require grad); stored rounded once, the weights give the same numbers
        with half the memory and no casts. The model then runs only under autocast in ``dtype``."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                m.to(dtype)
        return self

    def embed_patches(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, F, W) -> tokens (B, N, D) with positions added."""
        c = self.cfg
        if x.dim() != 4 or x.shape[1] != c.in_channels or x.shape[2] % c.patch_size or x.shape[3] % c.patch_size:
            raise ValueError(f"DiT input must be (B, {c.in_channels}, F, W) with F and W multiples of "
                             f"{c.patch_size}, got {tuple(x.shape)}")
        return self.pos_embed(x)

    def embed_timestep(self, t: torch.Tensor, dtype: torch.dtype = torch.float32):
        """t (B,) -> (adaln modulation (B, 6D), embedded timestep (B, D)).

        One item at a time: a matrix kernel may sum in another order for another row count, and an item's
        output must not depend on how many songs share its batch (the cost is a few (1, D) products)."""
        parts = [self.adaln_single(t[i:i + 1], dtype) for i in range(t.shape[0])]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def project_out(self, h: torch.Tensor, embedded_t: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Final modulated norm + linear + unpatchify: (B, N, D) -> (B, out_channels, F, W)."""
        b, p, c = h.shape[0], self.cfg.patch_size, self.cfg.out_channels
        shift, scale = (self.scale_shift_table[None] + embedded_t[:, None]).chunk(2, dim=1)
        h = self.proj_out(modulated_norm(h, shift, scale, self.cfg.norm_eps))  # (B, N, p*p*c) ordered (dy, dx, c)
        h = h.reshape(b, height, width, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return h.reshape(b, c, height * p, width * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device).reshape(-1).expand(b)
        h = self.embed_patches(x)
        adaln, embedded_t = self.embed_timestep(t, h.dtype)
        for block in self.transformer_blocks:
            if self.checkpoint_blocks and torch.is_grad_enabled():
                # training: keep each block's input only and recompute its activations in the backward pass
                h = torch.utils.checkpoint.checkpoint(block, h, adaln, use_reentrant=False)
            else:
                h = block(h, adaln)
        p = self.cfg.patch_size
        return self.project_out(h, embedded_t, x.shape[2] // p, x.shape[3] // p)
