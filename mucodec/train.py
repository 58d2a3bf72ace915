"""Fine-tune the decoder on your own music (docs/training.md)::

    python -m mucodec.train prepare MUSIC/ -o DATA/     # windows: codes + VAE latents, resumable, --shard I/N
    python -m mucodec.train fit DATA/ -o RUN/ --ckpt BASE   # RUN/ becomes a checkpoint folder: --ckpt RUN/

A thin command line over :func:`library.prepare.prepare_library` and :func:`trainer.fit_folder`.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

from .settings import DTYPES, EncodingOptions, JobOptions, build
from .errors import ArgumentError, MuCodecError
from .library.prepare import HOLDOUT, LATENT_DTYPES, SHARD_SONGS
from .library.songs import parse_shard

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def build_parser() -> argparse.ArgumentParser:
    from .trainer import TrainOptions

    d = TrainOptions()
    # the fit options are TrainOptions' fields, with its defaults (one home for each)
    p = argparse.ArgumentParser(prog="python -m mucodec.train", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="music folder -> training windows")
    prep.add_argument("inputs", nargs="+", help="music files or folders")
    prep.add_argument("-o", "--output", required=True, help="folder of the prepared windows")
    prep.add_argument("--workers", type=int, default=None, help="reader processes (default: by the CPU count)")
    prep.add_argument("--shard", type=parse_shard, default=None, help="I/N: this machine's part of the library")
    prep.add_argument("--batch-size", type=int, default=None,
                      help=f"encoder windows at once (default {EncodingOptions().batch_size})")
    prep.add_argument("--latent-dtype", choices=tuple(LATENT_DTYPES), default="bfloat16")
    prep.add_argument("--shard-songs", type=int, default=SHARD_SONGS, help="songs per committed shard")
    prep.add_argument("--retry-errors", action="store_true", help="try the files that failed before again")
    prep.add_argument("--overwrite", action="store_true", help="discard output made with other weights or settings")
    fit = sub.add_parser("fit", help="prepared windows -> fine-tuned checkpoint folder")
    fit.add_argument("data", help="a folder written by prepare")
    fit.add_argument("-o", "--output", required=True, help="run folder (resumed when it holds a run)")
    fit.add_argument("--holdout", type=float, default=HOLDOUT, help="fraction of songs held out, by song id")
    for f in dataclasses.fields(TrainOptions):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(d, f.name)
        if isinstance(default, bool):
            fit.add_argument(flag, action="store_true")
        elif isinstance(default, tuple):
            fit.add_argument(flag, type=float, nargs=len(default), default=default)
        else:
            fit.add_argument(flag, type=type(default), default=default)
    for q in (prep, fit):
        q.add_argument("--ckpt", default=None, help="starting checkpoint folder or hub repo (default: as generate.py)")
        q.add_argument("--revision", default=None)
        q.add_argument("--device", default="cpu")
        q.add_argument("-q", "--quiet", action="store_true")
    prep.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="precision of the encoder")
    return p


def main(argv=None) -> int:
    from .codec import pick_device

    args = build_parser().parse_args(argv)
    say = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    try:
        device = pick_device(args.device)
        if args.command == "prepare":
            from .library.prepare import prepare_library
            job = JobOptions(ckpt=args.ckpt, revision=args.revision, device=device, dtype=args.dtype,
                             shard=args.shard, workers=args.workers, retry_errors=args.retry_errors,
                             overwrite=args.overwrite, shard_size=args.shard_songs)
            rep = prepare_library(args.inputs, args.output, build(EncodingOptions, batch_size=args.batch_size), job,
                                  latent_dtype=args.latent_dtype, progress=not args.quiet and sys.stderr.isatty(),
                                  say=say)
            s = rep["songs"]
            say(f"{s['done']} songs prepared, {s['skipped']} skipped, {s['failed']} failed: {args.output}")
            return EXIT_FAILED if s["failed"] else EXIT_OK
        from .trainer import TrainOptions, fit_folder
        opts = TrainOptions(**{f.name: (tuple(getattr(args, f.name)) if isinstance(f.default, tuple)
                                        else getattr(args, f.name)) for f in dataclasses.fields(TrainOptions)})
        fit_folder(args.data, args.output, ckpt=args.ckpt, revision=args.revision, device=device, opts=opts,
                   holdout=args.holdout, log=say)
        return EXIT_OK
    except KeyboardInterrupt:
        say("interrupted: run the same command again to resume")
        return EXIT_INTERRUPTED
    except MuCodecError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE if isinstance(e, ArgumentError) else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
