"""Tokenising a music library: resumable, sharded, exactly-once.

    from mucodec import library
    songs, problems = library.scan(["music/"], out="tokens/")
    lib = library.Library("tokens/", fmt="parquet")
    report = library.encode_library(codec, lib, songs, ckpt_files=...)   # or the CLI: --encode music/ -o tokens/
    flat = library.load_flat("tokens/")              # uint16 codes of every song + offsets, for LM training

The output folder (format ``parquet``; ``mct`` writes ``<path without extension>.mct`` per song instead,
``both`` does both)::

    fingerprint.json          what made the codes: checkpoint hashes, code version, batch size, dtype, ...
    manifest[-I-of-N].jsonl   the songs of one job: song_id, path, size, mtime
    shards/<job>-<n>.parquet  ~1000 songs each: song_id, path, duration, sample_rate, channels, num_samples,
                              num_codes, codes (list<uint16>)
    errors/<job>-<n>.jsonl    failed songs: song_id, path, stage, message, time
    index[-I-of-N].json       the committed shards of the job (informative: the shard files are the truth)
    report[-I-of-N].json      the last run: songs done/skipped/failed, hours per hour, windows/s, padding

Exactly once: a song's id is a hash of its path relative to the input folder. Every shard and error file
appears by an atomic rename, so a song is committed exactly when a shard file holding it exists; the state
is read back from those files on every start (temporary files of a crashed run are ignored and cleaned),
so a crash between two steps can neither lose nor duplicate a committed song. pyarrow is imported only when
parquet is written or read.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import contextlib
import glob
import hashlib
import json
import multiprocessing
import os
import re
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import audio, tokens
from .errors import ArgumentError, AudioError, MuCodecError, OutputError

# Bump when a change to the code makes different codes from the same audio and weights: old output
# then no longer matches the fingerprint and is refused instead of being silently mixed with new codes.
CODE_VERSION = 1
FORMATS = ("mct", "parquet", "both")
SHARD_SONGS = 1000
COMMIT_SECONDS = 600.0
_SHARD_NAME = re.compile(r"^(?P<tag>[a-z0-9-]+?)-(?P<seq>\d{6})\.(parquet|jsonl)$")


# ------------------------------------------------------------------------------------------------
# songs
# ------------------------------------------------------------------------------------------------
def song_id(rel_path: str) -> str:
    """The id of a song: 16 hex digits of the SHA-1 of its ``/``-separated path relative to its input folder
    (two ``01.flac`` in different folders are two songs; the same file listed twice is one)."""
    return hashlib.sha1(rel_path.encode("utf-8", "surrogateescape")).hexdigest()[:16]


@dataclass(frozen=True)
class Song:
    song_id: str
    path: str  # relative to its input folder, '/'-separated: what the output records
    file: str  # where to read it on this machine (never written to the output)
    size: int
    mtime: float

    def manifest_row(self) -> dict:
        return {"song_id": self.song_id, "path": self.path, "size": self.size, "mtime": self.mtime}


def scan(inputs, out=None) -> tuple[list[Song], list[tuple[str, str]]]:
    """INPUT arguments (folders, searched recursively; files; glob patterns) -> (songs sorted by path,
    [(input, one-sentence problem)]). Hidden files and anything inside ``out`` are skipped; a name with an
    audio extension that is not a regular file is kept, so that it becomes an error row, not a silent gap."""
    exts = audio.audio_extensions()
    out = Path(out).resolve() if out is not None else None
    found: dict[str, Song] = {}
    problems = []

    def add(f: Path, rel: str):
        sid = song_id(rel)
        if sid in found:
            if found[sid].file != str(f):
                problems.append((str(f), f"{f} has the same relative path '{rel}' as {found[sid].file}; "
                                         "encode the two folders into separate outputs."))
            return
        try:
            st = os.stat(f)
            size, mtime = st.st_size, st.st_mtime
        except OSError:
            size, mtime = 0, 0.0
        found[sid] = Song(sid, rel, str(f), size, mtime)

    for arg in map(str, inputs):
        path = Path(arg)
        if path.is_dir():
            before = len(found)
            for f in sorted(path.rglob("*")):
                rel = f.relative_to(path)
                if (f.suffix.lower() in exts and not f.is_dir() and not any(p.startswith(".") for p in rel.parts)
                        and not (out is not None and _is_within(f, out))):
                    add(f, rel.as_posix())
            if len(found) == before:
                problems.append((arg, f"The folder {arg} holds no audio files."))
        elif os.path.lexists(path):
            add(path, path.name)
        elif any(c in arg for c in "*?["):
            files = [Path(f) for f in sorted(glob.glob(arg, recursive=True)) if not Path(f).is_dir()]
            if not files:
                problems.append((arg, f"The pattern {arg} matches no file."))
            for f in files:
                add(f, f.name)
        else:
            problems.append((arg, f"{arg} does not exist."))
    return sorted(found.values(), key=lambda s: s.path), problems


def _is_within(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder)
        return True
    except ValueError:
        return False


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N' (1 <= I <= N) -> (I, N); ArgumentError otherwise."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        raise ArgumentError(f"--shard {text} is not a shard; write I/N with 1 <= I <= N, e.g. 3/8.")
    return int(m.group(1)), int(m.group(2))


def in_shard(sid: str, shard: tuple[int, int] | None) -> bool:
    """Whether song ``sid`` belongs to job ``shard`` = (I, N): by its id alone, so the N jobs never overlap,
    cover every song, and do not depend on the order files are listed in."""
    return shard is None or int(sid, 16) % shard[1] == shard[0] - 1


def job_tag(shard: tuple[int, int] | None) -> str:
    return "all" if shard is None else f"{shard[0]}-of-{shard[1]}"


# ------------------------------------------------------------------------------------------------
# fingerprint
# ------------------------------------------------------------------------------------------------
def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint(ckpt_files: dict, *, batch_size: int, dtype, device) -> dict:
    """What decides the codes: the encoder's checkpoint files (by content), this code, and the run's settings."""
    return {
        "code_version": CODE_VERSION,
        "checkpoints": {role: file_sha256(p) for role, p in sorted(ckpt_files.items()) if role in ("muq", "mucodec")},
        "batch_size": int(batch_size),
        "dtype": str(dtype).replace("torch.", ""),
        "device": torch.device(device).type,
        "torch": torch.__version__,
    }


# ------------------------------------------------------------------------------------------------
# the output folder
# ------------------------------------------------------------------------------------------------
@dataclass
class State:
    committed: set[str]  # song ids in committed shards (parquet) or with a .mct (mct)
    errors: dict[str, dict]  # song id -> its latest error row, for songs not committed since


class Library:
    """The output folder of a tokenisation job: its files, state, and atomic commits."""

    def __init__(self, out, fmt: str = "parquet", shard: tuple[int, int] | None = None):
        if fmt not in FORMATS:
            raise ArgumentError(f"format {fmt!r} is not one of {', '.join(FORMATS)}.")
        self.out, self.fmt, self.shard = Path(out), fmt, shard
        self.tag = job_tag(shard)
        suffix = "" if shard is None else f"-{self.tag}"
        self.manifest_path = self.out / f"manifest{suffix}.jsonl"
        self.index_path = self.out / f"index{suffix}.json"
        self.report_path = self.out / f"report{suffix}.json"
        self.fingerprint_path = self.out / "fingerprint.json"
        self.shards, self.errors = self.out / "shards", self.out / "errors"
        self._seq = None

    @property
    def parquet(self) -> bool:
        return self.fmt in ("parquet", "both")

    @property
    def mct(self) -> bool:
        return self.fmt in ("mct", "both")

    def mct_path(self, song: Song | str) -> Path:
        rel = song.path if isinstance(song, Song) else song
        return self.out / Path(rel).with_suffix(tokens.EXTENSION)

    # ---- setup ---------------------------------------------------------------------------------
    def prepare(self, songs: list[Song], fp: dict, overwrite: bool = False) -> None:
        """Create the folders, refuse output made differently (or discard it with ``overwrite``), clean the
        temporary files a crashed run of this job left, and write this job's manifest."""
        try:
            for d in (self.out, self.shards, self.errors):
                d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"Cannot create the output folder {self.out}: {e.strerror or e}.") from None
        old = self.read_fingerprint()
        if overwrite:
            self._discard(songs)
        elif old is not None and old != fp:
            diff = [k for k in sorted(set(old) | set(fp)) if old.get(k) != fp.get(k)]
            what = ", ".join(f"{k} {_short(old.get(k))} there, {_short(fp.get(k))} now" for k in diff)
            raise OutputError(f"{self.out} holds codes made differently ({what}); pass --overwrite to discard "
                              f"them, or choose another -o folder.")
        elif old is None and self._has_output():
            raise OutputError(f"{self.out} holds shards but no fingerprint.json, so what made them is unknown; "
                              f"pass --overwrite to discard them, or choose another -o folder.")
        if old != fp or overwrite:
            tokens.write_atomic(self.fingerprint_path, _json(fp))
        for d in (self.shards, self.errors):
            for tmp in d.glob(f".{self.tag}-*.tmp"):
                with contextlib.suppress(OSError):
                    tmp.unlink()
        tokens.write_atomic(self.manifest_path, b"".join(_json(s.manifest_row(), indent=None) for s in songs))

    def read_fingerprint(self) -> dict | None:
        try:
            return json.loads(self.fingerprint_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise OutputError(f"Cannot read {self.fingerprint_path} ({e}); pass --overwrite to start over.") from None

    def _has_output(self) -> bool:
        return any(self._files(self.shards, ".parquet")) or any(self._files(self.errors, ".jsonl"))

    def _discard(self, songs: list[Song]) -> None:
        for f in [*self._files(self.shards, ".parquet"), *self._files(self.errors, ".jsonl"),
                  *self.out.glob("manifest*.jsonl"), *self.out.glob("index*.json"), *self.out.glob("report*.json"),
                  self.fingerprint_path, *(self.mct_path(s) for s in songs)]:
            with contextlib.suppress(FileNotFoundError):
                f.unlink()

    @staticmethod
    def _files(folder: Path, suffix: str) -> list[Path]:
        # hidden names are temporary files of unfinished commits: never part of the state
        return sorted(p for p in folder.glob(f"*{suffix}") if not p.name.startswith(".")) if folder.is_dir() else []

    # ---- state ---------------------------------------------------------------------------------
    def state(self, songs: list[Song] | None = None) -> State:
        """Committed ids and outstanding errors, read from the committed files themselves."""
        if self.parquet:
            committed = set()
            for f in self._files(self.shards, ".parquet"):
                committed.update(_pq().read_table(f, columns=["song_id"]).column("song_id").to_pylist())
        else:
            committed = {s.song_id for s in songs or () if self.mct_path(s).is_file()}
        errors = {}
        for row in read_errors(self.out):
            if row["song_id"] not in committed:
                errors[row["song_id"]] = row
        return State(committed, errors)

    def next_name(self) -> str:
        if self._seq is None:
            seqs = [int(m.group("seq")) for d in (self.shards, self.errors) for f in d.iterdir()
                    if (m := _SHARD_NAME.match(f.name)) and m.group("tag") == self.tag]
            self._seq = max(seqs, default=-1) + 1
        name, self._seq = f"{self.tag}-{self._seq:06d}", self._seq + 1
        return name

    # ---- commits -------------------------------------------------------------------------------
    def commit(self, name: str, rows: list[dict], errors: list[dict], fp: dict | None = None) -> list[dict]:
        """Commit finished songs and error rows under ``name``: the .mct files first, then the error file,
        then the shard, each by an atomic rename (the shard's rename is the commit of its songs).
        Returns the error rows of songs whose .mct could not be written (they are not committed)."""
        failed = []
        if self.mct:
            kept = []
            for r in rows:
                try:
                    dst = self.mct_path(r["path"])
                    try:
                        dst.parent.mkdir(parents=True, exist_ok=True)
                    except OSError as e:
                        raise OutputError(f"Cannot create the folder {dst.parent}: {e.strerror or e}.") from None
                    tokens.save_codes(self.mct_path(r["path"]), torch.from_numpy(r["codes"].astype(np.int64)),
                                      num_samples=r["num_samples"], original_sample_rate=r["sample_rate"],
                                      original_channels=r["channels"])
                    kept.append(r)
                except MuCodecError as e:
                    failed.append(error_row(r["song_id"], r["path"], "write", str(e)))
            rows, errors = kept, errors + failed
        if errors:
            tokens.write_atomic(self.errors / f"{name}.jsonl", b"".join(_json(e, indent=None) for e in errors))
        if rows and self.parquet:
            write_shard(self.shards / f"{name}.parquet", rows, fp)
        return failed

    def write_index(self) -> None:
        entries = []
        for f in self._files(self.shards, ".parquet"):
            if f.name.startswith(self.tag + "-"):
                entries.append({"file": f"shards/{f.name}", "songs": _pq().read_metadata(f).num_rows})
        tokens.write_atomic(self.index_path, _json({"job": self.tag, "shards": entries}))


def _short(v) -> str:
    s = json.dumps(v, sort_keys=True) if not isinstance(v, str) else v
    return s if len(s) <= 40 else s[:37] + "..."


def _json(obj, indent=2) -> bytes:
    return (json.dumps(obj, indent=indent, sort_keys=True) + "\n").encode()


def error_row(sid: str, path: str, stage: str, message: str) -> dict:
    return {"song_id": sid, "path": path, "stage": stage, "message": message, "time": time.time()}


def read_errors(out) -> list[dict]:
    """Every error row under ``out/errors``, oldest first (a song retried and failed again has several)."""
    rows = []
    for f in Library._files(Path(out) / "errors", ".jsonl"):
        rows += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return sorted(rows, key=lambda r: r["time"])


# ------------------------------------------------------------------------------------------------
# parquet
# ------------------------------------------------------------------------------------------------
def _pa():
    try:
        import pyarrow
    except ImportError:
        raise ArgumentError("Parquet output needs pyarrow: pip install -r requirements-library.txt "
                            "(or use --format mct).") from None
    return pyarrow


def _pq():
    _pa()
    import pyarrow.parquet
    return pyarrow.parquet


def _schema(fp: dict | None):
    pa = _pa()
    return pa.schema([("song_id", pa.string()), ("path", pa.string()), ("duration", pa.float64()),
                      ("sample_rate", pa.int32()), ("channels", pa.int32()), ("num_samples", pa.int64()),
                      ("num_codes", pa.int32()), ("codes", pa.list_(pa.uint16()))],
                     metadata={b"mucodec.fingerprint": json.dumps(fp, sort_keys=True).encode()} if fp else None)


def write_shard(path: Path, rows: list[dict], fp: dict | None = None) -> None:
    pa, pq = _pa(), _pq()
    schema = _schema(fp)
    lengths = np.array([len(r["codes"]) for r in rows], dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    flat = np.concatenate([np.asarray(r["codes"], dtype=np.uint16) for r in rows]) if rows else np.zeros(0, np.uint16)
    columns = [pa.array([r[name] for r in rows], type=schema.field(name).type) for name in schema.names[:-1]]
    columns.append(pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=pa.uint16())))
    table = pa.Table.from_arrays(columns, schema=schema)
    with tokens.open_atomic(path) as f:
        pq.write_table(table, f)


def read_library(out, columns=None):
    """All committed songs of ``out`` as one pyarrow Table sorted by path (``columns``: a subset)."""
    pa, pq = _pa(), _pq()
    files = Library._files(Path(out) / "shards", ".parquet")
    if not files:
        return _schema(None).empty_table() if columns is None else _schema(None).empty_table().select(columns)
    table = pa.concat_tables([pq.read_table(f, columns=columns) for f in files])
    if "path" in table.column_names:
        table = table.sort_by("path")
    return table


def iter_codes(out):
    """(song_id, path, codes uint16 array) for every committed song of ``out``, by path."""
    table = read_library(out, columns=["song_id", "path", "codes"])
    for sid, path, codes in zip(table.column("song_id").to_pylist(), table.column("path").to_pylist(),
                                table.column("codes")):
        yield sid, path, codes.values.to_numpy(zero_copy_only=False).astype(np.uint16, copy=False)


@dataclass
class FlatCodes:
    """Every song's codes end to end, for language-model training: song ``k`` is
    ``codes[offsets[k]:offsets[k + 1]]``."""

    codes: np.ndarray  # uint16 (total,)
    offsets: np.ndarray  # int64 (songs + 1,)
    song_ids: list[str]
    paths: list[str]

    def __len__(self) -> int:
        return len(self.song_ids)

    def __getitem__(self, k: int) -> np.ndarray:
        return self.codes[self.offsets[k]:self.offsets[k + 1]]


def load_flat(out) -> FlatCodes:
    """The committed songs of ``out`` (by path) as one flat uint16 array plus offsets."""
    table = read_library(out, columns=["song_id", "path", "codes"])
    col = table.column("codes").combine_chunks() if table.num_rows else None
    if col is None:
        return FlatCodes(np.zeros(0, np.uint16), np.zeros(1, np.int64), [], [])
    offsets = col.offsets.to_numpy().astype(np.int64)
    codes = col.values.to_numpy(zero_copy_only=False).astype(np.uint16, copy=False)
    return FlatCodes(codes[offsets[0]:offsets[-1]], offsets - offsets[0], table.column("song_id").to_pylist(),
                     table.column("path").to_pylist())


# ------------------------------------------------------------------------------------------------
# reading audio (worker processes)
# ------------------------------------------------------------------------------------------------
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


def _safe_read(file: str, sample_rate: int) -> dict:
    """read_song, with any failure turned into {'error': message} (a worker must never die of a bad file)."""
    try:
        return read_song(file, sample_rate)
    except MuCodecError as e:
        return {"error": str(e)}
    except Exception as e:  # a bug or a decoder crash of one file: reported as that file's error
        return {"error": f"internal error {type(e).__name__}: {e}"}


def _init_worker():
    # Ctrl-C goes to the whole process group: the parent decides what to keep, workers just stop with it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)


def _to_tensor(wav: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(wav)
    return t.expand(2, -1) if t.shape[0] == 1 else t


class Reader:
    """Songs -> decoded audio, in order, read ``workers`` at a time in spawned processes (0: in this process)
    with at most ``prefetch`` songs decoded ahead, so memory stays bounded whatever the library's size."""

    def __init__(self, songs: list[Song], workers: int, sample_rate: int, prefetch: int | None = None):
        self.songs, self.workers, self.sample_rate = songs, workers, sample_rate
        self.prefetch = prefetch or 2 * workers + 1
        self.pool = None

    def _pool(self):
        # spawn, not fork: this process already runs torch threads, and a forked copy of them can deadlock
        return cf.ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                      initializer=_init_worker)

    def __iter__(self):
        if self.workers == 0:
            for s in self.songs:
                yield s, _safe_read(s.file, self.sample_rate)
            return
        self.pool = self._pool()
        pending, queue = collections.deque(), collections.deque(self.songs)
        solo = 0  # songs at the front of the queue to read one at a time, after a worker died among them
        crashes = successes = 0
        try:
            while True:
                while len(pending) < (1 if solo else self.prefetch) and queue:
                    s = queue.popleft()
                    pending.append((s, self.pool.submit(_safe_read, s.file, self.sample_rate)))
                if not pending:
                    return
                s, fut = pending.popleft()
                try:
                    got = fut.result()
                except cf.process.BrokenProcessPool:
                    suspects = [s] + [x for x, _ in pending]
                    pending.clear()
                    self.pool.shutdown(wait=False, cancel_futures=True)
                    self.pool = self._pool()
                    if len(suspects) > 1:  # any of them may be the culprit: read them again, alone
                        queue.extendleft(reversed(suspects))
                        solo = len(suspects)
                        continue
                    crashes += 1
                    solo = max(solo - 1, 0)
                    if not successes and crashes >= 3:
                        raise MuCodecError("The audio worker processes die before reading any file; run with "
                                           "--workers 0 to read in this process.")
                    got = {"error": f"Reading {s.path} crashed its worker process; check or re-export the file."}
                else:
                    successes += "error" not in got
                    solo = max(solo - 1, 0)
                yield s, got
        finally:
            self.pool.shutdown(wait=False, cancel_futures=True)


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


# ------------------------------------------------------------------------------------------------
# the local engine
# ------------------------------------------------------------------------------------------------
@dataclass
class Plan:
    """What a run will do: every song of the job, the ones still to encode, and the ones skipped."""

    songs: list[Song]
    todo: list[Song]
    skipped: int
    skipped_errors: int


def plan_run(lib: Library, songs: list[Song], retry_errors: bool = False) -> Plan:
    """Resume = the job's songs - committed ids - errored ids (unless ``retry_errors``)."""
    songs = [s for s in songs if in_shard(s.song_id, lib.shard)]
    st = lib.state(songs)
    todo, skipped, skipped_errors = [], 0, 0
    for s in songs:
        if s.song_id in st.committed:
            skipped += 1
        elif s.song_id in st.errors and not retry_errors:
            skipped_errors += 1
        else:
            todo.append(s)
    return Plan(songs, todo, skipped, skipped_errors)


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


@dataclass
class Stats:
    done: int = 0
    failed: int = 0
    seconds_audio: float = 0.0
    windows: int = 0
    padding: int = 0
    failures: list = field(default_factory=list)


def song_row(song: Song, got: dict, codes: torch.Tensor, num_samples: int) -> dict:
    return {"song_id": song.song_id, "path": song.path, "duration": float(got["duration"]),
            "sample_rate": int(got["sample_rate"]), "channels": int(got["channels"]), "num_samples": int(num_samples),
            "num_codes": int(codes.numel()), "codes": codes.numpy().astype(np.uint16)}


def run_local(codec, lib: Library, todo: list[Song], fp: dict, *, batch_size: int, workers: int = 1,
              shard_songs: int = SHARD_SONGS, commit_seconds: float = COMMIT_SECONDS, progress: bool = False,
              extra_errors=()) -> Stats:
    """Encode ``todo`` into ``lib``: workers decode, the packer fills fixed-size encoder batches, finished songs
    are committed every ``shard_songs`` songs or ``commit_seconds`` seconds. Ctrl-C commits the songs already
    finished before it stops."""
    from tqdm.auto import tqdm

    stats = Stats()
    rows, errors = [], list(extra_errors)
    last = time.monotonic()
    by_key = {}
    bar = tqdm(total=len(todo), unit="song", desc="encode", file=sys.stderr, disable=not progress, dynamic_ncols=True)

    def commit():
        nonlocal rows, errors, last
        # the buffers are handed over first: a Ctrl-C inside lib.commit must not commit them a second time
        batch, batch_errors = rows, errors
        rows, errors, last = [], [], time.monotonic()
        if batch or batch_errors:
            failed = lib.commit(lib.next_name(), batch, batch_errors, fp)
            stats.done -= len(failed)
            stats.failed += len(failed)
            stats.failures += failed
            if lib.parquet:
                lib.write_index()

    def fail(song: Song, stage: str, message: str):
        errors.append(error_row(song.song_id, song.path, stage, message))
        stats.failed += 1
        stats.failures.append(errors[-1])
        bar.update(1)

    def finish(done):
        for key, codes, why in done:
            song, got, n = by_key.pop(key)
            if why is not None:
                fail(song, "encode", why)
                continue
            rows.append(song_row(song, got, codes, n))
            stats.done += 1
            stats.seconds_audio += float(got["duration"])
            bar.update(1)
            bar.set_postfix_str(f"{stats.seconds_audio / 3600:.2f} h", refresh=False)

    packer = WindowPacker(codec, batch_size)
    try:
        for k, (song, got) in enumerate(Reader(todo, workers, audio.CODEC_SAMPLE_RATE)):
            if "error" in got:
                fail(song, "read", got["error"])
            else:
                wav = _to_tensor(got.pop("wav"))
                by_key[k] = (song, got, wav.shape[-1])
                try:
                    finish(packer.add(k, wav))
                except MuCodecError as e:  # raised before the song joined the queue
                    by_key.pop(k, None)
                    fail(song, "encode", str(e))
                del wav
            if len(rows) + len(errors) >= shard_songs or (time.monotonic() - last >= commit_seconds
                                                          and (rows or errors)):
                commit()
        finish(packer.flush())
        commit()
    except KeyboardInterrupt:
        commit()  # keep what finished; the songs in flight are redone by the next run
        raise
    finally:
        bar.close()
        stats.windows, stats.padding = packer.windows, packer.padding
    return stats


def report(lib: Library, plan: Plan, stats: Stats, *, engine: str, device: str, workers: int, devices: int,
           wall: float, fp: dict, lost: int = 0) -> dict:
    """The run's final report (written to ``report[-I-of-N].json``)."""
    hours = stats.seconds_audio / 3600
    rep = {
        "engine": engine, "device": device, "devices": devices, "workers": workers, "format": lib.fmt,
        "job": lib.tag,
        "songs": {"in_job": len(plan.songs), "done": stats.done, "skipped": plan.skipped + plan.skipped_errors,
                  "skipped_failed_earlier": plan.skipped_errors, "failed": stats.failed},
        "hours_encoded": round(hours, 6), "wall_seconds": round(wall, 3),
        "hours_per_hour": round(hours / (wall / 3600), 3) if wall > 0 else None,
        "hours_per_hour_per_device": round(hours / (wall / 3600) / max(devices, 1), 3) if wall > 0 else None,
        "windows": stats.windows, "windows_per_second": round(stats.windows / wall, 4) if wall > 0 else None,
        "padding_fraction": round(stats.padding / (stats.windows + stats.padding), 4)
        if stats.windows + stats.padding else 0.0,
        "failures": stats.failures[:1000],
        "fingerprint": fp,
    }
    with contextlib.suppress(OutputError):
        tokens.write_atomic(lib.report_path, _json(rep))
    return rep


def summary_line(rep: dict) -> str:
    s = rep["songs"]
    line = (f"{s['done']} done, {s['skipped']} skipped, {s['failed']} failed; {rep['hours_encoded']:.2f} h of audio "
            f"in {rep['wall_seconds']:.0f} s")
    if rep["hours_per_hour"] and s["done"]:
        line += f" ({rep['hours_per_hour']:.1f} h/h, padding {100 * rep['padding_fraction']:.0f}%)"
    if s["skipped_failed_earlier"]:
        line += f"; {s['skipped_failed_earlier']} failed earlier (--retry-errors retries them)"
    return line


# ------------------------------------------------------------------------------------------------
# one call for a whole job (the CLI's --encode on a library)
# ------------------------------------------------------------------------------------------------
def default_workers() -> int:
    """Decoding processes: one core is left to the encoder (more help little: decoding is the cheap part)."""
    return max(1, min(8, (os.cpu_count() or 2) - 1))


@dataclass
class Result:
    report: dict
    problems: list  # [(input, message)]: inputs that named nothing


def encode_library(inputs, out, *, ckpt=None, revision=None, device="cpu", dtype=torch.float32, fmt="parquet",
                   shard=None, engine="local", address=None, workers=None, batch_size=3, retry_errors=False,
                   overwrite=False, shard_songs=SHARD_SONGS, commit_seconds=COMMIT_SECONDS, progress=False,
                   say=lambda msg: None) -> Result:
    """Tokenise the songs under ``inputs`` into ``out`` (see the module docstring); returns the report.

    A finished job run again loads no model and encodes nothing; a job whose output was made with other
    weights or settings is refused (OutputError) unless ``overwrite``. Per-song failures become error rows.
    """
    from . import api
    from .checkpoint import ENCODER_STAGES, resolve_files, roles_of
    from .codec import MuCodec

    start = time.perf_counter()
    workers = default_workers() if workers is None else int(workers)
    if engine not in ("local", "ray"):
        raise ArgumentError(f"engine {engine!r} is not one of local, ray.")
    songs, problems = scan(inputs, out)
    lib = Library(out, fmt, shard)
    if lib.parquet:
        _pa()  # a missing pyarrow is one sentence now, not a traceback after the first shard
    ckpt = ckpt if ckpt is not None else api.default_checkpoint()
    files = resolve_files(ckpt, roles_of(ENCODER_STAGES), revision)
    if engine == "ray":
        from . import ray_engine
        device = ray_engine.connect(address, progress)
    job_songs = [s for s in songs if in_shard(s.song_id, shard)]
    fp = fingerprint(files, batch_size=batch_size, dtype=dtype, device=device)
    lib.prepare(job_songs, fp, overwrite)
    plan = plan_run(lib, job_songs, retry_errors)
    todo, collisions = mct_collisions(lib, plan.todo)
    say(f"{len(job_songs)} songs in this job: {plan.skipped} already done, {plan.skipped_errors} failed earlier, "
        f"{len(todo) + len(collisions)} to encode" + ("" if shard is None else f" (shard {shard[0]}/{shard[1]})"))
    lost = 0
    if engine == "ray":
        stats, devices, lost = ray_engine.run(lib, todo, fp, ckpt=ckpt, revision=revision, dtype=dtype,
                                              batch_size=batch_size, workers=workers, shard_songs=shard_songs,
                                              progress=progress, extra_errors=collisions)
    else:
        devices = 1
        stats = Stats()
        if todo or collisions:
            codec = None
            if todo:
                say(f"loading the MuCodec encoder from {ckpt} on {device}")
                codec = MuCodec.from_pretrained(ckpt, device=device, dtype=dtype, encoder_only=True,
                                                revision=revision)
            stats = run_local(codec, lib, todo, fp, batch_size=batch_size, workers=workers, shard_songs=shard_songs,
                              commit_seconds=commit_seconds, progress=progress, extra_errors=collisions)
            stats.failed += len(collisions)
            stats.failures += collisions
    rep = report(lib, plan, stats, engine=engine, device=torch.device(device).type, workers=workers, devices=devices,
                 wall=time.perf_counter() - start, fp=fp, lost=lost)
    return Result(rep, problems)
