"""MuCodec's single-codebook vector quantizer (official ``descript_quantize3``, 1 of 1 codebooks).

Names are relative to ``rvq_muencoder_emb.quantizers.0.`` in ``mucodec.pt``; the weight-normed
``in_proj`` / ``out_proj`` are loaded as plain weights (``fold_weight_norm``), and the training-only
``stale_counter`` buffer is not part of this module.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mucodec.errors import TokenFileError


@dataclass
class QuantizerConfig:
    input_dim: int = 1024
    codebook_size: int = 16384  # 14 bits per code
    codebook_dim: int = 32


class Quantizer(nn.Module):
    """1x1 conv down-projection, cosine nearest neighbour in the codebook, 1x1 conv up-projection."""

    def __init__(self, cfg: QuantizerConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or QuantizerConfig()
        self.in_proj = nn.Conv1d(cfg.input_dim, cfg.codebook_dim, 1)
        self.out_proj = nn.Conv1d(cfg.codebook_dim, cfg.input_dim, 1)
        self.codebook = nn.Embedding(cfg.codebook_size, cfg.codebook_dim)

    @torch.no_grad()
    def encode(self, z: torch.Tensor):
        """z (B, input_dim, T) -> codes (B, 1, T) int64, z_e (B, codebook_dim, T).

        The nearest code is found with the official arithmetic: both sides L2-normalised, then
        the argmax of ``-(|e|^2 - 2 e.c + |c|^2)`` (first index on ties).
        """
        z_e = self.in_proj(z)
        b, d, t = z_e.shape
        e = F.normalize(z_e.transpose(1, 2).reshape(b * t, d))
        c = F.normalize(self.codebook.weight)
        dist = e.pow(2).sum(1, keepdim=True) - 2 * e @ c.t() + c.pow(2).sum(1, keepdim=True).t()
        codes = (-dist).max(1).indices.view(b, 1, t)
        return codes, z_e

    @torch.no_grad()
    def from_codes(self, codes: torch.Tensor):
        """codes (B, 1, T) -> z_q (B, input_dim, T), z_p (B, codebook_dim, T).

        ``z_p`` is the raw (un-normalised) codebook row, as the official ``from_codes``.
        """
        if codes.dim() != 3 or codes.shape[1] != 1:
            raise TokenFileError(f"codes must have shape (batch, 1, frames), got {tuple(codes.shape)}.")
        if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise TokenFileError(f"codes must be integers, got {codes.dtype}.")
        n = self.cfg.codebook_size
        if codes.numel() and (codes.min() < 0 or codes.max() >= n):
            raise TokenFileError(
                f"codes must be in [0, {n}), got values from {int(codes.min())} to {int(codes.max())}."
            )
        z_p = F.embedding(codes[:, 0].long(), self.codebook.weight).transpose(1, 2)
        # one item at a time: the convolution kernel may sum in another order for another batch size, and a
        # song's decode must not depend on how many songs share its batch
        return torch.cat([self.out_proj(z_p[i:i + 1]) for i in range(z_p.shape[0])]), z_p
