"""What a fine-tuning run keeps on disk: its training state and the checkpoint folder it produces.

The run folder is itself a checkpoint folder in the official layout::

    ckpt/mucodec.pt          the starting mucodec.pt with the trained tensors replaced (same keys, shapes, container)
    muq_dev/muq.pt           the frozen encoder: a link to (or copy of) the starting file
    tools/audioldm_48k.pth   the frozen VAE and vocoder: likewise
    model_card.json          base checkpoint hash, data fingerprint, steps, settings, final validation figures
    state/last.pt            training state (weights, optimiser, scheduler, EMA, RNG states, data position)
    state/best.pt            trained tensors of the best validation so far
    metrics.csv, loss.png    one row per logged step; the plot when matplotlib is installed

Every file is written through :func:`files.open_atomic` and holds only tensors and plain containers, read
back with ``torch.load(weights_only=True)``: a killed run leaves the previous state file whole.
"""
from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import torch

from . import files
from .checkpoint import FILES, read_checkpoint, state_dict_of
from .errors import CheckpointError, OutputError

STATE_DIR = "state"
LAST, BEST = "last.pt", "best.pt"
CARD = "model_card.json"
# FlowDecoder state-dict prefix -> the official mucodec.pt prefix (the DiT lives in the CFM wrapper there)
OFFICIAL_PREFIX = {"estimator.": "cfm_wrapper.estimator."}
COPY_BLOCK = 1 << 24


def official_name(name: str) -> str:
    for ours, theirs in OFFICIAL_PREFIX.items():
        if name.startswith(ours):
            return theirs + name[len(ours):]
    return name


def save(path: Path, obj: dict) -> None:
    """``torch.save`` of tensors and plain containers, replacing ``path`` only once fully written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(obj, buf)
    files.write_atomic(path, buf.getvalue())


def load(path: Path) -> dict:
    """A state file written by :func:`save`, read without executing anything from it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable training state ({type(e).__name__}); delete it to "
                              f"start the run again, or restore it from a copy.") from None


def export(base_files: dict, trained: dict, run: Path) -> Path:
    """Write ``run``/ckpt/mucodec.pt: the base mucodec.pt with ``trained`` (FlowDecoder names -> tensors)
    put in place of its own tensors; every other entry, the container and the key order stay as they were.
    Links (or copies) the frozen muq.pt and audioldm_48k.pth beside it. Returns the mucodec.pt path."""
    base = base_files["mucodec"]
    obj = read_checkpoint(base, "mucodec")
    state = state_dict_of(obj)
    for name, value in trained.items():
        key = official_name(name)
        if key not in state:
            raise CheckpointError(f"{base} has no tensor {key}; fine-tune from the official mucodec.pt.")
        if tuple(state[key].shape) != tuple(value.shape):
            raise CheckpointError(f"{base}: {key} has shape {tuple(state[key].shape)}, the trained one "
                                  f"{tuple(value.shape)}; fine-tune from the file the run started with.")
        # the dict inside ``obj`` is updated in place: the layout (flat or wrapped) is kept
        container = obj if key in obj else obj.get("state_dict", obj.get("model"))
        container[key] = value.detach().to(state[key].dtype).cpu().contiguous()
    out = run / FILES["mucodec"]
    save(out, obj)
    for role in ("muq", "audioldm"):
        if role in base_files:
            link_or_copy(Path(base_files[role]), run / FILES[role])
    return out


def link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` becomes the frozen file ``src``: a symbolic link, or a copy where links are not allowed."""
    src = src.resolve()
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_symlink() or dst.exists():
        if dst.resolve() == src:
            return
        dst.unlink()
    try:
        os.symlink(src, dst)
        return
    except OSError:
        pass
    try:
        with open(src, "rb") as f, files.open_atomic(dst) as g:
            shutil.copyfileobj(f, g, COPY_BLOCK)
    except OSError as e:
        raise OutputError(f"Cannot copy {src} to {dst}: {e.strerror or e}.") from None
