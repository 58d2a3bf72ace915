"""Checkpoint files: finding them, hub download, safe unpickling, name mapping, size/shape validation.

The three official files and where a user puts them (the official repository layout)::

    tools/audioldm_48k.pth   {'state_dict': {'first_stage_model.<name>': tensor, ..., 'scale_factor': tensor}}
    muq_dev/muq.pt           fairseq checkpoint {'cfg': {'model': {...}}, 'model': {'model.<name>': tensor}, ...}
    ckpt/mucodec.pt          flat state dict of the codec (may also carry a 'muencoder.model.*' copy of MuQ)

How each model stage is read from them is one table, :data:`mucodec.stages.STAGES`, which
:class:`mucodec.stages.Checkpoints` applies with the checks defined here.

Nothing here ever executes code from a file: ``torch.load(weights_only=True)`` is tried first, and a
file that pickles other objects (fairseq configs, meters, optimizer state) is read by a restricted
unpickler that rebuilds tensors and plain containers only and turns every other class into an inert
placeholder.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import pickle
import zipfile
from pathlib import Path
from typing import Callable

import torch

from .errors import CheckpointError
from .files import NotRegularFile, open_regular, os_reason

log = logging.getLogger(__name__)

DEFAULT_REPO = "MuCodec/mucodec"
HUB_URL = "https://huggingface.co/MuCodec/mucodec"
# role -> path relative to the checkpoint folder (the official layout); the hub repo holds the basenames.
FILES = {
    "audioldm": "tools/audioldm_48k.pth",
    "muq": "muq_dev/muq.pt",
    "mucodec": "ckpt/mucodec.pt",
}
KINDS = {
    "audioldm": "an AudioLDM-48k checkpoint (audioldm_48k.pth)",
    "muq": "a MuQ checkpoint (muq.pt)",
    "mucodec": "a MuCodec checkpoint (mucodec.pt)",
}
# Optional entry a checkpoint may carry to describe non-official sizes (tiny test models, retrained models).
CONFIG_KEY = "mucodec_config"
# The folder above the package: a source checkout in the official layout keeps its weights there.
REPO_ROOT = Path(__file__).resolve().parent.parent


def default_checkpoint() -> str:
    """The folder above the package when it holds the three official files, else the hub repo id."""
    return str(REPO_ROOT) if all((REPO_ROOT / f).is_file() for f in FILES.values()) else DEFAULT_REPO


# --------------------------------------------------------------------------------------------------
# Finding the files
# --------------------------------------------------------------------------------------------------
def put_them(folder="the checkpoint folder") -> str:
    return (f"download audioldm_48k.pth, muq.pt and mucodec.pt from {HUB_URL} and save them as "
            f"{', '.join(FILES.values())} in {folder}")


def _missing_message(folder: Path, missing: list[str]) -> str:
    return (
        f"MuCodec checkpoint file(s) {', '.join(missing)} not found under {folder}: {put_them('that folder')} "
        f"(or pass the hub id {DEFAULT_REPO} with network access)."
    )


def _looks_like_repo_id(s: str) -> bool:
    parts = s.split("/")
    return len(parts) == 2 and all(parts) and not os.path.exists(s) and not s.startswith((".", "~"))


def resolve_files(path_or_repo: str | os.PathLike, roles=("audioldm", "muq", "mucodec"),
                  revision: str | None = None) -> dict[str, Path]:
    """Local paths of the checkpoint files a model needs: ``{role: Path}``, each checked by :func:`check_file`.

    ``path_or_repo`` is a folder in the official layout, or a hub repo id whose files are downloaded
    into the huggingface_hub cache (``HF_HOME``, ``HF_HUB_OFFLINE`` are honoured) at ``revision``
    (a branch, tag or commit; the default branch when None). ``revision`` has no meaning for a folder.
    """
    s = os.fspath(path_or_repo)
    if _looks_like_repo_id(s):
        paths = _download(s, roles, revision)
    else:
        folder = Path(s).expanduser()
        paths = {r: folder / FILES[r] for r in roles}
        missing = [FILES[r] for r, p in paths.items() if not os.path.lexists(p)]
        if missing:
            raise CheckpointError(_missing_message(folder, missing))
    for p in paths.values():  # every file before any is read: a bad one is reported before minutes of loading
        check_file(p)
    return paths


def _download(repo_id: str, roles, revision: str | None) -> dict[str, Path]:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as e:  # pragma: no cover - it is a declared dependency
        raise CheckpointError(f"huggingface_hub is needed to download {repo_id}: pip install huggingface_hub.") from e
    at = f" at revision {revision!r}" if revision is not None else ""
    paths = {}
    for role in roles:
        name = os.path.basename(FILES[role])
        try:
            paths[role] = Path(hf_hub_download(repo_id=repo_id, filename=name, revision=revision))
        except Exception as e:  # network down, offline mode, unknown repo or revision, missing file ...
            raise CheckpointError(
                f"Could not get {name} from the hub repo {repo_id}{at} ({type(e).__name__}); without network "
                f"access, {put_them('the MuCodec folder (beside generate.py) or in a folder you pass as the checkpoint path')}."
            ) from None
    return paths


def check_file(path: str | os.PathLike) -> None:
    """Raise a CheckpointError saying what the OS says about ``path`` unless it is a readable regular file.

    A FIFO or device is reported, never opened (opening a FIFO would hang).
    """
    try:
        open_regular(path).close()
    except (FileNotFoundError, NotADirectoryError):  # NotADirectoryError: a component of the path is a file
        raise CheckpointError(f"Checkpoint {path} does not exist: download it from {HUB_URL} and save it there.") from None
    except NotRegularFile as e:
        raise CheckpointError(
            f"{path} is not a regular file (it is {e.kind}): put the checkpoint file itself at that path "
            f"(download it from {HUB_URL})."
        ) from None
    except OSError as e:
        raise _os_error(path, e) from None


def _os_error(path, e: OSError) -> CheckpointError:
    if isinstance(e, PermissionError):
        return CheckpointError(
            f"{path} cannot be read: permission denied; give your user read access to it (e.g. chmod a+r) "
            f"or copy it to a folder you can read."
        )
    return CheckpointError(f"{path} cannot be read: {os_reason(e)}; check the disk and the file, or download it "
                           f"again from {HUB_URL}.")


# --------------------------------------------------------------------------------------------------
# Reading a file without executing it
# --------------------------------------------------------------------------------------------------
class Opaque:
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
        return type(name, (Opaque,), {"_qualname": f"{module}.{name}"})


class _RestrictedPickle:
    """A ``pickle_module`` for torch.load that never resolves arbitrary globals."""

    Unpickler = _RestrictedUnpickler
    load = staticmethod(lambda f, **kw: _RestrictedUnpickler(f, **kw).load())
    __name__ = "mucodec_restricted_pickle"


@contextlib.contextmanager
def _explicit_weights_only():
    """Make torch.load do what each call here asks for.

    ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` turns the restricted-unpickler fallback into an error (torch
    refuses any pickle_module then), so an intact fairseq muq.pt would look damaged. Lifting it is
    safe because neither call here can run code from the file: one is torch's weights-only load,
    the other the restricted unpickler above. The variables are read by torch on every call.
    """
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("TORCH_FORCE_") and "WEIGHTS_ONLY" in k}
    try:
        yield
    finally:
        os.environ.update(saved)


def read_checkpoint(path: str | os.PathLike, role: str | None = None) -> dict:
    """Load a checkpoint file into plain dicts of CPU tensors, never executing code from it.

    Tensors are memory-mapped where the file format allows, so entries that are never used (training
    state, unused layers) are never read from disk. With ``role`` (a key of :data:`FILES`) the file
    must also be that kind of checkpoint (:func:`kind_of`).
    """
    path = Path(path)
    check_file(path)
    damaged = (
        f"{path} is not a readable PyTorch checkpoint (damaged or incomplete download?): "
        f"download it again from {HUB_URL}."
    )
    mmap = zipfile.is_zipfile(path)
    try:
        with _explicit_weights_only():
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            except pickle.UnpicklingError:
                # Not only tensors (e.g. fairseq meters or omegaconf objects): read it with placeholders instead.
                obj = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap,
                                 pickle_module=_RestrictedPickle)
    except OSError as e:
        if isinstance(e, PermissionError) or e.errno is not None:
            raise _os_error(path, e) from None
        raise CheckpointError(damaged) from e
    except Exception as e:
        raise CheckpointError(damaged) from e
    what = KINDS.get(role, f"a MuCodec {role or 'checkpoint'} file")
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict: it is not {what}; "
                              f"{put_them()}.")
    if role in FILES:
        kind = kind_of(obj)
        if kind != role:
            held = f"holds {KINDS[kind]}" if kind else "is none of the three MuCodec checkpoints"
            raise CheckpointError(f"{path} {held}, where {KINDS[role]} belongs; put the files in their places: "
                                  f"{put_them()}.")
    return obj


def kind_of(obj: dict) -> str | None:
    """Which of the three files ``obj`` is, recognised by its keys (None: none of them)."""
    names = state_dict_of(obj)
    if any(k.startswith(("cfm_wrapper.estimator.", "rvq_muencoder_emb.")) for k in names):
        return "mucodec"
    if any(k.startswith("first_stage_model.") for k in names):
        return "audioldm"
    if any(k.startswith("model.") for k in _tensors(obj.get("model"))):
        return "muq"
    return None


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


def check_shapes(expected: dict, state: dict, where: Callable) -> None:
    """Every tensor of ``expected`` ({name: tensor or shape}) is in ``state`` with that shape.

    ``where(name)`` gives (file, name in that file) for the message.
    """
    for name, ref in expected.items():
        shape = tuple(ref.shape)
        got = state.get(name)
        path, in_file = where(name)
        if got is None:
            raise CheckpointError(
                f"{path} lacks the tensor '{in_file}' (expected shape {shape}): it is not a complete "
                f"MuCodec checkpoint; download it again from {HUB_URL}."
            )
        if tuple(got.shape) != shape:
            raise CheckpointError(
                f"{path} has '{in_file}' of shape {tuple(got.shape)} where {shape} is expected: "
                f"it does not belong to this model; use the official file from {HUB_URL}."
            )


def assign(module: torch.nn.Module, state: dict, path) -> torch.nn.Module:
    expected = module.state_dict()
    extra = sorted(set(state) - set(expected))
    if extra:
        log.debug("%s: %d entries not needed at inference (e.g. %s)", path, len(extra), extra[:3])
    # assign=True adopts the (memory-mapped) checkpoint tensors instead of copying them into the
    # placeholder parameters the module was built with.
    module.load_state_dict({k: state[k].to(expected[k].dtype) for k in expected}, strict=True, assign=True)
    return module


def load_module(module: torch.nn.Module, state: dict, path, prefix="") -> torch.nn.Module:
    """Load ``state`` (names relative to ``module``) into ``module``, checking every tensor it needs.

    ``prefix`` (a string to prepend, or a function of the name) gives how a name appears in the
    file, for the error message. Extra entries are ignored (and summarised at debug level); a
    missing or misshaped entry raises one clear CheckpointError.
    """
    in_file = prefix if callable(prefix) else (lambda name: prefix + name)
    check_shapes(module.state_dict(), state, lambda name: (path, in_file(name)))
    return assign(module, state, path)


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


# --------------------------------------------------------------------------------------------------
# Sizes stored in a file
# --------------------------------------------------------------------------------------------------
# Generous upper bounds: a size past them cannot be a real model and would allocate without limit.
INT_LIMIT = 1 << 16
INT_LIMITS = {"sample_rate": 1_000_000, "sampling_rate": 1_000_000, "encoder_window": 1 << 28,
              "codebook_size": 1 << 24, "encoder_depth": 1024, "num_layers": 1024, "num_res_blocks": 64,
              "cpu_attention_block": 1 << 30}
CAN_BE_ZERO = {"encoder_window_extra", "cpu_attention_block"}
FLOAT_LIMIT = 1e9
SEQUENCE_LIMIT = 16


def make_config(cls, d, path, key: str):
    """``cls`` (a config dataclass) from the plain dict ``d`` read at ``key`` of the file ``path``.

    Every known value is checked against the type and range of its default (ints positive and
    bounded, floats finite, tuples short and of the right items, nested configs as dicts); unknown
    keys are ignored and None means the default. Raises one CheckpointError naming file and key.
    """
    if d is None:
        return cls()
    if not isinstance(d, dict):
        raise bad_size(path, key, d, "a dict of sizes")
    kwargs = {}
    for f in dataclasses.fields(cls):
        v = d.get(f.name)
        if v is None:
            continue
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        kwargs[f.name] = _size_value(v, default, f.name, path, f"{key}[{f.name!r}]")
    try:
        return cls(**kwargs)
    except (ValueError, CheckpointError) as e:  # a config's own consistency checks
        raise CheckpointError(f"{path}: the sizes in {key} do not fit together ({str(e).rstrip('.')}); use the official file "
                              f"from {HUB_URL}.") from None


def _size_value(v, default, name, path, key):
    if dataclasses.is_dataclass(default):
        return make_config(type(default), v, path, key)
    if isinstance(default, tuple):
        if not isinstance(v, (list, tuple)) or not 1 <= len(v) <= SEQUENCE_LIMIT:
            raise bad_size(path, key, v, f"a list of 1 to {SEQUENCE_LIMIT} items")
        return tuple(_size_value(x, default[0], name, path, f"{key}[{i}]") for i, x in enumerate(v))
    if isinstance(default, int):
        low, high = (0 if name in CAN_BE_ZERO else 1), INT_LIMITS.get(name, INT_LIMIT)
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
            kind = "a non-negative" if low == 0 else "a positive"
            raise bad_size(path, key, v, f"{kind} integer no larger than {high}")
        return v
    if isinstance(default, float):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or abs(v) > FLOAT_LIMIT:
            raise bad_size(path, key, v, f"a finite number of magnitude at most {FLOAT_LIMIT:g}")
        return float(v)
    return v


def bad_size(path, key, v, must) -> CheckpointError:
    shown = repr(v) if len(repr(v)) <= 60 else f"a {type(v).__name__}"
    return CheckpointError(f"{path}: {key} is {shown}; it must be {must}: the sizes stored in this file are "
                           f"damaged or not MuCodec's, so use the official file from {HUB_URL}.")
