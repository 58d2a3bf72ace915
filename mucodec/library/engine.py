"""The local engine, generic over jobs: items -> worker reads -> the job's batcher -> the job's sink.

A job is a :class:`Job` (the encode job is :class:`encode.EncodeJob`); its items are hashable and have
``song_id``, ``path`` and ``manifest_row()`` (:class:`songs.Song` is one); its results are dicts holding at
least ``duration`` (seconds of audio, for the report). The same job runs on Ray (``ray_engine.run``).
"""
from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

from ..errors import MuCodecError, OutputError, StorageError
from ..settings import SHARD_SONGS
from ..workers import Reader
from .songs import in_shard
from .store import Store, error_row

COMMIT_SECONDS = 600.0  # and at least one commit every so often, so a crash loses little


class Batcher(Protocol):
    """Computes many items together (several songs per model call); finished items come back in any order."""

    def add(self, key, payload: dict) -> list[tuple]:
        """Queue one item; returns [(key, result or None, error message or None)] for the items it finished.
        A MuCodecError raised here fails ``key`` alone."""

    def flush(self) -> list[tuple]:
        """Finish every queued item; the same triples."""

    def counters(self) -> dict[str, int]:
        """The job's own counts for the report (encode: windows, padding); summed over batchers."""


class Job(Protocol):
    """What a job gives the engines."""

    task: str  # "encode": the progress label, the stage of the batcher's errors, the report's hours_<task>d
    # module-level function (pickled by name into worker processes): item -> payload dict, or
    # {'error': message} for an item it cannot use
    read: Callable[[object], dict]

    def batcher(self) -> Batcher:
        """A fresh batcher, in the process that holds the model (this one, or a Ray actor): the job loads
        its model on the first call and keeps it."""

    def sink(self, store: Store) -> Sink:
        """Where this job's finished songs go."""


class ModelJob:
    """What both jobs share: the model, loaded on the first batcher in the process that runs it (this one, or a
    Ray actor) and kept; it never travels with the job. A subclass has ``job`` (its JobOptions) and codec."""

    def model(self, **kwargs):
        if self.codec is None:
            from ..codec import MuCodec

            self.codec = MuCodec.from_pretrained(self.job.ckpt, device=self.job.device, dtype=self.job.torch_dtype,
                                                 revision=self.job.revision, **kwargs)
        return self.codec

    def __getstate__(self) -> dict:
        return {**self.__dict__, "codec": None}


class Sink:
    """Where finished songs and error rows go: buffered, committed every ``songs_per_commit`` songs or
    ``commit_seconds`` seconds. A job overrides :meth:`write` (and :meth:`close`) to commit its own output;
    this one commits error rows only (a job whose batcher commits each song itself needs no more)."""

    def __init__(self, store: Store, songs_per_commit: int = SHARD_SONGS, commit_seconds: float = COMMIT_SECONDS):
        self.store, self.songs_per_commit, self.commit_seconds = store, songs_per_commit, commit_seconds
        self.rows, self.errors = [], []
        self.last = time.monotonic()

    def put(self, item, result: dict) -> None:
        self.rows.append(result)

    def fail(self, row: dict) -> None:
        self.errors.append(row)

    def due(self) -> bool:
        n = len(self.rows) + len(self.errors)
        return n >= self.songs_per_commit or (n > 0 and time.monotonic() - self.last >= self.commit_seconds)

    def commit(self, name: str | None = None) -> list[dict]:
        """Commit what is buffered under ``name`` (default: the store's next); returns the error rows of
        songs that failed while being committed (they are not committed)."""
        # the buffers are handed over first: a Ctrl-C inside write must not commit them a second time
        rows, errors = self.rows, self.errors
        self.rows, self.errors, self.last = [], [], time.monotonic()
        if not rows and not errors:
            return []
        return self.write(name or self.store.next_name(), rows, errors)

    def write(self, name: str, rows: list[dict], errors: list[dict]) -> list[dict]:
        self.store.write_errors(name, errors)
        return []

    def close(self) -> None:
        """After the run's last commit."""


@dataclass
class Plan:
    """What a run will do: every song of the job, the ones still to do, and the ones skipped."""

    songs: list
    todo: list
    skipped: int
    skipped_errors: int


def plan_run(store: Store, songs: list, retry_errors: bool = False) -> Plan:
    """Resume = the job's songs - committed ids - errored ids (unless ``retry_errors``)."""
    songs = [s for s in songs if in_shard(s.song_id, store.shard)]
    st = store.state(songs)
    todo, skipped, skipped_errors = [], 0, 0
    for s in songs:
        if s.song_id in st.committed:
            skipped += 1
        elif s.song_id in st.errors and not retry_errors:
            skipped_errors += 1
        else:
            todo.append(s)
    return Plan(songs, todo, skipped, skipped_errors)


@dataclass
class Stats:
    done: int = 0
    failed: int = 0
    seconds_audio: float = 0.0
    counters: dict = field(default_factory=dict)  # the batchers' own counts, summed
    failures: list = field(default_factory=list)

    def count(self, counters: dict) -> None:
        for k, v in counters.items():
            self.counters[k] = self.counters.get(k, 0) + v

    def failed_rows(self, rows: list[dict], done: bool = False) -> None:
        """Record failed songs (``done``: counted as done so far)."""
        self.done -= len(rows) if done else 0
        self.failed += len(rows)
        self.failures += rows


def run_local(job, store: Store, todo: list, *, workers: int = 1, progress: bool = False,
              extra_errors=(), log=None) -> Stats:
    """Run ``todo`` through ``job`` into ``store``: worker processes read, the batcher computes, the sink
    commits. ``extra_errors`` (rows of songs failed while planning) are committed with the rest. ``log``: called
    with one line per finished or failed song when there is no progress bar (a job on a cluster, or with its
    output in a file, is never silent for long). Ctrl-C
    commits the songs already finished before it stops; the next run redoes the ones in flight."""
    from tqdm.auto import tqdm

    stats, sink = Stats(), job.sink(store)
    bar = tqdm(total=len(todo), unit="song", desc=job.task, file=sys.stderr, disable=not progress, dynamic_ncols=True)
    for row in extra_errors:
        sink.fail(row)
    stats.failed_rows(list(extra_errors))

    def fail(item, stage: str, message: str):
        row = error_row(item.song_id, item.path, stage, message)
        sink.fail(row)
        stats.failed_rows([row])
        bar.update(1)
        note(f"failed {item.path} ({stage}): {message}")

    def note(line: str):
        if log is not None and not progress:
            log(f"{job.task} {stats.done + stats.failed}/{len(todo)}: {line}")

    def finish(done):
        for item, result, why in done:
            if why is not None:
                fail(item, job.task, why)
                continue
            sink.put(item, result)
            stats.done += 1
            stats.seconds_audio += float(result["duration"])
            bar.update(1)
            note(f"{item.path} ({float(result['duration']):.1f} s of audio)")
            bar.set_postfix_str(f"{stats.seconds_audio / 3600:.2f} h", refresh=False)

    batcher = job.batcher() if todo else None
    try:
        _feed(job, batcher, Reader(job.read, todo, workers), sink, stats, fail, finish)
    except StorageError:  # a full disk is the job's problem, not a song's: stop, keep what is already finished
        abort(batcher)
        with contextlib.suppress(OutputError):
            sink.commit()
        raise
    except KeyboardInterrupt:
        abort(batcher)
        sink.commit()  # keep what finished
        raise
    finally:
        bar.close()
        if batcher is not None:
            stats.count(batcher.counters())
    sink.close()
    return stats


def empty_report(store: Store, task: str, engine: str, device: str, workers: int, start: float, fields: dict,
                 failed: int = 0) -> dict:
    """The report of a job with no songs, which writes nothing (not even its report)."""
    import torch

    return report(store, Plan([], [], 0, 0), Stats(failed=failed), task=task, engine=engine,
                  device=torch.device(device).type, workers=workers, devices=0, wall=time.perf_counter() - start,
                  fp=None, fields=fields, write=False)


def _feed(job, batcher, reader, sink: Sink, stats: Stats, fail, finish) -> None:
    """Every item the workers read into the batcher, committing whenever the sink is due, then the rest."""
    for item, got in reader:
        if "error" in got:
            fail(item, "read", got["error"])
        else:
            try:
                finish(batcher.add(item, got))
            except StorageError:
                raise
            except MuCodecError as e:  # raised before the item joined the queue
                fail(item, job.task, str(e))
            del got
        if sink.due():
            stats.failed_rows(sink.commit(), done=True)
    if batcher is not None:
        finish(batcher.flush())
    stats.failed_rows(sink.commit(), done=True)


def abort(batcher) -> None:
    """Songs in flight are not committed: a batcher that writes as it goes removes what it had begun."""
    if batcher is not None and hasattr(batcher, "abort"):
        with contextlib.suppress(Exception):
            batcher.abort()


def report(store: Store, plan: Plan, stats: Stats, *, task: str, engine: str, device: str, workers: int,
           devices: int, wall: float, fp: dict | None, fields: dict | None = None, write: bool = True) -> dict:
    """The run's report, written to the store's ``report[-I-of-N].json`` (unless not ``write``); ``fields``:
    the job's own."""
    hours = stats.seconds_audio / 3600
    rep = {
        "task": task, "engine": engine, "device": device, "devices": devices, "workers": workers, "job": store.tag,
        "songs": {"in_job": len(plan.songs), "done": stats.done, "skipped": plan.skipped + plan.skipped_errors,
                  "skipped_failed_earlier": plan.skipped_errors, "failed": stats.failed},
        f"hours_{task}d": round(hours, 6), "wall_seconds": round(wall, 3),
        "hours_per_hour": round(hours / (wall / 3600), 3) if wall > 0 else None,
        "hours_per_hour_per_device": round(hours / (wall / 3600) / max(devices, 1), 3) if wall > 0 else None,
        "failures": stats.failures[:1000],
        "fingerprint": fp,
        **(fields or {}),
    }
    if write:
        store.write_report(rep)
    return rep


def summary_line(rep: dict) -> str:
    s = rep["songs"]
    line = (f"{s['done']} done, {s['skipped']} skipped, {s['failed']} failed; "
            f"{rep['hours_' + rep['task'] + 'd']:.2f} h of audio in {rep['wall_seconds']:.0f} s")
    if rep["hours_per_hour"] and s["done"]:
        line += f" ({rep['hours_per_hour']:.1f} h/h"
        if "padding_fraction" in rep:
            line += f", padding {100 * rep['padding_fraction']:.0f}%"
        if rep.get("batch_fill") is not None:
            line += f", batch fill {100 * rep['batch_fill']:.0f}%"
        line += ")"
    if s["skipped_failed_earlier"]:
        line += f"; {s['skipped_failed_earlier']} failed earlier (--retry-errors retries them)"
    return line
