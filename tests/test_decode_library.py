"""The decode job (mucodec.library.decode; decoding token inputs from the CLI) on the tiny checkpoints.

A song decoded inside a batch, in any order, equals ``code2sound(codes, seed=song_seed(seed, id))`` of that
song alone bit for bit (float WAV output keeps every bit); continuous batching keeps the batch full; every
input kind decodes; bad rows and files become error rows; shards partition the songs; the fingerprint and
the recorded seed guard a resumed job; a SIGKILLed job leaves no process and resumes complete.

Most tests replace the VAE and vocoder by a cheap function of the latents: they run per song, outside the
batch, on the same code path in both runs, and the real ones take seconds per window even at tiny width.
Tests marked slow run them for real.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from mucodec import cli, decoding, library
from mucodec.library.decode import AudioLibrary
from mucodec.settings import DecodingOptions, JobOptions
from mucodec.library.parquet import write_shard
from mucodec.library.token_inputs import TokenSong
from mucodec.codec import MuCodec
from mucodec.errors import ArgumentError, OutputError
from mucodec.library.decode import AudioWriter, SongDecoder, song_seed
from mucodec.tokens import save_codes
from test_library import common, make_music
from test_orphans import session, wait_for

pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SPC = 1920  # samples per code
LENGTHS = [50, 900, 1024, 1025, 1800, 300, 2500, 10]  # 1 to 4 windows each


def cheap_wave(self, latents, fast_vocoder=True, num_samples=None):
    """Stand-in for VAE + vocoder: every sample depends on the window's latents, at a fraction of the cost."""
    b, ch, t, f = latents.shape
    per_frame = self.config.codes_per_latent * self.config.samples_per_code
    x = latents.reshape(2, ch // 2, t, f).mean(1)
    return x.repeat_interleave(per_frame // f, dim=2).reshape(2, t * per_frame).float()


@pytest.fixture
def cheap(monkeypatch):
    monkeypatch.setattr(MuCodec, "latents_to_wave", cheap_wave)


@pytest.fixture(scope="module")
def codec(tiny_ckpt_dir):
    return MuCodec.from_pretrained(tiny_ckpt_dir, device="cpu")


def random_codes(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 16384, n).astype(np.int64)


_ALONE = {}


def alone(codec, codes, sid, seed, steps=1, num_samples=None) -> np.ndarray:
    """What code2sound gives the song alone with its derived seed, as the job writes it (cut, float32);
    remembered across tests (the same song alone is the reference of several batchings)."""
    key = (codes.tobytes(), sid, seed, steps, MuCodec.latents_to_wave is cheap_wave)
    if key not in _ALONE:
        _ALONE[key] = codec.code2sound(torch.from_numpy(codes), num_steps=steps, seed=song_seed(seed, sid)).numpy()
    wav = _ALONE[key]
    return wav[:, :num_samples] if num_samples is not None else wav


def read(path) -> np.ndarray:
    data, rate = sf.read(path, dtype="float32", always_2d=True)
    assert rate == 48000
    return data.T


def write_table(path: Path, columns: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


def decode(inputs, out, ckpt, codec=None, **kw):
    """decode_library with each keyword sent to the settings dataclass that has it."""
    kw = {"num_steps": 1, "audio_format": "wav", "workers": 0, **kw}
    decoding = {k: kw.pop(k) for k in [f.name for f in dataclasses.fields(DecodingOptions)] if k in kw}
    return library.decode_library([str(i) for i in inputs], out, DecodingOptions(**decoding),
                                  JobOptions(ckpt=str(ckpt), device="cpu", **kw), codec=codec)


# ---- batching ----------------------------------------------------------------------------------

@pytest.mark.parametrize("batch,shuffle", [(1, False), (3, False), (8, False), (8, True)])
def test_batched_songs_equal_code2sound_alone(tmp_path, codec, cheap, batch, shuffle):
    songs = [(TokenSong(f"{k:016x}", f"s{k}", "-"), random_codes(n, k)) for k, n in enumerate(LENGTHS)]
    if shuffle:
        random.Random(1).shuffle(songs)
    lib = AudioLibrary(tmp_path, "wav")
    dec = SongDecoder(codec, DecodingOptions(num_steps=2, batch_size=batch, seed=7), lib.audio_path,
                      AudioWriter(48000, "wav"))
    done = []
    for song, codes in songs:
        done += dec.add(song, {"codes": codes, "num_samples": None})
    done += dec.flush()
    assert sorted(s.path for s, result, why in done if why is None) == sorted(s.path for s, _ in songs)
    for song, codes in songs:
        expected = alone(codec, codes, song.song_id, 7, steps=2)
        got = read(lib.audio_path(song))
        assert got.shape == expected.shape == (2, len(codes) * SPC)
        assert np.array_equal(got, expected), song.path  # bit for bit
    windows = sum(len(decoding.decode_windows(codec, len(c))) for _, c in songs)
    assert dec.counters()["windows"] == windows
    assert not list(tmp_path.rglob(".*.tmp"))


def test_continuous_batching_refills_free_slots(tmp_path, codec, cheap):
    """Windows per song [3, 1, 1, 1, 1, 1] at batch 2: a finished song's slot is taken at the next step, so
    8 windows take 4 full steps (a batch kept until all its songs finish would need 5)."""
    lengths = [2000, 100, 100, 100, 100, 100]
    lib = AudioLibrary(tmp_path, "wav")
    dec = SongDecoder(codec, DecodingOptions(num_steps=1, batch_size=2, seed=0), lib.audio_path,
                      AudioWriter(48000, "wav"))
    for k, n in enumerate(lengths):
        dec.add(TokenSong(f"{k:016x}", f"s{k}", "-"), {"codes": random_codes(n, k), "num_samples": None})
    dec.flush()
    c = dec.counters()
    assert (c["windows"], c["steps"], c["slots_filled"], c["slots"]) == (8, 4, 8, 8)


def test_a_nan_fails_only_its_song_and_the_batch_goes_on(tmp_path, codec, cheap, monkeypatch):
    from_codes, sample, poisoned = codec.quantizer.from_codes, codec.flow.sample, []

    def marking(codes):  # the flow decoder gives NaN for the song whose codes are all 7
        poisoned[:] = [(codes == 7).flatten(1).all(1)]
        return from_codes(codes)

    def nan_sample(*a, **k):
        return torch.where(poisoned[0][:, None, None, None], float("nan"), sample(*a, **k))

    songs = [(TokenSong(f"{k:016x}", f"s{k}", "-"), codes)
             for k, codes in enumerate([random_codes(900, 1), np.full(300, 7), random_codes(1800, 2)])]
    lib = AudioLibrary(tmp_path, "wav")
    dec = SongDecoder(codec, DecodingOptions(num_steps=1, batch_size=3, seed=7), lib.audio_path,
                      AudioWriter(48000, "wav"))
    done = []
    with monkeypatch.context() as mp:
        mp.setattr(codec.quantizer, "from_codes", marking)
        mp.setattr(codec.flow, "sample", nan_sample)
        for song, codes in songs:
            done += dec.add(song, {"codes": codes, "num_samples": None})
        done += dec.flush()
    why = {s.path: w for s, _, w in done}
    assert why["s0"] is None and why["s2"] is None and why["s1"].startswith("The flow decoder produced NaN")
    assert not lib.audio_path(songs[1][0]).exists() and not list(tmp_path.rglob(".*.tmp"))
    for song, codes in (songs[0], songs[2]):  # the others of its batch, as they would be alone
        assert np.array_equal(read(lib.audio_path(song)), alone(codec, codes, song.song_id, 7)), song.path


# ---- inputs ------------------------------------------------------------------------------------

def make_inputs(root: Path, codec) -> dict:
    """Every input kind; returns {output name: (codes, num_samples or None, song id)}."""
    expected = {}
    # a token library as --encode writes it: shards named by the audio's path, cut to num_samples
    rows = []
    for k, (path, n) in enumerate([("album/01.flac", 700), ("b.wav", 1100)]):
        codes = random_codes(n, 100 + k)
        sid = library.song_id(path)
        rows.append({"song_id": sid, "path": path, "duration": n / 25, "sample_rate": 44100, "channels": 2,
                     "num_samples": n * SPC - 999, "num_codes": n, "codes": codes.astype(np.uint16)})
        expected[path.rsplit(".", 1)[0]] = (codes, n * SPC - 999, sid)
    (root / "tok" / "shards").mkdir(parents=True)
    write_shard(root / "tok" / "shards" / "all-000000.parquet", rows)
    (root / "tok" / "fingerprint.json").write_text("{}")
    # a language model's table: an id column names the outputs; a table without one: <table>/<row>
    gen = [random_codes(n, 200 + n) for n in (40, 60)]
    write_table(root / "lm" / "gen.parquet", {"id": ["x", "y"], "tokens": [c.tolist() for c in gen]})
    expected.update({"x": (gen[0], None, library.song_id("x")), "y": (gen[1], None, library.song_id("y"))})
    write_table(root / "anon.parquet", {"codes": [gen[0].tolist()]})
    expected["anon/000000"] = (gen[0], None, library.song_id("anon/000000"))
    # token files, a folder of them and a glob; numpy arrays of every accepted shape
    for k, name in enumerate(["mct/one", "mct/deep/two"]):
        codes = random_codes(80 + k, 300 + k)
        path = root / f"{name}.mct"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_codes(path, torch.from_numpy(codes), num_samples=len(codes) * SPC - 5,
                   **{k: v for k, v in codec.token_spec.items() if k != "num_codebooks"})
        expected[name.split("/", 1)[1]] = (codes, len(codes) * SPC - 5, library.song_id(name.split("/", 1)[1]))
    save_codes(root / "g1.mct", torch.from_numpy(random_codes(30, 5)), layer=codec.layer)
    expected["g1"] = (random_codes(30, 5), 30 * SPC, library.song_id("g1"))
    (root / "npy").mkdir()
    for name, shape in [("t", (33,)), ("1t", (1, 34)), ("11t", (1, 1, 35))]:
        codes = random_codes(int(np.prod(shape)), len(name))
        np.save(root / "npy" / f"{name}.npy", codes.reshape(shape).astype(np.int32))
        expected[name] = (codes, None, library.song_id(name))
    two = np.stack([random_codes(20, 1), random_codes(20, 2)]).astype(np.uint16)
    np.save(root / "npy" / "batch.npy", two)
    expected.update({f"batch/{r:06d}": (two[r].astype(np.int64), None, library.song_id(f"batch/{r:06d}"))
                     for r in range(2)})
    return expected


def test_every_input_kind_decodes(tmp_path, codec, cheap, tiny_ckpt_dir):
    expected = make_inputs(tmp_path, codec)
    inputs = [tmp_path / "tok", tmp_path / "lm" / "gen.parquet", tmp_path / "anon.parquet", tmp_path / "mct",
              str(tmp_path / "g*.mct"), tmp_path / "npy"]
    rep = decode(inputs, tmp_path / "out", tiny_ckpt_dir, seed=3, batch_size=3).report
    assert rep["songs"]["done"] == len(expected) and rep["songs"]["failed"] == 0
    written = sorted(p.relative_to(tmp_path / "out").as_posix()[:-4] for p in (tmp_path / "out").rglob("*.wav"))
    assert written == sorted(expected)
    for name, (codes, n, sid) in expected.items():
        assert np.array_equal(read(tmp_path / "out" / f"{name}.wav"), alone(codec, codes, sid, 3, num_samples=n)), name
    manifest = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert sorted(m["path"] for m in manifest if "output" not in m) == sorted(expected)
    # after the songs, what each committed output must be
    assert sorted(m["output"] for m in manifest if "output" in m) == sorted(f"{name}.wav" for name in expected)


def test_bad_rows_and_files_become_error_rows(tmp_path, codec, cheap, tiny_ckpt_dir, capsys):
    good = random_codes(40, 0)
    write_table(tmp_path / "in" / "t.parquet", {"id": ["good", "high", "empty"],
                                                "codes": [good.tolist(), [1, 20000, 3], []]})
    np.save(tmp_path / "in" / "float.npy", np.zeros(10, np.float32))
    np.save(tmp_path / "in" / "cube.npy", np.zeros((2, 2, 5), np.int64))
    (tmp_path / "in" / "junk.npy").write_bytes(b"not numpy")
    save_codes(tmp_path / "in" / "other.mct", torch.from_numpy(good), layer=codec.layer + 1)
    save_codes(tmp_path / "in" / "torn.mct", torch.from_numpy(good), layer=codec.layer)
    data = bytearray((tmp_path / "in" / "torn.mct").read_bytes())
    data[-7] ^= 0xFF
    (tmp_path / "in" / "torn.mct").write_bytes(bytes(data))
    out = tmp_path / "out"
    status = cli.main([str(tmp_path / "in"), "-o", str(out), "--steps", "1", "--workers", "0", "--seed", "1",
                       *common(str(tiny_ckpt_dir))])
    assert status == 1
    assert [p.name for p in out.rglob("*.flac")] == ["good.flac"]
    errors = {e["path"]: e["message"] for e in library.read_errors(out)}
    assert set(errors) == {"high", "empty", "float", "cube", "junk", "other", "torn"}
    for name, words in [("high", "must lie in [0, 16383]"), ("empty", "contain no codes"), ("float", "integers"),
                        ("cube", "must have shape"), ("junk", "Cannot read"), ("other", "was made with layer"),
                        ("torn", "checksum")]:
        assert words in errors[name], (name, errors[name])
        assert "t.parquet" in errors[name] if name in ("high", "empty") else f"{name}." in errors[name]
    assert "Traceback" not in capsys.readouterr().err
    assert not list(out.rglob(".*.tmp"))


def test_two_songs_with_one_name_fail_the_later(tmp_path, cheap, tiny_ckpt_dir):
    a = write_table(tmp_path / "a.parquet", {"id": ["x"], "codes": [[1, 2, 3]]})
    b = write_table(tmp_path / "b.parquet", {"id": ["X"], "codes": [[4, 5]]})  # one file on a case-blind disk
    rep = decode([a, b, a], tmp_path / "out", tiny_ckpt_dir).report  # a twice: the same song, once
    assert (rep["songs"]["done"], rep["songs"]["failed"]) == (1, 1)
    (err,) = library.read_errors(tmp_path / "out")
    assert err["path"] == "X" and "b.parquet" in err["message"] and "rename one of them" in err["message"]


# ---- exactly once, shards, fingerprint, seed --------------------------------------------------

def npy_songs(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        np.save(folder / f"s{k:02d}.npy", random_codes(30 + k, k))
    return folder


def test_shards_partition_the_songs(tmp_path, cheap, tiny_ckpt_dir):
    songs = npy_songs(tmp_path / "in", 12)
    seen = []
    for i in (1, 2, 3):
        rep = decode([songs], tmp_path / "out", tiny_ckpt_dir, seed=0, shard=(i, 3)).report
        rows = [json.loads(x) for x in (tmp_path / "out" / f"manifest-{i}-of-3.jsonl").read_text().splitlines()]
        ids = [r["song_id"] for r in rows if "output" not in r]
        assert rep["songs"]["done"] == len(ids) and all(library.in_shard(s, (i, 3)) for s in ids)
        seen += ids
    assert len(seen) == len(set(seen)) == 12 and len(list((tmp_path / "out").glob("*.wav"))) == 12


def test_seed_is_recorded_and_reused_and_settings_are_guarded(tmp_path, cheap, tiny_ckpt_dir):
    songs = npy_songs(tmp_path / "in", 3)
    out = tmp_path / "out"
    first = decode([songs], out, tiny_ckpt_dir).report
    seed = first["fingerprint"]["seed"]
    assert json.loads((out / "fingerprint.json").read_text())["seed"] == seed
    before = {p.name: read(p) for p in out.glob("*.wav")}
    (out / "s01.wav").unlink()
    again = decode([songs], out, tiny_ckpt_dir).report  # no seed given: the recorded one goes on
    assert (again["songs"]["done"], again["songs"]["skipped"]) == (1, 2)
    assert np.array_equal(read(out / "s01.wav"), before["s01.wav"])
    for change in ({"num_steps": 2}, {"seed": seed + 1}, {"guidance_scale": 2.0}, {"fast_vocoder": False}):
        with pytest.raises(OutputError, match="made differently"):
            decode([songs], out, tiny_ckpt_dir, **change)


def test_a_folder_fingerprinted_with_the_old_names_resumes(tmp_path, cheap, tiny_ckpt_dir):
    """Folders decoded before the settings took the official names (steps, guidance, vocoder) resume as they
    are; a changed setting is still refused."""
    songs = npy_songs(tmp_path / "in", 2)
    out = tmp_path / "out"
    decode([songs], out, tiny_ckpt_dir, seed=4)
    fp = json.loads((out / "fingerprint.json").read_text())
    old = {k: v for k, v in fp.items() if k not in ("num_steps", "guidance_scale", "fast_vocoder")}
    old.update(steps=fp["num_steps"], guidance=fp["guidance_scale"], vocoder="shared-overlaps")
    (out / "fingerprint.json").write_text(json.dumps(old))
    (out / "s01.wav").unlink()
    again = decode([songs], out, tiny_ckpt_dir).report
    assert (again["songs"]["done"], again["songs"]["skipped"]) == (1, 1) and again["fingerprint"]["seed"] == 4
    with pytest.raises(OutputError, match="made differently"):
        decode([songs], out, tiny_ckpt_dir, fast_vocoder=False)


def test_the_vae_and_vocoder_precision_reaches_the_job_and_its_fingerprint(tmp_path, monkeypatch, tiny_ckpt_dir):
    seen = []

    def recording(self, latents, fast_vocoder=True, num_samples=None):
        seen.append(self.audioldm_dtype)
        return cheap_wave(self, latents, fast_vocoder, num_samples)

    monkeypatch.setattr(MuCodec, "latents_to_wave", recording)
    songs = npy_songs(tmp_path / "in", 2)
    plain = decode([songs], tmp_path / "a", tiny_ckpt_dir).report["fingerprint"]
    # float32 is not written: folders decoded before the option existed still resume
    assert "audioldm_dtype" not in plain and set(seen) == {torch.float32}
    seen.clear()
    reduced = decode([songs], tmp_path / "b", tiny_ckpt_dir, audioldm_dtype=torch.bfloat16).report["fingerprint"]
    assert reduced["audioldm_dtype"] == "bfloat16" and set(seen) == {torch.bfloat16}
    assert {k: v for k, v in reduced.items() if k not in ("audioldm_dtype", "seed")} == \
        {k: v for k, v in plain.items() if k != "seed"}
    with pytest.raises(OutputError, match="made differently"):
        decode([songs], tmp_path / "b", tiny_ckpt_dir)  # the recorded seed, float32 now
    # a loaded codec must run what the fingerprint will say
    loaded = MuCodec.from_pretrained(tiny_ckpt_dir, device="cpu")
    with pytest.raises(ArgumentError, match="float32 / float32 .* asks for float32 / bfloat16"):
        decode([songs], tmp_path / "c", tiny_ckpt_dir, audioldm_dtype=torch.bfloat16, codec=loaded)
    assert not (tmp_path / "c").exists()


def test_nothing_to_decode_writes_nothing(tmp_path, tiny_ckpt_dir):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.npy").mkdir()  # a folder named like an array
    res = decode([tmp_path / "in"], tmp_path / "new" / "out", tiny_ckpt_dir)
    assert res.report["songs"]["in_job"] == 0 and res.problems
    assert not (tmp_path / "new").exists()


# ---- the command line ---------------------------------------------------------------------------

@pytest.mark.parametrize("argv,words", [
    (["--decode-batch", "0"], "--decode-batch must lie in"),
    (["--encode", "--decode-batch", "2"], "has no effect with --encode"),
    (["--prompt", "p.wav"], "--prompt is for single token files"),
])
def test_bad_decode_options_exit_2(tmp_path, capsys, argv, words):
    npy_songs(tmp_path / "in", 1)
    with pytest.raises(SystemExit) as e:
        cli.main([str(tmp_path / "in"), "-o", str(tmp_path / "o"), *argv])
    assert e.value.code == 2 and words in capsys.readouterr().err


@pytest.mark.slow
def test_cli_decodes_what_encode_wrote(tmp_path, tiny_ckpt_dir, codec):
    """Real VAE and vocoder: --encode of a folder, then the folder of tokens decodes to FLAC files named and
    cut like the music; a single token file keeps its own path (a .wav beside its name)."""
    music = make_music(tmp_path / "music", [("a/x.wav", 30000, 48000, 2), ("y.flac", 50000, 44100, 1)])
    assert cli.main(["--encode", str(music), "-o", str(tmp_path / "tok"), "--workers", "0",
                     *common(str(tiny_ckpt_dir))]) == 0
    assert cli.main([str(tmp_path / "tok"), "-o", str(tmp_path / "out"), "--steps", "1", "--seed", "4",
                     "--decode-batch", "2", *common(str(tiny_ckpt_dir))]) == 0
    lengths = {p: n for _, p, n in zip(*[library.read_library(tmp_path / "tok").column(c).to_pylist()
                                        for c in ("song_id", "path", "num_samples")])}
    for path, n in lengths.items():
        got = read(tmp_path / "out" / (path.rsplit(".", 1)[0] + ".flac"))
        sid = library.song_id(path)
        codes = dict((p, c) for _, p, c in library.iter_codes(tmp_path / "tok"))[path].astype(np.int64)
        expected = alone(codec, codes, sid, 4, num_samples=n)
        assert got.shape == expected.shape == (2, n)
        assert np.abs(got - np.clip(expected, -1, 1)).max() <= 2 ** -23  # 24-bit FLAC: one step of rounding
    save_codes(tmp_path / "one.mct", torch.from_numpy(random_codes(20, 0)), layer=codec.layer)
    assert cli.main([str(tmp_path / "one.mct"), "-o", str(tmp_path / "single"), "--steps", "1",
                     *common(str(tiny_ckpt_dir))]) == 0
    assert [p.name for p in (tmp_path / "single").iterdir()] == ["one.wav"]


@pytest.mark.slow
def test_killed_decode_leaves_no_process_and_resumes_complete(tmp_path, tiny_ckpt_dir):
    songs = npy_songs(tmp_path / "in", 6)
    out = tmp_path / "out"
    argv = [sys.executable, str(REPO / "generate.py"), str(songs), "-o", str(out), "--steps", "1", "--seed", "9",
            "--decode-batch", "2", "--workers", "1", "--audio-format", "wav", *common(str(tiny_ckpt_dir))]
    proc = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        assert wait_for(lambda: any(out.glob("*.wav")) or proc.poll() is not None, 300)
        assert proc.poll() is None, "the run ended before it was killed; give it more songs"
        assert any("spawn_main" in c for c in session(proc.pid).values())  # its reader process
        proc.kill()
        proc.wait()
        assert wait_for(lambda: not session(proc.pid), 10), f"still running: {session(proc.pid)}"
    finally:
        for pid in session(proc.pid):
            os.kill(pid, signal.SIGKILL)
    done_before = {p.name for p in out.glob("*.wav")}
    assert 0 < len(done_before) < 6
    assert subprocess.run(argv, cwd=tmp_path, capture_output=True).returncode == 0
    rep = json.loads((out / "report.json").read_text())
    assert (rep["songs"]["done"], rep["songs"]["skipped"]) == (6 - len(done_before), len(done_before))
    assert sorted(p.name for p in out.glob("*.wav")) == [f"s{k:02d}.wav" for k in range(6)]
    assert not list(out.rglob(".*.tmp")) and not library.read_errors(out)
