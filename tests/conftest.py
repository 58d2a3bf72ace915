"""Session fixtures: checkpoint files in the official layouts, written once per test session.

Shared helpers (golden data, ``max_err``, the synthetic-weight rule, tiny checkpoints) are in ``helpers.py``.

``official_ckpt_dir`` holds full-size synthetic checkpoints (the weights the golden data was made with),
saved the way the official files are: muq.pt as a fairseq checkpoint (``cfg`` + ``model`` with the
``model.`` prefix, plus pickled non-tensor objects as fairseq writes them), mucodec.pt as a flat state
dict with old-style weight-norm names, audioldm_48k.pth as ``{'state_dict': {'first_stage_model.*',
'scale_factor'}}``. Every golden test loads its model from these files through ``MuCodec.from_pretrained``.

Set ``MUCODEC_TEST_CKPT=/some/folder`` to keep the ~6 GB of files between sessions (they are rebuilt
when the folder lacks them).
"""
from __future__ import annotations

import argparse
import gc
import os
from pathlib import Path

import pytest
import torch

import helpers

FILES = {"audioldm": "tools/audioldm_48k.pth", "muq": "muq_dev/muq.pt", "mucodec": "ckpt/mucodec.pt"}


def write_official_checkpoints(folder: Path) -> Path:
    """Write the three synthetic full-size checkpoints into ``folder`` (official layout)."""
    for rel in FILES.values():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)

    path = folder / FILES["muq"]
    if not path.exists():
        model = helpers.state_dict("muq")
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

    path = folder / FILES["mucodec"]
    if not path.exists():
        _save(helpers.state_dict("mucodec"), path)

    path = folder / FILES["audioldm"]
    if not path.exists():
        sd = {"first_stage_model." + k: v for k, v in helpers.state_dict("audioldm_48k").items()}
        sd["scale_factor"] = torch.tensor(helpers.SCALE_FACTOR)
        _save({"state_dict": sd}, path)
        del sd
    gc.collect()
    return folder


def _save(obj, path: Path):
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


@pytest.fixture(scope="session")
def official_ckpt_dir(tmp_path_factory) -> Path:
    keep = os.environ.get("MUCODEC_TEST_CKPT")
    folder = Path(keep) if keep else tmp_path_factory.mktemp("official_ckpt")
    return write_official_checkpoints(folder)


@pytest.fixture(scope="session")
def encoder_codec(official_ckpt_dir):
    """Full-size encoder (MuQ + quantizer) loaded from the synthetic checkpoint files."""
    from mucodec.codec import MuCodec

    return MuCodec.from_pretrained(official_ckpt_dir, device="cpu", encoder_only=True)


@pytest.fixture(scope="session")
def full_codec(official_ckpt_dir):
    """The whole full-size codec loaded from the synthetic checkpoint files."""
    from mucodec.codec import MuCodec

    return MuCodec.from_pretrained(official_ckpt_dir, device="cpu")


@pytest.fixture(scope="session")
def tiny_ckpt_dir(tmp_path_factory) -> Path:
    """Tiny checkpoints in the official layout (same code and time structure, tiny widths)."""
    return helpers.write_tiny_checkpoints(tmp_path_factory.mktemp("tiny_ckpt"))


@pytest.fixture(scope="session")
def tiny_codec(tiny_ckpt_dir):
    from mucodec.codec import MuCodec

    return MuCodec.from_pretrained(tiny_ckpt_dir, device="cpu")
