"""The command line: ``python3 generate.py``, ``python -m mucodec`` or the ``mucodec`` command.

    python3 generate.py                           # the official demo: test_wav/test.wav -> reconstruct/test.wav
    python3 generate.py song.flac music/ 'live/*.mp3' -o out/     # reconstruct (encode + decode)
    python3 generate.py --encode song.flac -o tokens/             # song.flac -> tokens/song.mct (0.35 kbit/s)
    python3 generate.py tokens/song.mct -o out/                   # token file -> out/song.wav
    python3 generate.py --encode music/ -o tokens/                # a library -> parquet shards, resumable
    python3 generate.py --encode music/ -o tokens/ --shard 3/8 --engine ray
    python3 generate.py tokens/ -o audio/ --decode-batch 8         # a token library -> one FLAC per song
    python3 generate.py music/ -o out/ --evaluate                  # reconstruct, then metrics and report.html

A layer over the package: inputs are expanded and every output decided before the model loads (so
refusals cost nothing), then each file goes through ``compress.encode_file`` / ``decode_file`` /
``reconstruct_file``. A failing file is reported in one sentence and the batch goes on. ``--encode`` of a
folder (or with any library option) runs the encode job of ``mucodec.library`` instead, and token inputs
that are more than single token files (a token library, tables, arrays, folders of token files) run its
decode job: the input's kind picks the action, never a verb. ``--evaluate`` adds to reconstructing audio a
comparison of each reconstruction with its input (``mucodec.evaluate``).
"""
from __future__ import annotations

import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from . import checkpoint, compress, decoding, library, listing, samplers, tokens
from .audio import audio_extensions, check_input_file
from .checkpoint import default_checkpoint
from .codec import DTYPES, CodecConfig, MuCodec
from .errors import AudioError, MuCodecError, OutputError, StorageError
from .options import build_parser, check_args
from .precision import precision_warnings

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
_DEFAULTS = CodecConfig()


@dataclass
class Job:
    src: Path
    dst: Path
    kind: str  # "reconstruct" | "encode" | "decode"


def _library_options(args) -> list[str]:
    """The options only a library job has (encode or decode)."""
    return [name for name, on in (("--shard", args.shard is not None), ("--engine", args.engine != "local"),
                                  ("--address", args.address), ("--workers", args.workers is not None),
                                  ("--retry-errors", args.retry_errors), ("--verify", args.verify),
                                  ("--decode-batch", args.decode_batch is not None),
                                  ("--offload", args.offload)) if on]


def _library_mode(args) -> str | None:
    """Which library job the inputs call for: 'encode' (--encode of a folder, or with a library option),
    'decode' (token inputs beyond single token files: a token library, tables, arrays, folders; or single
    token files with a library option), or None: one output file per input."""
    if args.encode:
        lib = args.format != "auto" or _library_options(args) or any(Path(i).is_dir() for i in args.inputs)
        return "encode" if lib else None
    if not args.inputs or not all(library.is_token_input(i) for i in args.inputs):
        return None
    single_files = all(Path(i).is_file() and (tokens.is_token_path(i) or tokens.is_token_file(i))
                       for i in args.inputs)
    return "decode" if _library_options(args) or not single_files else None


def _run_library(args, out_dir: Path, say, progress: bool, mode: str) -> int:
    """A library job (mucodec.library); prints the summary and returns the exit status."""
    common = dict(ckpt=args.ckpt, revision=args.revision, device=args.device, dtype=DTYPES[args.dtype],
                  shard=args.shard, engine=args.engine, address=args.address, workers=args.workers,
                  retry_errors=args.retry_errors, overwrite=args.overwrite, progress=progress, verify=args.verify,
                  say=say)
    try:
        if mode == "encode":
            result = library.encode_library(args.inputs, out_dir, fmt="parquet" if args.format == "auto" else args.format,
                                            batch_size=args.batch_size, shard_songs=args.shard_size, **common)
        else:
            result = library.decode_library(
                args.inputs, out_dir, steps=args.steps, guidance=args.guidance, seed=args.seed,
                sampler=args.sampler, guidance_interval=args.guidance_interval,
                fast_vocoder=not args.official_vocoder, decode_batch=args.decode_batch, offload=args.offload,
                audioldm_dtype=DTYPES[args.audioldm_dtype],
                audio_format="flac" if args.audio_format == "auto" else args.audio_format, **common)
    except MuCodecError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    rep = result.report
    for src, why in result.problems:
        print(f"  {src}: {why}", file=sys.stderr)
    failures = rep["failures"]
    if failures:
        shown = failures[:20]
        print("failed:\n" + "\n".join(f"  {f['path']} ({f['stage']}): {f['message']}" for f in shown)
              + (f"\n  ... and {len(failures) - len(shown)} more in {out_dir / 'errors'}" if failures[20:] else ""),
              file=sys.stderr)
    if failures or result.problems or not args.quiet:
        print(library.summary_line(rep), file=sys.stderr)
    return EXIT_FAILED if failures or result.problems else EXIT_OK


def _expand_inputs(inputs: list[str], out_dir: Path) -> tuple[list[tuple[Path, Path]], list[tuple[str, str]]]:
    """INPUT arguments -> ([(file, output path relative to OUT without extension)], [(input, error)])."""
    # Regular files only from folders and patterns: files taken one by one need no row for a dangling link or
    # a pipe nobody named, whereas a library job keeps them to account for every song.
    found, failed = listing.expand_inputs(inputs, audio_extensions() | {tokens.EXTENSION}, out_dir,
                                          what=f"audio or {tokens.EXTENSION} files", keep=Path.is_file)
    return [(f, Path(rel).with_suffix("")) for f, rel in found], failed


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


def plan(args, out_dir: Path) -> tuple[list[Job], list[tuple[str, str]]]:
    """Decide every output before loading the model, so that refusals cost nothing."""
    found, failed = _expand_inputs(args.inputs, out_dir)
    jobs, claimed, seen = [], {}, set()
    audio_ext = ".flac" if args.audio_format == "flac" else ".wav"
    for src, rel in found:
        key = _real(src)
        if key in seen:
            continue
        seen.add(key)
        try:  # non-regular files (pipes, devices, folders) would block or never end
            check_input_file(src, "Input")
        except AudioError as e:
            failed.append((str(src), str(e)))
            continue
        # a .mct is a token file even when damaged: its error must say what is wrong with it
        if tokens.is_token_path(src) or tokens.is_token_file(src):
            if args.encode or args.evaluate:
                failed.append((str(src), f"{src} is already a token file; --{'encode' if args.encode else 'evaluate'} "
                                         "needs audio."))
                continue
            kind, ext = "decode", audio_ext
        else:
            kind, ext = ("encode", tokens.EXTENSION) if args.encode else ("reconstruct", audio_ext)
        dst = out_dir / rel.with_name(rel.name + ext)
        if _real(dst) in claimed:
            failed.append((str(src), f"{src} would write {dst}, which {claimed[_real(dst)]} already writes; "
                                     "rename one of them or run them separately."))
            continue
        if _real(dst) == key:
            failed.append((str(src), f"{src} would be overwritten by its own output; choose another -o folder."))
            continue
        if dst.exists() and not args.overwrite:
            if args.evaluate and kind == "reconstruct":  # resuming: evaluated as it is
                claimed[_real(dst)] = src
                jobs.append(Job(src, dst, "kept"))
                continue
            failed.append((str(src), f"{dst} already exists; pass --overwrite to replace it."))
            continue
        problem = _folder_problem(dst.parent)
        if problem:
            failed.append((str(src), problem))
            continue
        claimed[_real(dst)] = src
        jobs.append(Job(src, dst, kind))
    return jobs, failed


def token_path(job: Job) -> Path:
    """Where ``--evaluate`` keeps the token file of a reconstruction."""
    return job.dst.with_suffix(tokens.EXTENSION)


def run_job(codec: MuCodec, job: Job, args, prompt) -> None:
    """Process one input; raises MuCodecError (or a bug) on failure, leaving no output behind."""
    try:
        job.dst.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"Cannot create the output folder {job.dst.parent}: {e.strerror or e}.") from None
    if job.kind == "encode":
        compress.encode_file(codec, job.src, job.dst, batch_size=args.batch_size)
        return
    options = dict(guidance_scale=args.guidance, prompt=prompt, seed=args.seed, fast_vocoder=not args.official_vocoder,
                   sampler=args.sampler, guidance_interval=args.guidance_interval)
    if job.kind == "decode":
        compress.decode_file(codec, job.src, job.dst, num_steps=args.steps, **options)
    elif args.evaluate:  # through a token file, whose payload is the bitrate; the audio is the same
        compress.encode_file(codec, job.src, token_path(job), batch_size=args.batch_size)
        steps = codec.config.sound2sound_steps if args.steps is None else args.steps
        compress.decode_file(codec, token_path(job), job.dst, num_steps=steps, **options)
    else:
        compress.reconstruct_file(codec, job.src, job.dst, batch_size=args.batch_size, num_steps=args.steps,
                                  **options)


def main(argv=None, prog: str | None = None) -> int:
    """Run the command line; returns the exit status (``SystemExit(2)`` for a bad command line)."""
    try:
        return _main(argv, prog)
    except KeyboardInterrupt:
        print("interrupted; files already finished are kept, the one in progress was not written "
              "(a library run resumes where it stopped when run again)", file=sys.stderr)
        return EXIT_INTERRUPTED


def cli() -> None:
    """Console entry point."""
    sys.exit(main())


def _main(argv, prog) -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    out_dir = _demo_or_output(args)
    check_args(parser, args)

    from tqdm import tqdm

    def say(msg):
        if not args.quiet or msg.startswith("warning: "):
            tqdm.write(msg, file=sys.stderr)

    progress = not args.quiet and sys.stderr.isatty()
    for slow in [] if args.encode else precision_warnings(args.dtype, args.audioldm_dtype, args.device):
        say(f"warning: {slow}")  # (neither precision reaches the encoder)
    mode = _job_mode(parser, args)
    if mode is not None:
        return _run_library(args, out_dir, say, progress, mode)
    if args.evaluate:
        from . import evaluate

        try:  # before any work: an hour of reconstructing must not end in a missing package
            evaluate.require_extras()
        except MuCodecError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_FAILED
    jobs, failed = plan(args, out_dir)
    kept = [j for j in jobs if j.kind == "kept"]
    todo = [j for j in jobs if j.kind != "kept"]
    done, not_started = [], 0
    if todo:
        ran = _run_files(args, todo, failed, say, progress)
        if ran is None:
            return EXIT_FAILED
        done, not_started = ran
    _print_summary(args, done, kept, failed, not_started)
    if args.evaluate and (done or kept):
        return max(EXIT_FAILED if failed else EXIT_OK, _evaluate(args, done + kept, out_dir, say, progress))
    return EXIT_FAILED if failed else EXIT_OK


def _demo_or_output(args) -> Path:
    """The output folder; without INPUT, the official demo, whose input and output live in the MuCodec folder."""
    demo = not args.inputs
    root = checkpoint.REPO_ROOT  # looked up at run time, not import time, so that tests can point it elsewhere
    if demo:
        args.inputs = [str(root / "test_wav" / "test.wav")]
    return Path(args.output) if args.output else (root / "reconstruct" if demo else Path("reconstruct"))


def _job_mode(parser, args) -> str | None:
    """The library job the inputs call for (:func:`_library_mode`), refusing options that do not fit it."""
    mode = _library_mode(args)
    if mode == "decode" and args.prompt:
        parser.error("--prompt is for single token files; a decode job decodes each song from its codes alone")
    if mode is not None and args.evaluate:
        parser.error("--evaluate compares reconstructions with their audio inputs; give audio files or folders, "
                     "not token inputs")
    if mode is None:
        library_options = [o for o in _library_options(args) if not (args.evaluate and o == "--workers")]
        if library_options:
            parser.error(f"{library_options[0]} is an option of a library job: --encode of a folder of audio, or "
                         "decoding a token library, tables, arrays or folders of token files")
    return mode


def _run_files(args, todo: list[Job], failed: list, say, progress: bool) -> tuple[list[Job], int] | None:
    """One output file per input: (the jobs done, how many were not started), failures appended to ``failed``;
    None when the model or the prompt cannot be loaded (said on stderr)."""
    import torch
    from tqdm import tqdm

    try:
        if args.prompt:  # a bad prompt fails the run once, before the model loads
            check_input_file(args.prompt, "Prompt file")
        ckpt = args.ckpt or default_checkpoint()
        say(f"loading MuCodec from {ckpt} on {args.device} ({args.dtype})")
        codec = MuCodec.from_pretrained(ckpt, device=args.device, dtype=DTYPES[args.dtype],
                                        audioldm_dtype=DTYPES[args.audioldm_dtype],
                                        encoder_only=all(j.kind == "encode" for j in todo),
                                        revision=args.revision, progress=progress)
        prompt = decoding.prepare_prompt(codec, args.prompt) if args.prompt else None
    except MuCodecError as e:
        print(f"error: {e}", file=sys.stderr)
        return None
    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    bar = tqdm(todo, unit="file", desc="files", file=sys.stderr, disable=not progress or len(todo) < 2)
    done = []
    for job in bar:
        start = time.perf_counter()
        try:
            run_job(codec, job, args, prompt)
        except StorageError as e:  # every later file would fail the same way: stop
            failed.append((str(job.src), str(e)))
            return done, len(todo) - todo.index(job) - 1
        except MuCodecError as e:
            failed.append((str(job.src), str(e)))
        except oom:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            hint = "--batch-size 1" + (" or --dtype float16" if args.device != "cpu" else "")
            failed.append((str(job.src), f"Out of memory on {args.device} while processing {job.src}; try {hint}."))
        except Exception as e:  # a bug: show where, keep going with the other files
            traceback.print_exc()
            failed.append((str(job.src), f"internal error {type(e).__name__}: {e}"))
        else:
            done.append(job)
            say(f"{job.src} -> {job.dst} ({time.perf_counter() - start:.1f} s)")
            continue
        say(f"failed: {failed[-1][1]}")
    return done, 0


def _print_summary(args, done: list[Job], kept: list[Job], failed: list, not_started: int) -> None:
    if len(done) + len(failed) > 1 or failed or kept:
        summary = f"{len(done)} done, " + (f"{len(kept)} kept from an earlier run, " if kept else "") + \
            (f"{not_started} not started (run the same command again), " if not_started else "") + \
            f"{len(failed)} failed"
        if failed:
            summary += ":\n" + "\n".join(f"  {src}: {why}" for src, why in failed)
        if failed or not args.quiet:
            print(summary, file=sys.stderr)


def run_settings(args) -> dict:
    """What made the reconstructions, for the evaluation's summary and report."""
    from .checkpoint import resolve_files
    from .stages import DECODER_STAGES, ENCODER_STAGES, roles_of
    from .files import sha256

    files = resolve_files(args.ckpt or default_checkpoint(), roles_of(ENCODER_STAGES + DECODER_STAGES),
                          args.revision)
    return {"steps": _DEFAULTS.sound2sound_steps if args.steps is None else args.steps, "guidance": args.guidance,
            "seed": "random" if args.seed is None else args.seed, "dtype": args.dtype,
            "audioldm_dtype": args.audioldm_dtype, "device": args.device,
            "vocoder": "official" if args.official_vocoder else "shared-overlaps", "batch_size": args.batch_size,
            "prompt": args.prompt or "none",
            # the solver's settings only where they are not the official ones, as the decode fingerprint records them
            **({} if args.sampler == samplers.DEFAULT_SAMPLER else {"sampler": args.sampler}),
            **({} if args.guidance_interval is None else {"guidance_interval": list(args.guidance_interval)}),
            "checkpoint (sha256)": {role: sha256(f)[:16] for role, f in sorted(files.items())}}


def _evaluate(args, jobs: list[Job], out_dir: Path, say, progress: bool) -> int:
    """``--evaluate``: each finished reconstruction against its input; returns the exit status."""
    from . import evaluate

    pairs = [evaluate.Pair(j.dst.relative_to(out_dir).with_suffix("").as_posix(), str(j.src), str(j.dst),
                           str(token_path(j)) if token_path(j).is_file() else "") for j in jobs]
    try:
        ev = evaluate.evaluate(evaluate.Pairing(pairs), out_dir, settings=run_settings(args), workers=args.workers,
                               progress=progress, say=say)
    except MuCodecError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    evaluate.print_result(ev, args.quiet)
    return EXIT_FAILED if ev.failed else EXIT_OK
