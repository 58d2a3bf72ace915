"""Matrix-product kernels the stage modules share.

torch runs float32 matrix products on the CPU through MKL, and MKL uses 256-bit AVX2 kernels on AMD
processors even where they have AVX-512: on a Zen 5 core that is half of what oneDNN, which torch also
ships and already uses for every convolution, reaches with the same numbers of the same precision. The
two libraries sum each dot product in another order, so results differ in the last bits (about 1e-6
relative); a row's result does not depend on how many rows share its product at the sizes the codec
runs (whole windows).
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
