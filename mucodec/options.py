"""The command line's options: the parser, in groups, and the checks of what was parsed.

Everything a command line can get wrong is refused here (exit 2) before any file is touched; what the
options then do is :mod:`mucodec.cli`'s.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from . import library, samplers, settings as S, tokens
from .audio import AUDIO_FORMATS
from .checkpoint import DEFAULT_REPO, FILES, HUB_URL
from .codec import dtype_name, pick_device
from .errors import ArgumentError
from .precision import pick_dtype
from .settings import DTYPES, DecodingOptions, EncodingOptions, JobOptions, SettingError, build
from .workers import default_workers


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    ext = tokens.EXTENSION
    p = argparse.ArgumentParser(
        prog=prog,
        description="MuCodec: compress 48 kHz stereo music to 0.35 kbit/s tokens and reconstruct it. "
                    "Audio inputs are reconstructed (encoded and decoded) into DIR/<name>.wav, or encoded "
                    f"into DIR/<name>{ext} token files with --encode; token files are decoded into "
                    "DIR/<name>.wav. Without INPUT: the official demo, test_wav/test.wav -> reconstruct/test.wav "
                    "in the MuCodec folder.",
        epilog=f"Weights: the three files of {HUB_URL} as {', '.join(FILES.values())} in the MuCodec folder, "
               "or downloaded into the Hugging Face cache on first use. Output audio is "
               "48 kHz stereo 32-bit float WAV; existing outputs are never replaced without --overwrite. "
               "Exit status: 0 all done, 1 some input failed, 2 bad command line.",
    )
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="audio files, token files, folders (searched recursively for every format soundfile "
                        f"reads and {ext} files) or glob patterns such as 'music/**/*.flac'")
    p.add_argument("-o", "--output", metavar="DIR", default=None,
                   help="output folder, created if missing; files found in a folder keep their sub-folders "
                        "(default: ./reconstruct, or reconstruct/ in the MuCodec folder without INPUT)")
    _add_decoder_options(p, ext)
    _add_precision_options(p)
    _add_file_options(p, ext)
    _add_library_options(p, ext)
    p.add_argument("-q", "--quiet", action="store_true",
                   help="print only errors and warnings (progress bars also stay off when stderr is not a terminal)")
    return p


def _add_decoder_options(p: argparse.ArgumentParser, ext: str) -> None:
    p.add_argument("--encode", action="store_true",
                   help=f"only encode audio into {ext} token files (loads only the encoder)")
    p.add_argument("--steps", type=int, default=None, metavar="N",
                   help=f"flow-matching steps (default: {S.SOUND2SOUND_STEPS} to reconstruct audio, as the "
                        f"official sound2sound; {S.CODE2SOUND_STEPS} to decode a token file, as the official code2sound)")
    p.add_argument("--guidance", type=float, default=None, metavar="G",
                   help=f"classifier-free guidance scale, at least 1; 1 turns guidance off (default: "
                        f"{S.GUIDANCE_SCALE})")
    p.add_argument("--sampler", choices=samplers.SAMPLERS, default=None,
                   help="ODE solver of the flow decoder: euler (the official one, 1 DiT pass per step), heun "
                        "(2 per step, second order) or ab2 (1 per step, second order, reuses the previous "
                        f"step's velocity); docs/sampling.md (default: {samplers.DEFAULT_SAMPLER})")
    p.add_argument("--guidance-interval", metavar="A,B", default=None,
                   help="guidance only at flow times t in [A, B] (0 <= A <= B <= 1); elsewhere the DiT runs "
                        "without the unconditional half, at half the batch (default: guidance at every step)")
    p.add_argument("--schedule", choices=samplers.SCHEDULES, default=None,
                   help="flow times the steps meet: uniform (the official grid) or cosine (small steps near t = 0, "
                        f"where the flow leaves the noise); docs/sampling.md (default: {samplers.DEFAULT_SCHEDULE})")
    p.add_argument("--seed", type=int, default=None,
                   help="random seed for the decoder's noise, applied to each file (default: random)")
    p.add_argument("--device", default="auto",
                   help="cuda, cuda:1, mps, cpu or auto: cuda, else mps, else cpu (default: auto)")


def _add_precision_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=("auto",) + tuple(DTYPES), default="auto",
                   help="precision of the flow decoder (DiT under autocast; everything else stays float32). "
                        "auto: float16 on CUDA, as the official code runs it, float32 elsewhere; bfloat16 speeds "
                        "the DiT up on CPUs with native bfloat16 (deviation ~0.5 %%) and slows it down on CPUs "
                        "without it, which get a warning; figures in docs/speed.md (default: auto)")
    p.add_argument("--audioldm-dtype", choices=tuple(DTYPES), default="float32",
                   help="precision of the VAE and vocoder (autocast), which turn the flow's latents into audio. "
                        "bfloat16 speeds them up on CPUs with native bfloat16 but moves the audio about 2.4 %% "
                        "(figures in docs/speed.md); float16 needs a GPU (default: float32)")
    p.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help=f"40.96 s chunks encoded at once; lower it if memory runs out (default: {S.ENCODE_BATCH})")


def _add_file_options(p: argparse.ArgumentParser, ext: str) -> None:
    p.add_argument("--prompt", metavar="FILE", default=None,
                   help="reference audio whose first 10.24 s guide the decoder (official code2sound prompt)")
    p.add_argument("--ckpt", metavar="PATH_OR_REPO", default=None,
                   help=f"folder holding {', '.join(FILES.values())}, or a hub repo id (default: the MuCodec "
                        f"folder if it holds them, else {DEFAULT_REPO})")
    p.add_argument("--revision", metavar="REV", default=None,
                   help="branch, tag or commit of the hub repo (default: its main branch)")
    p.add_argument("--official-vocoder", action="store_true",
                   help="run the vocoder in the official overlapping chunks (each mel frame 4 times) instead of "
                        "once per frame plus the chunk edges (default: once per frame, less vocoder work, "
                        "the same audio up to float rounding)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files (default: refuse)")
    p.add_argument("--evaluate", action="store_true",
                   help="reconstructing audio: then compare each reconstruction with its input (ViSQOL, mel and "
                        "STFT distances, SI-SDR, loudness, bitrate) into DIR/metrics.csv, summary.json and "
                        f"report.html. Keeps each song's token file DIR/<name>{ext} (for the bitrate); existing "
                        "reconstructions are kept and evaluated as they are, so a run resumes (--overwrite redoes "
                        "them); --workers sets the processes computing metrics. Needs pip install -r "
                        "requirements-eval.txt")


def _add_library_options(p: argparse.ArgumentParser, ext: str) -> None:
    lib = p.add_argument_group(
        "libraries: tokenising (--encode of a folder) and decoding (a token library, parquet tables, .npy arrays "
        "or folders of token files)",
        "Resumable: run the same command again after a crash and only what was not committed is done. "
        "Encoding writes parquet shards of songs (columns song_id, path, duration, sample_rate, channels, "
        "num_samples, num_codes, codes); decoding writes one audio file per song, named by its path or id. "
        "Both write a manifest, an errors table, fingerprint.json and report.json in DIR.")
    lib.add_argument("--decode-batch", type=int, default=None, metavar="B",
                     help="decoding token inputs: songs decoded together, one window each per step; lower it if "
                          f"memory runs out (default: {S.DECODE_BATCH})")
    lib.add_argument("--audio-format", choices=("auto", *AUDIO_FORMATS), default="auto",
                     help="audio files written when decoding: flac (24-bit, lossless for it, half the size) or "
                          "wav (32-bit float, exact); auto: flac for a decode job, wav for single files")
    lib.add_argument("--offload", action="store_true",
                     help="keep the decoder's stages in CPU memory except while each runs on the GPU, so a "
                          "decode fits a small GPU (default: all on the device)")
    lib.add_argument("--format", choices=("auto", *S.TOKEN_FORMATS), default="auto",
                     help=f"parquet shards, one {ext} per song, or both; auto: parquet when an INPUT is a folder or "
                          f"a library option is given, else one {ext} per file as without it (default: auto)")
    lib.add_argument("--shard", metavar="I/N", default=None,
                     help="run job I of N independent jobs (1 <= I <= N; songs are split by id, so the N jobs "
                          "never overlap and together cover every song)")
    lib.add_argument("--engine", choices=("local", "ray"), default="local",
                     help="local: worker processes read, this process runs the model; ray: Ray Data on a local "
                          "instance or a cluster (pip install -r requirements-ray.txt) (default: local)")
    lib.add_argument("--address", metavar="ADDR", default=None,
                     help="Ray cluster to join with --engine ray (default: RAY_ADDRESS, else a local instance)")
    lib.add_argument("--workers", type=int, default=None, metavar="N",
                     help="processes (ray: tasks) reading the inputs; 0 reads in this process (default: encoding "
                          f"{default_workers()} here, one less than the cores, at most 8; decoding 1)")
    lib.add_argument("--retry-errors", action="store_true",
                     help="try again the songs that failed in an earlier run (default: skip them)")
    lib.add_argument("--verify", action="store_true",
                     help="resuming: check the checksum of every committed output against the manifest before "
                          "skipping its song (default: its size only); damaged outputs are done again either way")
    lib.add_argument("--shard-size", type=int, default=None, metavar="N",
                     help=f"songs per parquet shard, the unit of commit (default: {S.SHARD_SONGS}; a shard "
                          f"is also committed every {library.COMMIT_SECONDS / 60:.0f} minutes)")


@dataclass(frozen=True)
class Settings:
    """A command line's settings, each checked by its own dataclass."""

    decoding: DecodingOptions
    encoding: EncodingOptions
    job: JobOptions


# The flag that sets each field, for errors in the words of the command line.
_FLAGS = {DecodingOptions: {"num_steps": "--steps", "guidance_scale": "--guidance", "seed": "--seed",
                            "batch_size": "--decode-batch", "sampler": "--sampler",
                            "guidance_interval": "--guidance-interval", "schedule": "--schedule"},
          EncodingOptions: {"batch_size": "--batch-size"},
          JobOptions: {"shard_size": "--shard-size", "workers": "--workers", "address": "--address",
                       "shard": "--shard"}}


# A rule in the words of the command line, where its flag is written otherwise than the field.
_RULES = {"guidance_interval": "must be A,B with 0 <= A <= B <= 1, e.g. 0.2,0.8"}


def flag_sentence(e: SettingError, cls) -> str:
    """A setting's error in the words of the command line: its flag and its rule."""
    return f"{_FLAGS[cls].get(e.name, e.name)} {_RULES.get(e.name, e.rule)}"


def checked(parser: argparse.ArgumentParser, cls, **values):
    """``build(cls, **values)``, or exit 2 with the setting's error in the words of the command line."""
    try:
        return build(cls, **values)
    except SettingError as e:
        parser.error(flag_sentence(e, cls))


def check_args(parser: argparse.ArgumentParser, args) -> Settings:
    """Everything about the command line that can be wrong, found before any file is touched (exit 2);
    returns the run's settings."""
    interval = None if args.guidance_interval is None else args.guidance_interval.split(",")
    decoding = checked(parser, DecodingOptions, num_steps=args.steps, guidance_scale=args.guidance, seed=args.seed,
                         fast_vocoder=not args.official_vocoder, batch_size=args.decode_batch, sampler=args.sampler,
                         guidance_interval=interval, schedule=args.schedule)
    encoding = checked(parser, EncodingOptions, batch_size=args.batch_size)
    if args.encode and args.prompt:
        parser.error("--prompt guides the decoder; it has no effect with --encode")
    if args.encode and args.evaluate:
        parser.error("--evaluate compares reconstructions with their inputs; it has no effect with --encode")
    try:
        args.device = pick_device(args.device)
    except ArgumentError as e:
        parser.error(str(e))
    args.dtype = dtype_name(pick_dtype(args.dtype, args.device))
    for flag, dtype in (("--dtype", args.dtype), ("--audioldm-dtype", args.audioldm_dtype)):
        if args.device.split(":")[0] == "cpu" and dtype == "float16":
            parser.error(f"{flag} float16 needs a GPU; use bfloat16 or float32 on the CPU")
    if args.output is not None and Path(args.output).exists() and not Path(args.output).is_dir():
        parser.error(f"-o {args.output} is a file; it must name a folder")
    encode_flags = [name for name, on in (("--format", args.format != "auto"),
                                          ("--shard-size", args.shard_size is not None)) if on]
    if encode_flags and not args.encode:
        parser.error(f"{encode_flags[0]} is an option of --encode (tokenising a library); add --encode")
    decode_flags = [name for name, on in (("--decode-batch", args.decode_batch is not None),
                                          ("--audio-format", args.audio_format != "auto"),
                                          ("--offload", args.offload),
                                          ("--sampler", args.sampler is not None),
                                          ("--guidance-interval", args.guidance_interval is not None),
                                          ("--schedule", args.schedule is not None),
                                          ("--audioldm-dtype", args.audioldm_dtype != "float32")) if on]
    if decode_flags and args.encode:
        parser.error(f"{decode_flags[0]} is an option of decoding; it has no effect with --encode")
    if args.shard is not None:
        try:
            args.shard = library.parse_shard(args.shard)
        except ArgumentError as e:
            parser.error(str(e))
    job = checked(parser, JobOptions, ckpt=args.ckpt, revision=args.revision, device=args.device, dtype=args.dtype,
                    audioldm_dtype=args.audioldm_dtype, offload=args.offload,
                    audio_format=None if args.audio_format == "auto" else args.audio_format,
                    token_format=None if args.format == "auto" else args.format, shard_size=args.shard_size,
                    shard=args.shard, engine=args.engine, address=args.address, workers=args.workers,
                    retry_errors=args.retry_errors, overwrite=args.overwrite, verify=args.verify)
    return Settings(decoding, encoding, job)
