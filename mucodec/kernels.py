"""Matrix-product kernels the stage modules share.

torch runs float32 matrix products on the CPU through MKL, which does not take its AVX-512 kernels on
AMD processors: on a Zen 5 it reached half of what oneDNN, which torch also ships and already uses for
every convolution, reaches on the same product (176 against 363 GFLOP/s at 3072 x 1024 x 4096). The
two libraries sum each dot product in another order, so results differ in the last bits (about 1e-6
relative); a row's result does not depend on how many rows share its product at the sizes the codec
runs (whole windows). The encoder, the DiT (its Linears and float32 attention products), the flow's
condition and the VAE's attention use it.
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


_ONEDNN_LINEAR = _onednn_linear()


def onednn_float32() -> bool:
    """Whether :func:`linear` runs float32 CPU products through oneDNN in this torch build."""
    return _ONEDNN_LINEAR is not None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``: (..., in) -> (..., out); float32 on the CPU through oneDNN.

    Under autocast, on other devices and in other precisions it is ``F.linear`` itself."""
    if (_ONEDNN_LINEAR is not None and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu")):
        # a weight with strided rows sends oneDNN to a reference kernel, a thousand times slower
        return _ONEDNN_LINEAR(x, weight.contiguous(), bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict names) whose product is :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
