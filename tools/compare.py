#!/usr/bin/env python3
"""Side-by-side table: the official code's timings beside tools/bench.py's, measured on one machine.

    python3 tools/compare.py OFFICIAL_TIMINGS.json BENCH.json [BENCH.json ...] [--steps 20]

OFFICIAL_TIMINGS.json is what the reference harness's timing script writes for the official code
(stages ``sound2code_40.96s``, ``dit_cfg_forward``, ``vae_decode_window``, ``vocoder_chunk_infer``);
each BENCH.json is a ``tools/bench.py --json`` file (run the vocoder with the same ``--vocoder-frames``).
A row's precision is the run's ``--dtype`` for the encoder and DiT and its ``--audioldm-dtype`` for the VAE and
vocoder; one composed window is printed per pair of those measured.
Prints a Markdown table, one row per stage and precision (memory used = peak RSS while the stage ran
minus RSS before it; a stage that first touches lazily loaded weights counts them), and one 40.96 s
window at ``--steps`` steps composed from the stages (steps x DiT step + VAE + vocoder of a full window; vocoder times of shorter
mels are scaled to 4096 frames: by vocoder calls for the official code, as its script does, and by
frames for the shared-overlap schedule).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mucodec.codec import CodecConfig  # noqa: E402
from mucodec.settings import CODE2SOUND_STEPS  # noqa: E402
from mucodec.vae import VAEConfig  # noqa: E402
from mucodec.vocoder import VocoderConfig  # noqa: E402

AUDIOLDM_STAGES = ("vae", "vocoder", "vocoder_official")
FULL_FRAMES = CodecConfig().window_latents * VAEConfig().downsampling  # mel frames of one window (4096)
PAIRS = [  # (bench stage, official item, label)
    ("sound2code", "sound2code_40.96s", "`sound2code`, 40.96 s stereo clip"),
    ("dit_step", "dit_cfg_forward", "one DiT guidance step (batch 2, full window)"),
    ("vae", "vae_decode_window", "VAE decode, one window"),
    ("vocoder_official", "vocoder_chunk_infer", "vocoder, {frames} frames, official chunks"),
    ("vocoder", "vocoder_chunk_infer", "vocoder, {frames} frames, shared overlaps (default)"),
]


def precision(run: dict, stage: str) -> str:
    """The precision a bench run measured ``stage`` in (files from before --audioldm-dtype ran it in float32)."""
    return run.get("audioldm_dtype", "float32") if stage in AUDIOLDM_STAGES else run["dtype"]


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("official")
    p.add_argument("bench", nargs="+")
    p.add_argument("--steps", type=int, default=CODE2SOUND_STEPS)
    args = p.parse_args(argv)
    official = json.loads(Path(args.official).read_text())
    ref = {it["name"]: it for it in official["items"]}
    runs = [json.loads(Path(b).read_text()) for b in args.bench]
    wav_shape = ref.get("vocoder_chunk_infer", {}).get("wav_shape")
    frames = wav_shape[-1] // VocoderConfig().hop_length if wav_shape else None
    rows = ["| stage | this repo in | official, float32 (s) | this repo (s) | speed-up | memory used official / this repo (GiB) |",
            "| --- | --- | --- | --- | --- | --- |"]
    # (stage, precision) -> result; a later file replaces an earlier one's measurement of the same stage
    results = {(stage, precision(run, stage)): r for run in runs for stage, r in run["stages"].items()}
    dtypes = sorted({d for _, d in results}, key=lambda d: d != "float32")
    for stage, item, label in PAIRS:
        if item not in ref:
            continue
        o = ref[item]
        for dtype in dtypes:
            r = results.get((stage, dtype))
            if r is None:
                continue
            rate = ""
            gflop = max((x.get("gflop", 0) for (st, _), x in results.items() if st == stage), default=0)
            peak = results.get(("gemm", dtype), {}).get("gflops")
            if gflop and peak:  # the work is the shapes' (the same in every run): the largest count is the full one
                rate = f" ({gflop / r['seconds']:.0f} GFLOP/s, {100 * gflop / r['seconds'] / peak:.0f} % of the {dtype} GEMM peak)"
            rows.append(f"| {label.format(frames=frames or '?')} | {dtype} | {o['seconds']:.1f} | {r['seconds']:.1f}{rate} "
                        f"| {o['seconds'] / r['seconds']:.2f}x | {o['rss_increase_gib']:.2f} / {r['rss_peak_gib'] - r['rss_before_gib']:.2f} |")
    out = "\n".join(rows)
    if {"dit_cfg_forward", "vae_decode_window", "vocoder_chunk_infer"} <= set(ref):
        o_win = args.steps * ref["dit_cfg_forward"]["seconds"] + ref["vae_decode_window"]["seconds"] + \
            ref["vocoder_chunk_infer"].get("extrapolated_full_window_s", ref["vocoder_chunk_infer"]["seconds"])
        lines = [f"One 40.96 s window at {args.steps} steps, composed: official float32 {o_win:.0f} s"]
        scale = FULL_FRAMES / frames if frames else 1.0
        for dit_dtype in dtypes:
            for audioldm_dtype in dtypes:
                dit = results.get(("dit_step", dit_dtype))
                vae, voc = results.get(("vae", audioldm_dtype)), results.get(("vocoder", audioldm_dtype))
                if None in (dit, vae, voc):
                    continue
                ours = args.steps * dit["seconds"] + vae["seconds"] + voc["seconds"] * scale
                lines.append(f"this repo with the DiT in {dit_dtype}" +
                             (f" and the VAE and vocoder in {audioldm_dtype}" if audioldm_dtype != "float32" else "") +
                             f" {ours:.0f} s ({o_win / ours:.2f}x)")
        out += "\n\n" + "; ".join(lines) + "."
    print(out)
    return out


if __name__ == "__main__":
    main()
