"""Helpers shared by the tests: golden data, error measures, synthetic and tiny checkpoints.

* Golden data and manifests live in ``tests/data`` (rebuilt from the reference data folder by
  ``tools/make_test_data.py``; ``tests/data/README.md`` lists what was kept of each array).
* ``max_err`` is the one error measure of the golden tests; it also understands arrays that are stored
  as a fixed subset plus whole-array statistics (``Sampled``).
* ``synth`` / ``state_dict``: the deterministic synthetic-weight rule the reference data was made with.
* ``write_tiny_checkpoints``: tiny models in the official file layouts.
* ``smooth_in_time``: a flow decoder whose velocity is smooth in flow time (solver orders show on it).

The package under test is imported only inside ``write_tiny_checkpoints``, so that the data tool can use
the subset definition here without depending on the code it checks.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import gzip
import json
import math
import os
import zlib
from pathlib import Path

import numpy as np
import torch

DATA = Path(__file__).resolve().parent / "data"

# ================================================================================================
# golden data
# ================================================================================================
# A large expected-output array may be stored as a subset of its elements plus statistics of the whole
# array (mean, std, min, max, mean of |x|, all float64 over every element). Keys in the .npz file:
#   KEY.subset  float32 values at the subset positions (groups concatenated)
#   KEY.shape   the original shape
#   KEY.counts  subset size per group; one group = the whole array, several = one per index of axis 0
#   KEY.stats   (1 + groups, 5) statistics: whole array first, then each group when there are several
# The positions are not stored: ``subset_indices`` recomputes them from the file and key names.
SUBSET_FIELDS = ("subset", "shape", "counts", "stats")
STAT_NAMES = ("mean", "std", "min", "max", "mean_abs")


def subset_indices(size: int, count: int, label: str) -> np.ndarray:
    """``count`` distinct flat positions in ``range(size)``, sorted, fixed by ``label``.

    Integer arithmetic only (a splitmix64 finaliser ranks the positions), so the choice does not depend
    on the numpy version or its random generators. The finaliser is a bijection on uint64, so no two
    positions tie and the ``count`` smallest ranks are a unique set."""
    if not 0 < count <= size < 2**32:
        raise ValueError(f"cannot pick {count} of {size} positions")
    with np.errstate(over="ignore"):
        x = np.arange(size, dtype=np.uint64) + (np.uint64(zlib.crc32(label.encode())) << np.uint64(32))
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return np.sort(np.argpartition(x, count - 1)[:count])


def summary_stats(a) -> np.ndarray:
    """(mean, std, min, max, mean |x|) of every element, in float64."""
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    return np.array([a.mean(), a.std(), a.min(), a.max(), np.abs(a).mean()])


@dataclasses.dataclass
class Sampled:
    """An expected array of which only a subset of elements and whole-array statistics are stored.

    Compared with ``max_err``: the error is the larger of the largest elementwise error on the subset
    and the largest difference of any statistic (whole array, and each group if there are several).
    Each statistic moves by at most the largest elementwise error (mean, min, max, mean |x| obviously;
    std because it is the RMS norm of the centred array, and norms are 1-Lipschitz), so a full array
    within ``tol`` elementwise always passes ``max_err <= tol``: the same tolerance applies unchanged."""

    shape: tuple
    values: np.ndarray  # subset values, groups concatenated
    counts: tuple  # subset size per group
    stats: np.ndarray  # (1 + groups if groups > 1 else 1, 5)
    label: str  # positions of group g come from subset_indices(..., label + "/g") (one group: label)

    @property
    def groups(self) -> int:
        return len(self.counts)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def group_labels(self) -> list:
        return [self.label] if self.groups == 1 else [f"{self.label}/{g}" for g in range(self.groups)]

    def flat_indices(self) -> np.ndarray:
        """Positions of ``values`` in the flattened array."""
        n = self.size // self.groups
        return np.concatenate([g * n + subset_indices(n, c, lab)
                               for g, (c, lab) in enumerate(zip(self.counts, self.group_labels()))])

    def __getitem__(self, g: int) -> "Sampled":
        """Row ``g`` of axis 0, when the subset was drawn per row."""
        if self.groups == 1:
            raise IndexError("this array was sampled as a whole; only whole-array comparisons are possible")
        start = sum(self.counts[:g])
        return Sampled(tuple(self.shape[1:]), self.values[start:start + self.counts[g]], (self.counts[g],),
                       self.stats[1 + g][None], self.group_labels()[g])

    def errors(self, ours: np.ndarray) -> dict:
        """Per-check absolute errors of ``ours`` (the full array) against the stored subset and stats."""
        ours = np.asarray(ours, dtype=np.float64)
        assert ours.shape == tuple(self.shape), (ours.shape, self.shape)
        out = {"subset": float(np.abs(ours.reshape(-1)[self.flat_indices()] - self.values).max())}
        rows = [ours] if self.groups == 1 else [ours] + list(ours)
        for r, (part, ref) in enumerate(zip(rows, self.stats)):
            diff = np.abs(summary_stats(part) - ref)
            for name, d in zip(STAT_NAMES, diff):
                out[name if r == 0 else f"{name}[{r - 1}]"] = float(d)
        return out


def _as_float64(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=np.float64)


def max_err(ours, ref) -> float:
    """Largest absolute difference between ``ours`` and the expected ``ref`` (shapes must match).

    ``ref`` may be a ``Sampled`` array: see there for why the same tolerance stays valid."""
    ours = _as_float64(ours)
    if isinstance(ref, Sampled):
        return max(ref.errors(ours).values())
    ref = _as_float64(ref)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max()) if ours.size else 0.0


def golden(name: str) -> dict:
    """Arrays of one golden file, e.g. golden('muq_layer'): numpy arrays, or ``Sampled`` where only a
    subset is stored."""
    with np.load(DATA / f"{name}.npz", allow_pickle=False) as z:
        raw = {k: z[k] for k in z.files}
    out = {}
    for key in sorted(raw):
        base, _, field = key.rpartition(".")
        if field == "subset" and all(f"{base}.{f}" in raw for f in SUBSET_FIELDS):
            out[base] = Sampled(tuple(int(s) for s in raw[base + ".shape"]), raw[key],
                                tuple(int(c) for c in raw[base + ".counts"]), raw[base + ".stats"],
                                f"{name}/{base}")
    sampled_keys = {f"{b}.{f}" for b in out for f in SUBSET_FIELDS}
    out.update({k: v for k, v in raw.items() if k not in sampled_keys})
    return out


def _read_json_gz(path: Path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return json.load(f)


def manifest(which: str) -> dict:
    """Checkpoint manifest: ``{'entries': [{'name', 'shape', 'dtype'}, ...]}``; ``which`` is 'muq',
    'mucodec' or 'audioldm_48k'."""
    return _read_json_gz(DATA / f"{which}.json.gz")


def checksums() -> dict:
    """Per manifest (``'muq.json'``, ...) and entry: float64 ``sum``, ``sumsq`` and ``first`` values of the
    synthetic tensor, as recorded by the reference."""
    return _read_json_gz(DATA / "synthetic_checksums.json.gz")


def entries(which: str, select=None):
    """Yield (name, shape, dtype) of a manifest, optionally filtered by ``select(name)``."""
    for e in manifest(which)["entries"]:
        if select is None or select(e["name"]):
            yield e["name"], tuple(e["shape"]), e["dtype"]


# ================================================================================================
# synthetic weights (the rule of the reference data's README)
# ================================================================================================
# Every value depends only on the manifest name, shape and dtype of a checkpoint entry, so the weights
# the golden data was produced with are rebuilt here without any real checkpoint.

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


# ================================================================================================
# tiny checkpoints
# ================================================================================================
# Same code, same time structure (48 kHz, 25 Hz codes, 40.96 s windows, 16384 codes), tiny widths, so the
# windowing logic and the CLI run end to end in seconds. The sizes travel in each file (muq.pt: fairseq
# ``cfg['model']``; mucodec.pt / audioldm_48k.pth: a ``mucodec_config`` entry), which is how
# ``from_pretrained`` tells a tiny model from the official one.
TINY_MUQ = dict(label_rate=25, hop_length=240, n_mels=128, conv_dim=4, encoder_dim=16, encoder_depth=2,
                num_attention_heads=2, intermediate_size=32, conv_depthwise_kernel_size=5)
TINY_LAYER = 2


def _randomise(module: torch.nn.Module, seed: int) -> dict:
    """Random but well-scaled weights (fan-in normalised), as official names relative to the module."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in module.state_dict().items():
        if not t.is_floating_point():
            out[name] = t.clone()
        elif name.endswith(("running_var", "counts")):
            out[name] = t.clone() if name.endswith("running_var") else torch.full_like(t, 1.0)
        elif name.endswith(("sum_x2",)):
            out[name] = torch.ones_like(t)
        elif t.dim() >= 2:
            out[name] = torch.randn(t.shape, generator=g) / max(1, t[0].numel()) ** 0.5
        else:
            out[name] = 0.02 * torch.randn(t.shape, generator=g) + (1.0 if name.endswith("weight") else 0.0)
    return out


def write_tiny_checkpoints(folder: Path, seed: int = 0) -> Path:
    """Write tools/audioldm_48k.pth, muq_dev/muq.pt and ckpt/mucodec.pt with tiny models."""
    from mucodec.dit import DiTConfig
    from mucodec.flow import FlowDecoder, FlowDecoderConfig
    from mucodec.muq import MuQConfig, MuQEncoder
    from mucodec.quantizer import Quantizer, QuantizerConfig
    from mucodec.vae import MelVAE, VAEConfig
    from mucodec.vocoder import HiFiGAN, VocoderConfig

    quantizer = QuantizerConfig(input_dim=16, codebook_size=16384, codebook_dim=4)
    flow = FlowDecoderConfig(cond_dim=16, dit=DiTConfig(num_heads=2, head_dim=8, num_layers=1, ff_mult=2))
    vae = VAEConfig(ch=4, ch_mult=(1, 1, 1, 1), num_res_blocks=1, norm_groups=2)
    vocoder = VocoderConfig(upsample_initial_channel=32, resblock_kernel_sizes=(3,), resblock_dilation_sizes=((1,),))

    folder = Path(folder)
    for sub in ("tools", "muq_dev", "ckpt"):
        (folder / sub).mkdir(parents=True, exist_ok=True)

    muq = MuQEncoder(MuQConfig(**TINY_MUQ), num_layers=TINY_MUQ["encoder_depth"])
    torch.save({"args": argparse.Namespace(arch="muq"), "cfg": {"model": dict(TINY_MUQ, _name="muq")},
                "model": {"model." + k: v for k, v in _randomise(muq, seed).items()}},
               folder / "muq_dev/muq.pt")

    state = {"rvq_muencoder_emb.quantizers.0." + k: v for k, v in _randomise(Quantizer(quantizer), seed + 1).items()}
    for k, v in _randomise(FlowDecoder(flow), seed + 2).items():
        state[("cfm_wrapper." + k) if k.startswith("estimator.") else k] = v
    config = {"codec": {"layer": TINY_LAYER}, "quantizer": dataclasses.asdict(quantizer),
              "flow": dataclasses.asdict(flow)}
    torch.save({"state_dict": state, "mucodec_config": config}, folder / "ckpt/mucodec.pt")

    sd = {"first_stage_model." + k: v for k, v in _randomise(MelVAE(vae, with_encoder=True), seed + 3).items()}
    sd.update({"first_stage_model.vocoder." + k: v for k, v in _randomise(HiFiGAN(vocoder), seed + 4).items()})
    sd["scale_factor"] = torch.tensor(0.5)
    torch.save({"state_dict": sd, "mucodec_config": {"vae": dataclasses.asdict(vae),
                                                     "vocoder": dataclasses.asdict(vocoder)}},
               folder / "tools/audioldm_48k.pth")
    return folder


# ---- full-size synthetic checkpoints in the official layouts (golden tests, tools/bench.py) ----

OFFICIAL_FILES = {"audioldm": "tools/audioldm_48k.pth", "muq": "muq_dev/muq.pt", "mucodec": "ckpt/mucodec.pt"}


def write_official_checkpoints(folder: Path) -> Path:
    """Write the three synthetic full-size checkpoints into ``folder`` (official layout)."""
    for rel in OFFICIAL_FILES.values():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)

    path = folder / OFFICIAL_FILES["muq"]
    if not path.exists():
        model = state_dict("muq")
        ckpt = {
            # fairseq stores its config as plain containers, and pickles other objects beside it.
            "args": argparse.Namespace(arch="muq", seed=1),
            "cfg": {"model": {"_name": "muq", "label_rate": 25, "n_mels": 128, "conv_dim": 512,
                              "encoder_dim": 1024, "encoder_depth": 12, "hop_length": 240}, "task": {"_name": "muq"}},
            "model": model,
            "optimizer_history": [{"criterion_name": "ModelCriterion", "num_updates": 1}],
            "extra_state": {"epoch": 1},
        }
        _save(ckpt, path)
        del model, ckpt

    path = folder / OFFICIAL_FILES["mucodec"]
    if not path.exists():
        _save(state_dict("mucodec"), path)

    path = folder / OFFICIAL_FILES["audioldm"]
    if not path.exists():
        sd = {"first_stage_model." + k: v for k, v in state_dict("audioldm_48k").items()}
        sd["scale_factor"] = torch.tensor(SCALE_FACTOR)
        _save({"state_dict": sd}, path)
        del sd
    gc.collect()
    return folder


def _save(obj, path: Path):
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def deny_opening(monkeypatch, path) -> None:
    """Make ``os.open`` of ``path`` fail with "Permission denied" (file modes do not stop root)."""
    real_open = os.open

    def deny(p, *a, **k):
        if os.fspath(p) == str(path):
            raise PermissionError(13, "Permission denied", str(p))
        return real_open(p, *a, **k)

    monkeypatch.setattr(os, "open", deny)


def smooth_in_time(flow, max_omega: float = 8.0):
    """A copy of a flow decoder whose DiT reads only the slow sinusoids of its time embedding (angular
    frequency at most ``max_omega`` per unit of flow time t).

    Random weights read every sinusoid alike, sin(1000 t) included, so their velocity swings on a 0.006
    time scale that no step count below about a thousand resolves, and no solver's order shows. A trained
    flow is smooth in t (that is why 20 Euler steps work); this copy stands in for one."""
    import copy

    flow = copy.deepcopy(flow)
    emb = flow.estimator.adaln_single.emb
    half = emb.cfg.flow_t_size // 2
    omega = torch.exp(-math.log(emb.cfg.max_period) * torch.arange(half) / half) * emb.cfg.timestep_scale
    with torch.no_grad():
        emb.timestep_embedder.linear_1.weight[:, torch.cat([omega, omega]) > max_omega] = 0
    return flow
