"""The decode job: token sequences -> one audio file per song, batched across songs, resumable, sharded.

Inputs: any token files, arrays or tables (:mod:`token_inputs`, :func:`scan_tokens`).

Output folder, beside the store's files (fingerprint, manifest, errors, report; :mod:`store`)::

    <name>.flac (or .wav)     one per song, committed by an atomic rename, cut to ``num_samples`` where the
                              tokens carry it (token libraries and .mct files)

A song is committed exactly when its audio file exists and is what the manifest line written before its rename
says (bytes; the checksum too with ``verify``); a damaged, lost or unrecorded file is decoded again. A full,
read-only or failing disk stops the job at once (:class:`StorageError`): the songs in flight are not committed. Its noise comes from its own generator, seeded with
:func:`song_seed` of the job's seed and its id, so its audio equals ``code2sound(codes, seed=song_seed(...))``
of the song alone whatever the batch and the order (``tests/test_decode_library.py``).

Batching (:class:`SongDecoder`): windows of one song are sequential (each starts from the previous window's
latents), so window k of up to ``decode_batch`` songs runs through the flow decoder together; a finished
song's slot goes to the next song's first window at once (continuous batching), and writer threads encode
and write the audio while the model computes.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import contextlib
import hashlib
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import audio, decoding, files, samplers, tokens
from ..checks import MAX_BATCH, MAX_STEPS, check_count, check_guidance
from ..codec import CodecConfig, dtype_name
from ..errors import ArgumentError, MuCodecError, OutputError, StorageError
from .engine import COMMIT_SECONDS, ModelJob, Plan, Sink, Stats, plan_run, report, run_local
from .songs import in_shard
from .store import MACHINES, Store, machine
from .token_inputs import TokenSong, read_tokens, scan_tokens

# Bump when a change to the code makes different audio from the same codes, weights and settings.
DECODE_VERSION = 1
DEFAULT_BATCH = 4
WRITER_THREADS = 2
HEARTBEAT_SECONDS = 60.0


def song_seed(seed: int, sid: str) -> int:
    """The seed of one song's noise: 64 bits of SHA-256 of the job's seed and the song's id, so every song
    draws the same noise whatever it is batched with, and a resumed job goes on with the same draws."""
    return int.from_bytes(hashlib.sha256(f"{int(seed)}:{sid}".encode()).digest()[:8], "big")


# ------------------------------------------------------------------------------------------------
# writing audio (writer threads)
# ------------------------------------------------------------------------------------------------
class _OpenFile:
    """One song's audio file being written: every call runs on the song's writer thread, in order."""

    def __init__(self, dst: Path, sample_rate: int, fmt: str, record=None):
        self.dst, self.sample_rate, self.fmt, self.record = dst, sample_rate, fmt, record
        self.stack, self.write_piece, self.error = contextlib.ExitStack(), None, None

    def start(self) -> None:
        try:
            try:
                self.dst.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise OutputError(f"Cannot create the folder {self.dst.parent}: {e.strerror or e}.") from None
            self.write_piece = self.stack.enter_context(audio.audio_writer(self.dst, self.sample_rate, 2, self.fmt,
                                                                           before_commit=self.record))
        except MuCodecError as e:
            self.error = e

    def write(self, piece: np.ndarray) -> None:
        if self.error is None:
            try:
                self.write_piece(torch.from_numpy(piece))
            except MuCodecError as e:
                self.error = e
                self.abort()

    def finish(self) -> None:
        """Commit the file (rename), or raise why it could not be written."""
        if self.error is not None:
            raise self.error
        self.stack.close()

    def abort(self) -> None:
        """Remove the temporary file: the song is not committed."""
        with contextlib.suppress(BaseException):
            self.stack.__exit__(OutputError, OutputError("aborted"), None)


class AudioWriter:
    """Streams each song's pieces into its own file on ``threads`` writer threads (a song always on the same
    one, so its pieces stay in order), while the model computes the next window."""

    def __init__(self, sample_rate: int, fmt: str, threads: int = WRITER_THREADS, record=None):
        self.sample_rate, self.fmt, self.record = sample_rate, fmt, record
        self.pools = [cf.ThreadPoolExecutor(1, thread_name_prefix="mucodec-writer") for _ in range(max(1, threads))]
        self.open_files: dict = {}
        self._next = 0

    def open(self, key, dst: Path) -> None:
        f = _OpenFile(dst, self.sample_rate, self.fmt, self.record)
        pool = self.pools[self._next % len(self.pools)]
        self._next += 1
        self.open_files[key] = (f, pool)
        pool.submit(f.start)

    def write(self, key, piece: torch.Tensor) -> None:
        f, pool = self.open_files[key]
        pool.submit(f.write, piece.numpy())

    def close(self, key) -> cf.Future:
        """Commit ``key``'s file once its pieces are written; the future raises why it could not be."""
        f, pool = self.open_files.pop(key)
        return pool.submit(f.finish)

    def abort(self, key) -> None:
        f, pool = self.open_files.pop(key)
        pool.submit(f.abort)

    def storage_error(self) -> StorageError | None:
        """The first full-disk (or read-only, failing) error of a file being written: the job stops at it."""
        return next((f.error for f, _ in self.open_files.values() if isinstance(f.error, StorageError)), None)

    def shutdown(self) -> None:
        for key in list(self.open_files):
            self.abort(key)
        for pool in self.pools:
            pool.shutdown(wait=True)


# ------------------------------------------------------------------------------------------------
# the batcher: continuous batching of songs through the decoder
# ------------------------------------------------------------------------------------------------
class SongDecoder:
    """The decode job's batcher: songs' codes in, committed audio files out.

    Songs wait until a slot of the batch is free; every step runs the next window of every song in the
    batch (:func:`decoding.decode_step`); a song that finishes frees its slot for the next song's first
    window. A step that fails fails the songs in it, and only them.
    """

    def __init__(self, codec, opts, batch_size: int, seed: int, dst, writer: AudioWriter, log=None):
        self.codec, self.opts, self.batch_size, self.seed, self.dst = codec, opts, batch_size, seed, dst
        self.writer, self.log, self._logged = writer, log, time.monotonic()
        self.waiting, self.active, self.committing = collections.deque(), [], []
        self.steps = self.filled = self.windows = 0

    def add(self, song: TokenSong, got: dict) -> list[tuple]:
        if got.get("header") is not None:  # a token file made for another model is refused by name
            tokens.check_compatible(got["header"], self.codec.token_spec, song.file)
        dec = decoding.start_decode(self.codec, got["codes"], num_samples=got.get("num_samples"),
                                    seed=song_seed(self.seed, song.song_id), where=f"The codes of {song.where()}")
        self.waiting.append((song, dec))
        failed = []
        while len(self.active) + len(self.waiting) >= self.batch_size:
            failed += self._step()
        return failed + self._committed(wait=False)

    def flush(self) -> list[tuple]:
        failed = []
        try:
            while self.active or self.waiting:
                failed += self._step()
            return failed + self._committed(wait=True)
        finally:
            self.writer.shutdown()

    def abort(self) -> None:
        """Stop: the songs in flight are not committed and their temporary files are removed."""
        self.writer.shutdown()

    def counters(self) -> dict[str, int]:
        return {"windows": self.windows, "steps": self.steps, "slots_filled": self.filled,
                "slots": self.steps * self.batch_size}

    def _step(self) -> list[tuple]:
        while self.waiting and len(self.active) < self.batch_size:
            song, dec = self.waiting.popleft()
            self.writer.open(song, self.dst(song))
            self.active.append((song, dec))
        try:
            pieces = decoding.decode_step(self.codec, [dec for _, dec in self.active], self.opts)
        except Exception as e:  # out of memory, damaged weights, a bug: this batch's songs fail, the job goes on
            why = _failure(e, self.batch_size)
            failed = [(song, None, why) for song, _ in self.active]
            for song, _ in self.active:
                self.writer.abort(song)
            self.active = []
            return failed
        self.steps += 1
        self.filled += len(self.active)
        self.windows += len(self.active)
        if self.log is not None and time.monotonic() - self._logged >= HEARTBEAT_SECONDS:
            self._logged = time.monotonic()  # a window can take minutes on a CPU: say that work goes on
            self.log(f"decode: {self.windows} windows done, {len(self.active)} songs in the batch")
        for (song, dec), ps in zip(self.active, pieces):
            for p in ps:
                self.writer.write(song, p)
            if dec.done:
                self.committing.append((song, dec, self.writer.close(song)))
        self.active = [(song, dec) for song, dec in self.active if not dec.done]
        stop = self.writer.storage_error()
        if stop is not None:  # the disk is full: no window more is worth computing
            raise stop
        return []

    def _committed(self, wait: bool) -> list[tuple]:
        out, keep = [], []
        for song, dec, fut in self.committing:
            if not (wait or fut.done()):
                keep.append((song, dec, fut))
                continue
            try:
                fut.result()
            except StorageError:
                raise
            except MuCodecError as e:
                out.append((song, None, str(e)))
            else:
                out.append((song, {"duration": dec.num_samples / self.codec.sample_rate, "windows": dec.windows},
                            None))
        self.committing = keep
        return out


def _failure(e: Exception, batch_size: int) -> str:
    if isinstance(e, MuCodecError):
        return str(e)
    if isinstance(e, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)) or "out of memory" in str(e):
        return (f"Out of memory decoding a batch of {batch_size} songs; pass a smaller --decode-batch, "
                f"or --offload.")
    return f"internal error {type(e).__name__}: {e}"


# ------------------------------------------------------------------------------------------------
# the output folder and the job
# ------------------------------------------------------------------------------------------------
class AudioLibrary(Store):
    """The output folder of a decode job: one audio file per song, committed by an atomic rename."""

    what = "audio"

    def __init__(self, out, audio_format: str = "flac", shard: tuple[int, int] | None = None, verify: bool = False):
        if audio_format not in audio.AUDIO_FORMATS:
            raise ArgumentError(f"audio format {audio_format!r} is not one of {', '.join(audio.AUDIO_FORMATS)}.")
        super().__init__(out, shard, verify)
        self.audio_format = audio_format

    def audio_path(self, song: TokenSong) -> Path:
        return self.out / f"{song.path}.{self.audio_format}"

    def committed(self, songs) -> set[str]:
        return {s.song_id for s in songs if self.checked(self.audio_path(s))}

    def song_files(self, song) -> list[Path]:
        return [self.audio_path(song)]


def fingerprint(ckpt_files: dict, *, steps: int, guidance: float, seed: int, dtype, device, fast_vocoder: bool,
                audio_format: str, audioldm_dtype=torch.float32, sampler: str = samplers.DEFAULT_SAMPLER,
                guidance_interval=None) -> dict:
    """What decides the audio: the decoder's checkpoint files (by content), this code, and the settings.
    The VAE and vocoder's precision, the sampler and the guidance interval are written only where they are
    not the defaults, so folders decoded before they were options still resume."""
    reduced = {} if audioldm_dtype == torch.float32 else {"audioldm_dtype": dtype_name(audioldm_dtype)}
    if sampler != samplers.DEFAULT_SAMPLER:
        reduced["sampler"] = sampler
    if guidance_interval is not None:
        reduced["guidance_interval"] = [float(v) for v in guidance_interval]
    return {
        "task": "decode",
        "code_version": DECODE_VERSION,
        "checkpoints": {r: files.sha256(p) for r, p in sorted(ckpt_files.items()) if r in ("mucodec", "audioldm")},
        "steps": int(steps), "guidance": float(guidance), "seed": int(seed),
        "dtype": dtype_name(dtype), "device": torch.device(device).type,
        "vocoder": "shared-overlaps" if fast_vocoder else "official", "audio_format": audio_format, **reduced,
    }


@dataclass
class DecodeJob(ModelJob):
    """The decode job as the engines see it (:class:`engine.Job`)."""

    ckpt: str
    revision: str | None
    device: str
    dtype: torch.dtype
    steps: int
    guidance: float
    seed: int
    fast_vocoder: bool
    batch_size: int
    out: str
    audio_format: str
    offload: bool = False
    audioldm_dtype: torch.dtype = torch.float32
    shard: tuple | None = None
    log: object = None  # a line every minute or so while songs decode (this process only)
    commit_seconds: float = COMMIT_SECONDS
    codec: object = None  # the decoder; None: loaded by the first batcher() (a Ray actor loads its own)
    sampler: str = samplers.DEFAULT_SAMPLER
    guidance_interval: tuple | None = None

    task = "decode"
    read = staticmethod(read_tokens)

    def batcher(self) -> SongDecoder:
        self.model(decoder_only=True, offload=self.offload, audioldm_dtype=self.audioldm_dtype)
        opts = decoding.decode_options(self.codec, num_steps=self.steps, guidance_scale=self.guidance,
                                       fast_vocoder=self.fast_vocoder, sampler=self.sampler,
                                       guidance_interval=self.guidance_interval)
        lib = AudioLibrary(self.out, self.audio_format, self.shard)
        return SongDecoder(self.codec, opts, self.batch_size, self.seed, lib.audio_path,
                           AudioWriter(self.codec.sample_rate, self.audio_format, record=lib.record), self.log)

    def sink(self, store: Store) -> Sink:
        # each song commits itself (its audio file); the sink commits error rows, one file per batch of them
        return Sink(store, songs_per_commit=max(64, self.batch_size), commit_seconds=self.commit_seconds)

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "log": None}  # a Ray actor logs through Ray


def report_fields(stats: Stats, wall: float, batch_size: int) -> dict:
    c = stats.counters
    slots = c.get("slots", 0)
    peak = {"peak_rss_gib": round(_peak_rss() / 2 ** 30, 3)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak["peak_cuda_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 3)
    return {"decode_batch": batch_size, "windows": c.get("windows", 0),
            "windows_per_second": round(c.get("windows", 0) / wall, 4) if wall > 0 else None,
            "batch_fill": round(c.get("slots_filled", 0) / slots, 4) if slots else None, **peak}


def _peak_rss() -> int:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    except (ImportError, OSError):
        return 0


# ------------------------------------------------------------------------------------------------
# one call for a whole job (the CLI's decoding of token inputs)
# ------------------------------------------------------------------------------------------------
@dataclass
class Result:
    report: dict
    problems: list  # [(input, message)]


def decode_library(inputs, out, *, ckpt=None, revision=None, device="cpu", dtype=torch.float32, steps=None,
                   guidance=None, seed=None, fast_vocoder=True, audio_format="flac", decode_batch=DEFAULT_BATCH,
                   shard=None, engine="local", address=None, workers=None, retry_errors=False, overwrite=False,
                   offload=False, audioldm_dtype=torch.float32, codec=None, progress=False, verify=False,
                   sampler=samplers.DEFAULT_SAMPLER, guidance_interval=None, say=lambda msg: None) -> Result:
    """Decode the songs under ``inputs`` into one audio file each under ``out`` (see the module docstring).

    A job with no songs writes nothing; a finished job run again loads no model; output made with other
    weights or settings is refused (OutputError) unless ``overwrite``; per-song failures become error rows.
    ``codec``: a MuCodec already loaded from ``ckpt`` (local engine), instead of loading one.
    ``audioldm_dtype`` (VAE and vocoder), ``sampler``, ``guidance_interval``: as ``from_pretrained``, ``code2sound``.
    ``verify``: check the checksum of every committed song's audio, not only its size, before skipping it.
    A full, read-only or failing disk raises :class:`StorageError` at once, naming the folder and the space the
    rest of the job needs; nothing damaged is committed, and the same call resumes once it is fixed.
    """
    from ..checkpoint import default_checkpoint, resolve_files
    from ..stages import DECODER_STAGES, roles_of

    start = time.perf_counter()
    cfg = CodecConfig()
    steps = check_count("steps", steps, cfg.code2sound_steps, MAX_STEPS)
    guidance, sampling = check_guidance(guidance, cfg.guidance_scale), samplers.checked(sampler, guidance_interval)
    batch = check_count("decode_batch", decode_batch, DEFAULT_BATCH, MAX_BATCH)
    workers = 1 if workers is None else int(workers)
    if engine not in ("local", "ray"):
        raise ArgumentError(f"engine {engine!r} is not one of local, ray.")
    lib = AudioLibrary(out, audio_format, shard, verify)
    songs, problems, planned_errors, lost = scan_tokens(inputs, out)
    job_songs = [s for s in songs if in_shard(s.song_id, shard)]
    planned_errors = [e for e in planned_errors if in_shard(e["song_id"], shard)]
    if not job_songs and not planned_errors:
        return Result(_empty_report(lib, lost, engine, device, workers, start, batch), problems)
    _check_codec(codec, dtype, audioldm_dtype)
    ckpt = ckpt if ckpt is not None else default_checkpoint()
    ckpt_files = resolve_files(ckpt, roles_of(DECODER_STAGES), revision)
    if engine == "ray":
        from . import ray_engine
        device = ray_engine.connect(address, progress)
    if seed is None:
        seed = _resumed_seed(lib, overwrite)
    fp = fingerprint(ckpt_files, steps=steps, guidance=guidance, seed=seed, dtype=dtype, device=device,
                     fast_vocoder=fast_vocoder, audio_format=audio_format, audioldm_dtype=audioldm_dtype, **sampling)
    fp[MACHINES] = [machine(device, engine)]
    try:  # a full disk, wherever it stops the job, is said of the folder with what the rest needs
        lib.prepare(job_songs, fp, overwrite, say)
        plan = plan_run(lib, job_songs, retry_errors)
        say(f"{len(job_songs)} songs in this job: {plan.skipped} already done, {plan.skipped_errors} failed "
            f"earlier, {len(plan.todo)} to decode (seed {seed})"
            + ("" if shard is None else f" (shard {shard[0]}/{shard[1]})"))
        job = DecodeJob(str(ckpt), revision, device, dtype, steps, guidance, seed, fast_vocoder, batch, str(out),
                        audio_format, offload, audioldm_dtype, shard, log=None if progress else say, codec=codec, **sampling)
        stats, devices = _run(job, lib, plan.todo, engine, workers, progress, planned_errors, say)
        wall = time.perf_counter() - start
        stats.failed += lost  # songs of unreadable shards: failed, though they have no id to make a row of
        rep = report(lib, plan, stats, task="decode", engine=engine, device=torch.device(device).type,
                     workers=workers, devices=devices, wall=wall, fp=fp, fields=report_fields(stats, wall, batch))
    except StorageError as e:
        raise lib.storage_error(e, job_songs) from None
    return Result(rep, problems)


def _empty_report(lib, lost: int, engine: str, device, workers: int, start: float, batch: int) -> dict:
    """The report of a job with no songs, which writes nothing (not even its report)."""
    return report(lib, Plan([], [], 0, 0), Stats(failed=lost), task="decode", engine=engine,
                  device=torch.device(device).type,
                  workers=workers, devices=0, wall=time.perf_counter() - start, fp=None,
                  fields=report_fields(Stats(), 0.0, batch), write=False)


def _check_codec(codec, dtype, audioldm_dtype) -> None:
    if codec is not None and (codec.dtype, codec.audioldm_dtype) != (dtype, audioldm_dtype):
        has, asked = (" / ".join(dtype_name(d) for d in pair)
                      for pair in ((codec.dtype, codec.audioldm_dtype), (dtype, audioldm_dtype)))
        raise ArgumentError(f"The codec passed in runs in {has} (DiT / VAE and vocoder) but the job asks for {asked}, "
                            "which its fingerprint would record; pass the codec's precisions, or no codec.")


def _resumed_seed(lib: AudioLibrary, overwrite: bool) -> int:
    """The seed of the decode job that made the folder, so a resumed job draws the same noise; else a new one."""
    old = None if overwrite else lib.read_fingerprint()
    return old["seed"] if old and old.get("task") == "decode" else secrets.randbits(63)


def _run(job: DecodeJob, lib: AudioLibrary, todo: list, engine: str, workers: int, progress: bool,
         planned_errors: list, say) -> tuple[Stats, int]:
    """(stats, devices used) of running ``todo`` on the engine."""
    if engine == "ray":
        from . import ray_engine

        return ray_engine.run(job, lib, todo, workers=workers, progress=progress, extra_errors=planned_errors)
    return run_local(job, lib, todo, workers=workers, progress=progress, extra_errors=planned_errors, log=say), 1
