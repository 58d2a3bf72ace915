"""Checks of user arguments shared by the codec, the decoder's schedule, the library jobs and the command line.

Each bound and each range check has its home here, so a value refused in one entry point is refused
with the same words in every other.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .errors import ArgumentError

# Bounds of user arguments: far above any sensible use, low enough that a typo cannot run for days.
MAX_STEPS = 1000
MAX_BATCH = 256


def check_count(name: str, value, default, maximum):
    """A whole number >= 1 (at most ``maximum``), ``default`` for None; else ArgumentError."""
    if value is None and default is not None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1 or (
            maximum is not None and value > maximum):
        limit = f" and at most {maximum}" if maximum is not None else ""
        raise ArgumentError(f"{name} must be a whole number of at least 1{limit}, got {value!r}.")
    return int(value)


def check_guidance(value, default: float) -> float:
    """A classifier-free guidance scale: a finite number >= 1, ``default`` for None; else ArgumentError."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not math.isfinite(value) \
            or value < 1:
        raise ArgumentError(f"guidance_scale must be a finite number of at least 1 (1 turns guidance off), "
                            f"got {value!r}.")
    return float(value)


def check_generator(seed, generator) -> torch.Generator | None:
    """``seed`` or a CPU ``generator`` (not both) -> the generator noise is drawn from; None: torch's global one."""
    if seed is not None and generator is not None:
        raise ArgumentError("Pass seed or generator, not both.")
    if generator is not None:
        if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
            raise ArgumentError("generator must be a CPU torch.Generator (noise is drawn on the CPU, as the "
                                "official code does).")
        return generator
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2 ** 64:
        raise ArgumentError(f"seed must be a whole number in [0, 2**64), got {seed!r}.")
    return torch.Generator().manual_seed(int(seed))
