"""Issue 17, items 2 and 3: listing a folder never fails on links (loops are skipped with a line, dangling
links become error rows), a job with nothing to do writes nothing, and .mct files written by the library
carry the token spec of the model that made them, so that model decodes them."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mucodec import cli, library
from mucodec import listing
from mucodec.library.file_job import plan_files
from mucodec.audio import audio_extensions
from mucodec.tokens import load_codes
from test_library import common, encode, make_music

pytest.importorskip("pyarrow")
SHORT = 9600  # 0.2 s at 48 kHz


@pytest.fixture
def tangled(tmp_path) -> Path:
    """A music folder with every kind of link and an audio-named folder beside two real songs."""
    music = make_music(tmp_path / "music", [("a/01.wav", SHORT, 48000, 2), ("x.wav/inner.wav", SHORT, 48000, 2)])
    make_music(tmp_path / "outside", [("o.wav", SHORT, 48000, 2)])
    (music / "linked").symlink_to(tmp_path / "outside")  # a folder outside the input: followed
    (music / "up").symlink_to("..")  # a loop through the input's parent
    (music / "a" / "again").symlink_to(".")  # a loop onto itself
    (music / "alias").symlink_to("a")  # a second way into a folder listed already
    (music / "self.wav").symlink_to("self.wav")  # a link loop named like audio
    (music / "gone.wav").symlink_to("missing.wav")  # a dangling link
    return music


def test_listing_follows_links_but_never_loops(tangled):
    files, skipped = listing.list_folder(tangled, audio_extensions())
    assert [rel for _, rel in files] == ["a/01.wav", "gone.wav", "linked/o.wav", "self.wav", "x.wav/inner.wav"]
    why = {Path(entry).name: message for entry, message in skipped}
    assert set(why) == {"up", "again", "alias"}
    assert "a folder that holds it; skipped." in why["up"] and "holds it" in why["again"]
    assert "listed already; skipped." in why["alias"]


def test_encode_skips_loops_and_records_bad_links(tmp_path, tangled, tiny_ckpt_dir, capsys):
    out = tmp_path / "tok"
    assert encode("--encode", tangled, "-o", out, "--workers", 0, *common(tiny_ckpt_dir)) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "holds it; skipped." in err and "listed already; skipped." in err
    assert sorted(p for _, p, _ in library.iter_codes(out)) == ["a/01.wav", "linked/o.wav", "x.wav/inner.wav"]
    errors = {e["path"]: e for e in library.read_errors(out)}
    assert set(errors) == {"self.wav", "gone.wav"} and all(e["stage"] == "read" for e in errors.values())
    assert "symbolic links" in errors["self.wav"]["message"] and "does not exist" in errors["gone.wav"]["message"]


def test_cli_listing_skips_loops_too(tangled, tmp_path):
    tasks, failed = plan_files([str(tangled)], tmp_path / "o")
    assert sorted(t.dst.relative_to(tmp_path / "o").with_suffix("").as_posix() for t in tasks) == [
        "a/01", "linked/o", "x.wav/inner"]
    assert sorted(Path(src).name for src, _ in failed) == ["again", "alias", "up"]


def folder_without_audio(kind: str):
    def make(parent: Path) -> Path:
        folder = parent / kind
        folder.mkdir()
        if kind == "text":
            (folder / "notes.txt").write_text("not audio")
        elif kind == "loop":
            (folder / "up").symlink_to("..")
        return folder
    return make


@pytest.mark.parametrize("kind", ["empty", "text", "loop"])
def test_nothing_to_do_writes_nothing(tmp_path, tiny_ckpt_dir, capsys, kind):
    make = folder_without_audio(kind)
    out = tmp_path / "new" / "tok"
    assert encode("--encode", make(tmp_path), "-o", out, *common(tiny_ckpt_dir)) == 1
    assert "holds no audio files" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    (tmp_path / "new").mkdir()  # an existing -o folder is left as it was
    src = make(tmp_path / "new")
    assert encode("--encode", src, "-o", tmp_path / "new", *common(tiny_ckpt_dir)) == 1
    assert [p.name for p in (tmp_path / "new").iterdir()] == [src.name]


def test_shard_without_songs_writes_nothing(tmp_path, tiny_ckpt_dir):
    music = make_music(tmp_path / "music", [("a.wav", SHORT, 48000, 2)])
    other = 1 + (int(library.song_id("a.wav"), 16) + 1) % 2  # the job of 2 that a.wav is not in
    assert encode("--encode", music, "-o", tmp_path / "tok", "--shard", f"{other}/2", *common(tiny_ckpt_dir)) == 0
    assert not (tmp_path / "tok").exists()


def test_mct_headers_carry_the_models_token_spec(tmp_path, tiny_ckpt_dir, tiny_codec):
    music = make_music(tmp_path / "music", [("a.wav", 24000, 48000, 2), ("b/c.flac", 30000, 44100, 1)])
    out = tmp_path / "tok"
    assert encode("--encode", music, "-o", out, "--format", "mct", "--workers", 0, *common(tiny_ckpt_dir)) == 0
    assert tiny_codec.layer != 6  # the format's default: a header copied from the defaults would be caught
    for rel, n in (("a.mct", 24000), ("b/c.mct", int(30000 / 44100 * 48000))):
        codes, header = load_codes(out / rel)
        assert all(header[k] == v for k, v in tiny_codec.token_spec.items() if k != "num_codebooks")
        wav = tiny_codec.code2sound(out / rel, num_steps=1, seed=0)  # the model that made them decodes them
        assert wav.shape == (2, header["num_samples"]) and abs(header["num_samples"] - n) <= 1
        assert np.isfinite(wav.numpy()).all()
    rep = json.loads((out / "report.json").read_text())
    assert rep["songs"]["done"] == 2 and rep["format"] == "mct"


def test_looping_link_given_as_input_is_one_sentence(tmp_path, capsys):
    (tmp_path / "a.wav").symlink_to("a.wav")
    assert cli.main([str(tmp_path / "a.wav"), "-o", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "Too many levels of symbolic links" in err and "0 done, 1 failed" in err
