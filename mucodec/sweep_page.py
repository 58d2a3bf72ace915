"""index.html of a sweep: one self-contained page, plots as inline SVG, audio linked relatively.

It holds, for each score (mel distance; ViSQOL where it was measured), the score of every setting against its
decode seconds per minute of audio, one point per setting, the Pareto front marked (filled, joined by a line);
the table of settings (each linked to its evaluation report); and a player for every song at every setting
beside its original. No script: the page shows the same in any browser, and prints.
"""
from __future__ import annotations

import html
import math
from pathlib import Path

from . import files
from .report import STYLE, href, num

WIDTH, HEIGHT = 640, 380  # the plot, in CSS pixels
MARGIN = (60, 20, 20, 50)  # left, right, top, bottom: room for the axis labels
TICKS = 5
FRONT, OTHER = "#d9531e", "#4a7ab5"
PLOTS = {"mel_distance": ("mel distance (lower is better)", "pareto_mel"),
         "visqol": ("ViSQOL (higher is better)", "pareto_visqol")}
_PAGE_STYLE = """
svg { background: #fff; border: 1px solid #ddd; margin: .5em 1em 1em 0; }
svg text { font: 11px system-ui, sans-serif; fill: #333; }
table.players audio { width: 180px; height: 28px; } td.front { color: #d9531e; font-weight: bold; }
"""


def _scale(lo: float, hi: float, a: float, b: float):
    """The map of [lo, hi] onto [a, b] (pixels); a flat range is widened so every point still lands inside."""
    if hi - lo < 1e-12 * max(1.0, abs(hi)):
        lo, hi = lo - 0.5 * max(abs(lo), 1.0), hi + 0.5 * max(abs(hi), 1.0)
    return lambda v: a + (v - lo) / (hi - lo) * (b - a), lo, hi


def _padded(values: list[float], low_at_zero: bool = False) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    pad = 0.08 * (hi - lo) if hi > lo else 0.0
    return (0.0 if low_at_zero else lo - pad), hi + pad


def plot(rows: list[dict], metric: str) -> str:
    """One SVG: ``metric`` of every setting against its decode seconds per minute, the front marked."""
    title, front_key = PLOTS[metric]
    pts = [(r["decode_seconds_per_minute"], r[metric], r) for r in rows
           if math.isfinite(r["decode_seconds_per_minute"]) and math.isfinite(r[metric])]
    if not pts:
        return f"<p class=note>No setting has both a decode time and a {html.escape(title)}.</p>"
    left, right, top, bottom = MARGIN
    fx, x0, x1 = _scale(*_padded([p[0] for p in pts], low_at_zero=True), left, WIDTH - right)
    fy, y0, y1 = _scale(*_padded([p[1] for p in pts]), HEIGHT - bottom, top)
    parts = [f'<line x1="{left}" y1="{HEIGHT - bottom}" x2="{WIDTH - right}" y2="{HEIGHT - bottom}" stroke="#888"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{HEIGHT - bottom}" stroke="#888"/>']
    for k in range(TICKS + 1):
        xv, yv = x0 + (x1 - x0) * k / TICKS, y0 + (y1 - y0) * k / TICKS
        parts.append(f'<text x="{fx(xv):.1f}" y="{HEIGHT - bottom + 15}" text-anchor="middle">{xv:.3g}</text>')
        parts.append(f'<text x="{left - 5}" y="{fy(yv) + 4:.1f}" text-anchor="end">{yv:.3g}</text>')
    parts.append(f'<text x="{(left + WIDTH - right) / 2}" y="{HEIGHT - 8}" text-anchor="middle">'
                 "decode seconds per minute of audio</text>")
    parts.append(f'<text transform="translate(14 {(top + HEIGHT - bottom) / 2}) rotate(-90)" '
                 f'text-anchor="middle">{html.escape(title)}</text>')
    front = sorted((p for p in pts if p[2][front_key]), key=lambda p: p[0])
    if len(front) > 1:
        line = " ".join(f"{fx(x):.1f},{fy(y):.1f}" for x, y, _ in front)
        parts.append(f'<polyline class="front" points="{line}" fill="none" stroke="{FRONT}" stroke-width="1.5"/>')
    for x, y, r in pts:
        on = r[front_key]
        name = html.escape(r["setting"])
        parts.append(f'<circle class="point" data-setting="{name}" data-front="{str(on).lower()}" cx="{fx(x):.1f}" '
                     f'cy="{fy(y):.1f}" r="{6 if on else 4}" fill="{FRONT if on else OTHER}">'
                     f"<title>{name}: {x:.3g} s/min, {y:.4g}</title></circle>")
        if on:  # the others are named by their tooltip and the table: labels of close points would overlap
            parts.append(f'<text x="{fx(x) + 7:.1f}" y="{fy(y) - 5:.1f}">{name}</text>')
    return (f'<svg class="plot" data-metric="{metric}" width="{WIDTH}" height="{HEIGHT}" '
            f'viewBox="0 0 {WIDTH} {HEIGHT}" '
            f'xmlns="http://www.w3.org/2000/svg" role="img" aria-label="{html.escape(title)}">{"".join(parts)}</svg>')


def _settings_table(rows: list[dict], out: Path) -> str:
    heads = ("setting", "DiT passes / window", "s / min of audio", "mel distance", "ViSQOL", "front", "songs",
             "report")
    body = []
    for r in rows:
        report = out / r["setting"] / "report.html"
        link = f'<a href="{href(str(report), out)}">report</a>' if report.is_file() else ""
        front = " ".join(w for w, k in (("mel", "pareto_mel"), ("ViSQOL", "pareto_visqol")) if r[k])
        body.append(f"<tr><td class=name>{html.escape(r['setting'])}</td><td>{r['dit_passes_per_window']}</td>"
                    f"<td>{num(r['decode_seconds_per_minute'], 2)}</td><td>{num(r['mel_distance'], 4)}</td>"
                    f"<td>{num(r['visqol'], 3)}</td><td class=front>{front}</td><td>{r['songs']}</td>"
                    f"<td class=name>{link}</td></tr>")
    head = "".join(f'<th{" class=name" if h in ("setting", "report") else ""}>{html.escape(h)}</th>' for h in heads)
    return f"<table class=settings><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _players(rows: list[dict], references: dict, out: Path, audio_format: str) -> str:
    """A row per song: its original, then its decode at every setting (an empty cell where there is none)."""
    head = "<th class=name>song</th><th>original</th>" + "".join(
        f"<th>{html.escape(r['setting'])}</th>" for r in rows)
    body = []
    for name, ref in sorted(references.items()):
        cells = [f"<td class=name>{html.escape(name)}</td>",
                 f'<td><audio controls preload=none src="{href(ref, out)}"></audio></td>']
        for r in rows:
            f = out / r["setting"] / f"{name}.{audio_format}"
            cells.append(f'<td><audio class=decoded data-setting="{html.escape(r["setting"])}" controls '
                         f'preload=none src="{href(str(f), out)}"></audio></td>' if f.is_file() else "<td></td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table class=players><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def render(out: Path, rows: list[dict], references: dict, audio_format: str) -> str:
    plots = "".join(plot(rows, m) for m in PLOTS if any(math.isfinite(r[m]) for r in rows))
    untimed = [r["setting"] for r in rows if not math.isfinite(r["decode_seconds_per_minute"])]
    note = (f"<p class=note>No decode time recorded (decoded before timing was kept) for: "
            f"{html.escape(', '.join(untimed))}.</p>" if untimed else "")
    return f"""<!DOCTYPE html>
<html lang=en><head><meta charset=utf-8><title>MuCodec sweep: {len(rows)} settings, {len(references)} songs</title>
<style>{STYLE}{_PAGE_STYLE}</style></head><body>
<h1>MuCodec sweep</h1>
<p>{len(rows)} settings, {len(references)} songs. Each point is one setting: its mean score over the songs
against the wall time of its decode per minute of audio on this machine (model loading not counted). Filled
points joined by a line form the Pareto front: no other setting is both at least as fast and at least as
good. The scores compare each decode with its original; they measure these weights on this music.</p>
{plots}{note}
<h2>Settings</h2>{_settings_table(rows, out)}
<h2>Listen</h2><p class=note>Every song at every setting, beside its original.</p>
{_players(rows, references, out, audio_format)}
</body></html>
"""


def write_page(out, rows: list[dict], references: dict, audio_format: str) -> Path:
    """Write ``index.html`` into the sweep's folder, atomically."""
    out = Path(out)
    path = out / "index.html"
    files.write_atomic(path, render(out, rows, references, audio_format).encode("utf-8"))
    return path
