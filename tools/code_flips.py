#!/usr/bin/env python3
"""How often the codes of the same audio differ between torch thread counts and batch compositions.

    python3 tools/code_flips.py --synthetic --work /tmp/flips            # every setting below, then the table
    python3 tools/code_flips.py --ckpt . --work /tmp/flips --settings t1-alone3,t2-alone3
    python3 tools/code_flips.py --work /tmp/flips --compare-only          # the table from runs already made

Music-like synthetic pieces (harmonic tones with envelopes, chords, bass, drum-like noise bursts, noise;
several styles, ~6 minutes; written to ``WORK/music.npz``, never to the repository) are encoded once per
setting, each setting in its own process so that its thread count is set before torch does any work:

    tN-aloneB     N torch threads; each song's windows in batches of B of its own (= sound2code(batch_size=B))
    tN-packedB    windows of consecutive songs packed into batches of exactly B (= the library's WindowPacker)
    tN-shuffledB  the windows in a fixed random order, batches of B: other batch mates, other batch positions

Each run keeps, per encoder window, the MuQ hidden states, z_e and the codes (the quantizer's own call).
The table compares pairs of runs on the codes that ``sound2code`` keeps: codes compared, codes differing,
and where the flips come from: the largest difference of the hidden states and of the normalised z_e,
the margin (second-best minus best distance, float64) at flipped positions, and how many flips a float64
nearest-neighbour search on each run's own z_e would leave. Measurements, not tests: they check nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from mucodec import files  # noqa: E402

SR = 48000
DEFAULT_SETTINGS = "t1-alone3,t2-alone3,t4-alone3,t8-alone3,t2-alone1,t2-packed3,t2-shuffled3"
DEFAULT_PAIRS = ("t1-alone3:t2-alone3,t2-alone3:t4-alone3,t2-alone3:t8-alone3,t1-alone3:t8-alone3,"
                 "t2-alone3:t2-alone1,t2-alone3:t2-packed3,t2-alone3:t2-shuffled3,t2-packed3:t2-shuffled3")


# ------------------------------------------------------------------------------------------------
# music-like audio
# ------------------------------------------------------------------------------------------------
def midi(n):
    return 440.0 * 2.0 ** ((np.asarray(n, dtype=np.float64) - 69) / 12)


def tone(f0, dur, rng, *, partials=8, rolloff=1.2, decay=2.0, attack=0.005, inharm=0.0, vibrato=0.0, saw=False):
    """One harmonic note: partials of 1/k^rolloff, higher partials decaying faster, a short attack."""
    t = np.arange(int(dur * SR)) / SR
    out = np.zeros_like(t)
    vib = 1 + vibrato * np.sin(2 * np.pi * 5.3 * t + rng.uniform(0, 6.3)) if vibrato else 1.0
    for k in range(1, partials + 1):
        fk = f0 * k * np.sqrt(1 + inharm * k * k)
        if fk >= SR / 2 - 1000:
            break
        amp = (1.0 / k if saw else 1.0 / k ** rolloff) * np.exp(-decay * (1 + 0.3 * k) * t)
        out += amp * np.sin(2 * np.pi * np.cumsum(fk * vib * np.ones_like(t)) / SR + rng.uniform(0, 6.3))
    env = np.minimum(1.0, t / attack) if attack > 0 else 1.0
    release = np.minimum(1.0, (dur - t) / 0.02)
    return out * env * release


def kick(rng):
    t = np.arange(int(0.35 * SR)) / SR
    f = 45 + 110 * np.exp(-t / 0.03)
    return np.sin(2 * np.pi * np.cumsum(f) / SR) * np.exp(-t / 0.12) + 0.05 * rng.standard_normal(t.size) * np.exp(-t / 0.005)


def snare(rng):
    t = np.arange(int(0.25 * SR)) / SR
    return 0.6 * rng.standard_normal(t.size) * np.exp(-t / 0.06) + 0.4 * np.sin(2 * np.pi * 190 * t) * np.exp(-t / 0.04)


def hat(rng, length=0.05):
    t = np.arange(int(length * SR)) / SR
    n = rng.standard_normal(t.size + 1)
    return np.diff(n) * 0.5 * np.exp(-t / (length / 3))


def pink(n, rng):
    spec = np.fft.rfft(rng.standard_normal(n))
    spec /= np.sqrt(np.maximum(np.arange(spec.size), 1.0))
    x = np.fft.irfft(spec, n)
    return x / (np.abs(x).max() + 1e-12)


def add(buf, x, at, pan=0.0, gain=1.0):
    """Mix mono ``x`` into stereo ``buf`` at second ``at`` with an equal-power pan in [-1, 1]."""
    i = int(at * SR)
    if i >= buf.shape[1]:
        return
    x = x[: buf.shape[1] - i] * gain
    a = (pan + 1) * np.pi / 4
    buf[0, i:i + x.size] += np.cos(a) * x
    buf[1, i:i + x.size] += np.sin(a) * x


def reverb(buf, rng, seconds=0.8, wet=0.25):
    n = int(seconds * SR)
    t = np.arange(n) / SR
    out = buf.copy()
    size = 1 << int(np.ceil(np.log2(buf.shape[1] + n)))
    for c in range(2):
        ir = rng.standard_normal(n) * np.exp(-t / (seconds / 5))
        ir /= np.sqrt((ir ** 2).sum())
        out[c] += wet * np.fft.irfft(np.fft.rfft(buf[c], size) * np.fft.rfft(ir, size), size)[: buf.shape[1]]
    return out


def drums(buf, rng, bpm, seconds, *, pattern="rock", gain=1.0):
    beat = 60.0 / bpm
    for b in range(int(seconds / beat)):
        at = b * beat
        if pattern == "four" or b % 2 == 0:
            add(buf, kick(rng), at, 0.0, 0.9 * gain)
        if pattern != "four" and b % 2 == 1 or pattern == "four" and b % 2 == 1:
            add(buf, snare(rng), at, 0.1, 0.5 * gain)
        for s in range(2):
            add(buf, hat(rng, 0.04 if s else 0.09), at + s * beat / 2, 0.4, (0.25 if s else 0.35) * gain)


PROGRESSIONS = [[0, 5, 7, 3], [0, 9, 5, 7], [2, 7, 0, 5], [0, 4, 9, 5]]


def piece(style: str, seconds: float, seed: int) -> np.ndarray:
    """One stereo piece (2, N) float32 in ``style``, peak 0.7."""
    rng = np.random.default_rng(seed)
    buf = np.zeros((2, int(seconds * SR)))
    key = 48 + int(rng.integers(0, 12))
    prog = PROGRESSIONS[seed % len(PROGRESSIONS)]
    bpm = {"ballad": 76, "rock": 132, "electronic": 124, "ambient": 60, "folk": 100, "jazz": 150, "choir": 70}[style]
    beat = 60.0 / bpm
    bar = 4 * beat
    for k in range(int(seconds / bar) + 1):
        root = key + prog[k % len(prog)]
        chord = [root, root + (3 if prog[k % len(prog)] in (2, 9) else 4), root + 7]
        t0 = k * bar
        if style == "ballad":
            for j, n in enumerate(chord + [root + 12]):
                add(buf, tone(midi(n), bar, rng, partials=10, decay=1.2, inharm=2e-4), t0 + 0.02 * j, -0.3 + 0.2 * j, 0.25)
            for s in range(4):
                add(buf, tone(midi(root - 12), beat, rng, partials=4, decay=2.5), t0 + s * beat, 0.0, 0.35)
            for s in range(8):
                n = chord[int(rng.integers(0, 3))] + 12 * int(rng.integers(1, 3))
                add(buf, tone(midi(n), beat / 2, rng, partials=6, decay=3.0), t0 + s * beat / 2, 0.3, 0.15)
        elif style == "rock":
            for s in range(8):
                x = sum(tone(midi(n - 12), beat / 2, rng, partials=12, saw=True, decay=0.5) for n in (root, root + 7, root + 12))
                add(buf, np.tanh(3 * x) * 0.3, t0 + s * beat / 2, -0.5 if s % 2 else 0.5)
            add(buf, tone(midi(root - 24), bar, rng, partials=5, decay=0.3), t0, 0.0, 0.4)
        elif style == "electronic":
            for s in range(16):
                n = chord[s % 3] + 12 * (1 + (s // 3) % 2)
                add(buf, tone(midi(n), beat / 4, rng, partials=20, saw=True, decay=4.0, attack=0.002), t0 + s * beat / 4,
                    np.sin(s), 0.18)
            add(buf, tone(midi(root - 12), bar, rng, partials=3, decay=0.2), t0, 0.0, 0.35)
        elif style == "ambient":
            for j, n in enumerate(chord + [root + 14]):
                add(buf, tone(midi(n + 12), bar + 1.0, rng, partials=6, decay=0.05, attack=0.8, vibrato=0.004),
                    t0, -0.6 + 0.4 * j, 0.2)
        elif style == "folk":
            for s in range(8):
                n = chord[[0, 1, 2, 1, 0, 2, 1, 2][s]] + 12
                add(buf, tone(midi(n), beat, rng, partials=14, rolloff=0.8, decay=3.5, attack=0.001, inharm=1e-4),
                    t0 + s * beat / 2, -0.2, 0.3)
            for s in range(16):
                add(buf, 0.3 * rng.standard_normal(int(0.03 * SR)) * np.hanning(int(0.03 * SR)), t0 + s * beat / 4, 0.5,
                    0.3)
            mel = chord[int(rng.integers(0, 3))] + 24
            add(buf, tone(midi(mel), 2 * beat, rng, partials=5, decay=0.8, vibrato=0.006, attack=0.05), t0, 0.2, 0.2)
        elif style == "jazz":
            for s in range(4):  # walking bass
                add(buf, tone(midi(root - 12 + [0, 4, 7, 9][s]), beat, rng, partials=5, decay=2.0), t0 + s * beat, 0.0, 0.4)
            for s in range(6):  # ride
                add(buf, hat(rng, 0.3), t0 + s * bar / 6 + (0.05 if s % 2 else 0.0), 0.5, 0.2)
            for j, n in enumerate([root + 4, root + 10, root + 14]):  # comping
                add(buf, tone(midi(n), beat * 1.5, rng, partials=9, decay=2.0, inharm=2e-4), t0 + beat * 1.5, -0.4, 0.18)
        elif style == "choir":
            for j, n in enumerate(chord):
                # a pulse train through three vowel-like formants
                f0 = midi(n + 12)
                x = tone(f0, bar, rng, partials=40, rolloff=0.0, decay=0.0, attack=0.3, vibrato=0.008)
                spec = np.fft.rfft(x)
                f = np.fft.rfftfreq(x.size, 1 / SR)
                shape = sum(np.exp(-((f - fc) / bw) ** 2) for fc, bw in ((700, 120), (1200, 150), (2600, 250)))
                add(buf, np.fft.irfft(spec * shape, x.size), t0, -0.5 + 0.5 * j, 0.5)
    if style in ("ballad", "rock", "folk"):
        drums(buf, rng, bpm, seconds, gain={"ballad": 0.4, "rock": 1.0, "folk": 0.3}[style])
    if style == "electronic":
        drums(buf, rng, bpm, seconds, pattern="four")
    if style == "ambient":
        for k in range(int(seconds / 6)):
            n = rng.standard_normal(int(4 * SR)) * np.hanning(int(4 * SR))
            add(buf, np.diff(n, prepend=0.0), 6 * k + rng.uniform(0, 2), rng.uniform(-1, 1), 0.05)
    buf = reverb(buf, rng, wet={"ambient": 0.6, "choir": 0.5}.get(style, 0.2))
    buf += 10 ** (-55 / 20) * np.stack([pink(buf.shape[1], rng), pink(buf.shape[1], rng)])
    fade = np.minimum(1.0, np.minimum(np.arange(buf.shape[1]), buf.shape[1] - np.arange(buf.shape[1])) / (0.5 * SR))
    buf *= fade
    return (buf * (0.7 / np.abs(buf).max())).astype(np.float32)


PIECES = [("ballad", 70.0), ("rock", 55.5), ("electronic", 85.0), ("ambient", 45.0), ("folk", 40.25),
          ("jazz", 62.0), ("choir", 50.0)]


def make_music(path: Path) -> dict:
    if path.is_file():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    songs = {f"{i}-{style}": piece(style, sec, seed=i) for i, (style, sec) in enumerate(PIECES)}
    np.savez(path, **songs)
    return songs


# ------------------------------------------------------------------------------------------------
# one setting, in its own process
# ------------------------------------------------------------------------------------------------
def parse_setting(name: str) -> tuple[int, str, int]:
    threads, rest = name.split("-", 1)
    order = rest.rstrip("0123456789")
    return int(threads[1:]), order, int(rest[len(order):])


def encode_setting(ckpt: str, music: Path, name: str, out: Path) -> None:
    threads, order, batch = parse_setting(name)
    import torch

    torch.set_num_threads(threads)
    from mucodec.codec import MuCodec

    codec = MuCodec.from_pretrained(ckpt, device="cpu", encoder_only=True)
    songs = make_music(music)
    windows, units = {}, []  # units: (song, window index) in the order they are encoded
    for s, wav in songs.items():
        w, count, num_codes = codec.encoder_windows(torch.from_numpy(wav))
        windows[s] = (w, num_codes)
        units += [(s, k) for k in range(count)]
    if order == "alone":
        batches = []
        for s in songs:
            mine = [u for u in units if u[0] == s]
            batches += [mine[i:i + batch] for i in range(0, len(mine), batch)]
    else:
        if order == "shuffled":
            units = [units[i] for i in np.random.default_rng(12345).permutation(len(units))]
        elif order != "packed":
            raise SystemExit(f"unknown order {order!r}")
        batches = [units[i:i + batch] for i in range(0, len(units), batch)]

    seen = []
    inner = codec.quantizer.encode

    def spy(z):
        codes, z_e = inner(z)
        seen.append((z.transpose(1, 2).clone(), z_e.clone(), codes.clone()))
        return codes, z_e

    codec.quantizer.encode = spy
    result = {}
    start = time.perf_counter()
    for b in batches:
        x = torch.cat([windows[s][0].batch(k, k + 1) for s, k in b])
        if len(b) < batch:  # the library pads its last batch with silent windows
            x = torch.cat([x, x.new_zeros((batch - len(b),) + tuple(x.shape[1:]))])
        codes = codec.encode_windows(x)
        hidden, z_e, spied = seen.pop()
        assert torch.equal(codes, spied)
        for i, (s, k) in enumerate(b):
            result[f"{s}/{k}"] = {"hidden": hidden[i].numpy(), "z_e": z_e[i].numpy(), "codes": codes[i, 0].numpy()}
    wall = time.perf_counter() - start
    keep = {s: n for s, (_, n) in windows.items()}
    flat = {f"{key}/{field}": v for key, d in result.items() for field, v in d.items()}
    np.savez(out, **flat, __keep__=json.dumps(keep), __meta__=json.dumps(
        {"setting": name, "threads": torch.get_num_threads(), "wall_seconds": wall, "torch": torch.__version__,
         "windows": len(result), "isa": torch.backends.cpu.get_cpu_capability()}))
    print(f"{name}: {len(result)} windows in {wall:.0f} s at {torch.get_num_threads()} threads", flush=True)


# ------------------------------------------------------------------------------------------------
# comparing runs
# ------------------------------------------------------------------------------------------------
def load_run(path: Path) -> dict:
    with np.load(path) as z:
        keep = json.loads(str(z["__keep__"]))
        meta = json.loads(str(z["__meta__"]))
        windows = {}
        for name in z.files:
            if name.startswith("__"):
                continue
            s, k, field = name.rsplit("/", 2)
            windows.setdefault((s, int(k)), {})[field] = z[name]
    return {"keep": keep, "meta": meta, "windows": windows}


def distances(z_e: np.ndarray, codebook: np.ndarray, dtype) -> np.ndarray:
    """The official distances (T, K) of z_e (D, T), both sides L2-normalised, in ``dtype``."""
    e = z_e.T.astype(dtype)
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    c = codebook.astype(dtype)
    c = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
    return (e * e).sum(1, keepdims=True) - 2 * e @ c.T + (c * c).sum(1)[None]


def normalised(z_e: np.ndarray) -> np.ndarray:
    e = z_e.T.astype(np.float64)
    return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)


def compare(a: dict, b: dict, codebook: np.ndarray) -> dict:
    compared = differing = differing64 = same_z = 0
    hidden_max = ze_max = e_max = 0.0
    margins, second = [], 0
    cpw = None
    for key, wa in a["windows"].items():
        wb = b["windows"][key]
        cpw = cpw or wa["codes"].size
        s, k = key
        kept = max(0, min(cpw, a["keep"][s] - k * cpw))
        if kept == 0:
            continue
        ca, cb = wa["codes"][:kept], wb["codes"][:kept]
        compared += kept
        hidden_max = max(hidden_max, float(np.abs(wa["hidden"][:kept] - wb["hidden"][:kept]).max()))
        ze_max = max(ze_max, float(np.abs(wa["z_e"][:, :kept] - wb["z_e"][:, :kept]).max()))
        e_max = max(e_max, float(np.abs(normalised(wa["z_e"][:, :kept]) - normalised(wb["z_e"][:, :kept])).max()))
        diff = np.nonzero(ca != cb)[0]
        differing += diff.size
        same_z += int(sum(np.array_equal(wa["z_e"][:, i], wb["z_e"][:, i]) for i in diff))
        if diff.size:
            d = distances(wa["z_e"][:, diff], codebook, np.float64)
            order = np.argsort(d, axis=1)
            margins += (d[np.arange(diff.size), order[:, 1]] - d[np.arange(diff.size), order[:, 0]]).tolist()
            second += int(sum(set(order[i, :2]) == {ca[i2], cb[i2]} for i, i2 in enumerate(diff)))
        c64a = distances(wa["z_e"][:, :kept], codebook, np.float64).argmin(1)
        c64b = distances(wb["z_e"][:, :kept], codebook, np.float64).argmin(1)
        differing64 += int((c64a != c64b).sum())
    return {"compared": compared, "differing": differing, "rate": differing / compared if compared else None,
            "flips_with_equal_z_e": same_z, "flips_between_best_two": second,
            "max_abs_hidden": hidden_max, "max_abs_z_e": ze_max, "max_abs_normalised_z_e": e_max,
            "flip_margins": sorted(margins), "differing_if_float64_search": differing64}


def margin_profile(run: dict, codebook: np.ndarray) -> dict:
    """Over every kept code of one run: how many have a best-vs-second margin below a few thresholds."""
    margins, cpw = [], None
    for (s, k), w in run["windows"].items():
        cpw = cpw or w["codes"].size
        kept = max(0, min(cpw, run["keep"][s] - k * cpw))
        if kept:
            d = distances(w["z_e"][:, :kept], codebook, np.float64)
            two = np.partition(d, 1, axis=1)[:, :2]
            margins.append(two[:, 1] - two[:, 0])
    m = np.concatenate(margins)
    return {"codes": int(m.size), **{f"below_{t:g}": int((m < t).sum()) for t in (1e-7, 1e-6, 1e-5, 1e-4, 1e-3)},
            "median": float(np.median(m))}


def codebook_of(ckpt: str) -> np.ndarray:
    from mucodec.codec import MuCodec

    codec = MuCodec.from_pretrained(ckpt, device="cpu", encoder_only=True)
    cb = codec.quantizer.codebook.weight.detach().numpy().copy()
    del codec
    return cb


def table(work: Path, ckpt: str, pairs: list[tuple[str, str]]) -> dict:
    codebook = codebook_of(ckpt)
    runs = {}
    report = {"runs": {}, "pairs": {}}
    for a, b in pairs:
        for n in (a, b):
            if n not in runs:
                runs[n] = load_run(work / f"{n}.npz")
                report["runs"][n] = runs[n]["meta"]
        report["pairs"][f"{a} vs {b}"] = compare(runs[a], runs[b], codebook)
    first = next(iter(runs))
    report["margins"] = {first: margin_profile(runs[first], codebook)}
    print("| settings | codes compared | codes differing | rate | max abs hidden | max abs z_e (normalised) "
          "| margins at flips | left by a float64 search |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in report["pairs"].items():
        m = ", ".join(f"{x:.1e}" for x in r["flip_margins"][:6]) + (" ..." if len(r["flip_margins"]) > 6 else "")
        rate = f"{r['rate']:.2e}" if r["differing"] else "0"
        print(f"| {name} | {r['compared']} | {r['differing']} | {rate} | {r['max_abs_hidden']:.2e} | "
              f"{r['max_abs_z_e']:.2e} ({r['max_abs_normalised_z_e']:.2e}) | {m or '-'} | "
              f"{r['differing_if_float64_search']} |")
    print(f"margins of {first}: {json.dumps(report['margins'][first])}")
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--ckpt", help="checkpoints in the official layout (a folder or hub repo id)")
    src.add_argument("--synthetic", action="store_true", help="full-size synthetic weights (written once)")
    p.add_argument("--synthetic-dir", default=str(Path.home() / ".cache" / "mucodec" / "synthetic"))
    p.add_argument("--work", required=True, help="folder for the audio, one .npz per setting and report.json")
    p.add_argument("--settings", default=DEFAULT_SETTINGS)
    p.add_argument("--pairs", default=DEFAULT_PAIRS, help="a:b pairs of settings to compare")
    p.add_argument("--compare-only", action="store_true", help="make no new runs")
    p.add_argument("--encode-one", help=argparse.SUPPRESS)  # internal: the child process of one setting
    args = p.parse_args(argv)
    if args.synthetic:
        sys.path.insert(0, str(ROOT / "tests"))
        from helpers import write_official_checkpoints

        Path(args.synthetic_dir).mkdir(parents=True, exist_ok=True)
        args.ckpt = str(write_official_checkpoints(Path(args.synthetic_dir)))
    if args.ckpt is None:
        p.error("pass --ckpt or --synthetic")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    music = work / "music.npz"
    if args.encode_one:
        encode_setting(args.ckpt, music, args.encode_one, work / f"{args.encode_one}.npz")
        return 0
    songs = make_music(music)
    print(f"{len(songs)} pieces, {sum(w.shape[1] for w in songs.values()) / SR / 60:.2f} min of audio", flush=True)
    if not args.compare_only:
        for name in args.settings.split(","):
            if (work / f"{name}.npz").is_file():
                continue
            threads = str(parse_setting(name)[0])
            env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
            subprocess.run([sys.executable, __file__, "--ckpt", args.ckpt, "--work", str(work), "--encode-one", name],
                           env=env, check=True)
    pairs = [tuple(x.split(":")) for x in args.pairs.split(",")]
    rep = table(work, args.ckpt, pairs)
    files.write_atomic(work / "report.json", json.dumps(rep, indent=2).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
