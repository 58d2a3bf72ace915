"""``--engine ray``: the library pipeline on Ray Data, on a local instance or a cluster.

    pending songs (from the manifest) -> CPU tasks decode/resample -> encoder actors pack windows of
    several songs into fixed-size batches -> a datasink commits parquet shards (and .mct files)

Only this module imports ray, and only when ``--engine ray`` is asked for (``pip install -r
requirements-ray.txt``). The shards it writes are the local engine's (same columns, same commit by
rename, same state files); the codes are the same bit for bit (same :class:`library.WindowPacker`).

Failure handling, because Ray drops a whole block when a task raises: every per-song failure is caught
inside the task or actor and travels on as an error row. Tasks and actors are retried a bounded number of
times (a file that kills its process cannot loop forever); a block that still fails is dropped, and after
the run its songs, neither committed nor errored, get an error row of stage ``worker``. A shard's name is
derived from the ids it holds, so a write retried by Ray replaces its own file instead of adding a copy.
"""
from __future__ import annotations

import hashlib
import logging
import os
import warnings

import numpy as np
import torch

from . import audio, library
from .errors import ArgumentError

MAX_RETRIES = 2  # per task / actor: a file that crashes its process is tried 1 + MAX_RETRIES times
SONGS_PER_CALL = 16  # songs an encoder actor packs per call: more fill batches better, fewer bound memory


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
    return {"py_modules": [os.path.dirname(os.path.abspath(library.__file__))]}


def connect(address: str | None, progress: bool) -> str:
    """Join the cluster at ``address`` (None: RAY_ADDRESS, else a new local instance; a session this process
    already joined is used as is). Returns the encoder's device kind: cuda when the cluster has GPUs."""
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


def _read_row(row: dict) -> dict:
    """CPU task: one song decoded and resampled, or its error (a raise would drop the whole block)."""
    got = library._safe_read(row["file"], audio.CODEC_SAMPLE_RATE)
    out = {"song_id": row["song_id"], "path": row["path"], "error": got.get("error", ""),
           "duration": float(got.get("duration", 0.0)), "sample_rate": int(got.get("sample_rate", 0)),
           "channels": int(got.get("channels", 0))}
    wav = got.get("wav")
    out["rows"] = 0 if wav is None else int(wav.shape[0])
    out["samples"] = np.zeros(0, np.float32) if wav is None else wav.reshape(-1)
    return out


class _Encoder:
    """Encoder actor: one MuCodec (encoder only) per actor, packing the songs of each call into batches."""

    def __init__(self, ckpt, revision, dtype, device, batch_size):
        from .codec import MuCodec

        if device == "cpu":
            # Ray pins a 1-CPU actor to 1 thread; on a CPU node the encoder is the work, give it the cores
            torch.set_num_threads(os.cpu_count() or 1)
        self.codec = MuCodec.from_pretrained(ckpt, device=device, dtype=getattr(torch, dtype), encoder_only=True,
                                             revision=revision)
        self.batch_size = batch_size

    def __call__(self, batch: dict) -> dict:
        n = len(batch["song_id"])
        out = {k: [] for k in ("song_id", "path", "duration", "sample_rate", "channels", "num_samples", "num_codes",
                               "codes", "error", "stage", "windows", "padding")}
        packer = library.WindowPacker(self.codec, self.batch_size)
        lengths = {}

        def emit(i, codes, stage, why):
            for k in ("song_id", "path", "duration", "sample_rate", "channels"):
                out[k].append(batch[k][i])
            out["num_samples"].append(lengths.get(i, 0))
            out["num_codes"].append(0 if codes is None else int(codes.numel()))
            out["codes"].append(np.zeros(0, np.uint16) if codes is None else codes.numpy().astype(np.uint16))
            out["error"].append(why or "")
            out["stage"].append(stage)
            out["windows"].append(0)
            out["padding"].append(0)

        def finished(done):
            for i, codes, why in done:
                emit(i, codes, "encode" if why else "", why)

        for i in range(n):
            if batch["error"][i]:
                emit(i, None, "read", str(batch["error"][i]))
                continue
            try:
                wav = torch.from_numpy(np.asarray(batch["samples"][i], dtype=np.float32).reshape(
                    int(batch["rows"][i]), -1))
                wav = wav.expand(2, -1) if wav.shape[0] == 1 else wav
                lengths[i] = wav.shape[-1]
                finished(packer.add(i, wav))
            except Exception as e:  # caught here: an exception would make Ray drop every song of the call
                emit(i, None, "encode", str(e) if isinstance(e, library.MuCodecError)
                     else f"internal error {type(e).__name__}: {e}")
        finished(packer.flush())
        if out["windows"]:
            out["windows"][-1], out["padding"][-1] = packer.windows, packer.padding
        cols = {k: np.array(v) for k, v in out.items() if k != "codes"}
        cols["codes"] = np.empty(len(out["codes"]), dtype=object)
        cols["codes"][:] = out["codes"]
        return cols


def _shard_sink_class():
    from ray.data import Datasink
    from ray.data.block import BlockAccessor

    class ShardSink(Datasink):
        """Commits each write as one shard (+ error file, + .mct files) with a name derived from its songs."""

        def __init__(self, out, fmt, shard, fp, shard_songs):
            self.out, self.fmt, self.shard, self.fp, self.shard_songs = str(out), fmt, shard, fp, shard_songs
            self.results = []

        @property
        def min_rows_per_write(self):
            return self.shard_songs

        def write(self, blocks, ctx):
            lib = library.Library(self.out, self.fmt, self.shard)
            rows, errors = [], []
            res = {"done": 0, "failed": 0, "seconds": 0.0, "windows": 0, "padding": 0, "failures": []}
            for block in blocks:
                b = BlockAccessor.for_block(block).to_numpy()
                for i in range(len(b["song_id"])):
                    res["windows"] += int(b["windows"][i])
                    res["padding"] += int(b["padding"][i])
                    sid, path = str(b["song_id"][i]), str(b["path"][i])
                    if b["error"][i]:
                        errors.append(library.error_row(sid, path, str(b["stage"][i]), str(b["error"][i])))
                        continue
                    rows.append({"song_id": sid, "path": path, "duration": float(b["duration"][i]),
                                 "sample_rate": int(b["sample_rate"][i]), "channels": int(b["channels"][i]),
                                 "num_samples": int(b["num_samples"][i]), "num_codes": int(b["num_codes"][i]),
                                 "codes": np.asarray(b["codes"][i], dtype=np.uint16)})
            if not rows and not errors:
                return res
            ids = sorted(r["song_id"] for r in rows + errors)
            name = f"{lib.tag}-ray-{hashlib.sha1(' '.join(ids).encode()).hexdigest()[:16]}"
            failed = lib.commit(name, rows, errors, self.fp)
            lost = {e["song_id"] for e in failed}
            rows = [r for r in rows if r["song_id"] not in lost]
            errors = errors + failed
            res["done"], res["failed"], res["failures"] = len(rows), len(errors), errors
            res["seconds"] = sum(r["duration"] for r in rows)
            return res

        def on_write_complete(self, write_result):
            self.results = list(write_result.write_returns)

    return ShardSink


def run(lib: library.Library, todo, fp: dict, *, ckpt, revision, dtype, batch_size: int, workers: int,
        shard_songs: int, progress: bool, extra_errors=()) -> tuple[library.Stats, int, int]:
    """Encode ``todo`` into ``lib`` on the connected cluster; returns (stats, encoder devices, songs lost)."""
    ray = _ray()
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    stats = library.Stats()
    if extra_errors:
        ids = " ".join(sorted(e["song_id"] for e in extra_errors))
        lib.commit(f"{lib.tag}-plan-{hashlib.sha1(ids.encode()).hexdigest()[:16]}", [], list(extra_errors))
        stats.failed, stats.failures = len(extra_errors), list(extra_errors)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    actors = max(gpus, 1)
    if not todo:
        return stats, actors, 0
    items = [{"song_id": s.song_id, "path": s.path, "file": s.file} for s in todo]
    # one block per song (up to a limit): a file that kills its reader takes no other song with it
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 20000)))
    # Ray's defaults retry a failing task or actor forever, so a file that crashes its process would loop;
    # the caps below have no named parameter yet (Ray 2.60 warns that the remote-args route goes in 2.64,
    # hence the version cap in requirements-ray.txt), and the warning would only confuse a user.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        ds = ds.map(_read_row, num_cpus=1, compute=TaskPoolStrategy(size=max(1, workers)), max_retries=MAX_RETRIES)
        ds = ds.map_batches(
            _Encoder, fn_constructor_kwargs=dict(ckpt=str(ckpt), revision=revision,
                                                 dtype=str(dtype).replace("torch.", ""),
                                                 device="cuda" if gpus else "cpu", batch_size=batch_size),
            batch_size=SONGS_PER_CALL, compute=ActorPoolStrategy(size=actors), num_cpus=1,
            num_gpus=1 if gpus else None, batch_format="numpy", max_restarts=MAX_RETRIES,
            max_task_retries=MAX_RETRIES)
        sink = _shard_sink_class()(lib.out, lib.fmt, lib.shard, fp, shard_songs)
        ds.write_datasink(sink, ray_remote_args={"max_retries": MAX_RETRIES})
    for r in sink.results:
        if not isinstance(r, dict):
            continue
        stats.done += r["done"]
        stats.failed += r["failed"]
        stats.seconds_audio += r["seconds"]
        stats.windows += r["windows"]
        stats.padding += r["padding"]
        stats.failures += r["failures"]
    # songs of blocks Ray gave up on: neither committed nor errored; record them so the job ends complete
    st = lib.state(todo)
    lost = [library.error_row(s.song_id, s.path, "worker",
                              f"the worker processing {s.path} died {1 + MAX_RETRIES} times; check the file, "
                              f"then pass --retry-errors to try it again.")
            for s in todo if s.song_id not in st.committed and s.song_id not in st.errors]
    if lost:
        ids = " ".join(sorted(e["song_id"] for e in lost))
        lib.commit(f"{lib.tag}-lost-{hashlib.sha1(ids.encode()).hexdigest()[:16]}", [], lost)
        stats.failed += len(lost)
        stats.failures += lost
    if lib.parquet:
        lib.write_index()
    return stats, actors, len(lost)
