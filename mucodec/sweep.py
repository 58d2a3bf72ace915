"""The speed/quality trade-off of the decoder on your own music and weights, in one command.

    python -m mucodec.sweep music/ -o sweep/ --steps 4,8,12,20 --sampler euler,heun --guidance 1,1.5

Every song is encoded once (``sweep/tokens``, an encode job), then decoded at every setting of the grid (steps x
sampler x guidance x guidance interval) into ``sweep/<setting>/`` (a decode job each, with one seed for all, so
that settings differ by their setting alone), then every setting is scored against the original audio with the
project's evaluation (:mod:`mucodec.evaluate`: mel distance and ViSQOL, each setting's ``metrics.csv`` and
``report.html``; without the evaluation extra, the mel distance alone). Written into ``sweep/``:

    sweep.csv    one row per setting: DiT passes per window, decode seconds per minute of audio, mean scores,
                 whether it lies on the Pareto front
    index.html   :mod:`mucodec.sweep_page`: quality against decode time, the front marked, a player per song
                 and setting

Decode times and scores: :mod:`mucodec.sweep_score`. Resume: the jobs
resume as every library job does; a setting with nothing left to decode keeps its recorded time, and pairs
scored before are not scored again. ``--shard I/N`` encodes and decodes one job's share only; a run without it
(nothing left to decode) then scores and writes the page.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
from dataclasses import dataclass
from pathlib import Path

from . import library, samplers, sweep_score
from .errors import ArgumentError, MuCodecError, SettingError
from .settings import DecodingOptions, EncodingOptions, JobOptions, build

STEPS = (4, 8, 12, 20)
SAMPLERS = ("euler", "heun")
GUIDANCES = (1.0, 1.5)
SCHEDULES = (samplers.DEFAULT_SCHEDULE,)
SEED = 0  # one noise for every setting: settings then differ by their setting alone
MAX_SETTINGS = 256  # a typo in a grid should not plan days of decoding
TOKENS = "tokens"


@dataclass(frozen=True)
class Setting:
    name: str  # its folder
    options: DecodingOptions

    @property
    def dit_passes(self) -> int:
        """DiT passes per song and window (a guided evaluation is two: conditional and unconditional)."""
        o = self.options
        return sum(samplers.dit_rows(o.sampler, o.num_steps, o.guidance_scale, o.guidance_interval, o.schedule))


@dataclass(frozen=True)
class SweepOptions:
    """The grid (``steps`` x ``samplers`` x ``guidances`` x ``intervals`` x ``schedules``; an interval of None
    guides at every step), the decoding options they vary (``base``: seed, batch, vocoder) and the job's.
    Checked once here: each grid value through :class:`DecodingOptions`, whose SettingError names it."""

    steps: tuple = STEPS
    samplers: tuple = SAMPLERS
    guidances: tuple = GUIDANCES
    intervals: tuple = (None,)
    schedules: tuple = SCHEDULES
    base: DecodingOptions = DecodingOptions(seed=SEED)
    job: JobOptions = JobOptions()

    def __post_init__(self):
        for name in ("steps", "samplers", "guidances", "intervals", "schedules"):
            value = tuple(getattr(self, name))
            if not value:
                raise SettingError(name, "must hold at least one value", value)
            if len(set(value)) != len(value):
                raise SettingError(name, "must not repeat a value", value)
            object.__setattr__(self, name, value)
        if self.job.token_format != "parquet":
            raise SettingError("token_format", "must be parquet (the sweep's token library)", self.job.token_format)
        settings = self.settings()  # every combination checked now, not hours into the sweep
        if len(settings) > MAX_SETTINGS:
            raise SettingError("grid", f"must hold at most {MAX_SETTINGS} settings", len(settings))

    def settings(self) -> list[Setting]:
        grid = itertools.product(self.samplers, self.schedules, self.steps, self.guidances, self.intervals)
        out = [dataclasses.replace(self.base, sampler=sampler, schedule=schedule, num_steps=steps, guidance_scale=g,
                                   guidance_interval=gi) for sampler, schedule, steps, g, gi in grid]
        return [Setting(setting_name(o), o) for o in out]


def setting_name(o: DecodingOptions) -> str:
    name = f"{o.sampler}-{o.num_steps}steps-g{o.guidance_scale:g}"
    name += "" if o.guidance_interval is None else "-gi{:g}-{:g}".format(*o.guidance_interval)
    return name + ("" if o.schedule == samplers.DEFAULT_SCHEDULE else f"-{o.schedule}")


# ---- the sweep ----------------------------------------------------------------------------------
def decode_all(inputs, out: Path, sweep: SweepOptions, *, progress: bool = False, say=lambda msg: None) -> dict:
    """Encode once, decode at every setting; returns {setting name: its decode job's report}."""
    from .library.decode import AudioLibrary
    from .library.engine import plan_run

    job = sweep.job
    tokens = out / TOKENS
    say(f"encoding into {tokens}")
    # --dtype is the flow decoder's; the encoder runs in float32 whatever it is, so the tokens (and their
    # fingerprint) stay the same when a later sweep decodes them in another precision
    library.encode_library(inputs, tokens, EncodingOptions(), dataclasses.replace(job, dtype="float32"),
                           progress=progress, say=say)
    songs = library.scan_tokens([tokens])[0]
    codec, reports = None, {}
    for s in sweep.settings():
        folder = out / s.name
        lib = AudioLibrary(folder, job.audio_format, job.shard)
        if codec is None and job.engine == "local" and plan_run(lib, songs, job.retry_errors).todo:
            codec = load_decoder(job, say)  # once, and only when some setting has songs left
        say(f"{s.name}: {s.dit_passes} DiT passes per window")
        rep = library.decode_library([tokens], folder, s.options, job, codec=codec, progress=progress, say=say).report
        sweep_score.record_time(folder, job.shard, rep)
        reports[s.name] = rep
    return reports


def load_decoder(job: JobOptions, say):
    from .checkpoint import default_checkpoint
    from .codec import MuCodec

    ckpt = job.ckpt or str(default_checkpoint())
    say(f"loading the MuCodec decoder from {ckpt} on {job.device}")
    return MuCodec.from_pretrained(ckpt, device=job.device, dtype=job.torch_dtype, revision=job.revision,
                                   decoder_only=True, offload=job.offload, audioldm_dtype=job.torch_audioldm_dtype)


def run_sweep(inputs, out, sweep: SweepOptions, *, progress: bool = False, say=lambda msg: None):
    """The whole sweep (module docstring); returns the table's rows, or None for a ``--shard`` job."""
    from . import sweep_page

    out = Path(out)
    decode_all(inputs, out, sweep, progress=progress, say=say)
    if sweep.job.shard is not None:
        return None
    songs, _ = library.scan(inputs, out)
    references = {s.path.rsplit(".", 1)[0]: s.file for s in songs}
    rows = sweep_score.table_rows(out, sweep.settings(), sweep.job, references, say)
    for r in rows:
        r["songs_in_sweep"] = len(references)
    sweep_score.write_csv(out / "sweep.csv", rows)
    sweep_page.write_page(out, rows, references, sweep.job.audio_format)
    return rows


# ---- the command line ---------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mucodec.sweep",
        description="Decode your music at every setting of a grid and show quality against decode time: encodes "
                    "each song once into DIR/tokens, decodes it into DIR/<setting>/ at each setting, scores each "
                    "setting against the original (mel distance; ViSQOL with the evaluation extra) and writes "
                    "DIR/sweep.csv and DIR/index.html. Resumable: run it again and only what is missing is done.",
        epilog="Exit status: 0 done, 1 some song failed, 2 bad command line. docs/sampling.md explains the page.")
    p.add_argument("inputs", nargs="+", metavar="MUSIC", help="audio files, folders or glob patterns")
    p.add_argument("-o", "--output", metavar="DIR", required=True, help="the sweep's folder, created if missing")
    p.add_argument("--steps", default=",".join(map(str, STEPS)), metavar="N,N",
                   help=f"flow-matching steps per window to try (default: {','.join(map(str, STEPS))})")
    p.add_argument("--sampler", default=",".join(SAMPLERS), metavar="NAME,NAME",
                   help=f"samplers to try, of {', '.join(samplers.SAMPLERS)} (default: {','.join(SAMPLERS)})")
    p.add_argument("--guidance", default=",".join(f"{g:g}" for g in GUIDANCES), metavar="G,G",
                   help="guidance scales to try, each at least 1 (default: {})".format(
                       ",".join(f"{g:g}" for g in GUIDANCES)))
    p.add_argument("--guidance-interval", action="append", metavar="A,B",
                   help="a guidance interval to try (repeat the option for more; 'all' guides at every step) "
                        "(default: all)")
    p.add_argument("--schedule", default=samplers.DEFAULT_SCHEDULE, metavar="NAME,NAME",
                   help=f"time schedules to try, of {', '.join(samplers.SCHEDULES)} (default: "
                        f"{samplers.DEFAULT_SCHEDULE})")
    p.add_argument("--seed", type=int, default=SEED, help=f"the decoder's noise seed, one for every setting "
                                                          f"(default: {SEED})")
    _add_job_options(p)
    p.add_argument("-q", "--quiet", action="store_true", help="print only errors and the table")
    return p


def _add_job_options(p: argparse.ArgumentParser) -> None:
    from .audio import AUDIO_FORMATS
    from .settings import DTYPES, ENGINES

    g = p.add_argument_group("the jobs (as for python3 generate.py; see its --help)")
    g.add_argument("--ckpt", metavar="PATH_OR_REPO", default=None, help="the weights: a folder or a hub repo id")
    g.add_argument("--revision", metavar="REV", default=None, help="branch, tag or commit of the hub repo")
    g.add_argument("--device", default="auto", help="cuda, cpu, ... or auto (default: auto)")
    g.add_argument("--dtype", choices=("auto", *DTYPES), default="auto", help="the flow decoder's precision")
    g.add_argument("--audioldm-dtype", choices=tuple(DTYPES), default="float32",
                   help="the VAE and vocoder's precision (default: float32)")
    g.add_argument("--decode-batch", type=int, default=None, metavar="B", help="songs decoded together")
    g.add_argument("--audio-format", choices=AUDIO_FORMATS, default="flac", help="decoded files (default: flac)")
    g.add_argument("--offload", action="store_true", help="stages in CPU memory except while each runs")
    g.add_argument("--shard", metavar="I/N", default=None,
                   help="encode and decode job I of N only; then run without it for the table and page")
    g.add_argument("--engine", choices=ENGINES, default="local", help="local or ray (default: local)")
    g.add_argument("--address", metavar="ADDR", default=None, help="the Ray cluster of --engine ray")
    g.add_argument("--workers", type=int, default=None, metavar="N",
                   help="processes reading the inputs and computing metrics; 0: in this process")
    g.add_argument("--retry-errors", action="store_true", help="try again songs that failed before")
    g.add_argument("--overwrite", action="store_true", help="discard output made with other weights or settings")


def check_job_args(parser, args) -> JobOptions:
    from .codec import dtype_name, pick_device
    from .options import checked
    from .precision import pick_dtype

    try:
        device = pick_device(args.device)
        shard = None if args.shard is None else library.parse_shard(args.shard)
    except ArgumentError as e:
        parser.error(str(e))
    dtype = dtype_name(pick_dtype(args.dtype, device))
    for flag, d in (("--dtype", dtype), ("--audioldm-dtype", args.audioldm_dtype)):
        if device.split(":")[0] == "cpu" and d == "float16":
            parser.error(f"{flag} float16 needs a GPU; use bfloat16 or float32 on the CPU")
    if Path(args.output).exists() and not Path(args.output).is_dir():
        parser.error(f"-o {args.output} is a file; it must name a folder")
    return checked(parser, JobOptions, ckpt=args.ckpt, revision=args.revision, device=device, dtype=dtype,
                   audioldm_dtype=args.audioldm_dtype, offload=args.offload, audio_format=args.audio_format,
                   shard=shard, engine=args.engine, address=args.address, workers=args.workers,
                   retry_errors=args.retry_errors, overwrite=args.overwrite)


def _grid(parser, flag: str, text: str, kind) -> tuple:
    try:
        return tuple(kind(v.strip()) for v in text.split(","))
    except ValueError:
        example = parser.get_default(flag[2:].replace("-", "_")) or "0.2,0.8"
        parser.error(f"{flag} takes values separated by commas, e.g. {example}; got {text!r}")


def check_args(parser, args) -> SweepOptions:
    """The command line as SweepOptions; any wrong value exits 2 with one sentence."""
    from .options import flag_sentence

    job = check_job_args(parser, args)
    intervals = tuple(None if gi.strip() == "all" else tuple(_grid(parser, "--guidance-interval", gi, float))
                      for gi in (args.guidance_interval or ["all"]))
    try:
        return SweepOptions(steps=_grid(parser, "--steps", args.steps, int),
                            samplers=_grid(parser, "--sampler", args.sampler, str),
                            guidances=_grid(parser, "--guidance", args.guidance, float), intervals=intervals,
                            schedules=_grid(parser, "--schedule", args.schedule, str),
                            base=build(DecodingOptions, seed=args.seed, batch_size=args.decode_batch), job=job)
    except SettingError as e:
        grid = {"steps": "--steps", "samplers": "--sampler", "guidances": "--guidance",
                "intervals": "--guidance-interval", "schedules": "--schedule", "grid": "the grid"}
        parser.error(f"{grid[e.name]} {e.rule}" if e.name in grid else flag_sentence(e, DecodingOptions))


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    sweep = check_args(parser, args)
    progress = not args.quiet and sys.stderr.isatty()

    def say(msg):
        if not args.quiet and not progress:
            print(msg, file=sys.stderr)

    try:
        rows = run_sweep(args.inputs, args.output, sweep, progress=progress, say=say)
    except MuCodecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; what was committed is kept, run the same command to go on", file=sys.stderr)
        return 130
    if rows is None:
        print(f"shard {sweep.job.shard[0]}/{sweep.job.shard[1]} decoded; run the sweep without --shard for the "
              "table and page", file=sys.stderr)
        return 0
    print(sweep_score.text_table(rows))
    print(f"table {Path(args.output) / 'sweep.csv'}, page {Path(args.output) / 'index.html'}", file=sys.stderr)
    return 1 if any(r["songs"] < r["songs_in_sweep"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
