"""``--engine ray``: any job of :mod:`engine` on Ray Data, on a local instance or a cluster.

    pending items -> CPU tasks map the job's ``read`` -> actors (ActorPoolStrategy, one per GPU) run the
    job's batcher on each call's items -> a datasink commits each write through the job's sink

Only this module imports ray, and only when ``--engine ray`` is asked for (``pip install -r
requirements-ray.txt``). What it commits is what the local engine commits (same sink, same store); the
results are the same bit for bit (same batcher). Items, payloads and results travel between the stages
pickled, as byte arrays: Ray Data needs no schema for them.

Failure handling, because Ray drops a whole block when a task raises: every per-item failure is caught
inside the task or actor and travels on as an error row. Tasks and actors are retried a bounded number of
times (a file that kills its process cannot loop forever); a block that still fails is dropped, and after
the run its items, neither committed nor errored, get an error row of stage ``worker``. A commit's name is
derived from the ids it holds, so a write retried by Ray replaces its own files instead of adding a copy.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import pickle
import warnings

import numpy as np

from ..errors import ArgumentError, MuCodecError, StorageError
from ..workers import call_safely
from .engine import Stats, abort
from .store import Store, error_row

MAX_RETRIES = 2  # per task / actor: a file that crashes its process is tried 1 + MAX_RETRIES times
STORAGE = "storage"  # the stage of a song stopped by a full disk: never committed as the song's error
SONGS_PER_CALL = 16  # items an actor batches per call: more fill batches better, fewer bound memory


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise ArgumentError("--engine ray needs Ray Data: pip install -r requirements-ray.txt "
                            "(or use the default --engine local).") from None
    return ray


def runtime_env() -> dict:
    """The job's runtime environment: this package travels with the job, so the nodes of a cluster need
    Ray, torch and the runtime dependencies but no copy of MuCodec. Pass it to your own ``ray.init``."""
    return {"py_modules": [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]}


def connect(address: str | None, progress: bool) -> str:
    """Join the cluster at ``address`` (None: RAY_ADDRESS, else a new local instance; a session this process
    already joined is used as is). Returns the model's device kind: cuda when the cluster has GPUs."""
    ray = _ray()
    if not ray.is_initialized():
        ray.init(address=address, runtime_env=runtime_env(), include_dashboard=False, log_to_driver=progress,
                 logging_level=logging.INFO if progress else logging.WARNING)
    if not progress:  # Ray Data logs each execution at INFO level on its own logger
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    ctx.max_errored_blocks = -1  # a block that exhausts its retries loses its songs, never the job
    return "cuda" if ray.cluster_resources().get("GPU", 0) >= 1 else "cpu"


def _pack(obj) -> np.ndarray:
    return np.frombuffer(pickle.dumps(obj, protocol=5), dtype=np.uint8)


def _unpack(data):
    return pickle.loads(np.ascontiguousarray(data, dtype=np.uint8))


def _nothing() -> np.ndarray:
    return np.zeros(0, np.uint8)


def _objects(values: list) -> np.ndarray:
    # an object array, or numpy would turn arrays of one length into one 2-D array
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def _read_row(row: dict, read) -> dict:
    """CPU task: the job's read of one item, or its error (a raise would drop the whole block)."""
    got = call_safely(read, _unpack(row["item"]))
    return {"item": row["item"], "error": got.get("error", ""),
            "payload": _nothing() if "error" in got else _pack(got)}


class _Batcher:
    """Actor: one model per actor (the job loads it on its first batcher), one batcher per call."""

    def __init__(self, job, gpu: bool):
        import torch

        if not gpu:  # Ray pins a 1-CPU actor to 1 thread; on a CPU node the model is the work, give it the cores
            torch.set_num_threads(os.cpu_count() or 1)
        self.job = job

    def __call__(self, batch: dict) -> dict:
        out = {k: [] for k in ("item", "result", "error", "stage", "counters")}
        pending = {}  # item -> added and not finished

        def emit(item, result, stage, why):
            pending.pop(item, None)
            out["item"].append(_pack(item))
            out["result"].append(_nothing() if result is None else _pack(result))
            out["error"].append(why or "")
            out["stage"].append(stage)
            out["counters"].append("")

        def finished(done):
            for item, result, why in done:
                emit(item, result, self.job.task if why else "", why)

        batcher = self.job.batcher()
        stop = None  # a full disk: the rest of the call is not computed, and no song of it is failed for it
        for i in range(len(batch["item"])):
            item = _unpack(batch["item"][i])
            if stop is not None:
                emit(item, None, STORAGE, stop)
                continue
            if batch["error"][i]:
                emit(item, None, "read", str(batch["error"][i]))
                continue
            try:
                pending[item] = True
                finished(batcher.add(item, _unpack(batch["payload"][i])))
            except StorageError as e:
                stop = str(e)
                emit(item, None, STORAGE, stop)
            except Exception as e:  # caught here: an exception would make Ray drop every item of the call
                emit(item, None, self.job.task, _message(e))
        try:
            if stop is not None:
                abort(batcher)
            else:
                finished(batcher.flush())
        except StorageError as e:
            stop = str(e)
        except Exception as e:
            for item in list(pending):
                emit(item, None, self.job.task, _message(e))
        for item in list(pending):
            emit(item, None, STORAGE, stop)
        if out["counters"]:
            out["counters"][-1] = json.dumps(batcher.counters())
        return {k: _objects(v) if k in ("item", "result") else np.array(v) for k, v in out.items()}


def _storage_rows(failures: list[dict]) -> tuple[list[dict], str | None]:
    """The failures that are songs' own, and the first full-disk sentence among them (that is the job's)."""
    stop = next((r["message"] for r in failures if r["stage"] == STORAGE), None)
    return [r for r in failures if r["stage"] != STORAGE], stop


def _message(e: Exception) -> str:
    return str(e) if isinstance(e, MuCodecError) else f"internal error {type(e).__name__}: {e}"


def _digest(ids) -> str:
    return hashlib.sha1(" ".join(sorted(ids)).encode()).hexdigest()[:16]


def _commit_sink_class():
    from ray.data import Datasink
    from ray.data.block import BlockAccessor

    class CommitSink(Datasink):
        """Commits each write through the job's sink, under a name derived from its items."""

        def __init__(self, job, store: Store):
            self.job, self.store = job, store
            self.songs_per_commit = job.sink(store).songs_per_commit
            self.results = []

        @property
        def min_rows_per_write(self):
            return self.songs_per_commit

        def write(self, blocks, ctx):
            sink = self.job.sink(self.store)
            res, seconds = {"done": 0, "seconds": 0.0, "counters": {}, "failures": []}, {}
            for block in blocks:
                b = BlockAccessor.for_block(block).to_numpy()
                for i in range(len(b["item"])):
                    item = _unpack(b["item"][i])
                    seconds[item.song_id] = 0.0
                    for k, v in json.loads(str(b["counters"][i]) or "{}").items():
                        res["counters"][k] = res["counters"].get(k, 0) + v
                    if b["error"][i]:
                        row = error_row(item.song_id, item.path, str(b["stage"][i]), str(b["error"][i]))
                        if row["stage"] != STORAGE:  # a full disk is not the song's error: it is redone
                            sink.fail(row)
                        res["failures"].append(row)
                        continue
                    result = _unpack(b["result"][i])
                    sink.put(item, result)
                    seconds[item.song_id] = float(result["duration"])
            if seconds:
                try:
                    failed = sink.commit(f"{self.store.tag}-ray-{_digest(seconds)}")
                except StorageError as e:  # returned, not raised: Ray would retry the write on the same disk
                    failed = [error_row(s, "", STORAGE, str(e)) for s in seconds]
                res["failures"] += failed
                for r in failed:
                    seconds[r["song_id"]] = 0.0
                res["seconds"] = sum(seconds.values())
                res["done"] = len(seconds) - len(res["failures"])
            return res

        def on_write_complete(self, write_result):
            self.results = list(write_result.write_returns)

    return CommitSink


def _commit_errors(job, store: Store, what: str, rows: list[dict], stats: Stats) -> None:
    if rows:
        sink = job.sink(store)
        for r in rows:
            sink.fail(r)
        sink.commit(f"{store.tag}-{what}-{_digest(r['song_id'] for r in rows)}")
        stats.failed_rows(rows)


def run(job, store: Store, todo: list, *, workers: int, progress: bool, extra_errors=()) -> tuple[Stats, int]:
    """Run ``todo`` through ``job`` into ``store`` on the connected cluster; returns (stats, model devices)."""
    ray = _ray()
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    stats = Stats()
    _commit_errors(job, store, "plan", list(extra_errors), stats)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    actors = max(gpus, 1)
    if not todo:
        return stats, actors
    # one block per item (up to a limit): a file that kills its reader takes no other item with it
    ds = ray.data.from_items([{"item": _pack(s)} for s in todo], override_num_blocks=max(1, min(len(todo), 20000)))
    # Ray's defaults retry a failing task or actor forever, so a file that crashes its process would loop;
    # the caps below have no named parameter yet (Ray 2.60 warns that the remote-args route goes in 2.64,
    # hence the version cap in requirements-ray.txt), and the warning would only confuse a user.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        ds = ds.map(functools.partial(_read_row, read=job.read), num_cpus=1,
                    compute=TaskPoolStrategy(size=max(1, workers)), max_retries=MAX_RETRIES)
        ds = ds.map_batches(_Batcher, fn_constructor_kwargs=dict(job=job, gpu=bool(gpus)), batch_size=SONGS_PER_CALL,
                            compute=ActorPoolStrategy(size=actors), num_cpus=1, num_gpus=1 if gpus else None,
                            batch_format="numpy", max_restarts=MAX_RETRIES, max_task_retries=MAX_RETRIES)
        sink = _commit_sink_class()(job, store)
        ds.write_datasink(sink, ray_remote_args={"max_retries": MAX_RETRIES})
    stop = None
    for r in sink.results:
        if isinstance(r, dict):
            failures, full = _storage_rows(r["failures"])
            stop = stop or full
            stats.done += r["done"]
            stats.seconds_audio += r["seconds"]
            stats.count(r["counters"])
            stats.failed_rows(failures)
    if stop is not None:
        raise StorageError(stop)
    # items of blocks Ray gave up on: neither committed nor errored; record them so the job ends complete
    st = store.state(todo)
    _commit_errors(job, store, "lost", [
        error_row(s.song_id, s.path, "worker", f"the worker processing {s.path} died {1 + MAX_RETRIES} times; "
                                               "check the file, then pass --retry-errors to try it again.")
        for s in todo if s.song_id not in st.committed and s.song_id not in st.errors], stats)
    job.sink(store).close()
    return stats, actors
