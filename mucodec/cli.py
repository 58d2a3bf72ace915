"""The command line: ``python3 generate.py``, ``python -m mucodec`` or the ``mucodec`` command.

    python3 generate.py                           # the official demo: test_wav/test.wav -> reconstruct/test.wav
    python3 generate.py song.flac music/ 'live/*.mp3' -o out/     # reconstruct (encode + decode)
    python3 generate.py --encode song.flac -o tokens/             # song.flac -> tokens/song.mct (0.35 kbit/s)
    python3 generate.py tokens/song.mct -o out/                   # token file -> out/song.wav
    python3 generate.py --encode music/ -o tokens/                # a library -> parquet shards, resumable
    python3 generate.py --encode music/ -o tokens/ --shard 3/8 --engine ray
    python3 generate.py tokens/ -o audio/ --decode-batch 8         # a token library -> one FLAC per song
    python3 generate.py music/ -o out/ --evaluate                  # reconstruct, then metrics and report.html

A layer over the package: the options become the run's settings (:func:`options.check_args`), then files
named one by one run as a small job on the library engine (:mod:`mucodec.library.file_job`: every output
decided before the model loads, so refusals cost nothing; a failing file is reported in one sentence and the
batch goes on). ``--encode`` of a
folder (or with any library option) runs the encode job of ``mucodec.library`` instead, and token inputs
that are more than single token files (a token library, tables, arrays, folders of token files) run its
decode job: the input's kind picks the action, never a verb. ``--evaluate`` adds to reconstructing audio a
comparison of each reconstruction with its input (``mucodec.evaluate``).
"""
from __future__ import annotations

import sys
from pathlib import Path

from . import checkpoint, library, tokens
from .checkpoint import default_checkpoint
from .errors import MuCodecError
from .library.file_job import FileTask, plan_files, run_files
from .options import Settings, build_parser, check_args
from .precision import precision_warnings
from .settings import output_fields

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


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


def _run_library(args, run: Settings, out_dir: Path, say, progress: bool, mode: str) -> int:
    """A library job (mucodec.library); prints the summary and returns the exit status."""
    try:
        if mode == "encode":
            result = library.encode_library(args.inputs, out_dir, run.encoding, run.job, progress=progress, say=say)
        else:
            result = library.decode_library(args.inputs, out_dir, run.decoding, run.job, progress=progress, say=say)
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
    run = check_args(parser, args)

    from tqdm import tqdm

    def say(msg):
        if not args.quiet or msg.startswith("warning: "):
            tqdm.write(msg, file=sys.stderr)

    progress = not args.quiet and sys.stderr.isatty()
    for slow in [] if args.encode else precision_warnings(args.dtype, args.audioldm_dtype, args.device):
        say(f"warning: {slow}")  # (neither precision reaches the encoder)
    mode = _job_mode(parser, args)
    if mode is not None:
        return _run_library(args, run, out_dir, say, progress, mode)
    if args.evaluate:
        from . import evaluate

        try:  # before any work: an hour of reconstructing must not end in a missing package
            evaluate.require_extras()
        except MuCodecError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_FAILED
    tasks, failed = plan_files(args.inputs, out_dir, encode=args.encode, evaluate=args.evaluate,
                               overwrite=args.overwrite, audio_format=args.audio_format.replace("auto", "wav"))
    kept = [t for t in tasks if t.kind == "kept"]
    todo = [t for t in tasks if t.kind != "kept"]
    done, not_started = [], 0
    if todo:
        try:
            outcome = run_files(todo, run.decoding, run.encoding, run.job, prompt=args.prompt,
                                keep_tokens=args.evaluate, progress=progress, say=say)
        except MuCodecError as e:  # the model or the prompt: nothing can run
            print(f"error: {e}", file=sys.stderr)
            return EXIT_FAILED
        done, not_started = outcome.done, outcome.not_started
        failed += outcome.failed
    _print_summary(args, done, kept, failed, not_started)
    if args.evaluate and (done or kept):
        return max(EXIT_FAILED if failed else EXIT_OK, _evaluate(args, run, done + kept, out_dir, say, progress))
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


def _print_summary(args, done: list[FileTask], kept: list[FileTask], failed: list, not_started: int) -> None:
    if len(done) + len(failed) > 1 or failed or kept:
        summary = f"{len(done)} done, " + (f"{len(kept)} kept from an earlier run, " if kept else "") + \
            (f"{not_started} not started (run the same command again), " if not_started else "") + \
            f"{len(failed)} failed"
        if failed:
            summary += ":\n" + "\n".join(f"  {src}: {why}" for src, why in failed)
        if failed or not args.quiet:
            print(summary, file=sys.stderr)


def run_settings(run: Settings, prompt: str | None) -> dict:
    """What made the reconstructions, for the evaluation's summary and report."""
    from .checkpoint import resolve_files
    from .files import sha256
    from .stages import DECODER_STAGES, ENCODER_STAGES, roles_of

    job = run.job
    files = resolve_files(job.ckpt or default_checkpoint(), roles_of(ENCODER_STAGES + DECODER_STAGES), job.revision)
    decoding = output_fields(run.decoding.for_task("sound2sound"))
    return {**decoding, "seed": "random" if decoding["seed"] is None else decoding["seed"], "dtype": job.dtype,
            "audioldm_dtype": job.audioldm_dtype, "device": job.device, "encoder_batch_size": run.encoding.batch_size,
            "prompt": prompt or "none",
            "checkpoint (sha256)": {role: sha256(f)[:16] for role, f in sorted(files.items())}}


def _evaluate(args, run: Settings, jobs: list[FileTask], out_dir: Path, say, progress: bool) -> int:
    """``--evaluate``: each finished reconstruction against its input; returns the exit status."""
    from . import evaluate

    pairs = [evaluate.Pair(j.dst.relative_to(out_dir).with_suffix("").as_posix(), str(j.src), str(j.dst),
                           str(j.token_path) if j.token_path.is_file() else "") for j in jobs]
    try:
        ev = evaluate.evaluate(evaluate.Pairing(pairs), out_dir, settings=run_settings(run, args.prompt), workers=args.workers,
                               progress=progress, say=say)
    except MuCodecError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    evaluate.print_result(ev, args.quiet)
    return EXIT_FAILED if ev.failed else EXIT_OK
