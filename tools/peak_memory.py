#!/usr/bin/env python3
"""Peak memory of encoding or reconstructing one file, as a user would run it.

    python3 tools/peak_memory.py --ckpt CKPT_DIR --seconds 180 --mode encode
    python3 tools/peak_memory.py --ckpt CKPT_DIR --seconds 3600 --mode reconstruct --stub-decoder

Writes a synthetic stereo 16-bit WAV of the given length (kept in --workdir for reuse), loads the
model from CKPT_DIR, runs ``encode_file`` or ``reconstruct_file`` and prints one JSON line: the
process's peak RSS after loading (``base_mib``), at the end (``peak_mib``), their difference
(``growth_mib``) and the size of the song as float32 stereo at 48 kHz (``audio_mib``). Run one
measurement per process: peak RSS never goes down.

``--stub-decoder`` replaces the flow decoder and the VAE + vocoder of each window by constant-cost
stand-ins, so the window schedule, the overlap-add and the streaming WAV writer can be measured on
hour-long songs in seconds; what the real stages use per window does not depend on the song's length.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mucodec.codec import MuCodec  # noqa: E402


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def make_song(path: Path, seconds: float, rate: int = 48000) -> Path:
    """A stereo 16-bit WAV of ``seconds``, written in blocks (never held whole)."""
    if path.exists():
        return path
    n = int(seconds * rate)
    tmp = path.with_suffix(".tmp.wav")
    with sf.SoundFile(tmp, "w", rate, 2, subtype="PCM_16") as f:
        for start in range(0, n, 1 << 20):
            t = np.arange(start, min(n, start + (1 << 20))) / rate
            x = 0.3 * np.sin(2 * np.pi * 220 * t) * (1 + 0.5 * np.sin(2 * np.pi * 0.3 * t))
            f.write(np.stack([x, 0.6 * x], 1))
    tmp.replace(path)
    return path


def stub_decoder(codec: MuCodec) -> None:
    """Constant-cost stand-ins for the model stages of one decoder window (shapes as the real ones)."""
    def decode_window(codes, true_latents, incontext, x0, opts, callback=None):
        return x0 + 0.01 * true_latents

    def latents_to_wave(latents, fast_vocoder=False):
        frames = latents.shape[2] * codec.vae.cfg.downsampling
        return torch.full((2, frames * codec.vocoder.cfg.hop_length), 0.1) + latents.mean()

    codec.decode_window = decode_window
    codec.latents_to_wave = latents_to_wave


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="checkpoint folder in the official layout")
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--mode", choices=("encode", "reconstruct"), required=True)
    p.add_argument("--steps", type=int, default=1, help="Euler steps per window when reconstructing")
    p.add_argument("--batch-size", type=int, default=None, help="encoder windows per batch (default: 3)")
    p.add_argument("--stub-decoder", action="store_true")
    p.add_argument("--workdir", default=None, help="where the song and the output go (default: a temporary folder)")
    args = p.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp())
    work.mkdir(parents=True, exist_ok=True)
    song = make_song(work / f"song_{args.seconds:g}s.wav", args.seconds)

    codec = MuCodec.from_pretrained(args.ckpt, device="cpu", encoder_only=args.mode == "encode")
    if args.stub_decoder:
        stub_decoder(codec)
    base = peak_mib()
    start = time.perf_counter()
    if args.mode == "encode":
        out = codec.encode_file(song, work / "out.mct", batch_size=args.batch_size)
    else:
        out = codec.reconstruct_file(song, work / "out.wav", batch_size=args.batch_size, num_steps=args.steps)
    result = dict(mode=args.mode, seconds=args.seconds, stub_decoder=args.stub_decoder, base_mib=round(base),
                  peak_mib=round(peak_mib()), growth_mib=round(peak_mib() - base),
                  audio_mib=round(args.seconds * 48000 * 2 * 4 / 2 ** 20), wall_s=round(time.perf_counter() - start, 1))
    out.unlink()
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
