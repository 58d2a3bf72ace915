"""The numbers of a sweep (:mod:`mucodec.sweep`): each setting's decode time, its scores, the Pareto fronts,
and the table (``sweep.csv``, and printed).

Decode time: the wall time of a setting's decode job (the model is loaded before, and not counted) over the
seconds of audio it decoded, added up over the runs and shards that decoded something, in
``<setting>/timing-<job>.json``. Scores: the project's evaluation (:mod:`mucodec.evaluate`) of each decoded
song against its original, or without the evaluation extra the mel distance alone (:mod:`mucodec.metrics`).
"""
from __future__ import annotations

import csv
import importlib.util
import io
import json
import math
from pathlib import Path

from . import files
from .errors import MuCodecError
from .settings import JobOptions

DETAIL = 6  # songs with spectrograms in each setting's report.html (the sweep page has every player)
CSV_COLUMNS = ("setting", "sampler", "schedule", "steps", "guidance", "guidance_interval", "dit_passes_per_window",
               "songs",
               "audio_seconds", "decode_seconds", "decode_seconds_per_minute", "mel_distance", "visqol",
               "pareto_mel", "pareto_visqol")


# ---- decode time -----------------------------------------------------------------------------------
def timing_path(folder: Path, shard) -> Path:
    from .library.songs import job_tag

    return folder / f"timing-{job_tag(shard)}.json"


def record_time(folder: Path, shard, rep: dict) -> None:
    """Add this run's decode (wall seconds, seconds of audio) to the job's timing file; a run that decoded
    nothing leaves the recorded time as it is."""
    if not rep["songs"]["done"]:
        return
    path = timing_path(folder, shard)
    old = read_json(path) or {"wall_seconds": 0.0, "audio_seconds": 0.0}
    new = {"wall_seconds": old["wall_seconds"] + rep["wall_seconds"],
           "audio_seconds": old["audio_seconds"] + rep["hours_decoded"] * 3600}
    files.write_atomic(path, (json.dumps(new, indent=1) + "\n").encode())


def decode_time(folder: Path) -> tuple[float, float]:
    """(wall seconds, seconds of audio) of every job's decodes of this setting."""
    wall = audio = 0.0
    for f in sorted(folder.glob("timing-*.json")):
        t = read_json(f) or {}
        wall, audio = wall + float(t.get("wall_seconds", 0)), audio + float(t.get("audio_seconds", 0))
    return wall, audio


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


# ---- scores and the table ----------------------------------------------------------------------
def has_eval_extra() -> bool:
    from .evaluate import EXTRAS

    return all(importlib.util.find_spec(m) is not None for m in EXTRAS)


def score_setting(references: dict, folder: Path, job: JobOptions, say=lambda msg: None) -> list[dict]:
    """Rows (path, mel_distance, visqol, error) of the setting's songs against their references: the project's
    evaluation (metrics.csv, report.html in ``folder``), or without its extra the mel distance alone."""
    from . import evaluate, metrics
    from .audio import load_audio

    pairs = [evaluate.Pair(name, ref, str(folder / f"{name}.{job.audio_format}")) for name, ref in
             sorted(references.items()) if (folder / f"{name}.{job.audio_format}").is_file()]
    if not pairs:
        return []
    if has_eval_extra():
        done, todo = evaluate.scored_before(evaluate.Pairing(pairs), evaluate.read_rows(folder / "metrics.csv"))
        if not todo and (folder / "report.html").is_file():
            return [done[p.path] for p in pairs]  # nothing new: the evaluation's files stand as they are
        ev = evaluate.evaluate(evaluate.Pairing(pairs), folder, settings=read_json(folder / "fingerprint.json"),
                               workers=job.workers, detail=DETAIL, say=say)
        return ev.rows
    rows = []
    for p in pairs:
        try:
            ref, deg, _ = metrics.align(load_audio(p.ref), load_audio(p.deg))
            rows.append({"path": p.path, "mel_distance": metrics.mel_distance(ref, deg), "visqol": math.nan,
                         "error": ""})
        except MuCodecError as e:
            rows.append({"path": p.path, "mel_distance": math.nan, "visqol": math.nan, "error": str(e)})
    return rows


def mean_of(rows: list[dict], key: str) -> float:
    v = [r[key] for r in rows if not r["error"] and math.isfinite(r[key])]
    return sum(v) / len(v) if v else math.nan


def pareto(points: list[tuple[float, float]]) -> list[bool]:
    """Which (cost, loss) points no other point beats: another at most as costly and at most as lossy, and
    better in one of the two. A point with a NaN is on no front."""
    def beaten(a, b):
        return b[0] <= a[0] and b[1] <= a[1] and (b[0] < a[0] or b[1] < a[1])

    ok = [all(math.isfinite(v) for v in p) for p in points]
    return [ok[i] and not any(ok[j] and beaten(p, q) for j, q in enumerate(points)) for i, p in enumerate(points)]


def table_rows(out: Path, settings: list, job: JobOptions, references: dict, say=lambda msg: None) -> list[dict]:
    """One row per setting (:class:`mucodec.sweep.Setting`), CSV_COLUMNS."""
    rows, songs = [], {}
    for s in settings:
        folder = out / s.name
        songs[s.name] = score_setting(references, folder, job, say)
        wall, audio = decode_time(folder)
        o = s.options
        interval = "" if o.guidance_interval is None else "{:g}-{:g}".format(*o.guidance_interval)
        rows.append({"setting": s.name, "sampler": o.sampler, "schedule": o.schedule, "steps": o.num_steps,
                     "guidance": o.guidance_scale, "guidance_interval": interval,
                     "dit_passes_per_window": s.dit_passes, "songs": sum(not r["error"] for r in songs[s.name]),
                     "audio_seconds": audio, "decode_seconds": wall,
                     "decode_seconds_per_minute": 60 * wall / audio if audio else math.nan,
                     "mel_distance": mean_of(songs[s.name], "mel_distance"),
                     "visqol": mean_of(songs[s.name], "visqol")})
    cost = [r["decode_seconds_per_minute"] for r in rows]
    for key, sign in (("mel", 1), ("visqol", -1)):  # lower mel distance is better, higher ViSQOL
        front = pareto([(c, sign * r["mel_distance" if key == "mel" else "visqol"]) for c, r in zip(cost, rows)])
        for r, on in zip(rows, front):
            r[f"pareto_{key}"] = on
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: "" if isinstance(r[c], float) and math.isnan(r[c]) else r[c] for c in CSV_COLUMNS})
    files.write_atomic(path, buf.getvalue().encode("utf-8"))


def text_table(rows: list[dict]) -> str:
    lines = [f"{'setting':<28}{'DiT/window':>11}{'s/min':>9}{'mel dist.':>11}{'ViSQOL':>8}  front"]
    for r in rows:
        front = "*" if r["pareto_mel"] or r["pareto_visqol"] else ""
        lines.append(f"{r['setting']:<28}{r['dit_passes_per_window']:>11}{r['decode_seconds_per_minute']:>9.2f}"
                     f"{r['mel_distance']:>11.4f}{r['visqol']:>8.3f}  {front}")
    return "\n".join(lines)
