"""Evaluation (mucodec.metrics, mucodec.evaluate, mucodec.report): the metrics behave as metrics, the
hand-written ones agree with independent numpy code, the commands pair, resume and report, and the report
works in a real browser."""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import subprocess
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

pytest.importorskip("visqol", reason="the evaluation extra is not installed (pip install -r requirements-eval.txt)")

from mucodec import cli, evaluate, metrics, tokens  # noqa: E402

SR = 48000
GAIN_DB = 0.5


def music(seconds: float = 2.5, seed: int = 0) -> torch.Tensor:
    """A stereo stand-in for music: chords with a moving envelope, panned, plus a little independent noise
    per channel (so the side signal is not silence)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * SR), dtype=torch.float64) / SR
    env = 0.6 + 0.4 * torch.sin(2 * math.pi * 0.7 * t)
    left = sum(torch.sin(2 * math.pi * f * t) / k for k, f in enumerate((220.0, 277.2, 329.6, 880.0), 1))
    right = sum(torch.sin(2 * math.pi * f * t + 0.3) / k for k, f in enumerate((220.0, 329.6, 440.0, 1318.5), 1))
    x = 0.15 * env * torch.stack([left, 0.8 * right]) + 0.01 * torch.randn(2, t.numel(), generator=g, dtype=torch.float64)
    return x.float()


def with_noise(x: torch.Tensor, snr_db: float, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(x.shape, generator=g)
    noise *= torch.sqrt((x ** 2).mean() / (noise ** 2).mean() / 10 ** (snr_db / 10))
    return x + noise


@pytest.fixture(scope="module")
def ref():
    return music()


@pytest.fixture(scope="module")
def same(ref):
    return metrics.measure(ref, ref.clone())


def test_identical_signals_score_best(same):
    assert 4.7 < same["visqol"] <= 5  # ViSQOL audio mode's ceiling is about 4.73
    assert same["mel_distance"] == same["stft_distance"] == same["mid_side_stft_distance"] == 0
    assert same["loudness_diff_lu"] == 0 and same["lag_samples"] == 0
    assert same["si_sdr_db"] > 100


def test_added_noise_moves_every_metric_the_right_way(ref):
    runs = [metrics.measure(ref, with_noise(ref, snr)) for snr in (40, 20, 10)]
    got = {k: [r[k] for r in runs] for k in runs[0]}
    for name, (higher_is_better, _) in metrics.METRICS.items():
        if name == "bitrate_bps":
            continue
        values = [abs(v) for v in got[name]] if name == "loudness_diff_lu" else got[name]
        step = np.diff(values)
        assert (step < 0).all() if higher_is_better else (step > 0).all(), (name, values)
    # white noise at a given SNR: SI-SDR is that SNR
    assert np.allclose(got["si_sdr_db"], [40, 20, 10], atol=0.5)
    assert got["visqol"][0] > 4.5 and got["visqol"][2] < 4.2


@pytest.mark.parametrize("shift", [1, -1])
def test_one_sample_shift_is_undone(ref, shift):
    # the rule: a lag within 10 ms is undone where the waveforms are clearly related, then both are cut
    deg = torch.cat([torch.zeros(2, 1), ref[:, :-1]], 1) if shift > 0 else torch.cat([ref[:, 1:], torch.zeros(2, 1)], 1)
    m = metrics.measure(ref, deg)
    assert m["lag_samples"] == shift
    assert m["compared_seconds"] == (ref.shape[-1] - 1) / SR
    assert m["mel_distance"] == m["stft_distance"] == m["loudness_diff_lu"] == 0
    assert m["si_sdr_db"] > 100


def test_unrelated_waveforms_are_not_shifted(ref):
    # a lag picked from noise would only add error, so none is applied
    assert metrics.find_lag(ref, torch.randn(ref.shape, generator=torch.Generator().manual_seed(9))) == 0


def test_gain_change_is_reported_as_loudness_and_not_matched(ref, same):
    g = 10 ** (GAIN_DB / 20)
    louder = metrics.measure(ref, ref * g)
    assert louder["loudness_diff_lu"] == pytest.approx(GAIN_DB, abs=0.01)
    # level-invariant by definition
    assert louder["visqol"] == pytest.approx(same["visqol"], abs=0.01)
    assert louder["si_sdr_db"] > 100
    # no level matching: every magnitude grows by g, so the STFT distance is ln g + (g - 1) exactly ...
    assert louder["stft_distance"] == pytest.approx(math.log(g) + g - 1, rel=1e-4)
    assert louder["mid_side_stft_distance"] == pytest.approx(math.log(g) + g - 1, rel=1e-4)
    # ... and each mel scale moves by log10 g where a band is above the floor (none is more)
    assert 0.5 * 7 * math.log10(g) < louder["mel_distance"] <= 7 * math.log10(g) + 1e-6


# ---- hand-written metrics against independent numpy code ----------------------------------------
def np_magnitudes(x: np.ndarray, n_fft: int, win: int, hop: int) -> np.ndarray:
    """|STFT| written from the definition: periodic Hann centred in the frame, reflect-padded, rfft."""
    n = np.arange(win)
    window = np.zeros(n_fft)
    start = (n_fft - win) // 2
    window[start:start + win] = 0.5 - 0.5 * np.cos(2 * np.pi * n / win)
    padded = np.pad(x.astype(np.float64), [(0, 0), (n_fft // 2, n_fft // 2)], mode="reflect")
    count = 1 + (padded.shape[-1] - n_fft) // hop
    frames = np.stack([padded[:, k * hop:k * hop + n_fft] for k in range(count)], -1)  # (C, n_fft, T)
    return np.abs(np.fft.rfft(frames * window[None, :, None], axis=1))


def np_stft_distance(r: np.ndarray, d: np.ndarray) -> float:
    out = []
    for n_fft, win, hop in ((512, 240, 50), (1024, 600, 120), (2048, 1200, 240)):
        R, D = np_magnitudes(r, n_fft, win, hop), np_magnitudes(d, n_fft, win, hop)
        sc = np.linalg.norm(R - D) / np.linalg.norm(R)
        out.append(sc + np.mean(np.abs(np.log(np.maximum(R, 1e-7)) - np.log(np.maximum(D, 1e-7)))))
    return float(np.mean(out))


@pytest.fixture
def small_blocks(monkeypatch):
    # spectra are computed in blocks of frames; small blocks make the short test signals span several
    monkeypatch.setattr(metrics, "BLOCK_VALUES", 1 << 13)


def test_stft_distances_match_numpy(small_blocks):
    r = music(0.6, seed=2)
    d = with_noise(r, 15) * 0.9
    assert metrics.stft_distance(r, d) == pytest.approx(np_stft_distance(r.numpy(), d.numpy()), rel=1e-4)
    mid = lambda x: (x[:1] + x[1:]) / 2  # noqa: E731
    side = lambda x: (x[:1] - x[1:]) / 2  # noqa: E731
    expected = (np_stft_distance(mid(r.numpy()), mid(d.numpy())) + np_stft_distance(side(r.numpy()), side(d.numpy()))) / 2
    assert metrics.mid_side_stft_distance(r, d) == pytest.approx(expected, rel=1e-4)


def test_mel_distance_matches_numpy(small_blocks):
    from mucodec.audio import slaney_mel_basis  # the filterbank is checked against librosa elsewhere

    r = music(0.6, seed=3)
    d = with_noise(r, 15)
    total = 0.0
    for k in range(7):
        win, bands = 32 * 2 ** k, 5 * 2 ** k
        basis = slaney_mel_basis(SR, win, bands, 0.0, SR / 2).numpy().astype(np.float64)
        R = np.einsum("mf,cft->cmt", basis, np_magnitudes(r.numpy(), win, win, win // 4))
        D = np.einsum("mf,cft->cmt", basis, np_magnitudes(d.numpy(), win, win, win // 4))
        total += np.mean(np.abs(np.log10(np.maximum(R, 1e-5)) - np.log10(np.maximum(D, 1e-5))))
    assert metrics.mel_distance(r, d) == pytest.approx(total, rel=1e-4)


def test_si_sdr_matches_numpy():
    r, d = music(0.5, seed=4).double().numpy(), (with_noise(music(0.5, seed=4), 12) * 0.7 + 0.01).double().numpy()
    values = []
    for rc, dc in zip(r, d):
        rc, dc = rc - rc.mean(), dc - dc.mean()
        target = (dc @ rc) / (rc @ rc) * rc
        values.append(10 * np.log10((target @ target) / ((dc - target) @ (dc - target))))
    assert metrics.si_sdr(torch.from_numpy(r), torch.from_numpy(d)) == pytest.approx(np.mean(values), abs=1e-6)


def test_silence(ref):
    quiet = metrics.measure(ref, torch.zeros_like(ref))  # a silent reconstruction is the worst, not a gap
    assert quiet["visqol"] == 1.0 and quiet["mel_distance"] > 1 and quiet["stft_distance"] > 1
    with pytest.raises(metrics.AudioError, match="reference is silent"):
        metrics.measure(torch.zeros_like(ref), ref)


def test_mono_reference_has_no_stereo_image_distance():
    x = music(1.0)[:1].expand(2, -1)
    assert math.isnan(metrics.mid_side_stft_distance(x, with_noise(x, 20)))


def test_bitrate_is_the_token_payload_per_second(tmp_path):
    seconds, codes = 4, torch.randint(0, 16384, (1, 1, 101))
    path = tokens.save_codes(tmp_path / "x.mct", codes, num_samples=seconds * SR)
    # 101 codes of 14 bits = 1414 bits, in 177 whole bytes
    assert metrics.token_bitrate(path) == 177 * 8 / seconds


# ---- the commands -------------------------------------------------------------------------------
def write(path: Path, x: torch.Tensor, rate: int = SR) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, x.numpy().T, rate, subtype="FLOAT")
    return path


def make_folders(root: Path) -> tuple[Path, Path]:
    """ref/ and deg/: three pairs (one in a sub-folder, one reference as FLAC) at 30, 20, 10 dB SNR, one
    reference without a reconstruction, one reconstruction without a reference; 1 s each."""
    ref, deg = root / "ref", root / "deg"
    for k, name in enumerate(("a", "sub/b", "c")):
        x = music(1.0, seed=10 + k)
        if name == "c":
            sf.write(ref / "c.flac", x.numpy().T, SR, subtype="PCM_24")
        else:
            write(ref / f"{name}.wav", x)
        write(deg / f"{name}.wav", with_noise(x, 30 - 10 * k))
    write(ref / "lonely.wav", music(1.0, seed=20))
    write(deg / "stray.wav", music(1.0, seed=21))
    return ref, deg


@pytest.fixture
def folders(tmp_path):
    return make_folders(tmp_path)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """The folders, evaluated once by the command (its stderr kept): ViSQOL's first call and the report's
    pictures are the slow part, so the tests that read the outputs share them."""
    ref, deg = make_folders(tmp_path_factory.mktemp("evaluated"))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = evaluate.main([str(ref), str(deg), "--workers", "0"])
    return ref, deg, status, err.getvalue()


def fake_measure(r, d):
    """Metrics without the cost: enough to test pairing, resume and the outputs."""
    return {"ref_seconds": r.shape[-1] / SR, "deg_seconds": d.shape[-1] / SR, "compared_seconds": 1.0,
            "lag_samples": 0, **{m: float((r - d).abs().mean()) for m in metrics.METRICS},
            "loudness_ref_lufs": -20.0, "loudness_deg_lufs": -20.0}


def test_pairs_by_relative_path_and_lists_missing_and_extra(folders):
    ref, deg = folders
    p = evaluate.pair_inputs(ref, deg)
    assert [x.path for x in p.pairs] == ["a", "c", "sub/b"]
    assert p.missing == [str(ref / "lonely.wav")] and p.extra == [str(deg / "stray.wav")]
    (ref / "a.flac").write_bytes(b"")  # the same name twice in one folder
    assert any("same name" in m for _, m in evaluate.pair_inputs(ref, deg).problems)


def test_evaluate_command_writes_csv_summary_and_report(evaluated):
    ref, deg, status, err = evaluated
    assert status == 1  # a reference lacks its reconstruction
    assert "lonely.wav: no reconstruction" in err and "stray.wav: no reference" in err
    assert "3 pairs evaluated (3 scored now)" in err and "ViSQOL mean" in err
    rows = evaluate.read_rows(deg / "metrics.csv")
    assert sorted(rows) == ["a", "c", "sub/b"] and not any(r["error"] for r in rows.values())
    assert rows["a"]["visqol"] > rows["sub/b"]["visqol"] > rows["c"]["visqol"]  # 30, 20, 10 dB SNR
    assert all(math.isnan(r["bitrate_bps"]) for r in rows.values())  # no token files here
    summary = json.loads((deg / "summary.json").read_text())
    v = summary["metrics"]["visqol"]
    assert v["n"] == 3 and v["ci95"][0] <= v["mean"] <= v["ci95"][1]
    assert summary["missing"] == [str(ref / "lonely.wav")] and summary["extra"] == [str(deg / "stray.wav")]
    assert summary["metrics"]["bitrate_bps"]["n"] == 0


def test_pairs_scored_before_are_not_scored_again(folders, capsys, monkeypatch):
    ref, deg = folders
    calls = []
    monkeypatch.setattr(metrics, "measure", lambda r, d: calls.append(1) or fake_measure(r, d))
    argv = [str(ref), str(deg), "--workers", "0", "--detail", "0"]
    assert evaluate.main(argv) == 1 and len(calls) == 3
    rows = evaluate.read_rows(deg / "metrics.csv")
    os.utime(deg / "c.wav", ns=(1, 1))  # a changed reconstruction is scored again; the others are not
    assert evaluate.main(argv) == 1 and len(calls) == 4
    again = evaluate.read_rows(deg / "metrics.csv")
    assert again["a"] == rows["a"] and again["c"]["stamp"] != rows["c"]["stamp"]
    assert "3 pairs evaluated (1 scored now)" in capsys.readouterr().err


def test_failed_pair_is_a_row_with_its_error(tmp_path, capsys):
    x = music(1.0)
    write(tmp_path / "ref" / "a.wav", x)
    write(tmp_path / "deg" / "a.wav", x[:, :SR // 10])  # too short to compare
    assert evaluate.main([str(tmp_path / "ref"), str(tmp_path / "deg"), "--workers", "0"]) == 1
    row = evaluate.read_rows(tmp_path / "deg" / "metrics.csv")["a"]
    assert "at least 0.5 s" in row["error"] and math.isnan(row["visqol"])
    assert "a: The pair overlaps by 0.10 s only" in capsys.readouterr().err


def test_bootstrap_interval_holds_the_mean():
    v = np.random.default_rng(0).normal(3.0, 0.5, 200)
    lo, hi = evaluate.bootstrap_interval(v)
    assert lo < v.mean() < hi and hi - lo == pytest.approx(2 * 1.96 * v.std() / math.sqrt(len(v)), rel=0.2)
    assert evaluate.bootstrap_interval([2.0]) == (2.0, 2.0)


@pytest.mark.parametrize("argv, words", [
    (["nowhere", "."], "nowhere does not exist"),
    (["ref", "deg/a.wav"], "must both be folders or both be files"),
    (["ref", "ref/"], "is given as both reference and reconstruction"),
])
def test_user_errors_are_one_sentence_and_write_nothing(folders, capsys, argv, words, monkeypatch):
    monkeypatch.chdir(folders[0].parent)
    before = sorted(p.name for p in folders[1].iterdir())
    assert evaluate.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert words in err and err.count("\n") == 0 and "Traceback" not in err
    assert sorted(p.name for p in folders[1].iterdir()) == before


def test_without_the_extra_one_sentence_names_the_install_command(folders, capsys, monkeypatch):
    real = evaluate.importlib.util.find_spec
    monkeypatch.setattr(evaluate.importlib.util, "find_spec", lambda m: None if m == "visqol" else real(m))
    assert evaluate.main([str(folders[0]), str(folders[1])]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install -r requirements-eval.txt" in err
    assert not (folders[1] / "metrics.csv").exists()
    assert cli.main([str(folders[0] / "a.wav"), "-o", str(folders[1].parent / "rec"), "--evaluate"]) == 1
    assert "pip install -r requirements-eval.txt" in capsys.readouterr().err
    assert not (folders[1].parent / "rec").exists()


def test_metrics_run_in_worker_processes(tmp_path):
    x = music(1.0)
    write(tmp_path / "ref" / "a.wav", x)
    write(tmp_path / "deg" / "a.wav", with_noise(x, 20))
    ev = evaluate.evaluate(evaluate.pair_inputs(tmp_path / "ref", tmp_path / "deg"), tmp_path / "out", workers=1,
                           detail=0)
    assert ev.scored == 1 and not ev.failed and 1 < ev.rows[0]["visqol"] < 5


def test_detail_is_capped_and_the_cap_stated(folders, monkeypatch):
    monkeypatch.setattr(metrics, "measure", fake_measure)
    ev = evaluate.evaluate(evaluate.pair_inputs(*folders), folders[1], workers=0, detail=1)
    page = (folders[1] / "report.html").read_text()
    assert page.count("<img") == 2 and page.count("<audio") == 2  # the histogram, one song's detail
    songs = page.split("<table class=songs>", 1)[1].split("</table>", 1)[0]
    assert "at most 1 are shown" in page and songs.count("<tr>") == 1 + len(ev.rows) == 4


# ---- the report in a real browser ---------------------------------------------------------------
# Written into the page when it has loaded (images included): synchronous, so --dump-dom always holds it.
PROBE = """<script>
window.addEventListener('load', () => {
  const head = Array.from(document.querySelectorAll('table.songs th')).find(th => th.textContent === 'ViSQOL');
  head.click();
  const out = {
    images: Array.from(document.images).map(i => i.complete ? i.naturalWidth : -1),
    audio: Array.from(document.querySelectorAll('audio')).map(a => a.src),
    rows: Array.from(document.querySelectorAll('table.songs tbody tr')).map(tr => tr.cells[0].textContent),
  };
  const pre = document.createElement('pre'); pre.id = 'probe';
  pre.textContent = JSON.stringify(out); document.body.appendChild(pre);
});
</script>"""


def browser() -> str | None:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None and os.environ.get("CI"):
        pytest.fail("chromium is not installed; .ci/run installs it (apt-get install chromium)")
    return found


def test_report_in_a_real_browser(evaluated):
    chromium = browser()
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install chromium); CI installs it")
    deg = evaluated[1]
    rows = evaluate.read_rows(deg / "metrics.csv")
    # the probe runs in a copy beside the report, so every relative link resolves as in the report
    page = deg / "probe.html"
    page.write_text((deg / "report.html").read_text() + PROBE)
    dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    got = json.loads(dom.split('<pre id="probe">', 1)[1].split("</pre>", 1)[0].replace("&quot;", '"'))
    # the histogram and 3 songs' spectrograms, every one decoded by the browser
    assert len(got["images"]) == 4 and all(w > 0 for w in got["images"])
    assert len(got["audio"]) == 6
    for src in got["audio"]:
        assert sf.info(urllib.parse.unquote(urllib.parse.urlparse(src).path)).frames == SR  # exists, and is audio
    assert got["rows"] == sorted(rows, key=lambda k: rows[k]["visqol"])  # one row per song, sorted by the click


# ---- reconstruct and evaluate in one go, on the tiny model --------------------------------------
@pytest.mark.slow  # 25-55 s on a busy 2-core machine: three runs of the tiny decoder's windows
def test_reconstruct_and_evaluate_end_to_end(tmp_path, tiny_ckpt_dir, capsys):
    music_dir, out = tmp_path / "music", tmp_path / "out"
    write(music_dir / "sub" / "one.wav", music(2.0))
    common = ["--ckpt", str(tiny_ckpt_dir), "--device", "cpu", "--steps", "2", "--seed", "0"]
    assert cli.main([str(music_dir), "-o", str(out), "--evaluate", "--workers", "0", *common]) == 0
    err = capsys.readouterr().err
    assert "1 pairs evaluated (1 scored now)" in err and "mel_distance" in err
    rows = evaluate.read_rows(out / "metrics.csv")
    row = rows["sub/one"]
    # synthetic weights: the numbers mean nothing, but they are numbers in range
    assert not row["error"] and 1 <= row["visqol"] <= 5 and row["ref_seconds"] == row["deg_seconds"] == 2.0
    codes, _ = tokens.load_codes(out / "sub" / "one.mct")
    assert codes.shape[-1] == int(2.0 * 25) + 1
    assert row["bitrate_bps"] == math.ceil(codes.shape[-1] * 14 / 8) * 8 / 2.0
    settings = json.loads((out / "summary.json").read_text())["settings"]
    assert settings["num_steps"] == 2 and settings["seed"] == 0 and settings["fast_vocoder"] is True
    assert set(settings["checkpoint (sha256)"]) == {"audioldm", "muq", "mucodec"}
    page = (out / "report.html").read_text()
    assert 'src="sub/one.wav"' in page and 'src="../music/sub/one.wav"' in page  # players link relatively

    # the detour through a token file leaves the audio as a plain reconstruction makes it
    assert cli.main([str(music_dir / "sub" / "one.wav"), "-o", str(tmp_path / "plain"), *common]) == 0
    assert np.array_equal(sf.read(out / "sub" / "one.wav")[0], sf.read(tmp_path / "plain" / "one.wav")[0])

    # run again: the reconstruction is kept and nothing is scored again
    capsys.readouterr()
    assert cli.main([str(music_dir), "-o", str(out), "--evaluate", "--workers", "0", *common]) == 0
    err = capsys.readouterr().err
    assert "1 kept from an earlier run" in err and "(0 scored now)" in err and "loading MuCodec" not in err
    assert evaluate.read_rows(out / "metrics.csv") == rows
    # ... and the evaluation command on the same folders finds every pair scored, and keeps the settings
    assert evaluate.main([str(music_dir), str(out), "--workers", "0"]) == 0
    assert "(0 scored now)" in capsys.readouterr().err
    assert json.loads((out / "summary.json").read_text())["settings"] == settings


@pytest.mark.parametrize("argv, words", [
    (["--encode", "--evaluate"], "no effect with --encode"),
    (["--evaluate", "--shard", "1/2"], "--shard is an option of a library job"),
])
def test_evaluate_option_usage_errors(tmp_path, capsys, argv, words):
    with pytest.raises(SystemExit) as e:
        cli.main([str(write(tmp_path / "a.wav", music(0.6))), *argv])
    assert e.value.code == 2 and words in capsys.readouterr().err


def test_evaluate_refuses_token_inputs(tmp_path, capsys):
    tok = tokens.save_codes(tmp_path / "a.mct", torch.zeros(1, 1, 26, dtype=torch.long), num_samples=SR)
    assert cli.main([str(tok), "-o", str(tmp_path / "out"), "--evaluate"]) == 1
    assert "is already a token file; --evaluate needs audio" in capsys.readouterr().err
