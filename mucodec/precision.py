"""Choosing the precision: what ``auto`` means on each device, dtype names, and when a choice will be slow.

Shared by the notebook API and the command line, so that both pick the same precision for the same request
and warn about the same slow one.
"""
from __future__ import annotations

import torch

from .codec import dtype_name
from .settings import DTYPES
from .errors import ArgumentError
from .kernels import cpu_bfloat16


def pick_dtype(dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """None or 'auto' -> the precision the official code decodes in on ``device``: float16 autocast
    around the flow decoder on CUDA, float32 elsewhere (bfloat16 on a CPU is faster but deviates from
    the official output by ~0.6 %, so it is asked for, not assumed). Else a name or torch dtype among
    float32, float16, bfloat16."""
    if dtype is None or (isinstance(dtype, str) and dtype == "auto"):
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    return _named_dtype(dtype, "dtype", "auto or ")


def pick_audioldm_dtype(dtype) -> torch.dtype:
    """None -> float32, the VAE and vocoder as the official code runs them; else a name or torch dtype among
    float32, float16, bfloat16 (reduced precision is asked for: it moves the audio ~2.4 %, see docs/speed.md)."""
    return torch.float32 if dtype is None else _named_dtype(dtype, "audioldm_dtype")


def _named_dtype(dtype, what: str, also: str = "") -> torch.dtype:
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    raise ArgumentError(f"{what} {dtype!r} is not supported; use {also}one of {', '.join(DTYPES)}.")


def native_bfloat16(device: str | torch.device = "cpu") -> bool:
    """Whether ``device`` computes bfloat16 natively. On a CPU that means AVX512-BF16, AMX or the ARM BF16
    extension (oneDNN's own test); without them torch emulates bfloat16 products one element at a time."""
    if torch.device(device).type != "cpu":
        return True
    probe = cpu_bfloat16()
    return True if probe is None else probe  # a build without the probe: assume the best


def precision_warning(dtype, device: str | torch.device = "cpu", stage: str = "the flow decoder") -> str | None:
    """A one-line warning when ``dtype`` (a torch dtype or its name) will run ``stage`` far slower than
    float32 on ``device``, else None."""
    if dtype_name(dtype) != "bfloat16" or native_bfloat16(device):
        return None
    return (f"this CPU has no native bfloat16 arithmetic (AVX512-BF16, AMX or ARM BF16), so bfloat16 makes {stage} "
            "several times slower than float32 here (the DiT 7x); use float32, the default on CPUs.")


def precision_warnings(dtype, audioldm_dtype, device: str | torch.device = "cpu") -> list[str]:
    """:func:`precision_warning` for both precisions a decoder has: the flow decoder's and the VAE and vocoder's."""
    stages = ((dtype, "the flow decoder"), (audioldm_dtype, "the VAE and vocoder"))
    return [w for d, stage in stages if (w := precision_warning(d, device, stage))]
