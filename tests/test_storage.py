"""A full, read-only or failing disk: no writer trusts a write it did not check (issue: full-disk data loss).

Every write site is driven through the seam ``files.inject_fault`` (any write of the project fails with ENOSPC
or EIO once N more bytes were written, the bytes that fit written first): it must leave no committed output and
no temporary file, say one sentence (no traceback, not even one a library prints from a C callback), and exit
with 1; the same command run again once the fault is gone completes and equals a run that never failed. A test
on a real 2 MiB tmpfs does the same where the tests run as root. Resuming checks each committed output against
what the manifest recorded before its rename, so a truncated or lost output is done again and said to be.
"""
from __future__ import annotations

import csv
import errno
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from mucodec import audio, cli, evaluate, files, library, tokens
from mucodec.library.parquet import write_shard
from mucodec.settings import DecodingOptions, JobOptions
from mucodec.codec import MuCodec
from mucodec.errors import OutputError, StorageError
from test_decode_library import cheap_wave, npy_songs, read
from test_library import common, make_music

pytest.importorskip("pyarrow")

FAULTS = (errno.ENOSPC, errno.EIO)
SENTENCE = {errno.ENOSPC: "no space is left on ", errno.EIO: "reported an input/output error"}


def temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(files.TEMPORARY_SUFFIX)]


def files_of(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def one_error_line(err: str, code: int) -> None:
    """stderr holds one sentence about the disk, and no traceback of any kind."""
    assert "Traceback" not in err and "Exception ignored" not in err, err
    lines = [ln for ln in err.splitlines() if SENTENCE[code] in ln]
    assert len(lines) >= 1, err
    assert all(ln.count(". ") == 0 for ln in lines), lines  # one sentence each


@pytest.fixture
def cheap(monkeypatch):
    monkeypatch.setattr(MuCodec, "latents_to_wave", cheap_wave)


# ---- the writers themselves -------------------------------------------------------------------------

@pytest.mark.parametrize("code", FAULTS)
@pytest.mark.parametrize("fmt", ["wav", "flac"])
def test_an_audio_write_that_fails_anywhere_commits_nothing(tmp_path, capfd, fmt, code):
    """soundfile's virtual I/O prints and swallows exceptions raised in its callbacks; the writer must see the
    short write itself, whichever byte the disk fills at (header, data, the header's sizes at close)."""
    wav = torch.from_numpy(np.random.default_rng(0).uniform(-0.5, 0.5, (2, 30000)).astype(np.float32))
    dst = tmp_path / f"a.{fmt}"
    with audio.audio_writer(dst, 48000, 2, fmt) as write:
        write(wav)
    whole = dst.read_bytes()
    dst.unlink()
    for after in (0, 1, 43, 44, 4000, len(whole) // 2, len(whole) - 1):
        with files.inject_fault(after, code) as fault, pytest.raises(StorageError) as e:
            with audio.audio_writer(dst, 48000, 2, fmt) as write:
                for piece in wav.split(7000, dim=1):
                    write(piece)
        assert fault.tripped >= 1
        assert str(e.value).startswith(f"Cannot write {dst}: ") and SENTENCE[code] in str(e.value)
        assert list(tmp_path.iterdir()) == [], after
    one_error_line(capfd.readouterr().err or SENTENCE[code], code)
    with audio.audio_writer(dst, 48000, 2, fmt) as write:  # the fault gone, the same write completes
        for piece in wav.split(7000, dim=1):
            write(piece)
    assert dst.read_bytes() == whole


def test_a_committed_file_is_synced_and_its_size_checked(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(files.os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    files.write_atomic(tmp_path / "a.json", b"{}\n")
    assert len(synced) == 2  # the file before its rename, the folder after it

    # a file system that loses bytes without an error (a lying network mount) is caught by the size check
    real_write = files.os.write
    monkeypatch.setattr(files.os, "write", lambda fd, data: real_write(fd, bytes(data)[:-1]) + 1)
    with pytest.raises(OutputError, match="bytes were written but the file holds"):
        files.write_atomic(tmp_path / "b.json", b"0123456789")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_an_audio_file_that_reads_back_wrong_is_not_committed(tmp_path, monkeypatch):
    real = audio.soundfile.SoundFile

    class Short(real):
        @property
        def frames(self):
            return super().frames - 1 if self.mode == "r" else super().frames

    monkeypatch.setattr(audio.soundfile, "SoundFile", Short)
    with pytest.raises(OutputError, match="holds 99 frames at 48000 Hz in 2 channels, not the 100"):
        with audio.audio_writer(tmp_path / "a.wav") as write:
            write(torch.zeros(2, 100))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("code", FAULTS)
def test_token_files_shards_and_json_fail_whole(tmp_path, code):
    rows = [{"song_id": "a", "path": "a.wav", "duration": 1.0, "sample_rate": 48000, "channels": 2,
             "num_samples": 1920 * 40, "num_codes": 40, "codes": np.arange(40, dtype=np.uint16)}]
    writers = {
        "x.mct": lambda p: tokens.save_codes(p, torch.arange(40)),
        "s.parquet": lambda p: write_shard(p, rows),
        "r.json": lambda p: files.write_atomic(p, b'{"a": 1}\n' * 100),
    }
    (tmp_path / "ref").mkdir()
    for name, write in writers.items():
        write(tmp_path / "ref" / name)
        size = (tmp_path / "ref" / name).stat().st_size
        for after in (0, size // 3, size - 1):
            with files.inject_fault(after, code), pytest.raises(StorageError, match=SENTENCE[code]):
                write(tmp_path / name)
            assert not (tmp_path / name).exists() and temporaries(tmp_path) == [], (name, after)
        write(tmp_path / name)
        assert (tmp_path / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()


def test_a_failed_append_is_cut_off_and_a_torn_line_skipped(tmp_path):
    log = tmp_path / "log.jsonl"
    files.append_line(log, b'{"a": 1}\n')
    with files.inject_fault(3), pytest.raises(StorageError):
        files.append_line(log, b'{"b": 2}\n')
    assert log.read_bytes() == b'{"a": 1}\n'
    with open(log, "ab") as f:
        f.write(b'{"c": ')  # a crash mid-append
    assert files.read_lines(log) == [b'{"a": 1}']


def test_every_storage_errno_is_one_sentence_with_the_fix(tmp_path):
    for code, words in [(errno.ENOSPC, "free space on"), (errno.EDQUOT, "quota"), (errno.EROFS, "read-only"),
                        (errno.EIO, "check that disk")]:
        e = files.output_error(tmp_path / "a.wav", OSError(code, os.strerror(code)))
        assert isinstance(e, StorageError) and words in str(e) and str(tmp_path) in str(e)
        assert str(e).endswith(".") and str(e).count(". ") == 0
    e = files.job_storage_error(files.output_error(tmp_path / "a" / "b.wav", OSError(errno.ENOSPC, "x")),
                                tmp_path, 3 * 2 ** 30 // 2)
    assert f"free space on {tmp_path} (1.5 GiB needed for the rest of this job)" in str(e)
    assert not isinstance(files.output_error(tmp_path / "a", PermissionError(13, "Permission denied")),
                          StorageError)


# ---- the jobs: stop at the first failure, commit nothing damaged, resume to the uninterrupted result ----

def decode_cli(inputs, out, ckpt, *extra) -> int:
    return cli.main([*map(str, inputs), "-o", str(out), "--steps", "1", "--seed", "5", "--workers", "0",
                     "--audio-format", "wav", "--decode-batch", "2", *extra, *common(str(ckpt))])


@pytest.fixture
def songs(tmp_path):
    return npy_songs(tmp_path / "in", 5)


@pytest.mark.parametrize("code", FAULTS)
def test_the_decode_job_stops_at_a_full_disk_and_resumes_to_the_same_audio(tmp_path, songs, cheap, tiny_ckpt_dir,
                                                                           capfd, code):
    ref = tmp_path / "ref"
    assert decode_cli([songs], ref, tiny_ckpt_dir) == 0
    audio_ref = {k: v for k, v in files_of(ref).items() if k.endswith(".wav")}
    song_bytes = max(len(v) for v in audio_ref.values())
    capfd.readouterr()
    # the fault at the manifest, in the first song's audio, between songs, late in the job
    for after in (10, 2000, song_bytes + 500, 3 * song_bytes):
        out = tmp_path / f"out{after}"
        with files.inject_fault(after, code) as fault:
            assert decode_cli([songs], out, tiny_ckpt_dir) == 1
        assert fault.tripped
        one_error_line(capfd.readouterr().err, code)
        assert temporaries(tmp_path) == []
        for name in (p.name for p in out.glob("*.wav")):  # whatever was committed is complete
            assert (out / name).read_bytes() == audio_ref[name], (after, name)
        assert decode_cli([songs], out, tiny_ckpt_dir) == 0
        assert {k: v for k, v in files_of(out).items() if k.endswith(".wav")} == audio_ref
        assert "Traceback" not in capfd.readouterr().err


def test_a_full_disk_names_the_space_the_rest_of_the_job_needs(tmp_path, songs, cheap, tiny_ckpt_dir):
    out = tmp_path / "out"
    library.decode_library([str(songs)], out, DecodingOptions(num_steps=1, seed=5, batch_size=1),
                           JobOptions(ckpt=str(tiny_ckpt_dir), workers=0, audio_format="wav"))
    mean = sum(p.stat().st_size for p in out.glob("*.wav")) // 5
    for name in ("s02.wav", "s03.wav", "s04.wav"):
        (out / name).unlink()
    with files.inject_fault(0), pytest.raises(StorageError) as e:
        library.decode_library([str(songs)], out, DecodingOptions(num_steps=1, seed=5, batch_size=1),
                               JobOptions(ckpt=str(tiny_ckpt_dir), workers=0, audio_format="wav"))
    assert f"free space on {out} (" in str(e.value) and "needed for the rest of this job" in str(e.value)
    need = str(e.value).split(f"free space on {out} (")[1].split(" needed")[0]
    assert need == files.format_bytes(3 * mean)  # three songs of the mean size recorded


@pytest.mark.parametrize("code", FAULTS)
def test_the_encode_job_stops_at_a_full_disk_and_resumes_to_the_same_codes(tmp_path, tiny_ckpt_dir, capfd, code):
    music = make_music(tmp_path / "music", [("a.wav", 30000, 48000, 2), ("b/c.wav", 50000, 48000, 1),
                                            ("d.wav", 70000, 44100, 2)])
    argv = ["--encode", str(music), "--workers", "0", "--shard-size", "1", "--format", "both",
            *common(str(tiny_ckpt_dir))]
    assert cli.main([*argv, "-o", str(tmp_path / "ref")]) == 0
    ref = library.read_library(tmp_path / "ref").sort_by("path").to_pylist()
    mct_ref = {k: v for k, v in files_of(tmp_path / "ref").items() if k.endswith(".mct")}
    total = sum(map(len, files_of(tmp_path / "ref").values()))  # the job writes at least this much
    capfd.readouterr()
    for after in (5, total // 4, total // 2, total * 3 // 4):
        out = tmp_path / f"out{after}"
        with files.inject_fault(after, code):
            assert cli.main([*argv, "-o", str(out)]) == 1
        one_error_line(capfd.readouterr().err, code)
        assert temporaries(tmp_path) == []
        assert cli.main([*argv, "-o", str(out)]) == 0
        assert library.read_library(out).sort_by("path").to_pylist() == ref
        assert {k: v for k, v in files_of(out).items() if k.endswith(".mct")} == mct_ref


@pytest.mark.parametrize("code", FAULTS)
def test_single_files_say_the_same_sentence_and_stop(tmp_path, cheap, tiny_ckpt_dir, capfd, code):
    codec = MuCodec.from_pretrained(tiny_ckpt_dir, device="cpu")
    mcts = []
    for k in range(3):
        mcts.append(tokens.save_codes(tmp_path / f"t{k}.mct", torch.arange(30 + k), layer=codec.layer))
    args = [*map(str, mcts), "--steps", "1", "--seed", "2", *common(str(tiny_ckpt_dir))]
    assert cli.main([*args, "-o", str(tmp_path / "ref")]) == 0
    capfd.readouterr()
    with files.inject_fault(100, code):
        assert cli.main([*args, "-o", str(tmp_path / "out")]) == 1
    err = capfd.readouterr().err
    one_error_line(err, code)
    assert "internal error" not in err and "2 not started" in err
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
    assert cli.main([*args, "-o", str(tmp_path / "out")]) == 0
    assert files_of(tmp_path / "out") == files_of(tmp_path / "ref")


@pytest.mark.parametrize("code", FAULTS)
def test_the_evaluation_writes_nothing_damaged(tmp_path, code, capfd):
    pytest.importorskip("visqol")
    rng = np.random.default_rng(1)
    for d in ("ref", "deg"):
        (tmp_path / d).mkdir()
    x = (0.2 * rng.standard_normal((48000 * 2, 2))).astype(np.float32)
    sf.write(tmp_path / "ref" / "a.wav", x, 48000)
    sf.write(tmp_path / "deg" / "a.wav", x + 0.01 * rng.standard_normal(x.shape).astype(np.float32), 48000)
    argv = [str(tmp_path / "ref"), str(tmp_path / "deg"), "--workers", "0", "-q"]
    assert evaluate.main([*argv, "-o", str(tmp_path / "good")]) == 0
    written = files_of(tmp_path / "good")
    capfd.readouterr()
    for after in (0, len(written["metrics.csv"]) + 10, sum(map(len, written.values())) - 10):
        out = tmp_path / f"e{after}"
        with files.inject_fault(after, code):
            assert evaluate.main([*argv, "-o", str(out)]) == 1
        one_error_line(capfd.readouterr().err, code)
        assert temporaries(tmp_path) == []
        for name, data in files_of(out).items():  # a file that is there is whole (the CSV is the resume state)
            assert name in written and (name != "metrics.csv" or scores(data) == scores(written[name]))
        assert evaluate.main([*argv, "-o", str(out)]) == 0
        assert set(files_of(out)) == set(written)
        assert scores(files_of(out)["metrics.csv"]) == scores(written["metrics.csv"])


def scores(csv_bytes: bytes) -> list[dict]:
    """The rows of a metrics.csv, complete, without the seconds each took to score and with the scores to 6
    digits (ViSQOL's last digits vary from run to run)."""
    rows = list(csv.DictReader(io.StringIO(csv_bytes.decode())))
    assert rows and all(None not in r and None not in r.values() for r in rows)  # no torn row

    def value(v: str):
        try:
            return round(float(v), 6)
        except ValueError:
            return v

    return [{k: value(v) for k, v in r.items() if k != "score_seconds"} for r in rows]


# ---- the resume trusts only what it can check -------------------------------------------------------

def test_a_truncated_or_lost_output_is_done_again_and_said(tmp_path, songs, cheap, tiny_ckpt_dir, capfd):
    out = tmp_path / "out"
    assert decode_cli([songs], out, tiny_ckpt_dir) == 0
    whole = files_of(out)
    with open(out / "s01.wav", "r+b") as f:
        f.truncate(4096)  # as the old writers left a song on a full disk
    (out / "s03.wav").unlink()
    capfd.readouterr()
    assert cli.main([str(songs), "-o", str(out), "--steps", "1", "--seed", "5", "--workers", "0", "--audio-format",
                     "wav", "--ckpt", str(tiny_ckpt_dir), "--device", "cpu"]) == 0
    err = capfd.readouterr().err
    assert f"s01.wav is done again: it holds 4,096 bytes where {len(whole['s01.wav']):,} were written." in err
    assert "s03.wav is done again: it is missing." in err
    assert "5 songs in this job: 3 already done" in err
    assert {k: v for k, v in files_of(out).items() if k.endswith(".wav")} == \
        {k: v for k, v in whole.items() if k.endswith(".wav")}


def test_verify_checks_the_checksum_of_every_output(tmp_path, songs, cheap, tiny_ckpt_dir, capfd):
    out = tmp_path / "out"
    assert decode_cli([songs], out, tiny_ckpt_dir) == 0
    good = (out / "s02.wav").read_bytes()
    flipped = bytearray(good)
    flipped[-3] ^= 0x40  # same size: only the checksum tells
    (out / "s02.wav").write_bytes(bytes(flipped))
    assert decode_cli([songs], out, tiny_ckpt_dir) == 0
    assert (out / "s02.wav").read_bytes() == bytes(flipped)  # a stat per song does not see it
    capfd.readouterr()
    assert decode_cli([songs], out, tiny_ckpt_dir, "--verify") == 0
    assert "s02.wav is done again: its checksum differs" in capfd.readouterr().err
    assert (out / "s02.wav").read_bytes() == good


def test_an_output_without_a_record_is_not_trusted(tmp_path, songs, cheap, tiny_ckpt_dir, capfd):
    """An audio file of the right name that no commit recorded (a folder written by another tool, or a copy) is
    decoded again, never taken as done."""
    out = tmp_path / "out"
    out.mkdir()
    assert decode_cli([songs], out, tiny_ckpt_dir) == 0
    lines = (out / "manifest.jsonl").read_text().splitlines()
    (out / "manifest.jsonl").write_text("".join(ln + "\n" for ln in lines if '"s04.wav"' not in ln))
    capfd.readouterr()
    assert decode_cli([songs], out, tiny_ckpt_dir) == 0
    assert "s04.wav is done again: no record of its commit is in the manifest." in capfd.readouterr().err


def test_a_damaged_shard_of_the_encode_job_is_replaced(tmp_path, tiny_ckpt_dir, capfd):
    music = make_music(tmp_path / "music", [("a.wav", 30000, 48000, 2), ("b.wav", 40000, 48000, 2)])
    argv = ["--encode", str(music), "-o", str(tmp_path / "tok"), "--workers", "0", "--shard-size", "1",
            *common(str(tiny_ckpt_dir))]
    assert cli.main(argv) == 0
    ref = library.read_library(tmp_path / "tok").sort_by("path").to_pylist()
    shard = sorted((tmp_path / "tok" / "shards").glob("*.parquet"))[0]
    shard.write_bytes(shard.read_bytes()[:-20])
    capfd.readouterr()
    assert cli.main([a for a in argv if a != "-q"]) == 0
    assert f"shards/{shard.name} is done again: it holds" in capfd.readouterr().err
    assert library.read_library(tmp_path / "tok").sort_by("path").to_pylist() == ref  # once each, complete


def test_songs_of_an_unreadable_shard_count_as_failed(tmp_path, cheap, tiny_ckpt_dir, capfd):
    music = make_music(tmp_path / "music", [(f"s{k}.wav", 20000 + 100 * k, 48000, 2) for k in range(3)])
    assert cli.main(["--encode", str(music), "-o", str(tmp_path / "tok"), "--workers", "0",
                     *common(str(tiny_ckpt_dir))]) == 0
    (shard,) = (tmp_path / "tok" / "shards").glob("*.parquet")
    shard.write_bytes(shard.read_bytes()[:100])
    capfd.readouterr()
    assert cli.main([str(tmp_path / "tok"), "-o", str(tmp_path / "out"), "--steps", "1", "--workers", "0",
                     "--ckpt", str(tiny_ckpt_dir), "--device", "cpu"]) == 1
    err = capfd.readouterr().err
    assert f"3 songs in {shard} cannot be read" in err
    assert "0 done, 0 skipped, 3 failed" in err


# ---- a real full disk ------------------------------------------------------------------------------

def _tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.mark.slow
def test_twelve_songs_into_two_mebibytes_then_a_rerun_with_space(tmp_path, tiny_ckpt_dir):
    """The scenario of the report: a token library of 12 short songs decoded as float WAV (about 1.1 MB each)
    into a 2 MiB file system, in a separate process as a user runs it; then the same command with space."""
    disk = tmp_path / "disk"
    if not _tmpfs(disk, "2m"):
        pytest.skip("mounting a tmpfs needs root and mount(8) (CI runs as root)")
    try:
        music = make_music(tmp_path / "music", [(f"s{k:02d}.wav", 3 * 48000, 48000, 2) for k in range(12)])
        assert cli.main(["--encode", str(music), "-o", str(tmp_path / "tok"), "--workers", "0",
                         *common(str(tiny_ckpt_dir))]) == 0
        cmd = [sys.executable, "-m", "mucodec", str(tmp_path / "tok"), "--steps", "1", "--seed", "3", "--workers",
               "0", "--audio-format", "wav", "--decode-batch", "4", "--ckpt", str(tiny_ckpt_dir), "--device", "cpu"]
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        ref = subprocess.run([*cmd, "-o", str(tmp_path / "ref")], capture_output=True, text=True, env=env)
        assert ref.returncode == 0, ref.stderr
        full = subprocess.run([*cmd, "-o", str(disk / "out")], capture_output=True, text=True, env=env)
        assert full.returncode == 1
        assert "Traceback" not in full.stderr and "Exception ignored" not in full.stderr, full.stderr
        assert f"no space is left on {disk / 'out'}; free space on {disk / 'out'}" in full.stderr
        committed = sorted((disk / "out").glob("*.wav"))
        assert temporaries(disk) == [] and len(committed) < 12
        for p in committed:
            assert p.read_bytes() == (tmp_path / "ref" / p.name).read_bytes(), p.name
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        again = subprocess.run([*cmd, "-o", str(disk / "out")], capture_output=True, text=True, env=env)
        assert again.returncode == 0 and "Traceback" not in again.stderr, again.stderr
        assert files_of(disk / "out").keys() >= {f"s{k:02d}.wav" for k in range(12)}
        for k in range(12):
            assert (disk / "out" / f"s{k:02d}.wav").read_bytes() == (tmp_path / "ref" / f"s{k:02d}.wav").read_bytes()
        assert all(read(disk / "out" / f"s{k:02d}.wav").shape == (2, 3 * 48000) for k in range(12))
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
