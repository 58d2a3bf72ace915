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

import os
from pathlib import Path

import pytest

import helpers

@pytest.fixture(scope="session")
def official_ckpt_dir(tmp_path_factory) -> Path:
    keep = os.environ.get("MUCODEC_TEST_CKPT")
    folder = Path(keep) if keep else tmp_path_factory.mktemp("official_ckpt")
    return helpers.write_official_checkpoints(folder)


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
