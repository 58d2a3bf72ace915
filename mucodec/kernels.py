"""Matrix-product kernels the stage modules share.

torch runs float32 matrix products on the CPU through MKL, which does not take its AVX-512 kernels on
AMD processors: on a Zen 5 it reached half of what oneDNN, which torch also ships and already uses for
every convolution, reaches on the same product (figures in docs/speed.md). The
two libraries sum each dot product in another order, so results differ in the last bits (about 1e-6
relative). How oneDNN orders a row's sum can depend on how many rows share the product (on AVX2 CPUs it
does at most sizes), so a batched input is multiplied one item at a time: an item's result never depends
on its batch mates. The encoder, the DiT (its Linears and float32 attention products), the flow's
condition and the VAE's attention use it.

bfloat16 products (and those of bfloat16 autocast) already run through oneDNN under torch; calling it
directly gave the same bits a few percent faster, and lets the DiT's feed-forward apply its GELU to the
product while it is still in registers instead of in a second pass over 52 million values.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _onednn_linear():
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):  # a torch build without it
        return None


def cpu_bfloat16() -> bool | None:
    """oneDNN's test for bfloat16 arithmetic on this CPU, the one torch makes before it sends a bfloat16
    product to oneDNN; None where this torch build lacks the (private) probe."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return None


_ONEDNN_LINEAR = _onednn_linear()
_ONEDNN_BFLOAT16 = _ONEDNN_LINEAR is not None and bool(cpu_bfloat16())
# oneDNN's names for the activations it applies to a product's output
_POST_OPS = {"none": ("none", ""), "gelu_tanh": ("gelu", "tanh")}


def onednn_linear():
    """The oneDNN product :func:`linear` calls on the CPU (``torch.ops.mkldnn._linear_pointwise``), or None."""
    return _ONEDNN_LINEAR


def onednn_float32() -> bool:
    """Whether :func:`linear` runs float32 CPU products through oneDNN in this torch build."""
    return _ONEDNN_LINEAR is not None


def _onednn_operands(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """(x, weight, bias) as oneDNN should multiply them, or None where the product is ``F.linear``'s."""
    if _ONEDNN_LINEAR is None or x.device.type != "cpu":
        return None
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return None  # oneDNN's pointwise product has no backward: training would get silently wrong gradients
    if torch.is_autocast_enabled("cpu"):
        if torch.get_autocast_dtype("cpu") != torch.bfloat16 or not _ONEDNN_BFLOAT16:
            return None
        if {x.dtype, weight.dtype} - {torch.float32, torch.bfloat16}:
            return None
        # what autocast hands F.linear: every operand rounded to bfloat16 (a no-op for stored bf16 weights)
        return x.bfloat16(), weight.bfloat16(), None if bias is None else bias.bfloat16()
    dtypes = {x.dtype, weight.dtype} | ({bias.dtype} if bias is not None else set())
    if dtypes == {torch.float32} or dtypes == {torch.bfloat16} and _ONEDNN_BFLOAT16:
        return x, weight, bias
    return None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           activation: str = "none") -> torch.Tensor:
    """``F.linear(x, weight, bias)`` then ``activation`` ("none" or "gelu_tanh"): (..., in) -> (..., out).

    float32 and bfloat16 CPU products (bfloat16 autocast included, with autocast's rounding of the operands)
    run through oneDNN with the activation fused; everything else is ``F.linear`` and ``F.gelu``."""
    if activation not in _POST_OPS:
        raise ValueError(f"activation must be one of {tuple(_POST_OPS)}, got {activation!r}")
    operands = _onednn_operands(x, weight, bias)
    if operands is not None:
        x, weight, bias = operands
        post_op, algorithm = _POST_OPS[activation]
        # a weight with strided rows sends oneDNN to a reference kernel, a thousand times slower
        weight = weight.contiguous()
        if x.dim() < 3 or x.shape[0] == 1:
            return _ONEDNN_LINEAR(x, weight, bias, post_op, [], algorithm)
        # one product per item of the batch: oneDNN's kernels for a number of rows sum a row's products in an
        # order that can depend on that number (seen with AVX2), so an item's result must not depend on how
        # many items share its batch (a song decoded beside others equals the song alone)
        first = _ONEDNN_LINEAR(x[0], weight, bias, post_op, [], algorithm)
        out = first.new_empty((x.shape[0], *first.shape))  # filled item by item: one item's temporary at a time
        out[0] = first
        for i in range(1, x.shape[0]):
            out[i] = _ONEDNN_LINEAR(x[i], weight, bias, post_op, [], algorithm)
        return out
    y = F.linear(x, weight, bias)
    return F.gelu(y, approximate="tanh") if activation == "gelu_tanh" else y


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict names) whose product is :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
