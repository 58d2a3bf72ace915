"""The library pipeline (mucodec.library, --encode of a folder) on the tiny checkpoints: packed codes equal
per-file ``sound2code`` bit for bit, resume after a crash is complete and duplicate-free, shards partition the
songs, bad files become error rows, fingerprints guard the output, and the reader round-trips."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from mucodec import cli, library
from mucodec.library.encode import Library, WindowPacker
from mucodec.library.store import machine
from mucodec.codec import MuCodec
from mucodec.tokens import load_codes

pytest.importorskip("pyarrow")
REPO = Path(__file__).resolve().parent.parent
W = 1966080  # one encoder window at 48 kHz (40.96 s)

# The lengths the issue names: shorter than a window, exactly one, one + 1 sample, several, 44.1 kHz mono.
MIXED = [("short.wav", 30000, 48000, 2), ("one/01.flac", W, 48000, 2), ("plus1/01.flac", W + 1, 48000, 2),
         ("several.wav", int(100 * 48000), 48000, 2), ("mono441.flac", int(50 * 44100), 44100, 1),
         ("stereo48.wav", int(12.5 * 48000), 48000, 2)]


def make_music(folder: Path, specs=MIXED, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    for name, n, rate, channels in specs:
        p = folder / name
        p.parent.mkdir(parents=True, exist_ok=True)
        sf.write(p, (0.3 * rng.standard_normal((n, channels))).astype(np.float32), rate)
    return folder


def encode(*argv) -> int:
    return cli.main([str(a) for a in argv])


@pytest.fixture(scope="module")
def music(tmp_path_factory):
    return make_music(tmp_path_factory.mktemp("music"))


@pytest.fixture(scope="module")
def reference(music, tiny_ckpt_dir):
    """Each file encoded alone with sound2code (the same batch size as the pipeline)."""
    codec = MuCodec.from_pretrained(tiny_ckpt_dir, device="cpu", encoder_only=True)
    return {name: codec.sound2code(str(music / name), batch_size=3).reshape(-1).numpy() for name, *_ in MIXED}


def common(ckpt):
    return ["--ckpt", ckpt, "--device", "cpu", "-q"]


def codes_of(out) -> dict:
    return {path: codes for _, path, codes in library.iter_codes(out)}


# ---- bit identity --------------------------------------------------------------------------------

@pytest.mark.parametrize("workers", [0, 1])
def test_packed_codes_equal_sound2code_per_file(tmp_path, music, reference, tiny_ckpt_dir, workers):
    assert encode("--encode", music, "-o", tmp_path / "tok", "--workers", workers, *common(tiny_ckpt_dir)) == 0
    got = codes_of(tmp_path / "tok")
    assert sorted(got) == sorted(reference)
    for name, ref in reference.items():
        assert got[name].dtype == np.uint16 and np.array_equal(got[name], ref.astype(np.uint16)), name
    table = library.read_library(tmp_path / "tok")
    rows = {r["path"]: r for r in table.to_pylist()}
    assert rows["mono441.flac"]["sample_rate"] == 44100 and rows["mono441.flac"]["channels"] == 1
    assert rows["one/01.flac"]["song_id"] == library.song_id("one/01.flac") != rows["plus1/01.flac"]["song_id"]
    assert rows["several.wav"]["duration"] == pytest.approx(100.0)
    assert all(r["num_codes"] == len(r["codes"]) for r in rows.values())
    rep = json.loads((tmp_path / "tok" / "report.json").read_text())
    assert rep["songs"]["done"] == len(MIXED) and rep["songs"]["failed"] == 0
    assert 0 <= rep["padding_fraction"] < 1 and rep["windows"] > 0 and rep["hours_per_hour"] > 0


def test_formats_and_reader_round_trip(tmp_path, music, reference, tiny_ckpt_dir):
    out = tmp_path / "tok"
    assert encode("--encode", music, "-o", out, "--format", "both", "--workers", 0, *common(tiny_ckpt_dir)) == 0
    flat = library.load_flat(out)
    assert flat.codes.dtype == np.uint16 and flat.offsets[0] == 0 and flat.offsets[-1] == flat.codes.size
    assert flat.paths == sorted(reference) and len(flat) == len(reference)
    for k, path in enumerate(flat.paths):
        assert np.array_equal(flat[k], reference[path])
        mct, header = load_codes(out / Path(path).with_suffix(".mct"))
        assert np.array_equal(mct.reshape(-1).numpy(), reference[path])
        assert header["original_sample_rate"] == sf.info(str(music / path)).samplerate


def test_single_file_still_writes_mct(tmp_path, music, tiny_ckpt_dir):
    assert encode("--encode", music / "short.wav", "-o", tmp_path / "t", *common(tiny_ckpt_dir)) == 0
    assert [p.name for p in (tmp_path / "t").iterdir()] == ["short.mct"]


# ---- resume, exactly once ------------------------------------------------------------------------

def test_interrupted_run_resumes_without_redoing_or_duplicating(tmp_path, music, reference, tiny_ckpt_dir,
                                                               monkeypatch):
    out = tmp_path / "tok"
    real_commit = Library.commit
    commits = []

    def crash_after_first(self, name, rows, errors, fp=None):
        real_commit(self, name, rows, errors, fp)
        commits.append([r["path"] for r in rows])
        if len(commits) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(Library, "commit", crash_after_first)
    argv = ["--encode", music, "-o", out, "--workers", 0, "--shard-size", 2, *common(tiny_ckpt_dir)]
    assert encode(*argv) == cli.EXIT_INTERRUPTED
    first = set(commits[0])
    assert 2 <= len(first) < len(MIXED) and set(codes_of(out)) == first
    monkeypatch.setattr(Library, "commit", real_commit)

    encoded = []
    real_add = WindowPacker.add
    monkeypatch.setattr(WindowPacker, "add", lambda self, key, wav: encoded.append(key) or real_add(self, key, wav))
    assert encode(*argv) == 0
    assert len(encoded) == len(MIXED) - len(first)  # nothing committed was encoded again
    ids = library.read_library(out, columns=["song_id"]).column("song_id").to_pylist()
    assert len(ids) == len(set(ids)) == len(MIXED)
    got = codes_of(out)
    assert all(np.array_equal(got[k], reference[k]) for k in reference)

    # a finished job run again does no work: not even the model is loaded
    monkeypatch.setattr(MuCodec, "from_pretrained", lambda *a, **k: pytest.fail("model loaded for nothing"))
    assert encode(*argv) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["songs"]["done"] == 0 and rep["songs"]["skipped"] == len(MIXED)


@pytest.mark.slow
def test_killed_process_resumes_complete_and_duplicate_free(tmp_path, tiny_ckpt_dir):
    music = make_music(tmp_path / "music", [(f"s{k:02d}.wav", 48000 * (20 + 7 * k), 48000, 2) for k in range(14)])
    out = tmp_path / "tok"
    argv = [sys.executable, str(REPO / "generate.py"), "--encode", str(music), "-o", str(out), "--workers", "1",
            "--shard-size", "1", *common(str(tiny_ckpt_dir))]
    proc = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and len(list((out / "shards").glob("*.parquet"))) < 2:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = len(list((out / "shards").glob("*.parquet")))
    assert 1 <= partial < 14  # killed midway
    assert subprocess.run(argv, cwd=tmp_path, capture_output=True).returncode == 0
    ids = library.read_library(out, columns=["song_id"]).column("song_id").to_pylist()
    assert len(ids) == len(set(ids)) == 14
    assert not [p for p in (out / "shards").iterdir() if p.name.startswith(".")]  # temporary files cleaned


# ---- shards --------------------------------------------------------------------------------------

def test_shards_partition_by_id_independent_of_order(tmp_path):
    paths = [f"a/{k}/01.flac" for k in range(200)]
    ids = [library.song_id(p) for p in paths]
    assert len(set(ids)) == 200  # same basename, different folders: different songs
    parts = [{i for i in ids if library.in_shard(i, (k, 5))} for k in range(1, 6)]
    assert set().union(*parts) == set(ids) and sum(map(len, parts)) == 200
    shuffled = ids[:]
    random.Random(0).shuffle(shuffled)
    assert [{i for i in shuffled if library.in_shard(i, (k, 5))} for k in range(1, 6)] == parts


def test_sharded_jobs_cover_every_song_once(tmp_path, music, reference, tiny_ckpt_dir):
    out = tmp_path / "tok"
    for k in (1, 2, 3):
        assert encode("--encode", music, "-o", out, "--shard", f"{k}/3", "--workers", 0, *common(tiny_ckpt_dir)) == 0
        assert (out / f"manifest-{k}-of-3.jsonl").is_file() and (out / f"report-{k}-of-3.json").is_file()
    ids = library.read_library(out, columns=["song_id"]).column("song_id").to_pylist()
    assert len(ids) == len(set(ids)) == len(MIXED)
    assert all(np.array_equal(c, reference[p]) for p, c in codes_of(out).items())


@pytest.mark.parametrize("argv, words", [
    (["--shard", "0/8"], "1 <= I <= N"), (["--shard", "9/8"], "1 <= I <= N"), (["--shard", "x"], "I/N"),
    (["--workers", "-1"], "--workers"), (["--shard-size", "0"], "--shard-size"),
    (["--address", "h:1"], "--engine ray"),
])
def test_bad_library_options_exit_2(tmp_path, capsys, argv, words):
    with pytest.raises(SystemExit) as e:
        cli.main(["--encode", str(tmp_path), "-o", str(tmp_path / "o"), *argv])
    assert e.value.code == 2 and words in capsys.readouterr().err


def test_library_options_need_encode(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([str(tmp_path), "--shard", "1/2"])
    assert e.value.code == 2 and "--encode" in capsys.readouterr().err


# ---- bad files, errors, fingerprint --------------------------------------------------------------

def test_bad_files_become_error_rows_and_retry_errors(tmp_path, tiny_ckpt_dir):
    music = make_music(tmp_path / "music", MIXED[:1])
    (music / "empty.wav").write_bytes(b"")
    (music / "corrupt.flac").write_bytes(b"fLaC" + b"\x00" * 100)
    sf.write(music / "nan.wav", np.full((4800, 2), np.nan, np.float32), 48000, subtype="FLOAT")
    sf.write(music / "silent.wav", np.zeros((0, 2), np.float32), 48000)
    os.mkfifo(music / "pipe.wav")
    out = tmp_path / "tok"
    argv = ["--encode", music, "-o", out, "--workers", 0, *common(tiny_ckpt_dir)]
    assert encode(*argv) == 1
    errors = {e["path"]: e for e in library.read_errors(out)}
    assert set(errors) == {"empty.wav", "corrupt.flac", "nan.wav", "silent.wav", "pipe.wav"}
    assert all(e["stage"] == "read" and e["message"].endswith(".") and e["song_id"] == library.song_id(p)
               for p, e in errors.items())
    assert "NaN" in errors["nan.wav"]["message"] and "not a regular file" in errors["pipe.wav"]["message"]
    assert set(codes_of(out)) == {"short.wav"}
    rep = json.loads((out / "report.json").read_text())
    assert rep["songs"]["done"] == 1 and rep["songs"]["failed"] == 5

    assert encode(*argv) == 0  # failed songs are not retried by default
    assert json.loads((out / "report.json").read_text())["songs"]["skipped_failed_earlier"] == 5
    make_music(music, [("nan.wav", 9600, 48000, 2)])  # the user repairs one file
    assert encode(*argv, "--retry-errors") == 1  # the other four fail again
    assert set(codes_of(out)) == {"short.wav", "nan.wav"}
    assert Library(out).state().errors.keys() == {library.song_id(p) for p in errors if p != "nan.wav"}


def test_resume_on_another_machine_warns_and_records_it(tmp_path, tiny_ckpt_dir, capsys):
    music = make_music(tmp_path / "music", MIXED[:1])
    out = tmp_path / "tok"
    base = ["--encode", music, "-o", out, "--workers", 0, *common(tiny_ckpt_dir)]
    assert encode(*base) == 0
    first = json.loads((out / "fingerprint.json").read_text())["machines"]
    assert first == [machine("cpu")] and first[0]["threads"] == torch.get_num_threads()
    make_music(music, MIXED[1:2])
    capsys.readouterr()
    assert encode(*base) == 0  # the same machine: no warning, nothing added
    assert "another machine" not in capsys.readouterr().err
    assert json.loads((out / "fingerprint.json").read_text())["machines"] == first
    make_music(music, MIXED[2:3])
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1 if threads == 1 else 1)  # what another machine would change
    try:
        assert encode(*base) == 0
        other = machine("cpu")
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert f"{out} holds codes made on another machine ({threads} threads of" in err and "near-tie" in err
    assert json.loads((out / "fingerprint.json").read_text())["machines"] == [*first, other]
    assert set(codes_of(out)) == {"short.wav", "one/01.flac", "plus1/01.flac"}


def test_fingerprint_mismatch_is_refused_unless_overwrite(tmp_path, tiny_ckpt_dir, capsys):
    music = make_music(tmp_path / "music", MIXED[:1])
    out = tmp_path / "tok"
    base = ["--encode", music, "-o", out, "--workers", 0, *common(tiny_ckpt_dir)]
    assert encode(*base) == 0
    fp = json.loads((out / "fingerprint.json").read_text())
    assert fp["batch_size"] == 3 and fp["device"] == "cpu" and fp["dtype"] == "float32"
    assert fp["torch"] == torch.__version__ and set(fp["checkpoints"]) == {"muq", "mucodec"}
    capsys.readouterr()
    assert encode(*base, "--batch-size", "2") == 1
    err = capsys.readouterr().err
    assert "batch_size 3 there, 2 now" in err and "--overwrite" in err and err.count("\n") == 1
    assert encode(*base, "--batch-size", "2", "--overwrite") == 0
    assert json.loads((out / "fingerprint.json").read_text())["batch_size"] == 2
    ids = library.read_library(out, columns=["song_id"]).column("song_id").to_pylist()
    assert ids == [library.song_id("short.wav")]
