"""Files named one by one: one output file per input, written beside ``-o``, as a small job on the local engine.

    tasks, failed = plan_files(["song.flac", "music/"], "out/", overwrite=False)
    outcome = run_files(tasks, decoding, encoding, job, prompt=None, say=print)

Unlike the library jobs it keeps no state in the output folder: every output is decided before the model loads
(existing outputs are refused unless ``overwrite``, two inputs may not write one file), each appears by an
atomic rename when finished, and failures are kept for the caller's summary. The engine
(:func:`engine.run_local`) runs it as it runs the library jobs: the batcher computes, a full disk stops the job
(:class:`StorageError`) with the files not yet started counted, Ctrl-C keeps what finished.
"""
from __future__ import annotations

import dataclasses
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import compress, listing, tokens
from ..audio import audio_extensions, check_input_file
from ..errors import AudioError, MuCodecError, OutputError, StorageError
from ..settings import DecodingOptions, EncodingOptions, JobOptions
from .engine import ModelJob, Sink, run_local

KINDS = ("reconstruct", "encode", "decode", "kept")  # kept: an earlier run's reconstruction, only evaluated


@dataclass(frozen=True)
class FileTask:
    """One input and its output; ``kind`` in :data:`KINDS`."""

    src: Path
    dst: Path
    kind: str

    @property
    def path(self) -> str:  # the name the engine's messages use
        return str(self.src)

    @property
    def song_id(self) -> str:
        return str(self.dst)

    @property
    def token_path(self) -> Path:
        """Where ``--evaluate`` keeps the token file of a reconstruction."""
        return self.dst.with_suffix(tokens.EXTENSION)


# ---- planning: every output decided before the model loads, so refusals cost nothing --------------------
def plan_files(inputs: list[str], out_dir: Path, *, encode: bool = False, evaluate: bool = False,
               overwrite: bool = False, audio_format: str = "wav") -> tuple[list[FileTask], list[tuple[str, str]]]:
    """INPUT arguments -> (tasks, [(input, why it is refused)]). ``evaluate``: an existing reconstruction is
    kept (kind ``kept``) to be evaluated as it is, so a run resumes."""
    # Regular files only from folders and patterns: files taken one by one need no row for a dangling link or
    # a pipe nobody named, whereas a library job keeps them to account for every song.
    found, failed = listing.expand_inputs(inputs, audio_extensions() | {tokens.EXTENSION}, out_dir,
                                          what=f"audio or {tokens.EXTENSION} files", keep=Path.is_file)
    tasks, claimed, seen = [], {}, set()
    for src, rel in found:
        rel = Path(rel).with_suffix("")
        if _real(src) in seen:
            continue
        seen.add(_real(src))
        task, why = _task(src, out_dir, rel, encode, evaluate, overwrite, audio_format, claimed)
        if why is not None:
            failed.append((str(src), why))
        else:
            claimed[_real(task.dst)] = src
            tasks.append(task)
    return tasks, failed


def _task(src: Path, out_dir: Path, rel: Path, encode: bool, evaluate: bool, overwrite: bool, audio_format: str,
          claimed: dict) -> tuple[FileTask | None, str | None]:
    try:  # non-regular files (pipes, devices, folders) would block or never end
        check_input_file(src, "Input")
    except AudioError as e:
        return None, str(e)
    # a .mct is a token file even when damaged: its error must say what is wrong with it
    if tokens.is_token_path(src) or tokens.is_token_file(src):
        if encode or evaluate:
            return None, f"{src} is already a token file; --{'encode' if encode else 'evaluate'} needs audio."
        kind, ext = "decode", "." + audio_format
    else:
        kind, ext = ("encode", tokens.EXTENSION) if encode else ("reconstruct", "." + audio_format)
    dst = out_dir / rel.with_name(rel.name + ext)
    if _real(dst) in claimed:
        return None, (f"{src} would write {dst}, which {claimed[_real(dst)]} already writes; rename one of them or "
                      "run them separately.")
    if _real(dst) == _real(src):
        return None, f"{src} would be overwritten by its own output; choose another -o folder."
    if dst.exists() and not overwrite:
        if evaluate and kind == "reconstruct":  # resuming: evaluated as it is
            return FileTask(src, dst, "kept"), None
        return None, f"{dst} already exists; pass --overwrite to replace it."
    return FileTask(src, dst, kind), _folder_problem(dst.parent)


def _real(path: Path) -> Path:
    """The file ``path`` names, links followed; a looping link is itself (Path.resolve raises on one)."""
    return Path(os.path.realpath(path))


def _folder_problem(folder: Path) -> str | None:
    """Why ``folder`` cannot be used or created for outputs, or None (checked without creating it)."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return f"Cannot create the output folder {folder}: {probe} is a file."
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"Cannot create or write the output folder {folder}: {probe} is not writable."
    return None


# ---- running: the job, its batcher and its sink --------------------------------------------------------
@dataclass
class Outcome:
    done: list[FileTask] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (input, why)
    not_started: int = 0  # after a full disk stopped the job


def _no_read(task: FileTask) -> dict:
    return {}  # the model reads each file itself, streaming it: no worker holds a song


class _ErrorsOnly(Sink):
    """Nothing to commit: each output commits itself by its rename, and failures go to the caller."""

    def __init__(self):
        super().__init__(None)

    def due(self) -> bool:
        return False

    def commit(self, name: str | None = None) -> list[dict]:
        return []


@dataclass
class FileJob(ModelJob):
    """One output file per :class:`FileTask`, computed one file at a time (:class:`engine.Job`)."""

    decoding: DecodingOptions
    encoding: EncodingOptions
    job: JobOptions
    prompt: str | None = None  # reference audio of the decoder (official code2sound prompt)
    keep_tokens: bool = False  # a reconstruction goes through its token file, kept (--evaluate)
    encoder_only: bool = False
    say: object = print
    progress: bool = False
    outcome: Outcome = field(default_factory=Outcome)
    codec: object = None

    task = "file"
    read = staticmethod(_no_read)

    def batcher(self) -> _FileBatcher:
        from .. import decoding

        if self.prompt:  # a bad prompt fails the run once, before the model loads
            check_input_file(self.prompt, "Prompt file")
        where = self.job
        if self.codec is None:
            self.say(f"loading MuCodec from {where.ckpt} on {where.device} ({where.dtype})")
        codec = self.model(encoder_only=self.encoder_only, audioldm_dtype=where.torch_audioldm_dtype,
                           progress=self.progress)
        prompt = decoding.prepare_prompt(codec, self.prompt) if self.prompt else None
        return _FileBatcher(self, codec, prompt)

    def sink(self, store) -> Sink:
        return _ErrorsOnly()


class _FileBatcher:
    def __init__(self, job: FileJob, codec, prompt):
        self.job, self.codec, self.prompt = job, codec, prompt

    def add(self, task: FileTask, got: dict) -> list[tuple]:
        start = time.perf_counter()
        job = self.job
        try:
            _run_one(self.codec, task, job, self.prompt)
        except StorageError as e:  # every later file would fail the same way: the engine stops
            job.outcome.failed.append((str(task.src), str(e)))
            raise
        except MuCodecError as e:
            why = str(e)
        except getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError):
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            hint = "--batch-size 1" + (" or --dtype float16" if job.job.device != "cpu" else "")
            why = f"Out of memory on {job.job.device} while processing {task.src}; try {hint}."
        except Exception as e:  # a bug: show where, keep going with the other files
            traceback.print_exc()
            why = f"internal error {type(e).__name__}: {e}"
        else:
            job.outcome.done.append(task)
            job.say(f"{task.src} -> {task.dst} ({time.perf_counter() - start:.1f} s)")
            return [(task, {"duration": 0.0}, None)]
        job.outcome.failed.append((str(task.src), why))
        job.say(f"failed: {why}")
        return [(task, None, why)]

    def flush(self) -> list[tuple]:
        return []

    def counters(self) -> dict[str, int]:
        return {}


def _run_one(codec, task: FileTask, job: FileJob, prompt) -> None:
    """One input into its output; raises MuCodecError (or a bug) on failure, leaving no output behind."""
    try:
        task.dst.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"Cannot create the output folder {task.dst.parent}: {e.strerror or e}.") from None
    if task.kind == "encode":
        compress.encode_file(codec, task.src, task.dst, job.encoding)
    elif task.kind == "decode":
        compress.decode_file(codec, task.src, task.dst, job.decoding, prompt=prompt)
    elif job.keep_tokens:  # the token file's payload is the bitrate; the audio is the same
        compress.encode_file(codec, task.src, task.token_path, job.encoding)
        compress.decode_file(codec, task.token_path, task.dst, job.decoding.for_task("sound2sound"), prompt=prompt)
    else:
        compress.reconstruct_file(codec, task.src, task.dst, job.decoding, job.encoding, prompt=prompt)


def run_files(tasks: list[FileTask], decoding: DecodingOptions, encoding: EncodingOptions, job: JobOptions, *,
              prompt: str | None = None, keep_tokens: bool = False, progress: bool = False,
              say=lambda msg: None) -> Outcome:
    """Compute ``tasks`` (none ``kept``) on the local engine; returns what was done and what failed. A model or
    prompt that cannot be loaded raises its MuCodecError before any file; a full disk stops the job, the rest
    counted as not started."""
    if job.ckpt is None:
        from ..checkpoint import default_checkpoint

        job = dataclasses.replace(job, ckpt=str(default_checkpoint()))
    run = FileJob(decoding, encoding, job, prompt=prompt, keep_tokens=keep_tokens, progress=progress, say=say,
                  encoder_only=all(t.kind == "encode" for t in tasks))
    try:
        run_local(run, None, tasks, workers=0, progress=progress and len(tasks) > 1)
    except StorageError:
        out = run.outcome
        out.not_started = len(tasks) - len(out.done) - len(out.failed)
    return run.outcome

