#!/usr/bin/env python3
"""MuCodec from the command line and from a notebook.

Command line (``python3 generate.py --help`` lists every option)::

    python3 generate.py                           # the official demo: test_wav/test.wav -> reconstruct/test.wav
    python3 generate.py song.flac music/ 'live/*.mp3' -o out/     # reconstruct (encode + decode)
    python3 generate.py --encode song.flac -o tokens/             # song.flac -> tokens/song.mct (0.35 kbit/s)
    python3 generate.py tokens/song.mct -o out/                   # token file -> out/song.wav

Notebook::

    from generate import sound2code, code2sound
    codes = sound2code("song.flac")          # LongTensor (1, 1, T), 25 codes per second
    wav = code2sound(codes)                  # float tensor (2, T * 1920) at 48 kHz

Output audio is 48 kHz stereo 32-bit float WAV (what the official script writes; float keeps
the decoder's output exactly, including any sample beyond +-1).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent
HUB_REPO = "MuCodec/mucodec"
CKPT_FILES = ("tools/audioldm_48k.pth", "muq_dev/muq.pt", "ckpt/mucodec.pt")
TOKEN_EXT = ".mct"
DEFAULT_STEPS_RECONSTRUCT = 50  # official sound2sound
DEFAULT_STEPS_DECODE = 20  # official code2sound
DEFAULT_GUIDANCE = 1.5
DEFAULT_BATCH = 3
DTYPES = ("float32", "float16", "bfloat16")

# soundfile format names whose files users name differently (or not at all, for RAW / MATLAB).
_EXTRA_EXTENSIONS = {"AIFF": ("aif", "aifc"), "AU": ("snd",), "OGG": ("oga", "opus"), "SVX": ("iff", "8svx"),
                     "IRCAM": ("sf",), "NIST": ("sph",), "WAVEX": ("wav",)}
_NO_EXTENSION = {"RAW", "MAT4", "MAT5", "MPC2K", "WAVEX", "IRCAM"}


def audio_extensions() -> set[str]:
    """File extensions (lower case, with dot) of every format soundfile can read here."""
    import soundfile

    exts = set()
    for name in soundfile.available_formats():
        if name not in _NO_EXTENSION:
            exts.add("." + name.lower())
        exts.update("." + e for e in _EXTRA_EXTENSIONS.get(name, ()))
    return exts


def default_ckpt() -> str:
    """The folder next to this script when it holds the three official files, else the hub repo id."""
    return str(REPO) if all((REPO / f).is_file() for f in CKPT_FILES) else HUB_REPO


def pick_device(name: str = "auto") -> str:
    """'auto' -> cuda if available, else mps, else cpu; any other name is returned unchanged."""
    from mucodec.codec import default_device

    return default_device() if name == "auto" else name


def _read_audio(path):
    """(2, N) float32 at 48 kHz; the one place the CLI reads audio (tests may replace it)."""
    from mucodec.audio import load_audio

    return load_audio(path)


def _file_info(path) -> tuple[int | None, int | None]:
    """(sample rate, channels) of an audio file as stored, or (None, None) when soundfile cannot tell."""
    import soundfile

    try:
        info = soundfile.info(str(path))
        return int(info.samplerate), int(info.channels)
    except Exception:
        return None, None


def _as_stereo(audio, sample_rate):
    """Tensor/array (N,), (C, N) or (1, C, N) at `sample_rate` (default 48000) -> float32 (2, N) at 48 kHz,
    by the rules of mucodec.audio.load_audio (mono duplicated, first two channels kept)."""
    import torch

    from mucodec.audio import to_stereo

    wav = torch.as_tensor(audio)
    if wav.ndim == 3 and wav.shape[0] == 1:
        wav = wav[0]
    return to_stereo(wav, sample_rate or 48000)


def write_wav(path: Path, wav, sample_rate: int) -> None:
    """Write (2, N) audio as 32-bit float WAV through a temporary file and a rename (never partial)."""
    import numpy as np
    import soundfile

    from mucodec.errors import MuCodecError
    from mucodec.tokens import open_atomic

    data = wav.detach().float().cpu().numpy().T
    if not np.isfinite(data).all():
        raise MuCodecError(f"The decoder produced NaN or infinite samples for {path}; nothing was written "
                           f"(try --dtype float32).")
    try:
        with open_atomic(path) as f:
            soundfile.write(f, data, sample_rate, format="WAV", subtype="FLOAT")
    except OSError as e:
        raise MuCodecError(f"Cannot write {path}: {e.strerror or e}.") from None
    except soundfile.SoundFileError as e:
        raise MuCodecError(f"Cannot write {path}: {e}.") from None


def check_compatible(header: dict, codec, where) -> None:
    """Raise TokenFileError when a token file was made for a different model than `codec`."""
    from mucodec.errors import TokenFileError

    for field, ours in (("frame_rate", codec.frame_rate), ("codebook_size", codec.codebook_size),
                        ("sample_rate", codec.sample_rate), ("layer", codec.layer), ("num_codebooks", 1)):
        if header[field] != ours:
            raise TokenFileError(f"{where} was made with {field} {header[field]}, but this model uses {ours}.")


# ----------------------------------------------------------------------------------------------
# Notebook API


_codec = None
_codec_settings = None


def get_codec(ckpt: str | None = None, device: str = "auto", dtype=None):
    """The shared codec of the notebook functions, built on first use and rebuilt only when the
    settings change: `ckpt` (default: the official folder next to this file if it holds the
    weights, else the hub), `device` ('auto': cuda > mps > cpu), `dtype` (default float32).
    Raises CheckpointError with instructions when the weights are missing.
    """
    global _codec, _codec_settings
    import torch

    settings = (ckpt or default_ckpt(), pick_device(device), dtype or torch.float32)
    if _codec is None or settings != _codec_settings:
        from mucodec.codec import MuCodec

        _codec = MuCodec.from_pretrained(path_or_repo=settings[0], device=settings[1], dtype=settings[2],
                                         encoder_only=False, progress=True)
        _codec_settings = settings
    return _codec


def _generator(seed):
    import torch

    return None if seed is None else torch.Generator().manual_seed(int(seed))


def sound2code(audio, sample_rate: int | None = None, *, batch_size: int = DEFAULT_BATCH):
    """Encode music into MuCodec codes.

    audio: a file path (any format soundfile reads; resampled to 48 kHz, mono duplicated), or a
        float tensor/array (2, N), (1, N) or (N,) at `sample_rate` (default 48000).
    batch_size: 40.96 s chunks encoded at once (official: 3).
    Returns a LongTensor (1, 1, T) of codes in [0, 16384), T = int(N / 48000 * 25) + 1.
    """
    wav = _read_audio(audio) if isinstance(audio, (str, os.PathLike)) else _as_stereo(audio, sample_rate)
    return get_codec().sound2code(wav, batch_size=batch_size)


def code2sound(codes, *, num_steps: int = DEFAULT_STEPS_DECODE, guidance_scale: float = DEFAULT_GUIDANCE,
               prompt=None, seed: int | None = None):
    """Decode MuCodec codes into music.

    codes: LongTensor (1, 1, T) / (T,), or the path of a `.mct` token file (the output is then cut
        to the length of the audio it was made from).
    num_steps: flow-matching Euler steps (official code2sound: 20); guidance_scale: classifier-free
        guidance (1.5); prompt: optional reference audio (path or (2, N) tensor at 48 kHz, up to
        10.24 s used); seed: makes the result reproducible.
    Returns a float tensor (2, T * 1920): 48 kHz stereo.
    """
    import torch

    from mucodec.tokens import load_codes

    codec = get_codec()
    limit = None
    if isinstance(codes, (str, os.PathLike)):
        path = codes
        codes, header = load_codes(path)
        check_compatible(header, codec, path)
        limit = header["num_samples"]
    codes = torch.as_tensor(codes).long()
    codes = codes.reshape(1, 1, -1) if codes.ndim < 3 else codes
    if prompt is not None:
        prompt = _read_audio(prompt) if isinstance(prompt, (str, os.PathLike)) else _as_stereo(prompt, None)
    wav = codec.code2sound(codes, num_steps=num_steps, guidance_scale=guidance_scale, prompt=prompt,
                           generator=_generator(seed))
    return wav if limit is None else wav[:, :limit]


def sound2sound(audio, sample_rate: int | None = None, *, num_steps: int = DEFAULT_STEPS_RECONSTRUCT,
                guidance_scale: float = DEFAULT_GUIDANCE, prompt=None, seed: int | None = None,
                batch_size: int = DEFAULT_BATCH):
    """Encode then decode (the official sound2sound, 50 steps): returns (2, N) at 48 kHz, N as the input."""
    wav = _read_audio(audio) if isinstance(audio, (str, os.PathLike)) else _as_stereo(audio, sample_rate)
    codes = get_codec().sound2code(wav, batch_size=batch_size)
    return code2sound(codes, num_steps=num_steps, guidance_scale=guidance_scale, prompt=prompt,
                      seed=seed)[:, :wav.shape[-1]]


# ----------------------------------------------------------------------------------------------
# Command line


@dataclass
class Job:
    src: Path
    dst: Path
    kind: str  # "reconstruct" | "encode" | "decode"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="generate.py",
        description="MuCodec: compress 48 kHz stereo music to 0.35 kbit/s tokens and reconstruct it. "
                    "Audio inputs are reconstructed (encoded and decoded) into DIR/<name>.wav, or encoded "
                    f"into DIR/<name>{TOKEN_EXT} token files with --encode; token files are decoded into "
                    "DIR/<name>.wav. Without INPUT: the official demo, test_wav/test.wav -> reconstruct/test.wav "
                    "next to this script.",
        epilog="Weights: the three files of https://huggingface.co/MuCodec/mucodec in tools/, muq_dev/ and ckpt/ "
               "next to this script, or downloaded into the Hugging Face cache on first use. Output audio is "
               "48 kHz stereo 32-bit float WAV; existing outputs are never replaced without --overwrite. "
               "Exit status: 0 all done, 1 some input failed, 2 bad command line.",
    )
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="audio files, token files, folders (searched recursively for every format soundfile "
                        f"reads and {TOKEN_EXT} files) or glob patterns such as 'music/**/*.flac'")
    p.add_argument("-o", "--output", metavar="DIR", default=None,
                   help="output folder, created if missing; files found in a folder keep their sub-folders "
                        "(default: ./reconstruct, or reconstruct/ next to this script without INPUT)")
    p.add_argument("--encode", action="store_true",
                   help=f"only encode audio into {TOKEN_EXT} token files (loads only the encoder)")
    p.add_argument("--steps", type=int, default=None, metavar="N",
                   help=f"flow-matching steps (default: {DEFAULT_STEPS_RECONSTRUCT} to reconstruct audio, as the "
                        f"official sound2sound; {DEFAULT_STEPS_DECODE} to decode a token file, as the official "
                        "code2sound)")
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE, metavar="G",
                   help=f"classifier-free guidance scale (default: {DEFAULT_GUIDANCE})")
    p.add_argument("--seed", type=int, default=None,
                   help="random seed for the decoder's noise, applied to each file (default: random)")
    p.add_argument("--device", default="auto",
                   help="cuda, cuda:1, mps, cpu or auto: cuda, else mps, else cpu (default: auto)")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="compute precision; float16 and bfloat16 need a GPU (default: float32)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, metavar="N",
                   help=f"40.96 s chunks encoded at once; lower it if memory runs out (default: {DEFAULT_BATCH})")
    p.add_argument("--prompt", metavar="FILE", default=None,
                   help="reference audio whose first 10.24 s guide the decoder (official code2sound prompt)")
    p.add_argument("--ckpt", metavar="PATH_OR_REPO", default=None,
                   help="folder holding tools/audioldm_48k.pth, muq_dev/muq.pt and ckpt/mucodec.pt, or a hub "
                        f"repo id (default: the folder of this script if it holds them, else {HUB_REPO})")
    p.add_argument("--fast-vocoder", action="store_true",
                   help="run the vocoder once per mel frame instead of in the official overlapping chunks "
                        "(~2.5x less vocoder work, same audio up to float rounding; default: official chunks)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files (default: refuse)")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="print only errors (progress bars also stay off when stderr is not a terminal)")
    return p


def _expand_inputs(inputs: list[str], out_dir: Path) -> tuple[list[tuple[Path, Path]], list[tuple[str, str]]]:
    """INPUT arguments -> ([(file, output path relative to OUT without extension)], [(input, error)])."""
    import glob

    exts = audio_extensions() | {TOKEN_EXT}
    found, failed = [], []
    for arg in inputs:
        path = Path(arg)
        if path.is_dir():
            files = []
            for f in sorted(path.rglob("*")):
                rel = f.relative_to(path)
                if (f.is_file() and f.suffix.lower() in exts and not any(p.startswith(".") for p in rel.parts)
                        and not _is_within(f, out_dir)):
                    files.append((f, rel.with_suffix("")))
            if not files:
                failed.append((arg, f"The folder {arg} holds no audio or {TOKEN_EXT} files."))
            found += files
        elif path.exists():
            found.append((path, Path(path.stem)))
        elif any(c in arg for c in "*?["):
            files = [Path(f) for f in sorted(glob.glob(arg, recursive=True)) if Path(f).is_file()]
            if not files:
                failed.append((arg, f"The pattern {arg} matches no file."))
            found += [(f, Path(f.stem)) for f in files]
        else:
            failed.append((arg, f"{arg} does not exist."))
    return found, failed


def _is_within(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def _folder_problem(folder: Path) -> str | None:
    """Why `folder` cannot be used or created for outputs, or None (checked without creating it)."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return f"Cannot create the output folder {folder}: {probe} is a file."
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"Cannot create or write the output folder {folder}: {probe} is not writable."
    return None


def _make_folder(folder: Path) -> None:
    from mucodec.errors import MuCodecError

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MuCodecError(f"Cannot create the output folder {folder}: {e.strerror or e}.") from None


def plan(args, out_dir: Path) -> tuple[list[Job], list[tuple[str, str]]]:
    """Decide every output before loading the model, so that refusals cost nothing."""
    from mucodec.tokens import is_token_file

    found, failed = _expand_inputs(args.inputs, out_dir)
    jobs, claimed, seen = [], {}, set()
    for src, rel in found:
        key = src.resolve()
        if key in seen:
            continue
        seen.add(key)
        if is_token_file(src):
            if args.encode:
                failed.append((str(src), f"{src} is already a token file; --encode needs audio."))
                continue
            kind, ext = "decode", ".wav"
        else:
            kind, ext = ("encode", TOKEN_EXT) if args.encode else ("reconstruct", ".wav")
        dst = out_dir / rel.with_name(rel.name + ext)
        if dst.resolve() in claimed:
            failed.append((str(src), f"{src} would write {dst}, which {claimed[dst.resolve()]} already writes; "
                                     "rename one of them or run them separately."))
            continue
        if dst.resolve() == key:
            failed.append((str(src), f"{src} would be overwritten by its own output; choose another -o folder."))
            continue
        if dst.exists() and not args.overwrite:
            failed.append((str(src), f"{dst} already exists; pass --overwrite to replace it."))
            continue
        problem = _folder_problem(dst.parent)
        if problem:
            failed.append((str(src), problem))
            continue
        claimed[dst.resolve()] = src
        jobs.append(Job(src, dst, kind))
    return jobs, failed


def run_job(codec, job: Job, args, prompt) -> None:
    """Process one input; raises MuCodecError (or a bug) on failure, leaving no output behind."""
    from mucodec.tokens import load_codes, save_codes

    _make_folder(job.dst.parent)
    gen = _generator(args.seed)
    if job.kind == "decode":
        codes, header = load_codes(job.src)
        check_compatible(header, codec, job.src)
        wav = codec.code2sound(codes, num_steps=args.steps or DEFAULT_STEPS_DECODE, guidance_scale=args.guidance,
                               prompt=prompt, generator=gen, fast_vocoder=args.fast_vocoder)
        write_wav(job.dst, wav[:, :header["num_samples"]], codec.sample_rate)
        return
    wav = _read_audio(job.src)
    codes = codec.sound2code(wav, batch_size=args.batch_size)
    if job.kind == "encode":
        rate, channels = _file_info(job.src)
        save_codes(job.dst, codes, frame_rate=codec.frame_rate, codebook_size=codec.codebook_size,
                   sample_rate=codec.sample_rate, num_samples=wav.shape[-1], original_sample_rate=rate,
                   original_channels=channels, layer=codec.layer)
        return
    # Official sound2sound = sound2code then code2sound; done here so --batch-size applies to it.
    out = codec.code2sound(codes, num_steps=args.steps or DEFAULT_STEPS_RECONSTRUCT, guidance_scale=args.guidance,
                           prompt=prompt, generator=gen, fast_vocoder=args.fast_vocoder)
    write_wav(job.dst, out[:, :wav.shape[-1]], codec.sample_rate)


def _check_args(parser, args) -> None:
    import torch

    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be at least 1")
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    if args.encode and args.prompt:
        parser.error("--prompt guides the decoder; it has no effect with --encode")
    dev = pick_device(args.device)
    try:
        kind = torch.device(dev).type
    except RuntimeError:
        parser.error(f"unknown device {args.device!r} (use cuda, cuda:N, mps, cpu or auto)")
    if kind == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available on this machine (use --device cpu)")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        parser.error(f"--device {args.device}: MPS is not available on this machine (use --device cpu)")
    if kind == "cpu" and args.dtype != "float32":
        parser.error(f"--dtype {args.dtype} needs a GPU; use float32 on the CPU")
    args.device = dev


def main(argv=None, codec_factory=None) -> int:
    """Run the command line; returns the exit status. `codec_factory` (tests) replaces
    MuCodec.from_pretrained and takes the same keyword arguments."""
    try:
        return _main(argv, codec_factory)
    except KeyboardInterrupt:
        print("interrupted; files already finished are kept, the one in progress was not written", file=sys.stderr)
        return 130


def _main(argv, codec_factory) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    demo = not args.inputs
    if demo:
        args.inputs = [str(REPO / "test_wav" / "test.wav")]
    out_dir = Path(args.output) if args.output else (REPO / "reconstruct" if demo else Path("reconstruct"))
    if out_dir.exists() and not out_dir.is_dir():
        parser.error(f"-o {out_dir} is a file; it must name a folder")
    _check_args(parser, args)

    import torch
    from tqdm import tqdm

    from mucodec.errors import MuCodecError

    def say(msg):
        if not args.quiet:
            tqdm.write(msg, file=sys.stderr)

    progress = not args.quiet and sys.stderr.isatty()
    jobs, failed = plan(args, out_dir)
    done = []
    if jobs:
        try:
            prompt = _read_audio(args.prompt) if args.prompt else None
            if codec_factory is None:
                from mucodec.codec import MuCodec
                codec_factory = MuCodec.from_pretrained
            ckpt = args.ckpt or default_ckpt()
            say(f"loading MuCodec from {ckpt} on {args.device} ({args.dtype})")
            codec = codec_factory(path_or_repo=ckpt, device=args.device, dtype=getattr(torch, args.dtype),
                                  encoder_only=all(j.kind == "encode" for j in jobs), progress=progress)
        except MuCodecError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
        bar = tqdm(jobs, unit="file", desc="files", file=sys.stderr, disable=not progress or len(jobs) < 2)
        for job in bar:
            start = time.perf_counter()
            try:
                with torch.no_grad():
                    run_job(codec, job, args, prompt)
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
    if len(done) + len(failed) > 1 or failed:
        summary = f"{len(done)} done, {len(failed)} failed"
        if failed:
            summary += ":\n" + "\n".join(f"  {src}: {why}" for src, why in failed)
        if failed or not args.quiet:
            print(summary, file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
