"""A MuCodec over fake model stages, shared by the command-line and notebook-API tests.

Importing ``fake`` into a test module makes every ``from_pretrained`` there build a :class:`FakeCodec`: a
MuCodec whose model stages (``_encode``, ``decode_checked``) are fast and deterministic while everything around them
(argument checks, audio and token files, streaming output, errors) is the real code.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch

from mucodec import api
from mucodec.codec import CodecConfig, MuCodec
from mucodec.flow import FlowDecoderConfig


class FakeCodec(MuCodec):
    """The real MuCodec API over fake model stages (no weights)."""

    codebook_size = 16384
    built: list[dict] = []  # keyword arguments of every from_pretrained call

    def __init__(self, encoder_only=False):
        self.config = CodecConfig()
        self.device, self.dtype, self.progress = torch.device("cpu"), torch.float32, False
        self._sources = {}
        self.muq = SimpleNamespace()  # present: the encoder is loaded (its work is faked by _encode)
        self.flow = None if encoder_only else SimpleNamespace(cfg=FlowDecoderConfig())  # sizes only
        self.vae = None
        self.calls = []

    @classmethod
    def from_pretrained(cls, path_or_repo=None, *, device=None, dtype=torch.float32, encoder_only=False,
                        revision=None, progress=False, layer=None, audioldm_dtype=torch.float32):
        cls.built.append(dict(path_or_repo=path_or_repo, device=device, dtype=dtype, encoder_only=encoder_only,
                              revision=revision, progress=progress, audioldm_dtype=audioldm_dtype))
        return cls(encoder_only)

    def _encode(self, wav, batch_size):
        assert wav.ndim == 2 and wav.shape[0] == 2 and wav.dtype == torch.float32
        self.calls.append(("encode", dict(batch_size=batch_size, n=wav.shape[-1])))
        T = int(wav.shape[-1] / 48000 * 25) + 1
        frames = torch.nn.functional.pad(wav.abs().mean(0), (0, T * 1920 - wav.shape[-1])).reshape(T, 1920)
        return (frames.mean(1) * 1e5).long().remainder(16384).reshape(1, 1, T)

    def decode_checked(self, codes, limit, opts, generator, prompt, noise):
        assert codes.dtype == torch.int64 and codes.ndim == 3 and codes.shape[:2] == (1, 1)
        self.calls.append(("decode", dict(num_steps=opts.num_steps, guidance_scale=opts.guidance_scale,
                                          prompt=prompt, seeded=generator is not None,
                                          fast_vocoder=opts.fast_vocoder)))
        level = (codes[0, 0].float() / 16384 * 0.5).repeat_interleave(1920)[:limit]
        out = level.expand(2, -1) + 0.01 * torch.randn(2, level.numel(), generator=generator)
        yield from out.split(48000, -1)  # pieces, as the real decoder streams windows


@pytest.fixture(autouse=True)
def fake(monkeypatch):
    """Every from_pretrained in these tests builds a FakeCodec; the notebook's model starts unloaded."""
    FakeCodec.built.clear()
    monkeypatch.setattr(MuCodec, "from_pretrained", FakeCodec.from_pretrained)
    monkeypatch.setattr(api, "_current", None)
    codecs = []
    real = FakeCodec.from_pretrained.__func__

    def build(cls, *a, **kw):
        codecs.append(real(FakeCodec, *a, **kw))
        return codecs[-1]

    monkeypatch.setattr(MuCodec, "from_pretrained", classmethod(build))
    return codecs


def tone(path: Path, seconds=0.5, rate=48000, channels=2, **kw) -> Path:
    t = np.arange(int(seconds * rate)) / rate
    x = 0.3 * np.sin(2 * np.pi * 440 * t)[:, None] * np.linspace(0.5, 1, channels)[None]
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, x, rate, **kw)
    return path
