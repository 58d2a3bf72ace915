#!/usr/bin/env python3
"""Peak memory of encoding or reconstructing one file, or of the decode job, as a user would run it.

    python3 tools/peak_memory.py --ckpt CKPT_DIR --seconds 180 --mode encode
    python3 tools/peak_memory.py --ckpt CKPT_DIR --seconds 3600 --mode reconstruct --stub-decoder
    python3 tools/peak_memory.py --ckpt CKPT_DIR --seconds 40 --mode decode --decode-batch 16 --songs 16 \
        --dit-blocks 2 --stub-vae

Writes a synthetic stereo 16-bit WAV of the given length (kept in --workdir for reuse), loads the
model from CKPT_DIR, runs ``encode_file`` or ``reconstruct_file`` and prints one JSON line: the
process's peak RSS after loading (``base_mib``), at the end (``peak_mib``), their difference
(``growth_mib``) and the size of the song as float32 stereo at 48 kHz (``audio_mib``). Run one
measurement per process: peak RSS never goes down.

``--stub-decoder`` replaces the flow decoder and the VAE + vocoder of each window by constant-cost
stand-ins, so the window schedule, the overlap-add and the streaming WAV writer can be measured on
hour-long songs in seconds; what the real stages use per window does not depend on the song's length.

``--mode decode`` runs the decode job (``library.decode_library``) over ``--songs`` songs of random codes at
``--decode-batch``. Only the DiT sees the batch (the VAE and vocoder run per song), so the batch's cost in
memory is the DiT's activations. With inference mode a block's temporaries are freed before the next block
runs, so that peak does not depend on the number of blocks: ``--dit-blocks K`` keeps the full-width DiT's
first K blocks, which measures it at a large batch in minutes instead of hours on a CPU; ``--stub-vae``
replaces the per-song VAE and vocoder by constant-cost stand-ins (measure them once, at batch 1, without).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mucodec import compress  # noqa: E402
from mucodec.codec import MuCodec  # noqa: E402
from mucodec.settings import DECODE_BATCH, DecodingOptions, EncodingOptions, JobOptions  # noqa: E402


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


class Sampler:
    """The largest RSS while the block runs (every 10 ms): unlike the lifetime peak, it is not hidden by
    memory freed before the block (the DiT blocks --dit-blocks drops)."""

    def __enter__(self):
        gc.collect()
        self.before = self.peak = rss_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, rss_mib())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mib())


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
    def decode_window(codes, true_latents, incontext, x0, opts, callback=None, check=True):
        return x0 + 0.01 * true_latents

    def latents_to_wave(latents, fast_vocoder=False, num_samples=None):
        frames = latents.shape[2] * codec.vae.cfg.downsampling
        return torch.full((2, frames * codec.vocoder.cfg.hop_length), 0.1) + latents.mean()

    codec.decode_window = decode_window
    codec.latents_to_wave = latents_to_wave


def stub_vae(codec: MuCodec) -> None:
    """A constant-cost stand-in for the VAE and vocoder of one window (the output's shape as the real one)."""
    def latents_to_wave(latents, fast_vocoder=False, num_samples=None):
        frames = latents.shape[2] * codec.vae.cfg.downsampling
        return torch.full((2, frames * codec.vocoder.cfg.hop_length), 0.1) + latents.mean()

    codec.latents_to_wave = latents_to_wave


def decode_job(codec: MuCodec, args, work: Path) -> None:
    from mucodec import library

    songs = work / "tokens"
    songs.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for k in range(args.songs):
        np.save(songs / f"s{k:04d}.npy", rng.integers(0, codec.codebook_size, int(args.seconds * 25) + 1))
    out = work / f"audio-{args.decode_batch}"
    library.decode_library([songs], out, DecodingOptions(num_steps=args.steps, seed=0, batch_size=args.decode_batch),
                           JobOptions(ckpt=args.ckpt, device="cpu", workers=0, overwrite=True), codec=codec)
    for f in out.rglob("*.flac"):
        f.unlink()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="checkpoint folder in the official layout")
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--mode", choices=("encode", "reconstruct", "decode"), required=True)
    p.add_argument("--songs", type=int, default=1, help="songs of the decode job")
    p.add_argument("--decode-batch", type=int, default=DECODE_BATCH)
    p.add_argument("--dit-blocks", type=int, default=None, help="keep only the DiT's first K blocks (decode)")
    p.add_argument("--stub-vae", action="store_true", help="stand-ins for the VAE and vocoder (decode)")
    p.add_argument("--steps", type=int, default=1, help="Euler steps per window when reconstructing")
    p.add_argument("--batch-size", type=int, default=None, help="encoder windows per batch (default: 3)")
    p.add_argument("--stub-decoder", action="store_true")
    p.add_argument("--workdir", default=None, help="where the song and the output go (default: a temporary folder)")
    args = p.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp())
    work.mkdir(parents=True, exist_ok=True)
    song = make_song(work / f"song_{args.seconds:g}s.wav", args.seconds) if args.mode != "decode" else None

    codec = MuCodec.from_pretrained(args.ckpt, device="cpu", encoder_only=args.mode == "encode",
                                    decoder_only=args.mode == "decode")
    if args.stub_decoder:
        stub_decoder(codec)
    if args.stub_vae:
        stub_vae(codec)
    if args.dit_blocks:
        blocks = codec.flow.estimator.transformer_blocks
        codec.flow.estimator.transformer_blocks = blocks[: args.dit_blocks]
        del blocks
        gc.collect()
    base = peak_mib()
    start = time.perf_counter()
    out = None
    job = None
    if args.mode == "decode":
        with Sampler() as job:
            decode_job(codec, args, work)
    elif args.mode == "encode":
        out = compress.encode_file(codec, song, work / "out.mct", EncodingOptions(batch_size=args.batch_size))
    else:
        out = compress.reconstruct_file(codec, song, work / "out.wav", DecodingOptions(num_steps=args.steps),
                                       EncodingOptions(batch_size=args.batch_size))
    result = dict(mode=args.mode, seconds=args.seconds, stub_decoder=args.stub_decoder, base_mib=round(base),
                  **(dict(songs=args.songs, decode_batch=args.decode_batch, steps=args.steps,
                          dit_blocks=args.dit_blocks, stub_vae=args.stub_vae, rss_before_job_mib=round(job.before),
                          rss_peak_in_job_mib=round(job.peak), job_growth_mib=round(job.peak - job.before))
                     if args.mode == "decode" else {}),
                  peak_mib=round(peak_mib()), growth_mib=round(peak_mib() - base),
                  audio_mib=round(args.seconds * 48000 * 2 * 4 / 2 ** 20), wall_s=round(time.perf_counter() - start, 1))
    if out is not None:
        out.unlink()
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
