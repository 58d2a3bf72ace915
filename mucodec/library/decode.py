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
and write the audio while the model computes. The HTTP server (``serve_worker``) drives the same batcher
through ``submit``/``step``/``cancel``, with a writer of its own that streams each request's audio.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import contextlib
import dataclasses
import hashlib
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import audio, decoding, files, tokens
from ..errors import ArgumentError, MuCodecError, OutputError, StorageError
from ..settings import DecodingOptions, JobOptions, output_fields
from .engine import COMMIT_SECONDS, ModelJob, Sink, Stats, empty_report, plan_run, report
from .engines import joined, run_on
from .songs import in_shard
from .store import MACHINES, Store, machine
from .token_inputs import TokenSong, read_tokens, scan_tokens

# Bump when a change to the code makes different audio from the same codes, weights and settings.
DECODE_VERSION = 1
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
    window. A step that fails fails the songs in it, and only them; a NaN or infinite output fails only the
    song it is in, the others of its batch go on.
    """

    def __init__(self, codec, opts: DecodingOptions, dst, writer: AudioWriter, log=None):
        """``opts``: resolved, with the job's seed; each song's noise comes from :func:`song_seed` of it."""
        self.codec, self.opts, self.batch_size, self.seed, self.dst = codec, opts, opts.batch_size, opts.seed, dst
        self.writer, self.log, self._logged = writer, log, time.monotonic()
        self.waiting, self.active, self.committing = collections.deque(), [], []
        self.steps = self.filled = self.windows = 0

    def add(self, song: TokenSong, got: dict) -> list[tuple]:
        self.submit(song, got)
        failed = []
        while len(self.active) + len(self.waiting) >= self.batch_size:
            failed += self._step()
        return failed + self._committed(wait=False)

    def submit(self, song, got: dict) -> decoding.SongDecode:
        """Queue a song without stepping: :meth:`add` for a caller that steps on its own schedule (the server).
        ``got["seed"]``, where given, seeds the song's noise itself, as ``code2sound(seed=...)`` alone would."""
        if got.get("header") is not None:  # a token file made for another model is refused by name
            tokens.check_compatible(got["header"], self.codec.token_spec, song.file)
        seed = got.get("seed")
        dec = decoding.start_decode(self.codec, got["codes"], num_samples=got.get("num_samples"),
                                    seed=song_seed(self.seed, song.song_id) if seed is None else seed,
                                    where=f"The codes of {song.where()}")
        self.waiting.append((song, dec))
        return dec

    def step(self) -> list[tuple]:
        """One window of every song in the batch; returns the songs that finished or failed since the last call."""
        return self._step() + self._committed(wait=False)

    def cancel(self, song) -> bool:
        """Drop ``song`` (waiting or in the batch; its output aborted), freeing its slot for the next step."""
        for queue in (self.waiting, self.active):
            for item in list(queue):
                if item[0] is song:
                    queue.remove(item)
                    if queue is self.active:
                        self.writer.abort(song)
                    return True
        return False

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
        songs = [song for song, _ in self.active]

        def hand_out(i: int, pieces: list) -> None:  # a song's audio goes as soon as its own vocoder has run
            for p in pieces:
                self.writer.write(songs[i], p)

        nan = {}  # batch index -> why: a song whose output is not finite fails alone
        try:
            decoding.decode_step(self.codec, [dec for _, dec in self.active], self.opts, on_song=hand_out,
                                 on_error=lambda i, e: nan.update({i: str(e)}))
        except Exception as e:  # out of memory, damaged weights, a bug: this batch's songs fail, the job goes on
            why = _failure(e, self.batch_size)
            failed = [(song, None, why) for song, _ in self.active]
            for song, _ in self.active:
                self.writer.abort(song)
            self.active = []
            return failed
        self.steps += 1
        self.filled += len(self.active)
        self.windows += len(self.active) - len(nan)
        for i in nan:
            self.writer.abort(songs[i])
        self.active = [item for i, item in enumerate(self.active) if i not in nan]
        if self.log is not None and time.monotonic() - self._logged >= HEARTBEAT_SECONDS:
            self._logged = time.monotonic()  # a window can take minutes on a CPU: say that work goes on
            self.log(f"decode: {self.windows} windows done, {len(self.active)} songs in the batch")
        for song, dec in self.active:
            if dec.done:
                self.committing.append((song, dec, self.writer.close(song)))
        self.active = [(song, dec) for song, dec in self.active if not dec.done]
        stop = self.writer.storage_error()
        if stop is not None:  # the disk is full: no window more is worth computing
            raise stop
        return [(songs[i], None, why) for i, why in nan.items()]

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
        super().__init__(out, shard, verify)
        self.audio_format = audio_format

    def audio_path(self, song: TokenSong) -> Path:
        return self.out / f"{song.path}.{self.audio_format}"

    def committed(self, songs) -> set[str]:
        return {s.song_id for s in songs if self.checked(self.audio_path(s))}

    def read_fingerprint(self) -> dict | None:
        return _current_names(super().read_fingerprint())

    def song_files(self, song) -> list[Path]:
        return [self.audio_path(song)]


def fingerprint(ckpt_files: dict, options: DecodingOptions, job: JobOptions) -> dict:
    """What decides the audio: the decoder's checkpoint files (by content), this code, the decoding options
    (resolved, with their seed) and the job's precision, device type and format. The VAE and vocoder's
    precision is written only where it is reduced, so folders decoded before it was an option still resume."""
    reduced = {} if job.audioldm_dtype == "float32" else {"audioldm_dtype": job.audioldm_dtype}
    return {
        "task": "decode",
        "code_version": DECODE_VERSION,
        "checkpoints": {r: files.sha256(p) for r, p in sorted(ckpt_files.items()) if r in ("mucodec", "audioldm")},
        **options.fingerprint(), "dtype": job.dtype, "device": torch.device(job.device).type,
        "audio_format": job.audio_format, **reduced,
    }


def _current_names(fp: dict | None) -> dict | None:
    """A folder's fingerprint in today's names, so folders decoded by earlier versions still resume: the names
    before the settings took the official ones (steps, guidance, vocoder) are renamed, and a decoding setting
    the fingerprint lacks (one added since) had its default then."""
    if not fp or fp.get("task") != "decode":
        return fp
    if "steps" in fp:
        old = {"steps", "guidance", "vocoder"}
        fp = {**{k: v for k, v in fp.items() if k not in old}, "num_steps": fp["steps"],
              "guidance_scale": fp["guidance"], "fast_vocoder": fp["vocoder"] != "official"}
    return {**output_fields(DecodingOptions()), **fp}


@dataclass
class DecodeJob(ModelJob):
    """The decode job as the engines see it (:class:`engine.Job`): resolved options with the job's seed."""

    options: DecodingOptions
    job: JobOptions
    out: str
    log: object = None  # a line every minute or so while songs decode (this process only)
    commit_seconds: float = COMMIT_SECONDS
    codec: object = None  # the decoder; None: loaded by the first batcher() (a Ray actor loads its own)

    task = "decode"
    read = staticmethod(read_tokens)

    def batcher(self) -> SongDecoder:
        self.model(decoder_only=True, offload=self.job.offload, audioldm_dtype=self.job.torch_audioldm_dtype)
        lib = AudioLibrary(self.out, self.job.audio_format, self.job.shard)
        return SongDecoder(self.codec, self.options, lib.audio_path,
                           AudioWriter(self.codec.sample_rate, self.job.audio_format, record=lib.record), self.log)

    def sink(self, store: Store) -> Sink:
        # each song commits itself (its audio file); the sink commits error rows, one file per batch of them
        return Sink(store, songs_per_commit=max(64, self.options.batch_size), commit_seconds=self.commit_seconds)

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


def decode_library(inputs, out, options: DecodingOptions = DecodingOptions(), job: JobOptions = JobOptions(), *,
                   codec=None, progress: bool = False, say=lambda msg: None) -> Result:
    """Decode the songs under ``inputs`` into one audio file each under ``out`` (see the module docstring).

    ``options``: how (steps default to code2sound's; no seed: the folder's recorded one, else a new one);
    ``job``: weights, precision, format, shards, engine. A job with no songs writes nothing; a finished job run
    again loads no model; output made with other weights or settings is refused (OutputError) unless
    ``job.overwrite``; per-song failures become error rows. ``codec``: a MuCodec already loaded from
    ``job.ckpt`` (local engine), instead of loading one. A full, read-only or failing disk raises
    :class:`StorageError` at once, naming the folder and the space the rest of the job needs; nothing damaged
    is committed, and the same call resumes once it is fixed.
    """
    from ..checkpoint import default_checkpoint, resolve_files
    from ..stages import DECODER_STAGES, roles_of

    start = time.perf_counter()
    options = options.for_task("code2sound")
    workers = 1 if job.workers is None else job.workers
    lib = AudioLibrary(out, job.audio_format, job.shard, job.verify)
    songs, problems, planned_errors, lost = scan_tokens(inputs, out)
    job_songs = [s for s in songs if in_shard(s.song_id, job.shard)]
    planned_errors = [e for e in planned_errors if in_shard(e["song_id"], job.shard)]
    if not job_songs and not planned_errors:
        return Result(empty_report(lib, "decode", job.engine, job.device, workers, start,
                                   report_fields(Stats(), 0.0, options.batch_size), failed=lost), problems)
    _check_codec(codec, job)
    if job.ckpt is None:
        job = dataclasses.replace(job, ckpt=str(default_checkpoint()))
    ckpt_files = resolve_files(job.ckpt, roles_of(DECODER_STAGES), job.revision)
    job = joined(job, progress)
    if options.seed is None:
        options = dataclasses.replace(options, seed=_resumed_seed(lib, job.overwrite))
    fp = fingerprint(ckpt_files, options, job)
    fp[MACHINES] = [machine(job.device, job.engine)]
    try:  # a full disk, wherever it stops the job, is said of the folder with what the rest needs
        lib.prepare(job_songs, fp, job.overwrite, say)
        plan = plan_run(lib, job_songs, job.retry_errors)
        say(f"{len(job_songs)} songs in this job: {plan.skipped} already done, {plan.skipped_errors} failed "
            f"earlier, {len(plan.todo)} to decode (seed {options.seed})"
            + ("" if job.shard is None else f" (shard {job.shard[0]}/{job.shard[1]})"))
        run = DecodeJob(options, job, str(out), log=None if progress else say, codec=codec)
        stats, devices = run_on(job.engine, run, lib, plan.todo, workers=workers, progress=progress,
                                extra_errors=planned_errors, log=say)
        wall = time.perf_counter() - start
        stats.failed += lost  # songs of unreadable shards: failed, though they have no id to make a row of
        rep = report(lib, plan, stats, task="decode", engine=job.engine, device=torch.device(job.device).type,
                     workers=workers, devices=devices, wall=wall, fp=fp,
                     fields=report_fields(stats, wall, options.batch_size))
    except StorageError as e:
        raise lib.storage_error(e, job_songs) from None
    return Result(rep, problems)


def _check_codec(codec, job: JobOptions) -> None:
    if codec is not None and (codec.dtype, codec.audioldm_dtype) != (job.torch_dtype, job.torch_audioldm_dtype):
        has = " / ".join(str(d).removeprefix("torch.") for d in (codec.dtype, codec.audioldm_dtype))
        raise ArgumentError(f"The codec passed in runs in {has} (DiT / VAE and vocoder) but the job asks for "
                            f"{job.dtype} / {job.audioldm_dtype}, which its fingerprint would record; pass the "
                            "codec's precisions, or no codec.")


def _resumed_seed(lib: AudioLibrary, overwrite: bool) -> int:
    """The seed of the decode job that made the folder, so a resumed job draws the same noise; else a new one."""
    old = None if overwrite else lib.read_fingerprint()
    return old["seed"] if old and old.get("task") == "decode" else secrets.randbits(63)
