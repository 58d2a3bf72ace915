"""--engine ray on Ray's local instance (one per module, 2 CPUs) with the tiny checkpoints: its output equals
the local engine's and per-file ``sound2code``, bit for bit, and a killed run resumes complete and
duplicate-free."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from mucodec import cli, library
from mucodec.library import store
from mucodec.codec import MuCodec
from mucodec.tokens import load_codes

ray = pytest.importorskip("ray")
pytest.importorskip("pyarrow")
from mucodec.library import ray_engine  # noqa: E402  (needs ray)
from test_library import MIXED, codes_of, common, make_music  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def same_fingerprint_but_machines(ray_out, local_out) -> bool:
    """Ray and local runs record the same settings; the machines differ (a Ray cluster vs this CPU)."""
    ray_fp, local_fp = (json.loads((d / "fingerprint.json").read_text()) for d in (ray_out, local_out))
    assert ray_fp.pop("machines") == [{"engine": "ray"}] and local_fp.pop("machines") == [store.machine("cpu")]
    return ray_fp == local_fp


@pytest.fixture(scope="module", autouse=True)
def ray_instance():
    ray.init(num_cpus=2, include_dashboard=False, runtime_env=ray_engine.runtime_env(), log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_ray_equals_local_equals_per_file(tmp_path, tiny_ckpt_dir):
    music = make_music(tmp_path / "music")
    (music / "broken.wav").write_bytes(b"RIFF")
    base = ["--encode", music, "--workers", 1, *common(tiny_ckpt_dir)]
    assert cli.main([str(a) for a in [*base, "-o", tmp_path / "ray", "--engine", "ray"]]) == 1  # broken.wav
    assert cli.main([str(a) for a in [*base, "-o", tmp_path / "local"]]) == 1
    by_ray, by_local = codes_of(tmp_path / "ray"), codes_of(tmp_path / "local")
    codec = MuCodec.from_pretrained(tiny_ckpt_dir, device="cpu", encoder_only=True)
    assert sorted(by_ray) == sorted(by_local) == sorted(name for name, *_ in MIXED)
    for name in by_ray:
        ref = codec.sound2code(str(music / name), batch_size=3).reshape(-1).numpy().astype(np.uint16)
        assert np.array_equal(by_ray[name], by_local[name]) and np.array_equal(by_ray[name], ref), name
    ray_table = library.read_library(tmp_path / "ray").drop_columns(["codes"]).to_pylist()
    assert ray_table == library.read_library(tmp_path / "local").drop_columns(["codes"]).to_pylist()
    (err,) = library.read_errors(tmp_path / "ray")
    assert err["path"] == "broken.wav" and err["stage"] == "read"
    assert same_fingerprint_but_machines(tmp_path / "ray", tmp_path / "local")
    # run again: nothing to do
    assert cli.main([str(a) for a in [*base, "-o", tmp_path / "ray", "--engine", "ray"]]) == 0
    ids = library.read_library(tmp_path / "ray", columns=["song_id"]).column("song_id").to_pylist()
    assert len(ids) == len(set(ids)) == len(MIXED)


@pytest.mark.slow
def test_ray_killed_midway_resumes_complete_without_duplicates(tmp_path, tiny_ckpt_dir):
    n = 48
    music = make_music(tmp_path / "music", [(f"s{k:02d}.wav", 48000 * (3 + k % 5), 48000, 2) for k in range(n)])
    out = tmp_path / "tok"
    address = ray.get_runtime_context().gcs_address
    argv = [sys.executable, str(REPO / "generate.py"), "--encode", str(music), "-o", str(out), "--engine", "ray",
            "--address", address, "--shard-size", "1", "--workers", "1", *common(str(tiny_ckpt_dir))]
    proc = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600  # a busy machine can take minutes to start Ray workers
    while time.monotonic() < deadline and proc.poll() is None and not list((out / "shards").glob("*.parquet")):
        time.sleep(0.01)
    assert proc.poll() is None, "the job ended before it could be killed midway"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(3)  # Ray stops the dead driver's tasks; a write already renamed stays committed
    partial = len(library.read_library(out, columns=["song_id"]))
    assert 1 <= partial < n
    assert cli.main([str(a) for a in ["--encode", music, "-o", out, "--engine", "ray", "--shard-size", 1,
                                      "--workers", 1, *common(tiny_ckpt_dir)]]) == 0
    ids = library.read_library(out, columns=["song_id"]).column("song_id").to_pylist()
    assert len(ids) == len(set(ids)) == n


@pytest.mark.slow
def test_ray_mct_headers_carry_the_models_token_spec(tmp_path, tiny_ckpt_dir, tiny_codec):
    music = make_music(tmp_path / "music", [("a.wav", 24000, 48000, 2)])
    out = tmp_path / "tok"
    assert cli.main([str(a) for a in ["--encode", music, "-o", out, "--format", "mct", "--engine", "ray",
                                      "--workers", 1, *common(tiny_ckpt_dir)]]) == 0
    _, header = load_codes(out / "a.mct")
    assert header["layer"] == tiny_codec.layer != 6  # the model's layer, not the format's default
    assert tiny_codec.code2sound(out / "a.mct", num_steps=1, seed=0).shape == (2, 24000)


@pytest.mark.slow
def test_ray_decode_equals_local(tmp_path, tiny_ckpt_dir):
    """The decode job on Ray writes the local engine's audio bit for bit (float WAV), and its error rows."""
    songs = tmp_path / "tok"
    songs.mkdir()
    rng = np.random.default_rng(0)
    for k, n in enumerate((40, 70)):
        np.save(songs / f"s{k}.npy", rng.integers(0, 16384, n))
    np.save(songs / "bad.npy", np.full(5, 99999))
    base = [songs, "--steps", 1, "--seed", 3, "--decode-batch", 2, "--audio-format", "wav", *common(tiny_ckpt_dir)]
    assert cli.main([str(a) for a in [*base, "-o", tmp_path / "ray", "--engine", "ray"]]) == 1  # bad.npy
    assert cli.main([str(a) for a in [*base, "-o", tmp_path / "local", "--workers", 0]]) == 1
    for k in range(2):
        a, b = (sf.read(tmp_path / where / f"s{k}.wav", dtype="float32")[0] for where in ("ray", "local"))
        assert a.shape[0] > 0 and np.array_equal(a, b), k
    (err,) = library.read_errors(tmp_path / "ray")
    assert err["path"] == "bad" and "must lie in" in err["message"]
    assert same_fingerprint_but_machines(tmp_path / "ray", tmp_path / "local")


@pytest.mark.slow
def test_a_full_disk_stops_a_ray_decode_job_and_it_resumes(tmp_path, tiny_ckpt_dir):
    """The Ray actors write the audio: a full disk there stops the job with the one sentence, commits nothing
    damaged and records no song as failed for it (a tmpfs is a real full disk for every process)."""
    from test_storage import _tmpfs, temporaries

    disk = tmp_path / "disk"
    if not _tmpfs(disk, "2m"):
        pytest.skip("mounting a tmpfs needs root and mount(8) (CI runs as root)")
    try:
        songs = tmp_path / "in"
        songs.mkdir()
        for k in range(4):
            np.save(songs / f"s{k}.npy", np.random.default_rng(k).integers(0, 16384, 100 + k))  # 4 s: 1.5 MB of WAV
        base = [str(songs), "--steps", "1", "--seed", "4", "--audio-format", "wav", "--engine", "ray",
                "--ckpt", str(tiny_ckpt_dir), "--device", "cpu", "-q"]
        assert cli.main([*base, "-o", str(tmp_path / "ref")]) == 0
        assert cli.main([*base, "-o", str(disk / "out")]) == 1
        assert temporaries(disk) == [] and library.read_errors(disk / "out") == []
        committed = sorted((disk / "out").glob("*.wav"))
        assert len(committed) < 4
        for p in committed:
            assert p.read_bytes() == (tmp_path / "ref" / p.name).read_bytes()
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        assert cli.main([*base, "-o", str(disk / "out")]) == 0
        for k in range(4):
            assert (disk / "out" / f"s{k}.wav").read_bytes() == (tmp_path / "ref" / f"s{k}.wav").read_bytes()
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


@pytest.mark.slow
def test_a_ray_prepare_equals_the_local_one(tmp_path, tiny_ckpt_dir):
    """Fine-tuning's data preparation on Ray Data: the same windows, codes and latents as the local engine, a
    bad file as an error row, and a rerun that prepares nothing."""
    from mucodec.library import prepare
    from mucodec.settings import EncodingOptions, JobOptions
    from test_training import write_music

    music = write_music(tmp_path / "music", [(f"s{k}.wav", 1.0 + k / 2) for k in range(3)])
    (music / "broken.wav").write_bytes(b"RIFF")
    common = dict(ckpt=str(tiny_ckpt_dir), workers=1, shard_size=2)
    reps = {engine: prepare.prepare_library([music], tmp_path / engine, EncodingOptions(batch_size=2),
                                            JobOptions(engine=engine, **common)) for engine in ("ray", "local")}
    assert reps["ray"]["songs"]["done"] == reps["local"]["songs"]["done"] == 3
    assert reps["ray"]["songs"]["failed"] == 1 and reps["ray"]["engine"] == "ray"
    columns = ["song_id", "window", "start_code", "valid", "codes", "latents"]
    tables = [library.read_library(tmp_path / e, columns=columns).sort_by([("song_id", "ascending"),
                                                                          ("window", "ascending")])
              for e in ("ray", "local")]
    assert tables[0].num_rows == tables[1].num_rows >= 3 and tables[0].equals(tables[1])
    (err,) = library.read_errors(tmp_path / "ray")
    assert err["path"] == "broken.wav"
    again = prepare.prepare_library([music], tmp_path / "ray", EncodingOptions(batch_size=2),
                                    JobOptions(engine="ray", **common))
    assert again["songs"]["done"] == 0 and again["songs"]["skipped"] == 4  # 3 prepared, 1 failed before
