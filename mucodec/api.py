"""The notebook API: one default codec, loaded once, and the official functions on it.

    import mucodec
    codes = mucodec.sound2code("song.flac")          # LongTensor (1, 1, T), 25 codes per second
    wav = mucodec.code2sound(codes)                  # float tensor (2, T * 1920) at 48 kHz

``load_model`` picks the weights, device and precision; the functions use the model it loaded
last (loading the default on first use), so a model is never reloaded behind the user's back.
"""
from __future__ import annotations

import os
import warnings

import torch

from .checkpoint import default_checkpoint
from .codec import MuCodec, pick_device
from .errors import ArgumentError
from .precision import pick_audioldm_dtype, pick_dtype, precision_warnings

# Code written against this module finds these here still; they live in the layers below that use them.
from .checkpoint import REPO_ROOT  # noqa: F401
from .codec import DTYPES, dtype_name  # noqa: F401
from .precision import native_bfloat16, precision_warning  # noqa: F401

_current: tuple[tuple, MuCodec] | None = None


def load_model(ckpt: str | os.PathLike | None = None, *, device: str | None = "auto", dtype="auto",
               encoder_only: bool = False, revision: str | None = None, progress: bool = True,
               audioldm_dtype=None) -> MuCodec:
    """Load MuCodec and make it the model the notebook functions use.

    ``ckpt``: a folder in the official layout (``tools/audioldm_48k.pth``, ``muq_dev/muq.pt``,
    ``ckpt/mucodec.pt``) or a hub repo id at ``revision``; default: the folder above this package
    when it holds the weights, else ``MuCodec/mucodec`` (downloaded once into the Hugging Face cache).
    ``device``: 'auto' (cuda > mps > cpu) or a device name. ``dtype``: 'auto' (default: float16 for the
    flow decoder on CUDA, as the official code runs it, float32 elsewhere), float32, float16 or bfloat16.
    ``audioldm_dtype``: precision of the VAE and vocoder; default float32 (bfloat16 is faster on CPUs with
    native bfloat16 and moves the audio ~2.4 %; docs/speed.md). ``encoder_only`` loads MuQ and the quantizer only.
    Calling it again with the same settings returns the same model without reloading.
    """
    global _current
    if ckpt is not None and not isinstance(ckpt, (str, os.PathLike)):
        raise ArgumentError(f"ckpt must be a folder or a hub repo id, got {ckpt!r}.")
    device = pick_device(device)
    settings = (os.fspath(ckpt) if ckpt is not None else default_checkpoint(), device,
                pick_dtype(dtype, device), bool(encoder_only), revision, pick_audioldm_dtype(audioldm_dtype))
    if _current is not None and _current[0] == settings:
        return _current[1]
    _current = None  # let the old model go before the new one is built (each is several GB)
    for slow in [] if encoder_only else precision_warnings(settings[2], settings[5], device):
        warnings.warn(slow, RuntimeWarning, stacklevel=2)
    model = MuCodec.from_pretrained(settings[0], device=settings[1], dtype=settings[2], encoder_only=settings[3],
                                    revision=revision, progress=progress, audioldm_dtype=settings[5])
    _current = (settings, model)
    return model


def current_model() -> MuCodec:
    """The model :func:`load_model` loaded last; the default one is loaded on first use."""
    return _current[1] if _current is not None else load_model()


def sound2code(audio, *, sample_rate: int | None = None, batch_size: int | None = None) -> torch.Tensor:
    """Encode music into MuCodec codes with the current model (see :meth:`MuCodec.sound2code`).

    ``audio``: a file path (any format soundfile reads; resampled to 48 kHz, mono duplicated), or a
    float tensor/array (2, N), (1, N) or (N,) at ``sample_rate`` (default 48000). ``batch_size``:
    40.96 s windows encoded at once (default 3). Returns a LongTensor (1, 1, T) of codes in
    [0, 16384), T = int(N / 48000 * 25) + 1.
    """
    return current_model().sound2code(audio, sample_rate=sample_rate, batch_size=batch_size)


def code2sound(codes, *, num_steps: int | None = None, guidance_scale: float | None = None, prompt=None,
               prompt_sample_rate: int | None = None, seed: int | None = None, generator=None, noise=None,
               fast_vocoder: bool = True, sampler: str | None = None, guidance_interval=None,
               schedule: str | None = None) -> torch.Tensor:
    """Decode MuCodec codes into music with the current model (see :meth:`MuCodec.code2sound`).

    ``codes``: LongTensor (1, 1, T) / (T,), or the path of a ``.mct`` token file (the output is then
    cut to the length of the audio it was made from). ``num_steps``: Euler steps per window
    (default 20, the official code2sound); ``guidance_scale``: classifier-free guidance (1.5);
    ``prompt``: optional reference audio (path or waveform), up to 10.24 s used; ``seed`` makes the
    result reproducible; ``sampler`` ('euler', the official one, 'heun' or 'ab2') and
    ``guidance_interval`` (a, b) and ``schedule`` ('uniform', the official one, or 'cosine') trade quality
    for DiT evaluations (docs/sampling.md). Returns a float tensor (2, T * 1920): 48 kHz stereo.
    """
    return current_model().code2sound(codes, num_steps=num_steps, guidance_scale=guidance_scale, prompt=prompt,
                                      prompt_sample_rate=prompt_sample_rate, seed=seed, generator=generator,
                                      noise=noise, fast_vocoder=fast_vocoder, sampler=sampler,
                                      guidance_interval=guidance_interval, schedule=schedule)


def sound2sound(audio, *, sample_rate: int | None = None, batch_size: int | None = None,
                num_steps: int | None = None, guidance_scale: float | None = None, prompt=None,
                prompt_sample_rate: int | None = None, seed: int | None = None, generator=None, noise=None,
                fast_vocoder: bool = True, sampler: str | None = None, guidance_interval=None,
                schedule: str | None = None) -> torch.Tensor:
    """Encode then decode (the official sound2sound, 50 steps): (2, N) at 48 kHz, N as the input."""
    return current_model().sound2sound(audio, sample_rate=sample_rate, batch_size=batch_size, num_steps=num_steps,
                                       guidance_scale=guidance_scale, prompt=prompt,
                                       prompt_sample_rate=prompt_sample_rate, seed=seed, generator=generator,
                                       noise=noise, fast_vocoder=fast_vocoder, sampler=sampler,
                                       guidance_interval=guidance_interval, schedule=schedule)
