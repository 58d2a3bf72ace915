"""The settings of every job: one frozen dataclass each, built once, checked once, passed down unchanged.

    DecodingOptions   how tokens become audio: num_steps, guidance_scale, seed, fast_vocoder, sampler,
                      guidance_interval, schedule, batch_size
    EncodingOptions   how audio becomes tokens: batch_size
    JobOptions        where and how a library job runs: weights, device, precision, output format, shards, engine

The command line fills them from its arguments (:func:`mucodec.options.settings`), the notebook API from its
keyword arguments; both then hand the same object to the codec, the library jobs, the Ray engine, the
fingerprints (:meth:`DecodingOptions.fingerprint`) and the reports. Every default and every bound of a user
setting has its home here, and each is checked in its dataclass's ``__post_init__`` only, so a value refused
by one entry point is refused with the same words by every other.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .audio import AUDIO_FORMATS
from . import samplers
from .errors import ArgumentError, SettingError

# The official values.
CODE2SOUND_STEPS = 20  # MuCodec.code2sound
SOUND2SOUND_STEPS = 50  # MuCodec.sound2sound
GUIDANCE_SCALE = 1.5
ENCODE_BATCH = 3  # 40.96 s windows through MuQ at once

DECODE_BATCH = 4  # songs whose windows go through the flow decoder together (decode job)
SHARD_SONGS = 1000  # songs per parquet shard of an encode job, its unit of commit
# Bounds: far above any sensible use, low enough that a typo cannot run for days.
MAX_STEPS = 1000
MAX_BATCH = 256
MAX_WORKERS = 256
MAX_SHARD_SONGS = 10 ** 6
MAX_SEED = 2 ** 64 - 1

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ENGINES = ("local", "ray")
TOKEN_FORMATS = ("parquet", "mct", "both")  # what an encode job writes
TASKS = {"code2sound": CODE2SOUND_STEPS, "sound2sound": SOUND2SOUND_STEPS}

# Field metadata: a setting that changes how fast a job runs but not a bit of what it writes, so a job resumed
# with another value continues the same output.
SPEED_ONLY = {"output": False}


def whole_number(name: str, value, low: int = 1, high: int | None = None) -> int:
    """``value`` as an int in [low, high] (no upper bound for None); else SettingError."""
    rule = f"must lie in [{low}, {high}] (a whole number)" if high is not None else \
        f"must be a whole number of at least {low}"
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low or (
            high is not None and value > high):
        raise SettingError(name, rule, value)
    return int(value)


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise SettingError(name, f"must be one of {', '.join(map(str, choices))}", value)


def _set(obj, name: str, value) -> None:
    object.__setattr__(obj, name, value)  # normalising a frozen field once, in __post_init__


@dataclass(frozen=True)
class DecodingOptions:
    """How tokens become audio; the same object for ``code2sound``, a token file, a decode job and the server.

    ``num_steps``: Euler steps per 40.96 s window; None takes the official count of the task
    (:meth:`for_task`: 20 for code2sound, 50 for sound2sound). ``guidance_scale``: classifier-free guidance, >= 1 (1 turns it off
    and skips the unconditional pass). ``seed``: the noise's seed; None draws fresh noise. ``fast_vocoder``:
    each mel frame through the vocoder once plus the chunk edges (the official overlapping chunks otherwise; the
    same audio up to float rounding). ``sampler``: the ODE solver (:mod:`samplers`: euler, the official one,
    heun or ab2); ``guidance_interval`` (a, b): guidance only at flow times in [a, b] (None: everywhere);
    ``schedule``: the flow times the steps meet (uniform, the official one, or cosine: denser near t = 0).
    ``batch_size``: songs a decode job steps together (speed only).
    """

    num_steps: int | None = None
    guidance_scale: float = GUIDANCE_SCALE
    seed: int | None = None
    fast_vocoder: bool = True
    sampler: str = samplers.DEFAULT_SAMPLER
    guidance_interval: tuple[float, float] | None = None
    schedule: str = samplers.DEFAULT_SCHEDULE
    batch_size: int = field(default=DECODE_BATCH, metadata=SPEED_ONLY)

    def __post_init__(self):
        if self.num_steps is not None:
            _set(self, "num_steps", whole_number("num_steps", self.num_steps, 1, MAX_STEPS))
        g = self.guidance_scale
        if isinstance(g, bool) or not isinstance(g, (int, float, np.number)) or not math.isfinite(g) or g < 1:
            raise SettingError("guidance_scale", "must be a finite number of at least 1 (1 turns guidance off)", g)
        _set(self, "guidance_scale", float(g))
        if self.seed is not None:
            _set(self, "seed", whole_number("seed", self.seed, 0, MAX_SEED))
        _set(self, "fast_vocoder", bool(self.fast_vocoder))
        _set(self, "sampler", samplers.check_sampler(self.sampler))
        _set(self, "guidance_interval", samplers.check_guidance_interval(self.guidance_interval))
        _set(self, "schedule", samplers.check_schedule(self.schedule))
        _set(self, "batch_size", whole_number("batch_size", self.batch_size, 1, MAX_BATCH))

    def for_task(self, task: str) -> DecodingOptions:
        """These options with ``num_steps`` resolved for ``task`` (code2sound or sound2sound): the official
        count of the task where it is None. Every decode runs on resolved options."""
        if task not in TASKS:
            raise ArgumentError(f"task must be one of {', '.join(TASKS)}, got {task!r}.")
        return self if self.num_steps is not None else dataclasses.replace(self, num_steps=TASKS[task])

    def fingerprint(self) -> dict:
        """The fields of resolved options that decide the audio: what an output folder records and compares."""
        if self.num_steps is None:
            raise ArgumentError("Resolve num_steps (for_task) before fingerprinting decoding options.")
        return {k: list(v) if isinstance(v, tuple) else v for k, v in output_fields(self).items()}  # as JSON reads


@dataclass(frozen=True)
class EncodingOptions:
    """How audio becomes tokens. ``batch_size``: 40.96 s windows through MuQ at once (memory against speed;
    the codes do not depend on it)."""

    batch_size: int = ENCODE_BATCH

    def __post_init__(self):
        _set(self, "batch_size", whole_number("batch_size", self.batch_size, 1, MAX_BATCH))


@dataclass(frozen=True)
class JobOptions:
    """Where and how a library job runs (``mucodec.library``).

    ``ckpt``/``revision``: the weights (None: the MuCodec folder or the hub). ``dtype``: the flow decoder's
    precision; ``audioldm_dtype``: the VAE and vocoder's (names of :data:`DTYPES`, or torch dtypes).
    ``offload``: stages in CPU memory except while each runs. ``audio_format``: a decode job's files;
    ``token_format`` and ``shard_size``: an encode job's. ``shard``: (I, N), job I of N. ``engine``: local or
    ray (``address``: the cluster). ``workers``: processes reading the inputs (None: the job's default).
    ``retry_errors``: try again songs that failed before; ``overwrite``: discard output made differently;
    ``verify``: checksum committed outputs before skipping them.
    """

    ckpt: str | None = None
    revision: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    audioldm_dtype: str = "float32"
    offload: bool = False
    audio_format: str = "flac"
    token_format: str = "parquet"
    shard_size: int = SHARD_SONGS
    shard: tuple[int, int] | None = None
    engine: str = "local"
    address: str | None = None
    workers: int | None = None
    retry_errors: bool = False
    overwrite: bool = False
    verify: bool = False

    def __post_init__(self):
        if self.ckpt is not None:
            _set(self, "ckpt", str(self.ckpt))
        _set(self, "device", str(self.device))
        for name in ("dtype", "audioldm_dtype"):
            value = getattr(self, name)
            _set(self, name, str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else value)
            _choice(name, getattr(self, name), DTYPES)
        _choice("audio_format", self.audio_format, AUDIO_FORMATS)
        _choice("token_format", self.token_format, TOKEN_FORMATS)
        _set(self, "shard_size", whole_number("shard_size", self.shard_size, 1, MAX_SHARD_SONGS))
        if self.shard is not None:
            rule = "must be (I, N): job I of N, 1 <= I <= N"
            if not isinstance(self.shard, (tuple, list)) or len(self.shard) != 2:
                raise SettingError("shard", rule, self.shard)
            i, n = (whole_number("shard", v) for v in self.shard)
            if i > n:
                raise SettingError("shard", rule, self.shard)
            _set(self, "shard", (i, n))
        _choice("engine", self.engine, ENGINES)
        if self.address is not None and self.engine != "ray":
            raise SettingError("address", "names a Ray cluster, which needs the ray engine (--engine ray)", self.address)
        if self.workers is not None:
            _set(self, "workers", whole_number("workers", self.workers, 0, MAX_WORKERS))

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def torch_audioldm_dtype(self) -> torch.dtype:
        return DTYPES[self.audioldm_dtype]


def output_fields(options) -> dict:
    """``dataclasses.asdict`` of ``options`` without the fields that only change the speed."""
    return {f.name: getattr(options, f.name) for f in dataclasses.fields(options) if f.metadata.get("output", True)}


def build(cls, **values):
    """``cls(**values)`` with the values that are None left to the dataclass's defaults (the API's way of
    saying 'default'); the one place an API keyword becomes a setting."""
    return cls(**{k: v for k, v in values.items() if v is not None})


def generator_for(seed: int | None, generator: torch.Generator | None) -> torch.Generator | None:
    """The CPU generator a decode draws its noise from: ``generator``, or one seeded with ``seed`` (a checked
    :class:`DecodingOptions` seed); None: torch's global one."""
    if seed is not None and generator is not None:
        raise ArgumentError("Pass seed or generator, not both.")
    if generator is not None:
        if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
            raise ArgumentError("generator must be a CPU torch.Generator (noise is drawn on the CPU, as the "
                                "official code does).")
        return generator
    return None if seed is None else torch.Generator().manual_seed(int(seed))
