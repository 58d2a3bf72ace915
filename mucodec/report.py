"""report.html of an evaluation: one self-contained page (plots embedded as PNG), audio linked relatively.

It holds the summary, a ViSQOL histogram, the settings that made the reconstructions, a table of every song
(sortable by clicking a column head, each song linked to its two audio files) and, for the ``detail``
songs with the lowest ViSQOL, reference and reconstruction log-mel spectrograms on one colour scale, their
difference, and players. The cap keeps a page of hundreds of songs light, and is stated on the page.
"""
from __future__ import annotations

import base64
import html
import io
import math
import os
import urllib.parse
from pathlib import Path

from . import files, metrics
from .audio import load_audio

DETAIL = 24
DPI = 72  # thumbnails: a spectrogram triple is about 600 x 290 pixels
RANGE_DB = 80.0  # spectrogram colour range below the louder picture's peak
DIFF_DB = 20.0  # difference colour range, either way

LABELS = {"visqol": "ViSQOL", "mel_distance": "mel dist.", "stft_distance": "STFT dist.",
          "mid_side_stft_distance": "M/S STFT dist.", "si_sdr_db": "SI-SDR dB", "loudness_diff_lu": "loudness diff LU",
          "bitrate_bps": "bit/s"}

_SCRIPT = """
document.querySelectorAll('table.songs th').forEach((th, col) => th.addEventListener('click', () => {
  const body = th.closest('table').tBodies[0];
  const up = th.dataset.order !== 'up';
  th.closest('tr').querySelectorAll('th').forEach(h => delete h.dataset.order);
  th.dataset.order = up ? 'up' : 'down';
  const key = tr => { const v = tr.cells[col].dataset.v; const n = parseFloat(v);
                      return isNaN(n) ? (v || '') : n; };
  const rows = Array.from(body.rows).sort((a, b) => {
    const x = key(a), y = key(b);
    if (typeof x !== typeof y) return typeof x === 'number' ? -1 : 1;
    return (x < y ? -1 : x > y ? 1 : 0) * (up ? 1 : -1);
  });
  rows.forEach(r => body.appendChild(r));
}));
"""
STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: .5em 0 1.5em; }
td, th { padding: 2px 8px; border-bottom: 1px solid #ddd; text-align: right; }
td.name, th.name { text-align: left; } td { white-space: nowrap; }
table.songs th { cursor: pointer; background: #f4f4f4; }
th[data-order=up]::after { content: ' \\25B2'; } th[data-order=down]::after { content: ' \\25BC'; }
.song { margin: 1em 0 2em; } .song img { display: block; } .song audio { vertical-align: middle; height: 32px; } .err { color: #b00; } .note { color: #555; }
"""


def _embed(fig, fmt: str = "png") -> str:
    """The figure as a data URL. Spectrograms go as JPEG: as PNG, noise-like pictures take ~200 KB each."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=DPI, **({"pil_kwargs": {"quality": 80}} if fmt == "jpeg" else {}))
    plt.close(fig)
    return f"data:image/{fmt};base64," + base64.b64encode(buf.getvalue()).decode()


def _figure(*size):
    import matplotlib

    matplotlib.use("Agg")  # no display: the pictures only go into the page
    import matplotlib.pyplot as plt

    return plt.figure(figsize=size, layout="constrained")


def spectrogram_image(ref, deg, sample_rate: int = metrics.CODEC_SAMPLE_RATE) -> str:
    """Log-mel spectrograms of reference and reconstruction on one colour scale, and their difference."""
    r, d = metrics.log_mel(ref, sample_rate), metrics.log_mel(deg, sample_rate)
    n = min(r.shape[1], d.shape[1])
    r, d = 20 * r[:, :n], 20 * d[:, :n]  # log10 magnitude -> dB
    top = max(float(r.max()), float(d.max()))
    seconds = ref.shape[-1] / sample_rate
    fig = _figure(8.4, 4.0)
    axes = fig.subplots(3, 1, sharex=True)
    extent = (0, seconds, 0, r.shape[0])
    for ax, img, title in ((axes[0], r, "reference"), (axes[1], d, "reconstruction")):
        im = ax.imshow(img, origin="lower", aspect="auto", extent=extent, vmin=top - RANGE_DB, vmax=top,
                       cmap="magma", interpolation="nearest")
        ax.set_ylabel(title, fontsize=8)
    fig.colorbar(im, ax=axes[:2], label="dB", shrink=0.9)
    im = axes[2].imshow(d - r, origin="lower", aspect="auto", extent=extent, vmin=-DIFF_DB, vmax=DIFF_DB,
                        cmap="RdBu_r", interpolation="nearest")
    axes[2].set_ylabel("difference", fontsize=8)
    axes[2].set_xlabel("seconds (mel bands upward)", fontsize=8)
    fig.colorbar(im, ax=axes[2], label="dB")
    for ax in axes:
        ax.tick_params(labelsize=7)
        ax.set_yticks([])
    return _embed(fig, "jpeg")


def histogram_image(values: list[float]) -> str:
    fig = _figure(5.0, 2.4)
    ax = fig.subplots()
    ax.hist(values, bins=[1 + 0.1 * k for k in range(41)], color="#4a7ab5")
    ax.set_xlim(1, 5)
    ax.set_xlabel("ViSQOL (MOS-LQO)")
    ax.set_ylabel("songs")
    return _embed(fig)


def href(file: str, out: Path) -> str:
    rel = os.path.relpath(os.path.abspath(file), os.path.abspath(out))
    return html.escape(urllib.parse.quote(Path(rel).as_posix()))


def num(v, digits: int = 3) -> str:
    return "" if not isinstance(v, (int, float)) or math.isnan(v) else f"{v:.{digits}f}"


def _cell(v, digits: int = 3, cls: str = "") -> str:
    """A table cell whose data-v is what the column sorts by (empty for a missing number)."""
    if isinstance(v, (int, float)):
        key, text = ("" if math.isnan(v) else repr(float(v))), num(v, digits)
    else:
        key = text = str(v)
    attr = f" class={cls}" if cls else ""
    return f'<td{attr} data-v="{html.escape(key)}">{html.escape(text)}</td>'


def _summary_table(summary: dict) -> str:
    rows = ["<tr><th class=name>metric</th><th>n</th><th>mean</th><th>median</th><th>95 % CI of the mean</th></tr>"]
    for m, s in summary["metrics"].items():
        ci = f"{s['ci95'][0]:.3f} .. {s['ci95'][1]:.3f}" if s["n"] else ""
        rows.append(f"<tr><td class=name>{LABELS[m]}</td><td>{s['n']}</td><td>{num(s['mean'])}</td>"
                    f"<td>{num(s['median'])}</td><td>{ci}</td></tr>")
    return "<table>" + "".join(rows) + "</table>"


def _settings_table(settings: dict) -> str:
    if not settings:
        return "<p class=note>Not recorded: the reconstructions were evaluated as they were found.</p>"
    rows = []
    for k, v in sorted(settings.items()):
        text = ", ".join(f"{a}: {b}" for a, b in v.items()) if isinstance(v, dict) else str(v)
        rows.append(f"<tr><td class=name>{html.escape(str(k))}</td><td class=name>{html.escape(text)}</td></tr>")
    return "<table>" + "".join(rows) + "</table>"


def _songs_table(rows: list[dict], out: Path) -> str:
    heads = ["song", *LABELS.values(), "seconds", "audio", "error"]
    out_rows = []
    for r in rows:
        cells = [_cell(r["path"], cls="name")]
        cells += [_cell(r[m], 0 if m == "bitrate_bps" else 3) for m in LABELS]
        cells.append(_cell(r["ref_seconds"], 1))
        cells.append(f'<td class=name data-v=""><a href="{href(r["reference"], out)}">ref</a> '
                     f'<a href="{href(r["reconstruction"], out)}">rec</a></td>')
        cells.append(f'<td class="name err" data-v="{html.escape(r["error"])}">{html.escape(r["error"])}</td>')
        out_rows.append("<tr>" + "".join(cells) + "</tr>")
    head = "".join(f'<th{" class=name" if h in ("song", "audio", "error") else ""}>{html.escape(h)}</th>'
                   for h in heads)
    return f"<table class=songs><thead><tr>{head}</tr></thead><tbody>{''.join(out_rows)}</tbody></table>"


def _detail(row: dict, out: Path) -> str:
    try:
        ref, deg, _ = metrics.align(load_audio(row["reference"]), load_audio(row["reconstruction"]))
        picture = f'<img alt="log-mel spectrograms of {html.escape(row["path"])}" src="{spectrogram_image(ref, deg)}">'
    except Exception as e:  # a file changed since it was scored: the page still gets written
        picture = f"<p class=err>No spectrogram: {html.escape(str(e))}</p>"
    players = "".join(f'<div>{what} <audio controls preload=none src="{href(row[key], out)}"></audio></div>'
                      for what, key in (("reference", "reference"), ("reconstruction", "reconstruction")))
    return (f'<div class=song><h3>{html.escape(row["path"])} &mdash; ViSQOL {num(row["visqol"], 2)}, '
            f'mel distance {num(row["mel_distance"])}</h3>{picture}{players}</div>')


def render(ev, detail: int = DETAIL) -> str:
    """The page's HTML."""
    out, rows, summary = Path(ev.out), ev.rows, ev.summary
    scored = [r for r in rows if not r["error"]]
    chosen = sorted(scored, key=lambda r: (math.isnan(r["visqol"]), r["visqol"]))[:detail]
    visqols = [r["visqol"] for r in scored if math.isfinite(r["visqol"])]
    hist = f'<img alt="histogram of ViSQOL" src="{histogram_image(visqols)}">' if visqols else "<p>No ViSQOL.</p>"
    lists = "".join(f"<p class=err>{html.escape(what)}: {html.escape(', '.join(names[:100]))}"
                    f"{' ...' if len(names) > 100 else ''}</p>"
                    for what, names in (("References without a reconstruction", summary["missing"]),
                                        ("Reconstructions without a reference", summary["extra"])) if names)
    return f"""<!DOCTYPE html>
<html lang=en><head><meta charset=utf-8><title>MuCodec evaluation: {len(rows)} songs</title>
<style>{STYLE}</style></head><body>
<h1>MuCodec evaluation</h1>
<p>{html.escape(ev.verdict(where=False))}.</p>{lists}
<h2>Summary</h2>{_summary_table(summary)}
{hist}
<h2>Settings</h2>{_settings_table(summary["settings"])}
<p class=note>Alignment: both files read at 48 kHz stereo, a lag within &plusmn;10 ms undone where the waveforms
are clearly related, both cut to the shorter; no level matching (the loudness difference reports it).
Metric definitions: the module docstring of mucodec.metrics. SI-SDR is near meaningless for a generative codec.</p>
<h2>Songs</h2><p class=note>Click a column head to sort.</p>{_songs_table(rows, out)}
<h2>Detail</h2><p class=note>Spectrograms and players for the {len(chosen)} songs with the lowest ViSQOL, of
{len(scored)} scored (at most {detail} are shown, to keep the page light); every song is in the table above,
linked to its audio. Spectrograms: log-mel of the channel mean, reference and reconstruction on one colour
scale ({RANGE_DB:.0f} dB), then reconstruction minus reference (&plusmn;{DIFF_DB:.0f} dB).</p>
{''.join(_detail(r, out) for r in chosen)}
<script>{_SCRIPT}</script></body></html>
"""


def write_report(ev, detail: int = DETAIL) -> Path:
    """Write ``report.html`` into the evaluation's folder, atomically."""
    path = Path(ev.out) / "report.html"
    files.write_atomic(path, render(ev, detail).encode("utf-8"))
    return path
