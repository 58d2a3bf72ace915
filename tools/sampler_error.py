#!/usr/bin/env python3
"""Error of each flow solver against a fine solution of the same window's ODE, per DiT evaluation.

    python3 tools/sampler_error.py --tiny -o sampling/tiny
    python3 tools/sampler_error.py --synthetic /tmp/synthetic -o sampling/full --device cuda --smooth-time 8

Solves one decoder window (random codes, a 128-frame in-context prefix as every window after the
first has, official guidance 1.5) with each sampler at DiT evaluations 2..50, and once with a
fine reference (default: Heun at 500 steps, 1000 evaluations). Writes PREFIX.csv (weights, sampler,
evaluations, steps, relative L2 error of the latents, and with --audio the mel distance of the
decoded audio) and PREFIX.png (error against evaluations, log-log). Each row also carries the
reference's own error estimate: its distance to the same solver at half the steps.

``--smooth-time W`` adds a second set of rows on a copy of the DiT that reads only the time sinusoids
slower than W rad per unit of t (``tests/helpers.smooth_in_time``). Random weights read sin(1000 t) as
much as sin(t), so their velocity field is rough in t, unlike a trained one; the copy shows each
solver's order as a trained, smooth field would let it show. Neither is music: this measures the
solver, not the sound of trained weights, whose trajectories differ.

A measurement, not a test: it checks nothing. ``--tiny`` writes the tests' tiny checkpoints to a
temporary folder (same window of 512 x 32 latents, a DiT a few hundred weights wide).
"""
from __future__ import annotations

import argparse
import csv
import io
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mucodec import metrics, samplers  # noqa: E402
from mucodec.codec import MuCodec  # noqa: E402
from mucodec.files import write_atomic  # noqa: E402

FIELDS = ["weights", "sampler", "evaluations", "steps", "rel_l2_latents", "mel_distance", "reference",
          "reference_self_error", "seconds"]


def window_inputs(codec: MuCodec, frames: int, prefix: int, seed: int):
    """(z_q, in-context latents, noise, prefix frames) of one window of ``frames`` latent frames of random codes."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, codec.codebook_size, (1, 1, codec.config.codes_per_latent * frames), generator=g)
    z_q, _ = codec.quantizer.from_codes(codes.to(codec.device))
    shape = (1, codec.flow.cfg.latent_channels, frames, codec.flow.cfg.freq_bins)
    noise = [torch.randn(shape, generator=g).to(codec.device) for _ in range(2)]
    return z_q, noise[0], noise[1], prefix


def solve(codec, flow, inputs, sampler: str, steps: int, guidance: float) -> torch.Tensor:
    z_q, true_latents, noise, prefix = inputs
    with torch.inference_mode():
        return flow.sample(z_q, true_latents, true_latents.shape[2], prefix, noise, steps, guidance, sampler=sampler)


def rel_l2(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).norm() / ref.norm())


def audio_of(codec, latents: torch.Tensor) -> torch.Tensor:
    return codec.latents_to_wave(latents).cpu()


def measure(codec, flow, weights: str, args) -> list[dict]:
    """Rows of one set of weights: every sampler at every evaluation count it can make."""
    frames = args.frames or codec.config.window_latents
    prefix = args.prefix if args.prefix is not None else frames * codec.config.overlap_latents // codec.config.window_latents
    inputs = window_inputs(codec, frames, prefix, args.seed)
    ref_sampler, ref_steps = args.reference
    started = time.perf_counter()
    reference = solve(codec, flow, inputs, ref_sampler, ref_steps, args.guidance)
    coarse = solve(codec, flow, inputs, ref_sampler, ref_steps // 2, args.guidance)
    self_error = rel_l2(coarse, reference)
    print(f"{weights}: reference {ref_sampler}:{ref_steps} in {time.perf_counter() - started:.0f} s, "
          f"its distance to {ref_steps // 2} steps {self_error:.2e}", flush=True)
    ref_audio = audio_of(codec, reference) if args.audio else None
    rows = []
    for sampler in samplers.SAMPLERS:
        per_step = samplers.EVALUATIONS_PER_STEP[sampler]
        for evaluations in args.evals:
            if evaluations % per_step:
                continue
            started = time.perf_counter()
            x = solve(codec, flow, inputs, sampler, evaluations // per_step, args.guidance)
            seconds = time.perf_counter() - started
            mel = metrics.mel_distance(ref_audio, audio_of(codec, x)) if args.audio else None
            rows.append(dict(weights=weights, sampler=sampler, evaluations=evaluations,
                             steps=evaluations // per_step, rel_l2_latents=rel_l2(x, reference), mel_distance=mel,
                             reference=f"{ref_sampler}:{ref_steps}", reference_self_error=self_error,
                             seconds=round(seconds, 3)))
            print(f"  {sampler:5s} {evaluations:3d} evaluations: rel L2 {rows[-1]['rel_l2_latents']:.3e}"
                  + (f", mel {mel:.4f}" if mel is not None else ""), flush=True)
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row[k] is None else f"{row[k]:.6g}" if isinstance(row[k], float) else row[k])
                         for k in FIELDS})
    write_atomic(path, text.getvalue().encode())


def write_plot(path: Path, rows: list[dict], title: str) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(dict.fromkeys(r["weights"] for r in rows))
    fig, axes = plt.subplots(1, len(sets), figsize=(5.2 * len(sets), 4.2), squeeze=False, sharey=True)
    for ax, weights in zip(axes[0], sets):
        for sampler in samplers.SAMPLERS:
            pts = [(r["evaluations"], r["rel_l2_latents"]) for r in rows
                   if r["weights"] == weights and r["sampler"] == sampler]
            ax.loglog(*zip(*pts), marker="o", markersize=3, label=sampler)
        ref = next(r for r in rows if r["weights"] == weights)
        ax.axhline(ref["reference_self_error"], color="grey", linestyle=":", linewidth=1,
                   label="reference's own error (est.)")
        ax.set_title(weights, fontsize=10)
        ax.set_xlabel("DiT evaluations per window")
        ticks = sorted({r["evaluations"] for r in rows})
        ax.set_xticks(ticks, [str(e) for e in ticks], minor=False)
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("relative L2 error of the latents")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    write_atomic(path, png.getvalue())


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="checkpoint folder in the official layout")
    src.add_argument("--tiny", action="store_true", help="the tests' tiny checkpoints (written to a temp folder)")
    src.add_argument("--from-csv", metavar="CSV", help="only draw PREFIX.png again from a CSV this tool wrote")
    src.add_argument("--synthetic", metavar="DIR",
                     help="the tests' full-size synthetic checkpoints, written into DIR once (6 GB) and reused")
    p.add_argument("--device", default="cpu", help="where the flow decoder runs (float32 throughout)")
    p.add_argument("-o", "--output", required=True, help="output prefix: PREFIX.csv and PREFIX.png")
    p.add_argument("--evals", default="2,3,4,5,6,8,10,12,16,20,25,30,40,50",
                   help="DiT evaluations per window (Heun uses the even ones)")
    p.add_argument("--reference", default="heun:500", help="SAMPLER:STEPS of the fine solution")
    p.add_argument("--guidance", type=float, default=1.5)
    p.add_argument("--frames", type=int, default=None,
                   help="latent frames of the window (default: the codec's window, 512); fewer is faster")
    p.add_argument("--prefix", type=int, default=None,
                   help="in-context prefix frames (default: the official 128 of 512, in proportion)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smooth-time", type=float, default=None, metavar="W",
                   help="add rows on a copy of the DiT reading only time sinusoids slower than W rad per unit t")
    p.add_argument("--audio", action="store_true",
                   help="also decode every solution through the VAE and vocoder and give its mel distance")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = p.parse_args(argv)
    args.evals = sorted({int(e) for e in args.evals.split(",")})
    name, steps = args.reference.split(":")
    args.reference = (samplers.check_sampler(name), int(steps))
    return args


def title(frames, guidance: float, reference: str) -> str:
    return (f"one window of {frames} latent frames, guidance {guidance:g}, reference {reference} (steps). "
            "Solver error, not audio quality.")


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r.update(evaluations=int(r["evaluations"]), steps=int(r["steps"]), rel_l2_latents=float(r["rel_l2_latents"]),
                 reference_self_error=float(r["reference_self_error"]))
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.output)
    if args.from_csv:
        rows = read_csv(args.from_csv)
        write_plot(out.with_suffix(".png"), rows, title(args.frames, args.guidance, rows[0]["reference"]))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT / "tests"))
    import helpers

    if args.tiny:
        ckpt, size = helpers.write_tiny_checkpoints(Path(tempfile.mkdtemp())), "tiny"
    elif args.synthetic:
        Path(args.synthetic).mkdir(parents=True, exist_ok=True)
        ckpt, size = helpers.write_official_checkpoints(Path(args.synthetic)), "full-size synthetic"
    else:
        ckpt, size = args.ckpt, "given"
    codec = MuCodec.from_pretrained(ckpt, device=args.device, dtype=torch.float32)
    rows = measure(codec, codec.flow, f"{size} weights as drawn", args)
    if args.smooth_time is not None:
        smooth = helpers.smooth_in_time(codec.flow, args.smooth_time)
        rows += measure(codec, smooth, f"{size} weights, time sinusoids <= {args.smooth_time:g} rad", args)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_csv(out.with_suffix(".csv"), rows)
    try:
        import matplotlib  # noqa: F401  (the plot is drawn again from the CSV with --from-csv where it is)
    except ImportError:
        print(f"wrote {out.with_suffix('.csv')}; no plot: matplotlib is not installed (pip install matplotlib, "
              f"then --from-csv {out.with_suffix('.csv')}).")
        return
    write_plot(out.with_suffix(".png"), rows, title(args.frames or codec.config.window_latents, args.guidance,
                                                    rows[0]["reference"]))
    print(f"wrote {out.with_suffix('.csv')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
