"""AudioLDM-48k mel VAE: log-mel spectrogram (256 bins) <-> latent (16 channels, 8x smaller).

The module mirrors ``first_stage_model`` of ``tools/audioldm_48k.pth`` without its vocoder:
``state_dict()`` keys are the checkpoint keys minus ``first_stage_model.`` (``encoder.*``,
``quant_conv.*``, ``decoder.*``, ``post_quant_conv.*``). Decoding needs no encoder, so
``MelVAE(cfg, with_encoder=False)`` holds only ``decoder.*`` and ``post_quant_conv.*``.

Layout: mels are ``(B, 1, frames, mel_bins)`` images, latents ``(B, z, frames/8, mel_bins/8)``
for the official 4 levels (each level but the last halves both axes).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import linear


@dataclass
class VAEConfig:
    """Sizes of the AudioLDM-48k autoencoder (defaults = the released checkpoint).

    The encoder always predicts mean and log-variance (``double_z`` in the official config), and
    the only attention is the single-head one in each middle block (``attn_resolutions`` empty).
    """

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 8)
    num_res_blocks: int = 2
    z_channels: int = 16
    embed_dim: int = 16
    in_channels: int = 1
    out_channels: int = 1
    mel_bins: int = 256
    norm_groups: int = 32
    norm_eps: float = 1e-6
    logvar_min: float = -30.0
    logvar_max: float = 20.0

    @property
    def downsampling(self) -> int:
        """Factor between mel and latent sizes, on both axes."""
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def latent_bins(self) -> int:
        return self.mel_bins // self.downsampling


# Full-resolution activations are processed in row tiles of at most this many elements: a conv
# on a whole (C,H,W) tensor makes oneDNN copy its input to a blocked layout (+1 GiB at full size).
# 8 MiB keeps a tile's temporaries under glibc's mmap threshold (at most 32 MiB), so they reuse freed
# heap memory instead of faulting in fresh pages: a full-window decode ran 1.17x faster with 4x fewer
# page faults and no higher peak than with 64 MiB tiles.
_TILE_ELEMENTS = 1 << 21


def _tile_rows(channels: int, width: int) -> int:
    return max(1, _TILE_ELEMENTS // (channels * width))


def _norm_swish_conv(norm: nn.GroupNorm, conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(swish(norm(x)))`` for a 3x3 stride-1 padding-1 conv: (B,Ci,H,W) -> (B,Co,H,W).

    The normalised input, as large as ``x``, is never held whole: the GroupNorm statistics are
    taken over each item first, then rows are normalised and convolved in tiles with a one-row
    halo.
    """
    b, c, h, w = x.shape
    var, mean = torch.var_mean(x.reshape(b, norm.num_groups, -1), dim=2, correction=0)
    per_group = c // norm.num_groups
    scale = (var + norm.eps).rsqrt().repeat_interleave(per_group, 1) * norm.weight  # (B, C)
    shift = norm.bias - mean.repeat_interleave(per_group, 1) * scale
    scale, shift = scale[:, :, None, None], shift[:, :, None, None]
    rows = _tile_rows(c, w)
    if rows >= h:
        return conv(F.silu(x * scale + shift, inplace=True))
    out = x.new_empty(b, conv.out_channels, h, w)
    for top in range(0, h, rows):
        bottom = min(h, top + rows)
        lo, hi = max(0, top - 1), min(h, bottom + 1)
        tile = F.silu(x[:, :, lo:hi] * scale + shift, inplace=True)
        tile = F.pad(tile, (0, 0, 1 - (top - lo), 1 - (hi - bottom)))  # zero rows only at the image edges
        out[:, :, top:bottom] = F.conv2d(tile, conv.weight, conv.bias, padding=(0, 1))
    return out


class ResnetBlock(nn.Module):
    """GroupNorm-swish-conv3x3 twice, plus a 1x1 shortcut when the width changes. (B,Ci,H,W) -> (B,Co,H,W)."""

    def __init__(self, cfg: VAEConfig, in_ch: int, out_ch: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(cfg.norm_groups, in_ch, eps=cfg.norm_eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = nn.GroupNorm(cfg.norm_groups, out_ch, eps=cfg.norm_eps)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = _norm_swish_conv(self.norm1, self.conv1, x)
        h = _norm_swish_conv(self.norm2, self.conv2, h)
        if self.nin_shortcut is None:
            return h.add_(x)
        rows = _tile_rows(x.shape[1], x.shape[3])
        for top in range(0, x.shape[2], rows):
            h[:, :, top:top + rows] += self.nin_shortcut(x[:, :, top:top + rows])
        return h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions (scale C^-0.5), residual. (B,C,H,W) -> same.

    The official code materialises the (HW, HW) score matrix (1 GiB per item for a 40.96 s
    window); SDPA computes the same softmax attention in blocks.
    """

    def __init__(self, cfg: VAEConfig, ch: int):
        super().__init__()
        self.norm = nn.GroupNorm(cfg.norm_groups, ch, eps=cfg.norm_eps)
        self.q = nn.Conv2d(ch, ch, 1)
        self.k = nn.Conv2d(ch, ch, 1)
        self.v = nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def _linear(self, conv: nn.Conv2d, h: torch.Tensor) -> torch.Tensor:
        return linear(h, conv.weight.flatten(1), conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C): 1x1 convs become linears
        q, k, v = (self._linear(m, h).unsqueeze(1) for m in (self.q, self.k, self.v))
        del h
        h = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        del q, k, v
        h = self._linear(self.proj_out, h)
        return h.transpose(1, 2).reshape(b, c, hh, ww).add_(x)


class Downsample(nn.Module):
    """Zero-pad right/bottom by one, conv3x3 stride 2: (B,C,H,W) -> (B,C,floor(H/2),floor(W/2))."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest x2 then conv3x3: (B,C,H,W) -> (B,C,2H,2W).

    Computed without the 4x larger upsampled tensor: each of the four output phases (row parity
    a, column parity b) of a 3x3 conv over a nearest-upsampled image is a 2x2 conv over the
    original image whose taps are sums of the 3x3 taps that land on the same source pixel
    (2.25x fewer multiply-adds; equal to the official result up to float rounding). Row tiles
    keep the temporaries small.
    """

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    @staticmethod
    def _fold(w: torch.Tensor, dim: int, parity: int) -> torch.Tensor:
        # Source rows i-1, i (parity 0) receive taps {0}, {1,2}; rows i, i+1 (parity 1) get {0,1}, {2}.
        t0, t1, t2 = w.unbind(dim)
        return torch.stack((t0, t1 + t2) if parity == 0 else (t0 + t1, t2), dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        weight = self.conv.weight
        kernels = [[self._fold(self._fold(weight, 2, a), 3, p) for p in (0, 1)] for a in (0, 1)]
        out = x.new_empty(b, c, h, 2, w, 2)
        rows = _tile_rows(c, w)
        for top in range(0, h, rows):
            bottom = min(h, top + rows)
            lo, hi = max(0, top - 1), min(h, bottom + 1)
            # source rows top-1 .. bottom and columns -1 .. w, zero outside the image
            xp = F.pad(x[:, :, lo:hi], (1, 1, 1 - (top - lo), 1 - (hi - bottom)))
            n = bottom - top
            for a in (0, 1):
                for p in (0, 1):
                    out[:, :, top:bottom, a, :, p] = F.conv2d(xp[:, :, a:a + n + 1, p:p + w + 1],
                                                              kernels[a][p], self.conv.bias)
        return out.view(b, c, 2 * h, 2 * w)


class _Mid(nn.Module):
    def __init__(self, cfg: VAEConfig, ch: int):
        super().__init__()
        self.block_1 = ResnetBlock(cfg, ch, ch)
        self.attn_1 = AttnBlock(cfg, ch)
        self.block_2 = ResnetBlock(cfg, ch, ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class _Level(nn.Module):
    """Container of one resolution level: ResnetBlocks ``block`` and an optional resampler.

    Encoder/Decoder loop over its blocks themselves, so that no caller frame keeps a
    level's (up to 1 GiB) input alive while later blocks run.
    """

    def __init__(self, blocks: list[nn.Module], resample_name: str | None = None, resample: nn.Module | None = None):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.resample_name = resample_name  # checkpoint name: 'downsample' / 'upsample'
        if resample_name is not None:
            setattr(self, resample_name, resample)

    def modules_in_order(self) -> list[nn.Module]:
        resample = [getattr(self, self.resample_name)] if self.resample_name is not None else []
        return list(self.block) + resample


class Encoder(nn.Module):
    """Mel (B, in_channels, T, mel_bins) -> moments (B, 2*z_channels, T/8, mel_bins/8)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        widths = [cfg.ch] + [cfg.ch * m for m in cfg.ch_mult]
        last = len(cfg.ch_mult) - 1
        self.down = nn.ModuleList()
        for i in range(len(cfg.ch_mult)):
            blocks = [ResnetBlock(cfg, widths[i] if j == 0 else widths[i + 1], widths[i + 1])
                      for j in range(cfg.num_res_blocks)]
            self.down.append(_Level(blocks, None if i == last else "downsample",
                                    None if i == last else Downsample(widths[i + 1])))
        self.mid = _Mid(cfg, widths[-1])
        self.norm_out = nn.GroupNorm(cfg.norm_groups, widths[-1], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(widths[-1], 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for level in self.down:
            for m in level.modules_in_order():
                x = m(x)
        x = self.mid(x)
        return _norm_swish_conv(self.norm_out, self.conv_out, x)


class Decoder(nn.Module):
    """Latent (B, z_channels, t, f) -> mel (B, out_channels, 8t, 8f) for the official 4 levels.

    ``up[i]`` is resolution level i (0 = full resolution) and runs from the deepest level up,
    with ``num_res_blocks + 1`` blocks per level.
    """

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.z_channels, widths[-1], 3, padding=1)
        self.mid = _Mid(cfg, widths[-1])
        self.up = nn.ModuleList()
        for i in range(len(cfg.ch_mult)):
            in_ch = widths[i + 1] if i + 1 < len(widths) else widths[i]
            blocks = [ResnetBlock(cfg, in_ch if j == 0 else widths[i], widths[i])
                      for j in range(cfg.num_res_blocks + 1)]
            self.up.append(_Level(blocks, None if i == 0 else "upsample",
                                  None if i == 0 else Upsample(widths[i])))
        self.norm_out = nn.GroupNorm(cfg.norm_groups, widths[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(widths[0], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for m in level.modules_in_order():
                x = m(x)
        return _norm_swish_conv(self.norm_out, self.conv_out, x)


class MelVAE(nn.Module):
    """The AudioLDM-48k VAE (no vocoder).

    ``scale_factor`` is the latent scaling stored beside the weights in the checkpoint
    (``state_dict['scale_factor']``); it is a plain float, not part of ``state_dict()``.
    """

    def __init__(self, cfg: VAEConfig | None = None, scale_factor: float = 1.0, with_encoder: bool = True,
                 with_decoder: bool = True):
        super().__init__()
        self.cfg = cfg = cfg or VAEConfig()
        self.scale_factor = float(scale_factor)
        # Decoding never needs the encoder, and a prompt's encoding never needs the decoder:
        # each half is built (and its weights read) only where it is used.
        if with_encoder:
            self.encoder = Encoder(cfg)
            self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        else:
            self.encoder = self.quant_conv = None
        if with_decoder:
            self.decoder = Decoder(cfg)
            self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
        else:
            self.decoder = self.post_quant_conv = None

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latent (B, embed_dim, t, latent_bins) -> mel (B, out_channels, 8t, mel_bins).

        Items are decoded one at a time: every item is independent (GroupNorm and attention are
        per item) and the full-resolution activations dominate memory.
        """
        if self.decoder is None:
            raise RuntimeError("this MelVAE was built with with_decoder=False")
        if z.dim() != 4 or z.shape[1] != self.cfg.embed_dim:
            raise ValueError(f"latent must be (B, {self.cfg.embed_dim}, t, f), got {tuple(z.shape)}")
        inv = 1.0 / self.scale_factor
        return torch.cat([self.decoder(self.post_quant_conv(inv * z[i:i + 1])) for i in range(z.shape[0])])

    @torch.no_grad()
    def encode(self, mel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mel (B, in_channels, T, mel_bins) -> posterior (mean, logvar), each (B, embed_dim, T//8, mel_bins/8).

        ``logvar`` is clamped to [logvar_min, logvar_max] as the official posterior does.
        """
        if self.encoder is None:
            raise RuntimeError("this MelVAE was built with with_encoder=False")
        if mel.dim() != 4 or mel.shape[1] != self.cfg.in_channels:
            raise ValueError(f"mel must be (B, {self.cfg.in_channels}, T, bins), got {tuple(mel.shape)}")
        moments = self.quant_conv(self.encoder(mel))
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(self.cfg.logvar_min, self.cfg.logvar_max)

    def sample_latent(self, mean: torch.Tensor, logvar: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Scaled posterior sample ``scale_factor * (mean + exp(logvar/2) * noise)``, noise ~ N(0,1) like mean."""
        return self.scale_factor * (mean + torch.exp(0.5 * logvar) * noise)
