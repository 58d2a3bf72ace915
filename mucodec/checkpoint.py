"""Checkpoint loading: safe unpickling, name mapping, shape validation and hub download.

The three official files and where a user puts them (the official repository layout)::

    tools/audioldm_48k.pth   {'state_dict': {'first_stage_model.<name>': tensor, ..., 'scale_factor': tensor}}
    muq_dev/muq.pt           fairseq checkpoint {'cfg': {...}, 'model': {'model.<name>': tensor}, ...}
    ckpt/mucodec.pt          flat state dict of the codec (may also carry a 'muencoder.*' copy of MuQ)

Nothing here ever executes code from a file: ``torch.load(weights_only=True)`` is tried first, and a
file that pickles other objects (fairseq configs, meters, optimizer state) is read by a restricted
unpickler that rebuilds tensors and plain containers only and turns every other class into an inert
placeholder.
"""
from __future__ import annotations

import logging
import os
import pickle
import zipfile
from pathlib import Path

import torch

from .errors import CheckpointError

log = logging.getLogger(__name__)

DEFAULT_REPO = "MuCodec/mucodec"
HUB_URL = "https://huggingface.co/MuCodec/mucodec"
# role -> path relative to the checkpoint folder (the official layout); the hub repo holds the basenames.
FILES = {
    "audioldm": "tools/audioldm_48k.pth",
    "muq": "muq_dev/muq.pt",
    "mucodec": "ckpt/mucodec.pt",
}
# Optional entry a checkpoint may carry to describe non-official sizes (tiny test models, retrained models).
CONFIG_KEY = "mucodec_config"


# --------------------------------------------------------------------------------------------------
# Finding the files
# --------------------------------------------------------------------------------------------------
def _missing_message(folder: Path, missing: list[str]) -> str:
    return (
        f"MuCodec checkpoint file(s) {', '.join(missing)} not found under {folder}: download "
        f"audioldm_48k.pth, muq.pt and mucodec.pt from {HUB_URL} and save them as "
        f"{', '.join(FILES.values())} in that folder (or pass the hub id {DEFAULT_REPO} with network access)."
    )


def _looks_like_repo_id(s: str) -> bool:
    parts = s.split("/")
    return len(parts) == 2 and all(parts) and not os.path.exists(s) and not s.startswith((".", "~"))


def resolve_files(path_or_repo: str | os.PathLike, roles=("audioldm", "muq", "mucodec")) -> dict[str, Path]:
    """Local paths of the checkpoint files a model needs: ``{role: Path}``.

    ``path_or_repo`` is a folder in the official layout, or a hub repo id whose files are downloaded
    into the huggingface_hub cache (``HF_HOME``, ``HF_HUB_OFFLINE`` are honoured).
    """
    s = os.fspath(path_or_repo)
    if not _looks_like_repo_id(s):
        folder = Path(s).expanduser()
        paths = {r: folder / FILES[r] for r in roles}
        missing = [FILES[r] for r, p in paths.items() if not p.is_file()]
        if missing:
            raise CheckpointError(_missing_message(folder, missing))
        return paths
    return _download(s, roles)


def _download(repo_id: str, roles) -> dict[str, Path]:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as e:  # pragma: no cover - it is a declared dependency
        raise CheckpointError(f"huggingface_hub is needed to download {repo_id}: pip install huggingface_hub.") from e
    paths = {}
    for role in roles:
        name = os.path.basename(FILES[role])
        try:
            paths[role] = Path(hf_hub_download(repo_id=repo_id, filename=name))
        except Exception as e:  # network down, offline mode, unknown repo, missing file ...
            raise CheckpointError(
                f"Could not get {name} from the hub repo {repo_id} ({type(e).__name__}); without network access, "
                f"download audioldm_48k.pth, muq.pt and mucodec.pt from {HUB_URL} and save them as "
                f"{', '.join(FILES.values())} in the MuCodec folder (beside generate.py) or in a folder you pass "
                f"as the checkpoint path."
            ) from None
    return paths


# --------------------------------------------------------------------------------------------------
# Reading a file without executing it
# --------------------------------------------------------------------------------------------------
class _Opaque:
    """Inert stand-in for any class a checkpoint pickles besides tensors and containers."""

    _qualname = "?"

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"<opaque {self._qualname}>"


_SAFE_GLOBALS = {
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch", "Size"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("builtins", "complex"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        log.debug("checkpoint pickles %s.%s: replaced by an inert placeholder", module, name)
        return type(name, (_Opaque,), {"_qualname": f"{module}.{name}"})


class _RestrictedPickle:
    """A ``pickle_module`` for torch.load that never resolves arbitrary globals."""

    Unpickler = _RestrictedUnpickler
    load = staticmethod(lambda f, **kw: _RestrictedUnpickler(f, **kw).load())
    __name__ = "mucodec_restricted_pickle"


def read_checkpoint(path: str | os.PathLike, role: str = "checkpoint") -> dict:
    """Load a checkpoint file into plain dicts of CPU tensors, never executing code from it.

    Tensors are memory-mapped where the file format allows, so entries that are never used (training
    state, unused layers) are never read from disk.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} does not exist: download it from {HUB_URL} and save it there.")
    damaged = (
        f"{path} is not a readable PyTorch checkpoint (damaged or incomplete download?): "
        f"download it again from {HUB_URL}."
    )
    mmap = zipfile.is_zipfile(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        # Not only tensors (e.g. fairseq meters or omegaconf objects): read it with placeholders instead.
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap, pickle_module=_RestrictedPickle)
        except Exception as e:
            raise CheckpointError(damaged) from e
    except Exception as e:
        raise CheckpointError(damaged) from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict: it is not a MuCodec {role} file.")
    return obj


# --------------------------------------------------------------------------------------------------
# Mapping names
# --------------------------------------------------------------------------------------------------
def _tensors(d) -> dict:
    return {k: v for k, v in d.items() if isinstance(k, str) and isinstance(v, torch.Tensor)} if isinstance(d, dict) else {}


def state_dict_of(obj: dict) -> dict:
    """The tensor dict of a checkpoint: flat, or wrapped in 'state_dict' / 'model'."""
    for key in ("state_dict", "model"):
        inner = _tensors(obj.get(key))
        if inner:
            return inner
    return _tensors(obj)


def subdict(state: dict, prefix: str, new_prefix: str = "") -> dict:
    """Entries whose name starts with ``prefix``, renamed to start with ``new_prefix``."""
    return {new_prefix + k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def fold_weight_norm(state: dict) -> dict:
    """Replace weight-norm pairs by the plain weight they parametrise.

    Accepts both namings: ``<m>.weight_g``/``<m>.weight_v`` (torch.nn.utils.weight_norm) and
    ``<m>.parametrizations.weight.original0``/``original1`` (torch.nn.utils.parametrizations),
    giving ``<m>.weight = g * v / ||v||`` with the norm over every dim but one, computed with the
    kernel torch's weight-norm forward uses, so the result is bit-identical to the official modules.
    """
    out = dict(state)
    for k in state:
        dotted = "." + k  # top-level modules have no leading dot
        if dotted.endswith(".weight_g"):
            base, vk = k[: -len("weight_g")], k[:-1] + "v"
        elif dotted.endswith(".parametrizations.weight.original0"):
            base = k[: -len("parametrizations.weight.original0")]
            vk = base + "parametrizations.weight.original1"
        else:
            continue
        if vk not in state:
            continue
        g, v = out.pop(k), out.pop(vk)
        # g keeps size 1 on every dim but the one the norm is taken per (dim 0 for the RVQ convs).
        dim = next((i for i, s in enumerate(g.shape) if s != 1), 0)
        out[base + "weight"] = torch._weight_norm(v.float(), g.float(), dim)
    return out


def load_module(module: torch.nn.Module, state: dict, path, prefix="") -> torch.nn.Module:
    """Load ``state`` (names relative to ``module``) into ``module``, checking every tensor it needs.

    ``prefix`` (a string to prepend, or a function of the name) gives how a name appears in the
    file, for the error message. Extra entries are ignored (and summarised at debug level); a
    missing or misshaped entry raises one clear CheckpointError.
    """
    in_file = prefix if callable(prefix) else (lambda name: prefix + name)
    expected = module.state_dict()
    for name, ref in expected.items():
        got = state.get(name)
        if got is None:
            raise CheckpointError(
                f"{path} lacks the tensor '{in_file(name)}' (expected shape {tuple(ref.shape)}): it is not a complete "
                f"MuCodec checkpoint; download it again from {HUB_URL}."
            )
        if tuple(got.shape) != tuple(ref.shape):
            raise CheckpointError(
                f"{path} has '{in_file(name)}' of shape {tuple(got.shape)} where {tuple(ref.shape)} is expected: "
                f"it does not belong to this model; use the official file from {HUB_URL}."
            )
    extra = sorted(set(state) - set(expected))
    if extra:
        log.debug("%s: %d entries not needed at inference (e.g. %s)", path, len(extra), [in_file(k) for k in extra[:3]])
    # assign=True adopts the (memory-mapped) checkpoint tensors instead of copying them into the
    # placeholder parameters the module was built with.
    module.load_state_dict({k: state[k].to(expected[k].dtype) for k in expected}, strict=True, assign=True)
    return module


class skip_init:
    """Context in which modules are built without initialising their weights.

    Random initialisation of ~1.5 B parameters costs seconds and RAM for values that loading
    overwrites at once; computed buffers (filterbanks, kernels) are still built normally.
    """

    _names = ("uniform_", "normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_",
              "trunc_normal_", "constant_", "ones_", "zeros_", "orthogonal_")

    def __enter__(self):
        self._saved = {n: getattr(torch.nn.init, n) for n in self._names}
        for n in self._names:
            setattr(torch.nn.init, n, lambda t, *a, **k: t)
        return self

    def __exit__(self, *exc):
        for n, f in self._saved.items():
            setattr(torch.nn.init, n, f)


def config_of(obj: dict) -> dict:
    """The optional ``mucodec_config`` entry (sizes of a non-official model), else {}."""
    cfg = obj.get(CONFIG_KEY)
    return cfg if isinstance(cfg, dict) else {}
