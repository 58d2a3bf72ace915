#!/usr/bin/env python3
"""Benchmark MuCodec stage by stage on this machine.

    python3 tools/bench.py --ckpt .                      # real checkpoints in the official layout
    python3 tools/bench.py --synthetic                   # full-size synthetic weights, no download
    python3 tools/bench.py --synthetic --device cuda --dtype bfloat16 --stages dit_step,window --steps 20
    python3 tools/bench.py --synthetic --song-seconds 180 --stages song   # real-time factor of a 3-minute song
    python3 tools/bench.py --synthetic --stages decode --decode-batches 1,8 --steps 20 --device cuda

Stages (``--stages``, comma-separated; default all but ``song`` and ``decode``):

    gemm        the machine's matrix-multiply peak in --dtype (so "percent of peak" below is honest)
    load        MuCodec.from_pretrained
    sound2code  a 40.96 s stereo clip (--clip-seconds; the official encoder schedule)
    dit_step    one classifier-free-guidance DiT forward over a full window (batch 2 x 96 x 512 x 32)
    dit_row     one unguided DiT forward over a full window (batch 1: --guidance 1, or outside the interval)
    vae         VAE decode of one window's latents (2, 16, 512, 32) -> mel (2, 1, 4096, 256)
    vocoder     the vocoder of one window (4096 mel frames, 2 channels; --vocoder-frames), shared overlaps
    vocoder_official  the same with the official overlapping chunks
    window      code2sound of one 40.96 s window at --steps steps
    song        sound2sound of a --song-seconds song at --steps steps: real-time factor
    decode      the decode job (token files -> FLAC files) over --decode-songs songs of --decode-seconds, once per
                batch size of --decode-batches, at --steps steps: hours of audio per hour, windows/s, batch
                fill, peak memory (on a CPU use few steps and say so: a full-size DiT step takes minutes)

Each stage reports seconds (best of --repeat), GFLOP/s where the work is matrix products (FLOPs counted
once with torch's FLOP counter), the process's peak RSS while it ran (sampled every 10 ms), and the peak
CUDA memory on a GPU. ``--json FILE`` writes every number with the machine description, after each stage.
Benchmarks are not tests: they check nothing, they measure.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mucodec import files, kernels  # noqa: E402
from mucodec.codec import DTYPES, MuCodec, pick_device  # noqa: E402
from mucodec.settings import CODE2SOUND_STEPS, DecodingOptions, JobOptions  # noqa: E402

ALL_STAGES = ("gemm", "load", "sound2code", "dit_step", "dit_row", "vae", "vocoder", "vocoder_official", "window")
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE
    except OSError:  # not Linux: fall back to the lifetime peak
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Peak:
    """Peak RSS (and CUDA memory) while the block runs."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        gc.collect()
        self.before = self.peak = rss()
        self._stop = False
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def _watch(self):
        while not self._stop:
            self.peak = max(self.peak, rss())
            time.sleep(0.01)

    def __exit__(self, *exc):
        self._stop = True
        self._thread.join()
        self.peak = max(self.peak, rss())
        self.cuda = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeat: int = 1) -> dict:
    best, out = None, None
    with Peak(device) as p:
        for _ in range(repeat):
            sync(device)
            t = time.perf_counter()
            out = fn()
            sync(device)
            dt = time.perf_counter() - t
            best = dt if best is None else min(best, dt)
    gib = 2 ** 30
    result = dict(seconds=round(best, 3), rss_before_gib=round(p.before / gib, 2), rss_peak_gib=round(p.peak / gib, 2))
    if p.cuda is not None:
        result["cuda_peak_gib"] = round(p.cuda / gib, 2)
    return result, out


def _count_cpu_kernels() -> None:
    """torch's FLOP counter knows the CUDA attention kernels but counts the CPU one as free, which made
    the DiT's rate look 30 % lower than it is; count it like the others (2 matmuls of L x S x E). The same
    holds for oneDNN's linear, which the codec runs its float32 and bfloat16 CPU products through
    (mucodec/kernels.py)."""
    from torch.utils import flop_counter as fc

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None and op not in fc.flop_registry:
        @fc.register_flop_formula(op)
        def _sdpa_cpu(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
            return fc.sdpa_flop_count(query_shape, key_shape, value_shape)

    op = kernels.onednn_linear()
    if op is not None and op not in fc.flop_registry:
        @fc.register_flop_formula(op)
        def _onednn_linear(input_shape, weight_shape, *args, out_shape=None, **kwargs):
            rows = math.prod(input_shape[:-1])
            return 2 * rows * weight_shape[1] * weight_shape[0]


def flops_of(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    _count_cpu_kernels()
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def gemm_peak(device, dtype, size: int = 4096, repeat: int = 5) -> dict:
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    # through the codec's own product (oneDNN on the CPU: mucodec/kernels.py), so that the
    # percentages below compare a stage with the fastest product it could use
    kernels.linear(a, b).sum().item()  # warm-up (kernel selection, thread pool)
    best = float("inf")
    for _ in range(repeat):
        sync(device)
        t = time.perf_counter()
        kernels.linear(a, b)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return dict(seconds=round(best, 4), gflops=round(2 * size ** 3 / best / 1e9, 1), size=size)


def synthetic_folder(folder: Path) -> Path:
    """Full-size synthetic checkpoints in the official layout (the weights the tests use), made once."""
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import write_official_checkpoints

    folder.mkdir(parents=True, exist_ok=True)
    return write_official_checkpoints(folder)


def signal(seconds: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = int(seconds * 48000)
    t = torch.arange(n) / 48000
    x = 0.4 * torch.sin(2 * torch.pi * 220 * t) * (1 + torch.sin(2 * torch.pi * 0.5 * t))
    return torch.stack([x, 0.7 * x]) + 0.02 * torch.randn(2, n, generator=g)


def decode_job(codec, ckpt, device, dtype, args):
    """The decode job over random codes (the decoder's cost does not depend on their values), per batch size."""
    import tempfile

    import numpy as np

    from mucodec import library

    with tempfile.TemporaryDirectory() as tmp:
        songs = Path(tmp) / "tokens"
        songs.mkdir()
        rng = np.random.default_rng(0)
        for k in range(args.decode_songs):
            np.save(songs / f"s{k:04d}.npy", rng.integers(0, codec.codebook_size, int(args.decode_seconds * 25) + 1))
        for b in [int(x) for x in args.decode_batches.split(",")]:
            r, res = timed(lambda: library.decode_library(
                [songs], Path(tmp) / f"audio-{b}", DecodingOptions(num_steps=args.steps, seed=0, batch_size=b),
                JobOptions(ckpt=ckpt, device=str(device), dtype=dtype, audioldm_dtype=codec.audioldm_dtype,
                           workers=0), codec=codec), device)
            rep = res.report
            r.update(songs=rep["songs"]["done"], audio_hours=round(rep["hours_decoded"], 4),
                     hours_per_hour=rep["hours_per_hour"], windows=rep["windows"],
                     windows_per_second=rep["windows_per_second"], batch_fill=rep["batch_fill"], steps=args.steps)
            yield f"decode_b{b}", r


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="checkpoint folder in the official layout, or a hub repo id")
    src.add_argument("--synthetic", action="store_true", help="full-size synthetic weights (written once)")
    p.add_argument("--synthetic-dir", default=str(Path.home() / ".cache" / "mucodec" / "synthetic"),
                   help="where the synthetic checkpoints are kept (about 6 GB)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="precision of the flow decoder")
    p.add_argument("--audioldm-dtype", choices=tuple(DTYPES), default="float32",
                   help="precision of the VAE and vocoder (stages vae, vocoder, window, song, decode)")
    p.add_argument("--stages", default=",".join(ALL_STAGES))
    p.add_argument("--steps", type=int, default=CODE2SOUND_STEPS,
                   help="Euler steps for 'window' and 'song' (default: the official code2sound's)")
    p.add_argument("--song-seconds", type=float, default=180.0)
    p.add_argument("--clip-seconds", type=float, default=40.96, help="length of the 'sound2code' clip")
    p.add_argument("--vocoder-frames", type=int, default=None,
                   help="mel frames for 'vocoder' (default: one window, 4096; the official timing script uses 1792)")
    p.add_argument("--decode-songs", type=int, default=8, help="songs of the 'decode' stage")
    p.add_argument("--decode-seconds", type=float, default=180.0, help="length of each song of the 'decode' stage")
    p.add_argument("--decode-batches", default="1,4", help="--decode-batch values the 'decode' stage compares")
    p.add_argument("--gemm-size", type=int, default=4096, help="matrix side of 'gemm'")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    unknown = set(stages) - set(ALL_STAGES) - {"song", "decode"}
    if unknown:
        p.error(f"unknown stage(s) {', '.join(sorted(unknown))}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(pick_device(args.device))
    dtype = DTYPES[args.dtype]
    report = dict(machine=dict(platform=platform.platform(), processor=platform.processor() or platform.machine(),
                               cpu_threads=torch.get_num_threads(), torch=torch.__version__, device=str(device),
                               gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None),
                  dtype=args.dtype, audioldm_dtype=args.audioldm_dtype, steps=args.steps, stages={})

    def save():  # whole or not at all: another process may read the file while this one runs
        if args.json:
            files.write_atomic(args.json, (json.dumps(report, indent=2) + "\n").encode())

    def say(name, r):
        report["stages"][name] = r
        print(f"{name:>12}: " + ", ".join(f"{k}={v}" for k, v in r.items()), flush=True)
        save()  # after every stage, so a run killed at a time limit keeps what it measured

    if "gemm" in stages:
        say("gemm", gemm_peak(device, dtype, args.gemm_size))
        if dtype != torch.float32:
            say("gemm_float32", gemm_peak(device, torch.float32, args.gemm_size))
    ckpt = str(synthetic_folder(Path(args.synthetic_dir))) if args.synthetic else args.ckpt
    audioldm_dtype = DTYPES[args.audioldm_dtype]
    r, codec = timed(lambda: MuCodec.from_pretrained(ckpt, device=str(device), dtype=dtype,
                                                     audioldm_dtype=audioldm_dtype), device)
    if "load" in stages:
        say("load", r)
    codec.progress = False
    peak = report["stages"].get("gemm", {}).get("gflops")

    def with_rate(r, flops):
        r["gflop"] = round(flops / 1e9, 1)
        r["gflops"] = round(flops / r["seconds"] / 1e9, 1)
        if peak:
            r["percent_of_gemm_peak"] = round(100 * r["gflops"] / peak, 1)
        return r

    if "sound2code" in stages:
        clip = signal(args.clip_seconds)
        codec.sound2code(clip[:, : codec.sample_rate])  # warm-up: maps the encoder weights in
        say("sound2code", timed(lambda: codec.sound2code(clip), device, args.repeat)[0])

    c = codec.config
    lat = (1, codec.flow.cfg.latent_channels, c.window_latents, codec.flow.cfg.freq_bins)
    for name, rows in (("dit_step", 2), ("dit_row", 1)):
        if name not in stages:
            continue
        g = torch.Generator().manual_seed(0)
        x = torch.randn((rows, 3 * lat[1]) + lat[2:], generator=g).to(device)
        t = torch.full((rows,), 0.5, device=device)

        def step(x=x, t=t):
            with torch.inference_mode(), codec._autocast():
                return codec.flow.estimator(x, t)

        flops = flops_of(step)  # a full forward: also the warm-up
        say(name, with_rate(timed(step, device, args.repeat)[0], flops))

    if "vae" in stages:
        z = torch.randn(2, lat[1] // 2, lat[2], lat[3], generator=torch.Generator().manual_seed(1)).to(device)

        def vae():
            with torch.inference_mode(), codec._autocast(audioldm_dtype):
                return codec.vae.decode(z)

        r, mel = timed(vae, device, args.repeat)
        say("vae", r)
    else:
        mel = torch.randn(2, 1, lat[2] * codec.vae.cfg.downsampling, codec.vocoder.cfg.num_mels).to(device) * 0.5
    if args.vocoder_frames:
        reps = -(-args.vocoder_frames // mel.shape[2])
        mel = mel.repeat(1, 1, reps, 1)[:, :, : args.vocoder_frames]

    for name, share in (("vocoder", True), ("vocoder_official", False)):
        if name in stages:
            def voc(share=share):
                with torch.inference_mode(), codec._autocast(audioldm_dtype):
                    return codec.vocoder.vocode(mel, share_overlaps=share)

            say(name, timed(voc, device, args.repeat)[0])

    if "window" in stages:
        one = codec.sound2code(signal(40.96))[..., : c.window_codes]
        say("window", timed(lambda: codec.code2sound(one, num_steps=args.steps, seed=0), device)[0])
    if "song" in stages:
        song = signal(args.song_seconds, seed=2)
        r, _ = timed(lambda: codec.sound2sound(song, num_steps=args.steps, seed=0), device)
        r["real_time_factor"] = round(r["seconds"] / args.song_seconds, 3)
        say("song", r)

    if "decode" in stages:
        for name, r in decode_job(codec, ckpt, device, dtype, args):
            say(name, r)

    save()  # also when no stage ran
    return report


if __name__ == "__main__":
    main()
