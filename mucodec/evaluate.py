"""Evaluating reconstructions against their references: per-song metrics, a summary and a report.

    python -m mucodec.evaluate music/ reconstruct/           # existing pairs -> reconstruct/metrics.csv, ...
    python3 generate.py music/ -o reconstruct/ --evaluate      # reconstruct, then evaluate, in one go

Pairs: a reference folder and a reconstruction folder are matched by relative path without extension
(``music/a/b.flac`` with ``reconstruct/a/b.wav``); references without a reconstruction (missing) and
reconstructions without a reference (extra) are listed, never dropped silently. Two files also make one pair.
A token file ``<name>.mct`` beside the reconstruction (or under ``--tokens DIR``) gives the bitrate.

Output folder (the reconstruction folder unless ``-o``), each file written atomically:

    metrics.csv    one row per pair: every metric of :mod:`mucodec.metrics`, durations, lag, error
    summary.json   per metric: mean, median and a 95 % bootstrap interval of the mean; missing and extra
                   files; the settings that made the reconstructions
    report.html    :mod:`mucodec.report`

Resume: metrics.csv is committed every few pairs; a pair whose row there was made from the same files (sizes
and modification times) by the same metric code is not scored again. Metrics run in worker processes
(:class:`mucodec.workers.Reader`). Only this module and the report need the evaluation extra.
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import io
import json
import math
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import files, metrics, tokens
from .audio import audio_extensions, load_audio
from .errors import ArgumentError, MuCodecError, OutputError
from .listing import list_folder
from .workers import Reader, default_workers

METRICS_VERSION = 1  # bump when a metric's definition changes: older rows are then scored again
COMMIT_PAIRS, COMMIT_SECONDS = 10, 60.0
BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED = 2000, 0
EXTRAS = ("visqol", "numba", "matplotlib")
INSTALL = "pip install -r requirements-eval.txt (or pip install 'mucodec[eval]')"
COLUMNS = ("path", "reference", "reconstruction", "tokens", "ref_seconds", "deg_seconds", "compared_seconds",
           "lag_samples", *metrics.METRICS, "loudness_ref_lufs", "loudness_deg_lufs", "score_seconds", "error",
           "stamp", "version")
TEXT_COLUMNS = ("path", "reference", "reconstruction", "tokens", "error", "stamp")


def require_extras() -> None:
    """ArgumentError naming the install command when the evaluation extra is not installed."""
    missing = [m for m in EXTRAS if importlib.util.find_spec(m) is None]
    if missing:
        raise ArgumentError(f"Evaluation needs {', '.join(missing)}, which are not installed; run {INSTALL}.")


# ---- pairs --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pair:
    path: str  # the pair's name: relative path of the reference without extension
    ref: str
    deg: str
    tokens: str = ""  # token file of the reconstruction, "" if none

    def stamp(self) -> str:
        """Sizes and modification times of the pair's files: a row made from other files is stale."""
        parts = []
        for f in (self.ref, self.deg, self.tokens):
            try:
                st = os.stat(f) if f else None
            except OSError:
                st = None
            parts.append(f"{st.st_size}:{st.st_mtime_ns}" if st else "-")
        return "|".join(parts)


@dataclass
class Pairing:
    pairs: list
    missing: list = field(default_factory=list)  # references without a reconstruction
    extra: list = field(default_factory=list)  # reconstructions without a reference
    problems: list = field(default_factory=list)  # [(path, one sentence)]


def _by_name(folder: Path, exclude=None) -> tuple[dict, list]:
    listed, skipped = list_folder(folder, audio_extensions(), exclude=exclude)
    found, problems = {}, list(skipped)
    for f, rel in listed:
        key = rel.rsplit(".", 1)[0]
        if key in found:
            problems.append((str(f), f"{f} and {found[key]} have the same name but for the extension; "
                                      "keep one of them."))
            continue
        found[key] = f
    return found, problems


def token_file(folder, name: str) -> str:
    f = Path(folder) / (name + tokens.EXTENSION)
    return str(f) if f.is_file() else ""


def pair_inputs(ref, deg, token_dir=None) -> Pairing:
    """REF and DEG (two folders, or two files) -> the pairs, matched by relative path without extension."""
    ref, deg = Path(ref), Path(deg)
    for p in (ref, deg):
        if not p.exists():
            raise ArgumentError(f"{p} does not exist; give a folder or file of audio.")
    if ref.resolve() == deg.resolve():
        raise ArgumentError(f"{ref} is given as both reference and reconstruction; give the two folders (or files).")
    if ref.is_file() and deg.is_file():
        name = ref.stem
        tok = token_file(token_dir, name) if token_dir else token_file(deg.parent, deg.stem)
        return Pairing([Pair(name, str(ref), str(deg), tok)])
    if ref.is_file() or deg.is_file():
        raise ArgumentError(f"{ref} and {deg} must both be folders or both be files; give two of a kind.")
    refs, problems = _by_name(ref, exclude=deg)
    degs, more = _by_name(deg, exclude=ref)
    pairs = [Pair(k, str(refs[k]), str(degs[k]), token_file(token_dir or deg, k)) for k in sorted(refs) if k in degs]
    return Pairing(pairs, [str(refs[k]) for k in sorted(refs) if k not in degs],
                   [str(degs[k]) for k in sorted(degs) if k not in refs], problems + more)


# ---- scoring, in worker processes ---------------------------------------------------------------
def score(pair: Pair) -> dict:
    """Every metric of one pair (a module-level function: worker processes receive it by name)."""
    if multiprocessing.parent_process() is not None:  # one thread per worker: the workers fill the cores
        import numba

        numba.set_num_threads(1)
    start = time.perf_counter()
    ref, deg = load_audio(pair.ref), load_audio(pair.deg)
    row = metrics.measure(ref, deg)
    row["bitrate_bps"] = metrics.token_bitrate(pair.tokens) if pair.tokens else math.nan
    row["score_seconds"] = time.perf_counter() - start
    return row


def _row(pair: Pair, got: dict) -> dict:
    row = {c: math.nan for c in COLUMNS if c not in TEXT_COLUMNS}
    row.update(path=pair.path, reference=pair.ref, reconstruction=pair.deg, tokens=pair.tokens, error="",
               stamp=pair.stamp(), version=METRICS_VERSION)
    row.update({k: v for k, v in got.items() if k in row})
    return row


# ---- metrics.csv --------------------------------------------------------------------------------
def read_rows(path) -> dict[str, dict]:
    """metrics.csv -> {pair name: row}, numbers as floats (empty: NaN); {} if there is none."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise OutputError(f"Cannot read {path} ({e.strerror or e}); delete it to score every pair again.") from None
    rows = {}
    for raw in csv.DictReader(io.StringIO(text)):
        row = {c: raw.get(c) or "" for c in COLUMNS}
        for c in COLUMNS:
            if c not in TEXT_COLUMNS:
                try:
                    row[c] = float(row[c]) if row[c] != "" else math.nan
                except ValueError:
                    row[c] = math.nan
        rows[row["path"]] = row
    return rows


def write_rows(path, rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, COLUMNS, lineterminator="\n")
    w.writeheader()
    for row in rows:
        w.writerow({c: _cell(row.get(c)) for c in COLUMNS})
    files.write_atomic(path, buf.getvalue().encode("utf-8"))


def _cell(v):
    if isinstance(v, float):
        return "" if math.isnan(v) else repr(v)
    return "" if v is None else v


# ---- summary ------------------------------------------------------------------------------------
def bootstrap_interval(values, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED):
    """95 % percentile bootstrap interval of the mean of ``values`` (fixed seed: the same data, the same
    interval)."""
    v = np.asarray(values, dtype=np.float64)
    means = v[np.random.default_rng(seed).integers(0, len(v), (resamples, len(v)))].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def summarize(rows: list[dict]) -> dict:
    """{metric: {n, mean, median, ci95: [low, high]}} over the pairs scored without error (NaN left out)."""
    out = {}
    for m in metrics.METRICS:
        v = [r[m] for r in rows if not r["error"] and math.isfinite(r[m])]
        if not v:
            out[m] = {"n": 0, "mean": None, "median": None, "ci95": None}
            continue
        out[m] = {"n": len(v), "mean": float(np.mean(v)), "median": float(np.median(v)),
                  "ci95": list(bootstrap_interval(v))}
    return out


@dataclass
class Evaluation:
    out: Path
    rows: list
    summary: dict
    pairing: Pairing
    scored: int  # pairs scored in this run (the others were scored before)

    @property
    def failed(self) -> list:
        return [r for r in self.rows if r["error"]]

    def verdict(self, where: bool = True) -> str:
        """One line: what was done, the headline number, and (``where``) where the report is."""
        v = self.summary["metrics"]["visqol"]
        head = f"ViSQOL mean {v['mean']:.2f} (95 % CI {v['ci95'][0]:.2f}-{v['ci95'][1]:.2f})" if v["n"] else \
            "no pair scored"
        parts = [f"{len(self.rows) - len(self.failed)} pairs evaluated ({self.scored} scored now)"]
        for what, n in (("failed", len(self.failed)), ("missing a reconstruction", len(self.pairing.missing)),
                        ("extra", len(self.pairing.extra))):
            if n:
                parts.append(f"{n} {what}")
        return f"{', '.join(parts)}: {head}" + (f"; report {self.out / 'report.html'}" if where else "")

    def table(self) -> str:
        """The summary as a small text table."""
        lines = [f"{'metric':<24}{'n':>5}{'mean':>11}{'median':>11}   95 % CI of the mean"]
        for m, s in self.summary["metrics"].items():
            if s["n"]:
                lines.append(f"{m:<24}{s['n']:>5}{s['mean']:>11.4g}{s['median']:>11.4g}   "
                             f"{s['ci95'][0]:.4g} .. {s['ci95'][1]:.4g}")
            else:
                lines.append(f"{m:<24}{0:>5}{'-':>11}{'-':>11}")
        return "\n".join(lines)


# ---- a whole evaluation -------------------------------------------------------------------------
def _settings(out: Path, deg) -> dict:
    """What made the reconstructions, when the caller does not know: an earlier summary's, else a decode
    job's fingerprint.json."""
    for f, key in ((out / "summary.json", "settings"), (Path(deg) / "fingerprint.json", None)):
        try:
            data = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict):
            return (data.get(key) or {}) if key else data
    return {}


def evaluate(pairing: Pairing, out, *, settings: dict | None = None, workers: int | None = None,
             progress: bool = False, detail: int | None = None, say=lambda msg: None) -> Evaluation:
    """Score the pairs not scored yet, then write metrics.csv, summary.json and report.html into ``out``."""
    from tqdm.auto import tqdm

    from . import report

    require_extras()
    out = Path(out)
    if not pairing.pairs:
        raise ArgumentError("There is no pair of reference and reconstruction to evaluate"
                            + (f" ({len(pairing.missing)} references have no reconstruction)" if pairing.missing
                               else "") + "; check the two folders.")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"Cannot create the output folder {out}: {e.strerror or e}.") from None
    csv_path = out / "metrics.csv"
    rows, todo = scored_before(pairing, read_rows(csv_path))
    say(f"{len(pairing.pairs)} pairs: {len(rows)} scored before, {len(todo)} to score")
    workers = default_workers() if workers is None else workers

    def commit():
        write_rows(csv_path, [rows[p.path] for p in pairing.pairs if p.path in rows])

    bar = tqdm(total=len(todo), unit="song", desc="evaluate", file=sys.stderr, disable=not progress,
               dynamic_ncols=True)
    last, pending = time.monotonic(), 0
    try:
        for pair, got in Reader(score, todo, workers):
            rows[pair.path] = _row(pair, got)
            if "error" in got:
                say(f"failed {pair.path}: {got['error']}")
            elif not progress:
                say(f"{pair.path}: ViSQOL {got['visqol']:.2f}")
            bar.update(1)
            pending += 1
            if pending >= COMMIT_PAIRS or time.monotonic() - last >= COMMIT_SECONDS:
                commit()
                last, pending = time.monotonic(), 0
    except KeyboardInterrupt:
        commit()  # keep what was scored
        raise
    finally:
        bar.close()
    commit()
    ordered = [rows[p.path] for p in pairing.pairs]
    summary = _summary(pairing, ordered, settings or {})
    files.write_atomic(out / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    ev = Evaluation(out, ordered, summary, pairing, len(todo))
    report.write_report(ev, detail=report.DETAIL if detail is None else detail)
    return ev


def scored_before(pairing: Pairing, old: dict) -> tuple[dict, list]:
    """({path: row} of the pairs metrics.csv already holds for these very files, [the pairs to score])."""
    rows, todo = {}, []
    for p in pairing.pairs:
        row = old.get(p.path)
        # sizes and modification times to the nanosecond: files of another run are never taken for these
        if row and row["stamp"] == p.stamp() and row["version"] == METRICS_VERSION:
            rows[p.path] = row
        else:
            todo.append(p)
    return rows, todo


def _summary(pairing: Pairing, ordered: list, settings: dict) -> dict:
    return {
        "pairs": len(ordered), "failed": sum(1 for r in ordered if r["error"]),
        "missing": pairing.missing, "extra": pairing.extra,
        "problems": [{"path": p, "message": m} for p, m in pairing.problems],
        "metrics": summarize(ordered), "settings": settings,
        "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "seed": BOOTSTRAP_SEED, "interval": "percentile, of the mean"},
        "metrics_version": METRICS_VERSION,
    }


def print_result(ev: Evaluation, quiet: bool = False) -> None:
    """The failures, missing and extra files, the verdict line and the summary table, on stderr."""
    lines = [f"  {r['path']}: {r['error']}" for r in ev.failed]
    lines += [f"  {f}: no reconstruction" for f in ev.pairing.missing]
    lines += [f"  {f}: no reference" for f in ev.pairing.extra]
    lines += [f"  {p}: {m}" for p, m in ev.pairing.problems]
    if lines:
        print("\n".join(lines[:50]) + (f"\n  ... and {len(lines) - 50} more" if len(lines) > 50 else ""),
              file=sys.stderr)
    if lines or not quiet:
        print(ev.verdict(), file=sys.stderr)
    if not quiet:
        print(ev.table(), file=sys.stderr)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m mucodec.evaluate",
        description="Compare reconstructions with their references: folders matched by relative path without "
                    "extension (or two files). Writes metrics.csv, summary.json and report.html; pairs scored "
                    "before are not scored again.",
        epilog=f"Needs the evaluation extra: {INSTALL}. Exit status: 0 all pairs scored, 1 some pair failed "
               "or some reference has no reconstruction, 2 bad command line.")
    p.add_argument("reference", metavar="REF", help="folder (or file) of the original audio")
    p.add_argument("reconstruction", metavar="DEG", help="folder (or file) of the reconstructions")
    p.add_argument("-o", "--output", metavar="DIR", default=None,
                   help="where the results go (default: DEG, or the folder of DEG when it is a file)")
    p.add_argument("--tokens", metavar="DIR", default=None,
                   help="folder of <name>.mct token files, for the bitrate (default: beside the reconstructions)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help=f"processes computing metrics; 0 computes here (default: {default_workers()})")
    p.add_argument("--detail", type=int, default=None, metavar="N",
                   help="songs shown with spectrograms and players in the report, lowest ViSQOL first "
                        "(default: 24)")
    p.add_argument("-q", "--quiet", action="store_true", help="print only problems")
    args = p.parse_args(argv)
    if args.workers is not None and not 0 <= args.workers <= 256:
        p.error("--workers must lie in [0, 256]")
    if args.detail is not None and not 0 <= args.detail <= 10_000:
        p.error("--detail must lie in [0, 10000]")
    out = Path(args.output) if args.output else Path(args.reconstruction) if Path(args.reconstruction).is_dir() \
        else Path(args.reconstruction).parent
    progress = not args.quiet and sys.stderr.isatty()

    def say(msg):
        if not args.quiet and not progress:
            print(msg, file=sys.stderr)

    try:
        require_extras()
        pairing = pair_inputs(args.reference, args.reconstruction, args.tokens)
        deg = Path(args.reconstruction)
        ev = evaluate(pairing, out, settings=_settings(out, deg if deg.is_dir() else deg.parent),
                      workers=args.workers, progress=progress, detail=args.detail, say=say)
    except MuCodecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; the pairs already scored are kept in metrics.csv and not scored again",
              file=sys.stderr)
        return 130
    print_result(ev, args.quiet)
    return 1 if ev.failed or pairing.missing else 0


if __name__ == "__main__":
    sys.exit(main())
