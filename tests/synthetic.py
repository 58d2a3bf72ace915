"""Deterministic synthetic weights, following the rule in ``shared/reference/README.md``.

Every value depends only on the manifest name, shape and dtype of a checkpoint entry, so the
weights the golden data was produced with can be rebuilt here without any real checkpoint.
"""
from __future__ import annotations

import json
import math
import os
import zlib
from pathlib import Path

import torch

SHARED = Path(os.environ.get("MUCODEC_SHARED", Path(__file__).resolve().parents[2] / "shared"))
REFERENCE = SHARED / "reference"

# Buffers whose value the module computes itself (windows, filterbanks, kernels, rotary freqs).
COMPUTED_LEAVES = ("window", "fb", "kernel", "inv_freq")
NORMFEAT_COUNT = 1048576.0  # 2**20: exact in float32, and far past the statistics-update threshold
SCALE_FACTOR = 0.5


def _gen(name: str, global_seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed((global_seed << 32) | zlib.crc32(name.encode()))


def _randn(name, shape):
    return torch.randn(shape, generator=_gen(name), dtype=torch.float32)


def _rand(name, shape):
    return torch.rand(shape, generator=_gen(name), dtype=torch.float32)


def synth(name: str, shape, dtype=torch.float32):
    """Synthetic value of one manifest entry, or None for a computed buffer."""
    shape = tuple(int(s) for s in shape)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    leaf = name.rsplit(".", 1)[-1]
    if not dtype.is_floating_point:
        return torch.zeros(shape, dtype=dtype)
    if leaf in COMPUTED_LEAVES:
        return None
    if leaf in ("counts", "sum_x", "sum_x2", "sum_target_x2"):
        prefix = name[: -len(leaf)]
        if leaf in ("counts", "sum_target_x2"):
            return torch.full(shape, NORMFEAT_COUNT)
        mean = 0.5 * _randn(prefix + "sum_x", shape)
        if leaf == "sum_x":
            return mean * NORMFEAT_COUNT
        std = 0.5 + 0.5 * _rand(prefix + "sum_x2", shape)
        return (mean * mean + std * std) * NORMFEAT_COUNT
    if leaf == "running_mean":
        return 0.1 * _randn(name, shape)
    if leaf == "running_var":
        return 1.0 + 0.1 * _rand(name, shape)
    if leaf == "stale_counter":
        return torch.zeros(shape)
    if leaf in ("weight_g", "original0"):
        return 1.0 + 0.1 * _randn(name, shape)
    if leaf == "bias":
        return 0.02 * _randn(name, shape)
    if len(shape) >= 2:
        return _randn(name, shape) / math.sqrt(math.prod(shape[1:]))
    if leaf == "weight":
        return 1.0 + 0.1 * _randn(name, shape)
    return _randn(name, shape)


def manifest(which: str) -> dict:
    """``which`` is 'muq', 'mucodec' or 'audioldm_48k'."""
    with open(REFERENCE / f"{which}.json") as f:
        return json.load(f)


def entries(which: str, select=None):
    """Yield (name, shape, dtype) of a manifest, optionally filtered by ``select(name)``."""
    for e in manifest(which)["entries"]:
        if select is None or select(e["name"]):
            yield e["name"], tuple(e["shape"]), e["dtype"]


def state_dict(which: str, prefix: str = "", strip: str = "", select=None) -> dict:
    """Synthetic tensors of manifest entries whose name starts with ``prefix``.

    ``strip`` is removed from the front of each key (e.g. 'cfm_wrapper.estimator.')."""
    out = {}
    for name, shape, dtype in entries(which):
        if not name.startswith(prefix) or (select is not None and not select(name)):
            continue
        if which == "mucodec" and name.startswith("muencoder."):
            continue  # seeded by their muq.pt name; the synthetic mucodec.pt holds none of them
        t = synth(name, shape, dtype)
        if t is not None:
            out[name[len(strip):] if strip and name.startswith(strip) else name] = t
    return out


def golden(name: str):
    """Arrays of one golden file, e.g. golden('muq_layer')."""
    import numpy as np

    with np.load(REFERENCE / f"{name}.npz") as z:
        return {k: z[k] for k in z.files}
