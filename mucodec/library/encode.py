"""The encode job: a music library -> codes, in parquet shards and/or one ``.mct`` per song.

Output folder, beside the store's files (:mod:`store`)::

    shards/<job>-<n>.parquet  ~1000 songs each: song_id, path, duration, sample_rate, channels, num_samples,
                              num_codes, codes (list<uint16>)
    <path>.mct                with --format mct or both: one token file per song
    index[-I-of-N].json       the committed shards of the job (informative: the shard files are the truth)

A song is committed exactly when a shard holding it exists (``parquet``, ``both``) or its ``.mct`` does
(``mct``). Its codes equal ``sound2code(file, batch_size=...)`` of the file alone, bit for bit.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import audio, files, tokens
from ..errors import MuCodecError, OutputError, StorageError
from ..settings import EncodingOptions, JobOptions, output_fields
from ..workers import default_workers
from . import parquet
from .engine import COMMIT_SECONDS, ModelJob, Sink, Stats, empty_report, plan_run, report
from .engines import joined, run_on
from .songs import Song, in_shard, scan
from .store import MACHINES, Store, committed_files as store_files, dumps, error_row, machine

# Bump when a change to the code makes different codes from the same audio and weights: old output
# then no longer matches the fingerprint and is refused instead of being silently mixed with new codes.
CODE_VERSION = 1


def fingerprint(ckpt_files: dict, options: EncodingOptions, job: JobOptions) -> dict:
    """What decides the codes: the encoder's checkpoint files (by content), this code, the encoding options
    (the batch size: the kernels' sums depend on it) and the job's precision and device type."""
    return {
        "code_version": CODE_VERSION,
        "checkpoints": {role: files.sha256(p) for role, p in sorted(ckpt_files.items()) if role in ("muq", "mucodec")},
        **output_fields(options),
        "dtype": job.dtype,
        "device": torch.device(job.device).type,
        "torch": torch.__version__,
    }


# ------------------------------------------------------------------------------------------------
# the output folder
# ------------------------------------------------------------------------------------------------
class Library(Store):
    """The output folder of an encode job: parquet shards and/or .mct files, committed atomically."""

    what = "codes"
    machine_effect = "a rare near-tie code can differ between them (docs/library.md: Codes across machines)"

    def __init__(self, out, fmt: str = "parquet", shard: tuple[int, int] | None = None, verify: bool = False):
        super().__init__(out, shard, verify)
        self.fmt = fmt
        self.index_path = self.out / ("index.json" if shard is None else f"index-{self.tag}.json")
        self.shards = self.out / "shards"

    @property
    def parquet(self) -> bool:
        return self.fmt in ("parquet", "both")

    @property
    def mct(self) -> bool:
        return self.fmt in ("mct", "both")

    def mct_path(self, song: Song | str) -> Path:
        rel = song.path if isinstance(song, Song) else song
        return self.out / Path(rel).with_suffix(tokens.EXTENSION)

    def committed(self, songs) -> set[str]:
        if not self.parquet:
            return {s.song_id for s in songs if self.checked(self.mct_path(s))}
        ids = set()
        for f in store_files(self.shards, ".parquet"):
            if self.checked(f):
                ids.update(parquet.shard_song_ids(f))
            elif f.name.startswith(self.tag + "-"):
                # this job's own shard, damaged or never recorded: its songs are encoded again into a new one,
                # and it must not stay beside it (a reader would meet those songs twice, or fail on it)
                with contextlib.suppress(FileNotFoundError):
                    f.unlink()
        return ids

    def folders(self) -> list[tuple[Path, str]]:
        return [(self.shards, ".parquet"), (self.errors, ".jsonl")]

    def song_files(self, song) -> list[Path]:
        return [self.mct_path(song)]  # whatever the format: --overwrite leaves no codes of an earlier run

    def other_files(self) -> list[Path]:
        return list(self.out.glob("index*.json"))

    def commit(self, name: str, rows: list[dict], errors: list[dict], fp: dict | None = None) -> list[dict]:
        """Commit finished songs and error rows under ``name``: the .mct files first, then the error file,
        then the shard, each by an atomic rename (the shard's rename is the commit of its songs).
        Returns the error rows of songs whose .mct could not be written (they are not committed)."""
        failed = []
        if self.mct:
            kept = []
            for r in rows:
                try:
                    self._write_mct(r)
                    kept.append(r)
                except StorageError:
                    raise  # a full disk stops the job: it is no song's fault
                except MuCodecError as e:
                    failed.append(error_row(r["song_id"], r["path"], "write", str(e)))
            rows, errors = kept, errors + failed
        self.write_errors(name, errors)
        if rows and self.parquet:
            parquet.write_shard(self.shards / f"{name}.parquet", rows, fp, before_commit=self.record)
        return failed

    def _write_mct(self, row: dict) -> None:
        dst = self.mct_path(row["path"])
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"Cannot create the folder {dst.parent}: {e.strerror or e}.") from None
        # the header's fields come from the model that made the codes, or its own model could not decode them
        tokens.save_codes(dst, torch.from_numpy(row["codes"].astype(np.int64)), num_samples=row["num_samples"],
                          original_sample_rate=row["sample_rate"], original_channels=row["channels"],
                          before_commit=self.record, **row["token_fields"])

    def write_index(self) -> None:
        entries = [{"file": f"shards/{f.name}", "songs": parquet.shard_rows(f)}
                   for f in self._commit_files() if f.parent == self.shards and f.name.startswith(self.tag + "-")]
        files.write_atomic(self.index_path, dumps({"job": self.tag, "shards": entries}))


def read_item(song: Song) -> dict:
    """Worker process: decode and resample one song (:func:`read_song`)."""
    return read_song(song.file)


def read_song(file: str, sample_rate: int = audio.CODEC_SAMPLE_RATE) -> dict:
    """Decode and resample one file: {'wav': (1 or 2, N) float32 array at ``sample_rate`` (1 row = mono,
    shared by both channels), 'sample_rate', 'channels', 'duration' of the file as stored}.
    Raises AudioError for a file that cannot be used."""
    info = audio.audio_info(file)
    wav = audio.load_audio(file, sample_rate)
    # mono comes back as a stride-0 view of one row: send that row, not a doubled copy
    wav = wav[:1] if wav.stride(0) == 0 else wav
    return {"wav": wav.numpy(), "sample_rate": info.sample_rate, "channels": info.channels,
            "duration": info.duration}


# ------------------------------------------------------------------------------------------------
# packing windows of several songs into fixed-size encoder batches
# ------------------------------------------------------------------------------------------------
@dataclass
class _Entry:
    key: object
    windows: object
    count: int
    num_codes: int
    taken: int = 0  # windows put into a batch
    codes: list = field(default_factory=list)  # (n, 1, T) pieces, in window order
    failed: str | None = None


class WindowPacker:
    """Encodes the windows of many songs in batches of exactly ``batch_size`` windows.

    Each song gets :meth:`MuCodec.encoder_windows` (its peak divisor, windows and window count, as
    ``sound2code``); windows encode independently of their batch mates, so its codes equal
    ``sound2code(song, batch_size=batch_size)`` bit for bit. Only the final batch of a :meth:`flush` is
    padded (with silent windows whose codes are dropped).
    """

    def __init__(self, codec, batch_size: int):
        self.codec, self.batch_size = codec, batch_size
        self.queue: collections.deque[_Entry] = collections.deque()
        self.queued = 0  # windows not yet in a batch
        self.windows = self.padding = self.batches = 0

    def add(self, key, wav: torch.Tensor) -> list:
        """Queue a song ((2, N) at the codec rate); returns the songs finished by the full batches it allowed."""
        windows, count, num_codes = self.codec.encoder_windows(wav)
        self.queue.append(_Entry(key, windows, count, num_codes))
        self.queued += count
        done = []
        while self.queued >= self.batch_size:
            done += self._batch()
        return done

    def flush(self) -> list:
        done = []
        while self.queued:
            done += self._batch()
        return done

    def _batch(self) -> list:
        """Encode one batch; returns [(key, codes int64 (num_codes,) or None, error message or None)]."""
        parts, members = [], []
        room = self.batch_size
        for e in self.queue:
            if room == 0:
                break
            n = min(room, e.count - e.taken)
            if n:
                parts.append(e.windows.batch(e.taken, e.taken + n))
                members.append((e, n))
                e.taken += n
                room -= n
        used = self.batch_size - room
        self.queued -= used
        if room:
            parts.append(parts[0].new_zeros((room,) + tuple(parts[0].shape[1:])))
        self.windows += used
        self.padding += room
        self.batches += 1
        try:
            codes = self.codec.encode_windows(torch.cat(parts, 0))[:used].cpu()
        except MuCodecError as e:
            why = str(e)
        except Exception as e:  # out of memory or a bug: the songs of this batch fail, the run goes on
            why = f"internal error {type(e).__name__}: {e}"
        else:
            why = None
        at = 0
        for e, n in members:
            if why is not None:
                e.failed = e.failed or why
            else:
                e.codes.append(codes[at:at + n])
            at += n
        done = []
        while self.queue and self.queue[0].taken == self.queue[0].count:
            e = self.queue.popleft()
            if e.failed:
                done.append((e.key, None, e.failed))
            else:
                done.append((e.key, torch.cat(e.codes, 0).reshape(-1)[:e.num_codes], None))
        return done


class SongEncoder:
    """The encode job's batcher: decoded songs in, finished shard rows out (the packing is WindowPacker's)."""

    def __init__(self, codec, batch_size: int):
        self.packer = WindowPacker(codec, batch_size)
        self.token_fields = {k: v for k, v in codec.token_spec.items() if k != "num_codebooks"}
        self.songs = {}  # song -> (what its reader said, its length at 48 kHz)

    def add(self, song: Song, got: dict) -> list[tuple]:
        wav = torch.from_numpy(got.pop("wav"))
        wav = wav.expand(2, -1) if wav.shape[0] == 1 else wav
        self.songs[song] = (got, wav.shape[-1])
        try:
            return self._rows(self.packer.add(song, wav))
        except BaseException:
            self.songs.pop(song, None)
            raise

    def flush(self) -> list[tuple]:
        return self._rows(self.packer.flush())

    def counters(self) -> dict[str, int]:
        return {"windows": self.packer.windows, "padding": self.packer.padding}

    def _rows(self, done) -> list[tuple]:
        out = []
        for song, codes, why in done:
            got, n = self.songs.pop(song)
            out.append((song, None if why else song_row(song, got, codes, n, self.token_fields), why))
        return out


def song_row(song: Song, got: dict, codes: torch.Tensor, num_samples: int, token_fields: dict) -> dict:
    """A shard row (plus the ``.mct`` header fields of the model that made the codes)."""
    return {"song_id": song.song_id, "path": song.path, "duration": float(got["duration"]),
            "sample_rate": int(got["sample_rate"]), "channels": int(got["channels"]), "num_samples": int(num_samples),
            "num_codes": int(codes.numel()), "codes": codes.numpy().astype(np.uint16), "token_fields": token_fields}


# ------------------------------------------------------------------------------------------------
# the job
# ------------------------------------------------------------------------------------------------
class EncodeSink(Sink):
    """Buffers shard rows; commits them (with the error rows) as one shard every so many songs or seconds."""

    def __init__(self, lib: Library, fp: dict, songs_per_commit: int, commit_seconds: float):
        super().__init__(lib, songs_per_commit, commit_seconds)
        self.fp = fp

    def write(self, name: str, rows: list[dict], errors: list[dict]) -> list[dict]:
        failed = self.store.commit(name, rows, errors, self.fp)
        self.close()
        return failed

    def close(self) -> None:
        if self.store.parquet:
            self.store.write_index()


@dataclass
class EncodeJob(ModelJob):
    """The encode job as the engines see it (:class:`engine.Job`)."""

    options: EncodingOptions
    job: JobOptions
    fp: dict
    commit_seconds: float = COMMIT_SECONDS
    codec: object = None  # the encoder; None: loaded by the first batcher() (a Ray actor loads its own)

    task = "encode"
    read = staticmethod(read_item)

    def batcher(self) -> SongEncoder:
        return SongEncoder(self.model(encoder_only=True), self.options.batch_size)

    def sink(self, store: Library) -> EncodeSink:
        return EncodeSink(store, self.fp, self.job.shard_size, self.commit_seconds)


def report_fields(lib: Library, stats: Stats, wall: float) -> dict:
    windows, padding = stats.counters.get("windows", 0), stats.counters.get("padding", 0)
    return {"format": lib.fmt, "windows": windows,
            "windows_per_second": round(windows / wall, 4) if wall > 0 else None,
            "padding_fraction": round(padding / (windows + padding), 4) if windows + padding else 0.0}


def mct_collisions(lib: Library, songs: list[Song]) -> tuple[list[Song], list[dict]]:
    """With .mct output, two songs that differ only in extension would write one file: the later one fails."""
    if not lib.mct:
        return songs, []
    seen, kept, errors = {}, [], []
    for s in songs:
        dst = lib.mct_path(s)
        if dst in seen:
            errors.append(error_row(s.song_id, s.path, "plan", f"{s.path} would write {dst}, which {seen[dst]} "
                                                               "already writes; rename one of them."))
        else:
            seen[dst] = s.path
            kept.append(s)
    return kept, errors


# ------------------------------------------------------------------------------------------------
# one call for a whole job (the CLI's --encode on a library)
# ------------------------------------------------------------------------------------------------
@dataclass
class Result:
    report: dict
    problems: list  # [(input, message)]: inputs that named nothing, entries of folders that were skipped


def encode_library(inputs, out, options: EncodingOptions = EncodingOptions(), job: JobOptions = JobOptions(), *,
                   commit_seconds: float = COMMIT_SECONDS, progress: bool = False, say=lambda msg: None) -> Result:
    """Tokenise the songs under ``inputs`` into ``out`` (see the package docstring); returns the report.

    ``job``: weights, precision, ``token_format`` and ``shard_size``, shards, engine. A job with no songs writes
    nothing (not even ``out``); a finished job run again loads no model and encodes nothing; a job whose output
    was made with other weights or settings is refused (OutputError) unless ``job.overwrite``. Per-song failures
    become error rows. A full, read-only or failing disk raises :class:`StorageError` at once; nothing damaged
    is committed, and the same call resumes once it is fixed.
    """
    from ..checkpoint import default_checkpoint, resolve_files
    from ..stages import ENCODER_STAGES, roles_of

    start = time.perf_counter()
    workers = default_workers() if job.workers is None else job.workers
    songs, problems = scan(inputs, out)
    lib = Library(out, job.token_format, job.shard, job.verify)
    job_songs = [s for s in songs if in_shard(s.song_id, job.shard)]
    if not job_songs:
        # nothing to do writes nothing: no folder, fingerprint, manifest or report, and no model is looked for
        return Result(empty_report(lib, "encode", job.engine, job.device, workers, start,
                                   report_fields(lib, Stats(), 0.0)), problems)
    if lib.parquet:
        parquet.require_pyarrow()
    if job.ckpt is None:
        job = dataclasses.replace(job, ckpt=str(default_checkpoint()))
    ckpt_files = resolve_files(job.ckpt, roles_of(ENCODER_STAGES), job.revision)
    job = joined(job, progress)
    fp = {**fingerprint(ckpt_files, options, job), MACHINES: [machine(job.device, job.engine)]}
    try:  # a full disk, wherever it stops the job, is said of the folder with what the rest needs
        lib.prepare(job_songs, fp, job.overwrite, say)
        plan = plan_run(lib, job_songs, job.retry_errors)
        todo, collisions = mct_collisions(lib, plan.todo)
        say(f"{len(job_songs)} songs in this job: {plan.skipped} already done, {plan.skipped_errors} failed "
            f"earlier, {len(todo) + len(collisions)} to encode"
            + ("" if job.shard is None else f" (shard {job.shard[0]}/{job.shard[1]})"))
        run = EncodeJob(options, job, fp, commit_seconds)
        if todo and job.engine == "local":
            say(f"loading the MuCodec encoder from {job.ckpt} on {job.device}")
        stats, devices = run_on(job.engine, run, lib, todo, workers=workers, progress=progress,
                                extra_errors=collisions, log=say)
        wall = time.perf_counter() - start
        rep = report(lib, plan, stats, task="encode", engine=job.engine, device=torch.device(job.device).type,
                     workers=workers, devices=devices, wall=wall, fp=fp, fields=report_fields(lib, stats, wall))
    except StorageError as e:
        raise lib.storage_error(e, job_songs) from None
    return Result(rep, problems)
