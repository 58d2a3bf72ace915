"""The prepare job: a music library -> the training windows of a decoder fine-tuning, on the encode job's
machinery (listing, ``--shard``, worker reads, resume, error rows, fingerprint, the local and Ray engines;
:mod:`encode`, :mod:`engines`).

Each song is cut into the decoder's windows (:func:`decoding.decode_windows`: 1024 codes every 768, the
song repeated past its end as decoding repeats its codes). A window's row holds its codes and the VAE
latents of its audio, ``valid`` the frames that hold the song's own audio, and the song's id, path and duration::

    shards/<job>-<n>.parquet  song_id, path, duration, window, start_code, valid, codes (list<uint16>),
                              latents (binary: C x F x W values, row-major, in the shard's latent dtype)

Latents are the scaled posterior mean of the VAE (``scale_factor * mean``), the one deterministic latent of
a window (decoding's prompts draw a posterior sample instead; the posterior's spread is what is left out),
stored in bfloat16 or float16 instead of float32: half the bytes, relative rounding 2^-9 (bf16) or 2^-12
(fp16 in its range), below what the model itself resolves. At the released sizes a window's latents are
32 x 512 x 32 values, 1 MiB in 16 bits; docs/training.md gives the measured bytes per hour of audio.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import audio, decoding, files
from ..errors import ArgumentError, StorageError
from ..settings import EncodingOptions, JobOptions
from ..workers import default_workers
from . import parquet
from .encode import EncodeJob, EncodeSink, Library, SongEncoder, fingerprint as encode_fingerprint
from .engine import COMMIT_SECONDS, empty_report, plan_run, report
from .engines import joined, run_on
from .songs import in_shard, scan
from .store import MACHINES, machine

PREPARE_VERSION = 1
LATENT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
# songs per shard: a 4-minute song is ~8 windows of 1 MiB of latents, held in memory until their commit
SHARD_SONGS = 16
HOLDOUT = 0.02  # default fraction of songs held out for validation


def fingerprint(ckpt_files: dict, options: EncodingOptions, job: JobOptions, latent_dtype: str) -> dict:
    """What decides the windows: the encode job's fingerprint, the VAE's file, this code and the latent dtype."""
    fp = encode_fingerprint(ckpt_files, options, job)
    fp["checkpoints"]["audioldm"] = files.sha256(ckpt_files["audioldm"])
    return {**fp, "prepare_version": PREPARE_VERSION, "latent_dtype": latent_dtype}


def is_prepared(folder) -> bool:
    """Whether ``folder`` is a training set this job wrote (its fingerprint names the prepare version)."""
    path = Path(folder) / "fingerprint.json"
    try:
        return path.is_file() and "prepare_version" in json.loads(path.read_text())
    except (OSError, ValueError):
        return False


def is_holdout(song_id: str, fraction: float) -> bool:
    """Whether a song is held out for validation: a hash of its id (salted, so that it is independent of the
    ``--shard`` split), the same on every machine and for every run."""
    h = int(hashlib.sha256(f"holdout:{song_id}".encode()).hexdigest()[:12], 16)
    return h < fraction * 16 ** 12


@torch.inference_mode()
def window_latents(codec, wav: torch.Tensor, num_codes: int) -> list[tuple[int, int, torch.Tensor]]:
    """(start code, valid frames, scaled posterior mean (C, F, W) float32) of each decoder window of a song
    ((2, N) float32 at the codec rate, ``num_codes`` codes)."""
    c, enc = codec.config, codec.vae_encoder()
    spc, down = c.samples_per_code, enc.cfg.downsampling
    padded = c.padded_codes(num_codes)
    x = decoding.repeat_to(wav, padded * spc)[..., : padded * spc].to(codec.device)
    out = []
    for start in decoding.decode_windows(codec, num_codes):
        mel, _ = audio.tacotron_log_mel(x[:, start * spc:(start + c.window_codes) * spc])
        mel = mel[:, : c.window_latents * down]  # the frame past the window's end has no latent frame
        # one channel at a time, as the official prompt encoding (the VAE sees mono mels)
        lat = torch.cat([enc.encode(mel[ch][None, None])[0] for ch in range(mel.shape[0])], 1)[0]
        valid = min(c.window_latents, math.ceil((wav.shape[-1] - start * spc) / (spc * c.codes_per_latent)))
        out.append((start, valid, (enc.scale_factor * lat).float().cpu()))
    return out


class WindowPreparer:
    """The prepare job's batcher: codes by the encode job's packer, latents per window by the VAE encoder."""

    def __init__(self, codec, batch_size: int, latent_dtype: str):
        self.codec, self.dtype = codec, LATENT_DTYPES[latent_dtype]
        self.encoder = SongEncoder(codec, batch_size)
        self.pending: dict = {}
        self.windows = 0

    def add(self, song, got: dict) -> list[tuple]:
        wav = torch.from_numpy(got["wav"])
        wav = wav.expand(2, -1) if wav.shape[0] == 1 else wav
        num_codes = self.codec.encoder_windows(wav)[2]
        self.pending[song] = window_latents(self.codec, wav, num_codes)
        try:
            return self._rows(self.encoder.add(song, got))
        except BaseException:
            self.pending.pop(song, None)
            raise

    def flush(self) -> list[tuple]:
        return self._rows(self.encoder.flush())

    def counters(self) -> dict[str, int]:
        return {**self.encoder.counters(), "training_windows": self.windows}

    def _rows(self, done) -> list[tuple]:
        out = []
        for song, row, why in done:
            lat = self.pending.pop(song)
            if why is None:
                row = self._song(row, lat)
            out.append((song, None if why else row, why))
        return out

    def _song(self, row: dict, lat: list) -> dict:
        c = self.codec.config
        codes = decoding.repeat_to(torch.from_numpy(row["codes"].astype(np.int64)), c.padded_codes(row["num_codes"]))
        windows = [{"window": k, "start_code": start, "valid": valid,
                    "codes": codes[start:start + c.window_codes].numpy().astype(np.uint16),
                    "latents": x.to(self.dtype).view(torch.int16).numpy().tobytes(), "shape": list(x.shape)}
                   for k, (start, valid, x) in enumerate(lat)]
        self.windows += len(windows)
        return {"song_id": row["song_id"], "path": row["path"], "duration": row["duration"], "windows": windows}


class TrainingSet(Library):
    """The prepare job's output folder: an encode job's store whose shards hold windows instead of songs."""

    what = "training windows"

    def __init__(self, out, shard=None, verify: bool = False):
        super().__init__(out, "parquet", shard, verify)

    def commit(self, name: str, rows: list[dict], errors: list[dict], fp: dict | None = None) -> list[dict]:
        self.write_errors(name, errors)
        if rows:
            parquet.write_table(self.shards / f"{name}.parquet", window_table(rows, fp), before_commit=self.record)
        return []


def window_table(songs: list[dict], fp: dict | None):
    pa = parquet.arrow()
    rows = [{**w, "song_id": s["song_id"], "path": s["path"], "duration": s["duration"]}
            for s in songs for w in s["windows"]]
    meta = {b"mucodec.fingerprint": _json(fp), b"mucodec.latent_shape": _json(rows[0]["shape"] if rows else [])}
    schema = pa.schema([("song_id", pa.string()), ("path", pa.string()), ("duration", pa.float64()),
                        ("window", pa.int32()), ("start_code", pa.int32()), ("valid", pa.int32()),
                        ("codes", pa.list_(pa.uint16())), ("latents", pa.binary())], metadata=meta)
    return pa.Table.from_pylist([{k: r[k] for k in schema.names} for r in rows], schema=schema)


def _json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True).encode()


@dataclass
class PrepareJob(EncodeJob):
    """The prepare job as the engines see it: the encode job with another batcher and sink."""

    latent_dtype: str = "bfloat16"

    task = "prepare"

    def batcher(self) -> WindowPreparer:
        return WindowPreparer(self.model(), self.options.batch_size, self.latent_dtype)

    def sink(self, store: TrainingSet) -> EncodeSink:
        return EncodeSink(store, self.fp, self.job.shard_size, self.commit_seconds)


def prepare_library(inputs, out, options: EncodingOptions = EncodingOptions(),
                    job: JobOptions = JobOptions(shard_size=SHARD_SONGS), *, latent_dtype: str = "bfloat16",
                    commit_seconds: float = COMMIT_SECONDS, progress: bool = False, say=lambda msg: None) -> dict:
    """Prepare the songs under ``inputs`` into ``out`` (module docstring); returns the job's report. Resumes,
    refuses output made differently unless ``job.overwrite`` and turns bad files into error rows as the encode
    job. ``job.shard_size``: songs per committed shard (a shard's latents are held in memory until it commits)."""
    from ..checkpoint import default_checkpoint, resolve_files

    if latent_dtype not in LATENT_DTYPES:
        raise ArgumentError(f"latent dtype {latent_dtype!r} is not one of {', '.join(LATENT_DTYPES)}.")
    start = time.perf_counter()
    workers = default_workers() if job.workers is None else job.workers
    songs, _ = scan(inputs, out)
    lib = TrainingSet(out, job.shard, job.verify)
    job_songs = [s for s in songs if in_shard(s.song_id, job.shard)]
    if not job_songs:
        return empty_report(lib, "prepare", job.engine, job.device, workers, start, {})
    parquet.require_pyarrow()
    if job.ckpt is None:
        job = dataclasses.replace(job, ckpt=str(default_checkpoint()))
    ckpt_files = resolve_files(job.ckpt, ("audioldm", "muq", "mucodec"), job.revision)
    job = joined(job, progress)
    fp = {**fingerprint(ckpt_files, options, job, latent_dtype), MACHINES: [machine(job.device, job.engine)]}
    try:
        lib.prepare(job_songs, fp, job.overwrite, say)
        plan = plan_run(lib, job_songs, job.retry_errors)
        say(f"{len(job_songs)} songs in this job: {plan.skipped} already done, {plan.skipped_errors} failed "
            f"earlier, {len(plan.todo)} to prepare")
        run = PrepareJob(options, job, fp, commit_seconds, latent_dtype=latent_dtype)
        stats, devices = run_on(job.engine, run, lib, plan.todo, workers=workers, progress=progress, log=say)
        wall = time.perf_counter() - start
        return report(lib, plan, stats, task="prepare", engine=job.engine, device=torch.device(job.device).type,
                      workers=workers, devices=devices, wall=wall, fp=fp,
                      fields={"windows": stats.counters.get("training_windows", 0)})
    except StorageError as e:
        raise lib.storage_error(e, job_songs) from None
