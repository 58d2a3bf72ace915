"""The sweep: every setting decoded from one encode, scored, timed, tabled and shown, resumably (tiny models)."""
from __future__ import annotations

import csv
import json
import math
import subprocess
import urllib.parse

import pytest
import soundfile as sf

pytest.importorskip("visqol", reason="the evaluation extra is not installed (pip install -r requirements-eval.txt)")

from mucodec import library, sweep, sweep_score  # noqa: E402
from test_evaluate import SR, browser, music  # noqa: E402

SONGS = {"a": 2.0, "sub/b": 2.5}  # name -> seconds
GRID = ["--steps", "1", "--sampler", "euler,heun", "--guidance", "1.5"]
SETTINGS = {"euler-1steps-g1.5": 2, "heun-1steps-g1.5": 4}  # DiT passes per window: evaluations x 2 (guided)


def run(music_dir, out, ckpt, *extra, quiet=True):
    return sweep.main([str(music_dir), "-o", str(out), "--ckpt", str(ckpt), "--device", "cpu", "--workers", "0",
                       *GRID, *extra, *(["-q"] if quiet else [])])


@pytest.fixture(scope="module")
def swept(tmp_path_factory, tiny_ckpt_dir):
    root = tmp_path_factory.mktemp("sweep")
    music_dir, out = root / "music", root / "out"
    for k, (name, seconds) in enumerate(SONGS.items()):
        (music_dir / name).parent.mkdir(parents=True, exist_ok=True)
        sf.write(music_dir / f"{name}.wav", music(seconds, k).T.numpy(), SR)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sweep_score, "DETAIL", 0)  # no spectrograms in the per-setting reports: seconds of matplotlib each
        assert run(music_dir, out, tiny_ckpt_dir) == 0
    return music_dir, out


def table(out) -> dict:
    with open(out / "sweep.csv", newline="") as f:
        return {r["setting"]: r for r in csv.DictReader(f)}


def test_every_setting_decodes_every_song_and_gets_one_row(swept):
    _, out = swept
    rows = table(out)
    assert list(rows) == list(SETTINGS)  # one row per setting, in grid order
    for name, passes in SETTINGS.items():
        for song, seconds in SONGS.items():
            assert sf.info(out / name / f"{song}.flac").duration == seconds
        r = rows[name]
        assert int(r["dit_passes_per_window"]) == passes and int(r["songs"]) == len(SONGS)
        assert float(r["audio_seconds"]) == pytest.approx(sum(SONGS.values()), abs=1e-3)
        for key in ("decode_seconds", "decode_seconds_per_minute", "mel_distance", "visqol"):
            assert math.isfinite(float(r[key])) and float(r[key]) > 0
        timing = json.loads((out / name / "timing-all.json").read_text())
        assert float(r["decode_seconds_per_minute"]) == pytest.approx(
            60 * timing["wall_seconds"] / timing["audio_seconds"])
        # the scores are the project's evaluation of this folder against the originals
        with open(out / name / "metrics.csv", newline="") as f:
            mel = [float(m["mel_distance"]) for m in csv.DictReader(f)]
        assert len(mel) == len(SONGS) and float(r["mel_distance"]) == pytest.approx(sum(mel) / len(mel))
    # one encode for every setting; one seed for every setting
    assert json.loads((out / "tokens" / "report.json").read_text())["songs"]["done"] == len(SONGS)
    assert {json.loads((out / n / "fingerprint.json").read_text())["seed"] for n in SETTINGS} == {sweep.SEED}


def test_the_grid_names_every_setting_by_what_it_varies():
    grid = sweep.SweepOptions(steps=(8,), samplers=("ab2",), guidances=(1.0, 1.5), intervals=(None, (0.2, 0.8)),
                              schedules=("uniform", "cosine"))
    names = [s.name for s in grid.settings()]
    assert len(set(names)) == 8 and "ab2-8steps-g1.5-gi0.2-0.8-cosine" in names and "ab2-8steps-g1" in names
    passes = {s.name: s.dit_passes for s in grid.settings()}
    # 8 steps meet t = k/8; [0.2, 0.8] holds k = 2..6 (5 guided); the cosine grid's 1 - cos(pi k/16) holds k = 4..6
    assert passes["ab2-8steps-g1.5"] == 16 and passes["ab2-8steps-g1.5-gi0.2-0.8"] == 13
    assert passes["ab2-8steps-g1.5-gi0.2-0.8-cosine"] == 11 and passes["ab2-8steps-g1-cosine"] == 8


def test_pareto_front_by_hand():
    # (cost, loss): (3, 4) is beaten by (2, 3); equal points beat neither; a NaN is on no front
    points = [(1, 5), (2, 3), (3, 4), (4, 1), (2, 3), (5, math.nan), (6, 1)]
    assert sweep_score.pareto(points) == [True, True, False, True, True, False, False]


def test_a_rerun_decodes_nothing_and_keeps_the_times(swept, tiny_ckpt_dir, capsys):
    music_dir, out = swept
    audio = sorted(out.glob("*/**/*.flac"))
    before = {f: f.stat().st_mtime_ns for f in audio}
    timings = {n: (out / n / "timing-all.json").read_text() for n in SETTINGS}
    rows = table(out)
    capsys.readouterr()
    assert run(music_dir, out, tiny_ckpt_dir, quiet=False) == 0
    err = capsys.readouterr().err
    assert "loading the MuCodec decoder" not in err and "0 to encode" in err
    assert err.count(f"{len(SONGS)} already done, 0 failed earlier, 0 to decode") == len(SETTINGS)
    assert {f: f.stat().st_mtime_ns for f in audio} == before
    for n in SETTINGS:
        assert json.loads((out / n / "report.json").read_text())["songs"]["done"] == 0
        assert (out / n / "timing-all.json").read_text() == timings[n]
    assert table(out) == rows


@pytest.mark.parametrize("argv, words", [
    (["--steps", "0"], "--steps must lie in [1, 1000]"),
    (["--steps", "4,x"], "--steps takes values separated by commas"),
    (["--steps", "4,4"], "--steps must not repeat a value"),
    (["--sampler", "euler,rk9"], "--sampler must be one of euler, heun, ab2"),
    (["--guidance", "0.5"], "--guidance must be a finite number of at least 1"),
    (["--guidance-interval", "0.8,0.2"], "--guidance-interval must be A,B with 0 <= A <= B <= 1"),
    (["--decode-batch", "0"], "--decode-batch must lie in [1, 256]"),
    (["--schedule", "uniform,karras"], "--schedule must be one of uniform, cosine"),
])
def test_a_bad_grid_value_is_one_sentence_and_exit_2(tmp_path, capsys, argv, words):
    with pytest.raises(SystemExit) as e:
        sweep.main([str(tmp_path), "-o", str(tmp_path / "out"), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and words in err[-1] and sum(": error:" in line for line in err) == 1
    assert not (tmp_path / "out").exists()


PROBE = """<script>
window.addEventListener('load', () => {
  const out = {
    plots: Array.from(document.querySelectorAll('svg.plot')).map(svg => ({
      metric: svg.dataset.metric,
      points: Array.from(svg.querySelectorAll('circle.point')).map(c => {
        const b = c.getBoundingClientRect();
        return [c.dataset.setting, c.dataset.front, b.width > 0 && b.height > 0]; }),
      front: svg.querySelectorAll('polyline.front').length})),
    audio: Array.from(document.querySelectorAll('audio')).map(a => [a.dataset.setting || '', a.src]),
  };
  const pre = document.createElement('pre'); pre.id = 'probe';
  pre.textContent = JSON.stringify(out); document.body.appendChild(pre);
});
</script>"""


def test_page_in_a_real_browser(swept):
    chromium = browser()
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install chromium); CI installs it")
    _, out = swept
    rows = table(out)
    page = out / "probe.html"  # beside the page, so every relative link resolves as in it
    page.write_text((out / "index.html").read_text() + PROBE)
    dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    got = json.loads(dom.split('<pre id="probe">', 1)[1].split("</pre>", 1)[0].replace("&quot;", '"'))
    assert [p["metric"] for p in got["plots"]] == ["mel_distance", "visqol"]
    for p in got["plots"]:
        key = "pareto_mel" if p["metric"] == "mel_distance" else "pareto_visqol"
        # every setting is a point the browser draws, marked on the front exactly as the table says
        assert p["points"] == [[n, rows[n][key].lower(), True] for n in SETTINGS]
    # a player for each song at each setting, and for each original
    decoded = [(s, src) for s, src in got["audio"] if s]
    assert sorted(s for s, _ in decoded) == sorted(n for n in SETTINGS for _ in SONGS)
    assert len(got["audio"]) == len(SONGS) * (len(SETTINGS) + 1)
    for _, src in got["audio"]:
        path = urllib.parse.unquote(urllib.parse.urlparse(src).path)
        assert sf.info(path).duration in SONGS.values()  # exists, and is audio


def test_every_option_is_in_the_docs_table():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "sampling.md").read_text(encoding="utf-8")
    table = text.split("## The sweep", 1)[1]
    options = {s for a in sweep.build_parser()._actions for s in a.option_strings} - {"-h", "--help"}
    assert not [o for o in sorted(options) if f"`{o}" not in table]


def test_without_the_evaluation_extra_the_mel_distance_alone(swept, monkeypatch):
    music_dir, out = swept
    monkeypatch.setattr(sweep_score, "has_eval_extra", lambda: False)
    references = {name: str(music_dir / f"{name}.wav") for name in SONGS}
    name = next(iter(SETTINGS))
    rows = sweep_score.score_setting(references, out / name, sweep.JobOptions())
    with open(out / name / "metrics.csv", newline="") as f:
        evaluated = {r["path"]: float(r["mel_distance"]) for r in csv.DictReader(f)}
    # the same numbers as the evaluation's, and no ViSQOL
    assert {r["path"]: r["mel_distance"] for r in rows} == pytest.approx(evaluated)
    assert all(math.isnan(r["visqol"]) and not r["error"] for r in rows)


@pytest.mark.slow  # 40-80 s on a busy 2-core machine: a second sweep, in two shards
def test_shards_decode_their_share_and_a_last_run_tables_them(tmp_path, tiny_ckpt_dir, capsys, monkeypatch):
    monkeypatch.setattr(sweep_score, "DETAIL", 0)
    music_dir, out = tmp_path / "music", tmp_path / "out"
    songs = {"c": 2.0, "sub/b": 2.5}  # job 1 of 2 gets c, job 2 sub/b (by their ids)
    assert [library.in_shard(library.song_id(f"{n}.wav"), (1, 2)) for n in songs] == [True, False]
    for k, (name, seconds) in enumerate(songs.items()):
        (music_dir / name).parent.mkdir(parents=True, exist_ok=True)
        sf.write(music_dir / f"{name}.wav", music(seconds, k).T.numpy(), SR)
    for shard in ("1/2", "2/2"):
        assert run(music_dir, out, tiny_ckpt_dir, "--shard", shard) == 0
        assert not (out / "sweep.csv").exists()  # a shard decodes; the table waits for the whole
        i = shard[0]
        for name in SETTINGS:
            t = json.loads((out / name / f"timing-{i}-of-2.json").read_text())
            # the decode report's hours are rounded to 1e-6 h: 3.6 ms
            assert t["audio_seconds"] == pytest.approx(list(songs.values())[int(i) - 1], abs=1.8e-3)
    capsys.readouterr()
    assert run(music_dir, out, tiny_ckpt_dir, quiet=False) == 0
    err = capsys.readouterr().err
    assert "loading the MuCodec decoder" not in err and "0 to decode" in err
    rows = table(out)
    for name in SETTINGS:
        shards = [json.loads(f.read_text()) for f in sorted((out / name).glob("timing-*-of-2.json"))]
        assert float(rows[name]["audio_seconds"]) == pytest.approx(sum(songs.values()), abs=3.6e-3)
        assert float(rows[name]["decode_seconds"]) == pytest.approx(sum(t["wall_seconds"] for t in shards))
        assert int(rows[name]["songs"]) == len(songs)
