"""Fine-tune the decoder on your own music (docs/training.md)::

    python -m mucodec.train MUSIC/ -o RUN/ --ckpt BASE   # RUN/ becomes a checkpoint folder: --ckpt RUN/

MUSIC is a folder of music (prepared into RUN/data first, resumably) or a folder an earlier run prepared.
A thin command line over :func:`library.prepare.prepare_library` and :func:`trainer.fit_folder`.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from .settings import DTYPES, EncodingOptions, JobOptions, build
from .errors import ArgumentError, MuCodecError
from .library.prepare import HOLDOUT, LATENT_DTYPES, SHARD_SONGS, is_prepared
from .library.songs import parse_shard

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
PREPARED = "data"  # where a music folder is prepared, inside the run folder


def build_parser() -> argparse.ArgumentParser:
    from .trainer import TrainOptions

    d = TrainOptions()
    # the training options are TrainOptions' fields, with its defaults (one home for each)
    p = argparse.ArgumentParser(prog="python -m mucodec.train", description=__doc__.split("\n\n")[0])
    p.add_argument("data", nargs="+", help="music files or folders, or one folder prepared before")
    p.add_argument("-o", "--output", required=True, help="run folder (resumed when it holds a run)")
    p.add_argument("--ckpt", default=None, help="starting checkpoint folder or hub repo (default: as generate.py)")
    p.add_argument("--revision", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument("--holdout", type=float, default=HOLDOUT, help="fraction of songs held out, by song id")
    prep = p.add_argument_group("preparing a music folder (into RUN/data)")
    prep.add_argument("--engine", choices=("local", "ray"), default="local",
                      help="local: reader processes and this process; ray: Ray Data (pip install -r "
                           "requirements-ray.txt)")
    prep.add_argument("--address", default=None, help="Ray cluster to join with --engine ray (default: RAY_ADDRESS, "
                                                      "else a local instance)")
    prep.add_argument("--workers", type=int, default=None, help="reader processes (default: by the CPU count)")
    prep.add_argument("--shard", type=parse_shard, default=None,
                      help="I/N: prepare this machine's part of the library only, then stop")
    prep.add_argument("--encode-batch-size", type=int, default=None,
                      help=f"encoder windows at once (default {EncodingOptions().batch_size})")
    prep.add_argument("--encode-dtype", choices=tuple(DTYPES), default="float32", help="precision of the encoder")
    prep.add_argument("--latent-dtype", choices=tuple(LATENT_DTYPES), default="bfloat16")
    prep.add_argument("--shard-songs", type=int, default=SHARD_SONGS, help="songs per committed shard")
    prep.add_argument("--retry-errors", action="store_true", help="try the files that failed before again")
    prep.add_argument("--overwrite", action="store_true", help="discard output made with other weights or settings")
    fit = p.add_argument_group("training")
    for f in dataclasses.fields(TrainOptions):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(d, f.name)
        if isinstance(default, bool):
            fit.add_argument(flag, action="store_true")
        elif isinstance(default, tuple):
            fit.add_argument(flag, type=float, nargs=len(default), default=default)
        else:
            fit.add_argument(flag, type=type(default), default=default)
    return p


def prepare(args, device, say) -> tuple[Path | None, int]:
    """(the prepared folder to train on, exit code): DATA itself when prepared before, else RUN/data, prepared
    (or resumed) from the music in DATA now. No folder when a file failed or only a ``--shard`` part was asked."""
    from .library.prepare import prepare_library

    if len(args.data) == 1 and is_prepared(args.data[0]):
        return Path(args.data[0]), EXIT_OK
    out = Path(args.output) / PREPARED
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # every process would prepare the same songs at once
        raise ArgumentError(f"{args.data[0]} is not a prepared folder; prepare it in one process first (the same "
                            f"command without torchrun, with --shard 1/1 to stop before training), then pass {out} "
                            f"under torchrun.")
    job = JobOptions(ckpt=args.ckpt, revision=args.revision, device=device, dtype=args.encode_dtype,
                     shard=args.shard, engine=args.engine, address=args.address, workers=args.workers,
                     retry_errors=args.retry_errors,
                     overwrite=args.overwrite, shard_size=args.shard_songs)
    rep = prepare_library(args.data, out, build(EncodingOptions, batch_size=args.encode_batch_size), job,
                          latent_dtype=args.latent_dtype, progress=not args.quiet and sys.stderr.isatty(), say=say)
    s = rep["songs"]
    say(f"{s['done']} songs prepared, {s['skipped']} skipped, {s['failed']} failed: {out}")
    if s["failed"]:
        say(f"training did not start: fix or remove the files listed in {out}/errors, or add --retry-errors")
        return None, EXIT_FAILED
    if args.shard is not None:
        say(f"part {args.shard[0]}/{args.shard[1]} is prepared; once every part is, run again without --shard")
        return None, EXIT_OK
    return out, EXIT_OK


def main(argv=None) -> int:
    from .codec import pick_device

    args = build_parser().parse_args(argv)
    say = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    try:
        from .trainer import TrainOptions, fit_folder
        opts = TrainOptions(**{f.name: (tuple(getattr(args, f.name)) if isinstance(f.default, tuple)
                                        else getattr(args, f.name)) for f in dataclasses.fields(TrainOptions)})
        device = pick_device(args.device)
        data, code = prepare(args, device, say)
        if data is None:
            return code
        fit_folder(data, args.output, ckpt=args.ckpt, revision=args.revision, device=device, opts=opts,
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
