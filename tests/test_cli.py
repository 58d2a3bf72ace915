"""generate.py end to end: the command line and the notebook API.

Most tests inject a fake codec that follows the MuCodec contract (rates, shapes, keyword arguments)
so the plumbing (inputs, outputs, refusals, summaries, exit codes) runs in seconds; the tests at the
end run the real MuCodec on the tiny checkpoints of the `tiny_ckpt_dir` fixture when it exists.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import generate
from mucodec.errors import AudioError, CheckpointError, MuCodecError
from mucodec.tokens import load_codes, save_codes

REPO = Path(generate.__file__).resolve().parent
TESTS = Path(__file__).resolve().parent


# ---- a codec that follows the contract, fast and deterministic --------------------------------

class FakeCodec:
    """Stands in for mucodec.codec.MuCodec: same attributes, methods, shapes and keyword arguments."""

    sample_rate, frame_rate, codebook_size, layer = 48000, 25, 16384, 6
    built: list[dict] = []  # keyword arguments of every from_pretrained call

    def __init__(self):
        self.calls = []

    @classmethod
    def from_pretrained(cls, path_or_repo=".", device="cpu", dtype=torch.float32, encoder_only=False, progress=True):
        cls.built.append(dict(path_or_repo=path_or_repo, device=device, dtype=dtype, encoder_only=encoder_only,
                              progress=progress))
        return cls()

    def sound2code(self, wav, batch_size=3):
        assert wav.ndim == 2 and wav.shape[0] == 2 and wav.dtype == torch.float32
        self.calls.append(("sound2code", dict(batch_size=batch_size, n=wav.shape[-1])))
        T = int(wav.shape[-1] / 48000 * 25) + 1
        frames = torch.nn.functional.pad(wav.abs().mean(0), (0, T * 1920 - wav.shape[-1])).reshape(T, 1920)
        return (frames.mean(1) * 1e5).long().remainder(16384).reshape(1, 1, T)

    def code2sound(self, codes, num_steps=20, guidance_scale=1.5, prompt=None, generator=None, fast_vocoder=False):
        assert codes.dtype == torch.int64 and codes.ndim == 3 and codes.shape[:2] == (1, 1)
        assert generator is None or generator.device.type == "cpu"
        self.calls.append(("code2sound", dict(num_steps=num_steps, guidance_scale=guidance_scale, prompt=prompt,
                                              seeded=generator is not None, fast_vocoder=fast_vocoder)))
        level = (codes[0, 0].float() / 16384 * 0.5).repeat_interleave(1920)
        noise = 0.01 * torch.randn(2, level.numel(), generator=generator)
        return level.expand(2, -1) + noise

    def sound2sound(self, wav, num_steps=50, guidance_scale=1.5, prompt=None, generator=None):
        return self.code2sound(self.sound2code(wav), num_steps, guidance_scale, prompt, generator)


@pytest.fixture(autouse=True)
def _forget_builds():
    FakeCodec.built.clear()


@pytest.fixture
def codec_holder():
    """Runs main() with the fake codec and remembers the instance it built."""
    holder = {}

    def factory(**kw):
        holder["codec"] = FakeCodec.from_pretrained(**kw)
        return holder["codec"]

    def run(*argv):
        return generate.main([str(a) for a in argv], codec_factory=factory)

    holder["run"] = run
    return holder


def tone(path: Path, seconds=0.5, rate=48000, channels=2, **kw) -> Path:
    t = np.arange(int(seconds * rate)) / rate
    x = 0.3 * np.sin(2 * np.pi * 440 * t)[:, None] * np.linspace(0.5, 1, channels)[None]
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, x, rate, **kw)
    return path


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob(".*")]


# ---- help and argument checks ------------------------------------------------------------------

def test_help_lists_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        generate.main(["--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for words in ("50 to reconstruct audio", "20 to decode a token file", "(default: 1.5)", "(default: 3)",
                  "(default: float32)", "(default: auto)", ".mct", "--overwrite", "--encode", "--prompt", "--seed",
                  "--quiet", "tools/audioldm_48k.pth", "https://huggingface.co/MuCodec/mucodec", "32-bit float WAV"):
        assert words in out, words


@pytest.mark.parametrize("argv, words", [
    (["x.wav", "--dtype", "float16", "--device", "cpu"], "needs a GPU"),
    (["x.wav", "--steps", "0"], "--steps"),
    (["x.wav", "--batch-size", "0"], "--batch-size"),
    (["x.wav", "--encode", "--prompt", "p.wav"], "--prompt"),
    (["x.wav", "--device", "tpu9"], "unknown device"),
    (["x.wav", "--guidance", "lots"], "invalid float"),
])
def test_usage_errors_exit_2(capsys, argv, words):
    with pytest.raises(SystemExit) as e:
        generate.main(argv, codec_factory=FakeCodec.from_pretrained)
    assert e.value.code == 2
    assert words in capsys.readouterr().err
    assert FakeCodec.built == []


def test_output_that_is_a_file_is_a_usage_error(tmp_path, capsys):
    (tmp_path / "out").write_text("x")
    with pytest.raises(SystemExit) as e:
        generate.main([str(tone(tmp_path / "a.wav")), "-o", str(tmp_path / "out")])
    assert e.value.code == 2 and "must name a folder" in capsys.readouterr().err


# ---- reconstruct, encode, decode ---------------------------------------------------------------

def test_reconstruct_one_file(tmp_path, codec_holder, capsys):
    src = tone(tmp_path / "song.wav", seconds=0.77)
    assert codec_holder["run"](src, "-o", tmp_path / "out" / "new") == 0
    dst = tmp_path / "out" / "new" / "song.wav"
    info = sf.info(str(dst))
    assert (info.samplerate, info.channels, info.subtype, info.frames) == (48000, 2, "FLOAT", int(0.77 * 48000))
    built = FakeCodec.built[0]
    assert built["device"] == "cpu" and built["dtype"] == torch.float32
    assert built["encoder_only"] is False and built["progress"] is False  # stderr is not a terminal here
    assert built["path_or_repo"] == generate.default_ckpt()
    calls = codec_holder["codec"].calls
    assert calls[0] == ("sound2code", dict(batch_size=3, n=int(0.77 * 48000)))
    assert calls[1][1] == dict(num_steps=50, guidance_scale=1.5, prompt=None, seeded=False, fast_vocoder=False)
    assert f"-> {dst}" in capsys.readouterr().err
    assert leftovers(tmp_path) == []
    umask = os.umask(0)
    os.umask(umask)
    assert dst.stat().st_mode & 0o777 == 0o666 & ~umask  # a normal file, not a private temporary one


def test_flags_reach_the_codec(tmp_path, codec_holder):
    src = tone(tmp_path / "a.wav")
    prompt = tone(tmp_path / "p.wav", seconds=0.3, rate=44100, channels=1)
    assert codec_holder["run"](src, "-o", tmp_path / "o", "--steps", "7", "--guidance", "2.5", "--batch-size", "1",
                               "--seed", "3", "--prompt", prompt, "--ckpt", "some/where", "--device", "cpu",
                               "--fast-vocoder") == 0
    assert FakeCodec.built[0]["path_or_repo"] == "some/where"
    (_, enc), (_, dec) = codec_holder["codec"].calls
    assert enc["batch_size"] == 1
    assert dec["num_steps"] == 7 and dec["guidance_scale"] == 2.5 and dec["seeded"] and dec["fast_vocoder"]
    assert dec["prompt"].shape == (2, int(0.3 * 48000)) and dec["prompt"].dtype == torch.float32


def test_seed_makes_output_reproducible(tmp_path, codec_holder):
    src = tone(tmp_path / "a.wav")
    for name in ("s1", "s2"):
        assert codec_holder["run"](src, "-o", tmp_path / name, "--seed", "11") == 0
    assert codec_holder["run"](src, "-o", tmp_path / "r") == 0
    s1, s2, r = (sf.read(str(tmp_path / n / "a.wav"))[0] for n in ("s1", "s2", "r"))
    assert np.array_equal(s1, s2) and not np.array_equal(s1, r)


def test_encode_then_decode(tmp_path, codec_holder):
    src = tone(tmp_path / "in" / "mono.flac", seconds=1.3, rate=44100, channels=1)
    assert codec_holder["run"]("--encode", src, "-o", tmp_path / "tok") == 0
    assert FakeCodec.built[-1]["encoder_only"] is True
    assert [c[0] for c in codec_holder["codec"].calls] == ["sound2code"]
    token = tmp_path / "tok" / "mono.mct"
    codes, header = load_codes(token)
    n48 = round(1.3 * 48000)
    assert codes.shape == (1, 1, int(n48 / 48000 * 25) + 1)
    assert header["num_samples"] == n48 and header["original_sample_rate"] == 44100
    assert header["original_channels"] == 1 and header["layer"] == 6
    assert os.path.getsize(token) < 300 + 14 * codes.shape[-1] / 8 + 1

    assert codec_holder["run"](token, "-o", tmp_path / "dec") == 0
    assert FakeCodec.built[-1]["encoder_only"] is False
    (_, dec), = codec_holder["codec"].calls
    assert dec["num_steps"] == 20  # the official code2sound default for token files
    assert sf.info(str(tmp_path / "dec" / "mono.wav")).frames == n48  # cut to the original length


def test_token_file_is_recognised_by_content_not_name(tmp_path, codec_holder):
    save_codes(tmp_path / "weird.bin", torch.tensor([1, 2, 3]), num_samples=4000)
    assert codec_holder["run"](tmp_path / "weird.bin", "-o", tmp_path / "o") == 0
    assert sf.info(str(tmp_path / "o" / "weird.wav")).frames == 4000


def test_encode_refuses_token_files(tmp_path, codec_holder, capsys):
    save_codes(tmp_path / "t.mct", torch.tensor([1, 2, 3]))
    assert codec_holder["run"]("--encode", tmp_path / "t.mct", "-o", tmp_path / "o") == 1
    assert "already a token file" in capsys.readouterr().err
    assert FakeCodec.built == []  # nothing to do: the model is not even loaded


def test_incompatible_token_file_is_refused(tmp_path, codec_holder, capsys):
    save_codes(tmp_path / "t.mct", torch.tensor([1, 2, 3]), codebook_size=1024)
    assert codec_holder["run"](tmp_path / "t.mct", "-o", tmp_path / "o") == 1
    assert "was made with codebook_size 1024, but this model uses 16384" in capsys.readouterr().err
    assert not (tmp_path / "o" / "t.wav").exists()


def test_damaged_token_file_fails_cleanly(tmp_path, codec_holder, capsys):
    path = save_codes(tmp_path / "t.mct", torch.tensor([1, 2, 3]))
    path.write_bytes(path.read_bytes()[:-1])
    assert codec_holder["run"](path, "-o", tmp_path / "o") == 1
    err = capsys.readouterr().err
    assert "is damaged" in err and "Traceback" not in err
    assert list((tmp_path / "o").iterdir()) == []


# ---- inputs: folders, globs, missing things ----------------------------------------------------

def test_folder_is_searched_recursively(tmp_path, codec_holder):
    music = tmp_path / "music"
    tone(music / "a.wav")
    tone(music / "sub" / "b.flac")
    tone(music / "sub" / "deeper" / "c.ogg")
    tone(music / "d.AIFF", format="AIFF")
    save_codes(music / "sub" / "e.mct", torch.tensor([5, 6]))
    tone(music / ".hidden.wav")
    tone(music / ".cache" / "f.wav")
    (music / "notes.txt").write_text("not audio")
    assert codec_holder["run"](music, "-o", tmp_path / "out") == 0
    out = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert out == ["a.wav", "d.wav", "sub/b.wav", "sub/deeper/c.wav", "sub/e.wav"]


def test_output_folder_inside_input_folder_is_not_an_input(tmp_path, codec_holder):
    tone(tmp_path / "a.wav")
    assert codec_holder["run"](tmp_path, "-o", tmp_path / "out") == 0
    assert codec_holder["run"](tmp_path, "-o", tmp_path / "out", "--overwrite") == 0
    assert sorted(p.name for p in (tmp_path / "out").rglob("*")) == ["a.wav"]


def test_glob_patterns(tmp_path, codec_holder):
    for name in ("x1.flac", "x2.flac", "y.wav", "deep/x3.flac"):
        tone(tmp_path / name)
    assert codec_holder["run"](str(tmp_path / "*.flac"), str(tmp_path / "**" / "x3.*"), "-o", tmp_path / "o") == 0
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["x1.wav", "x2.wav", "x3.wav"]


def test_same_file_twice_is_done_once(tmp_path, codec_holder):
    src = tone(tmp_path / "a.wav")
    assert codec_holder["run"](src, str(tmp_path / "*.wav"), "-o", tmp_path / "o") == 0
    assert len(codec_holder["codec"].calls) == 2  # one encode, one decode


@pytest.mark.parametrize("make, words", [
    (lambda p: str(p / "nope.wav"), "does not exist"),
    (lambda p: str(p / "*.nothing"), "matches no file"),
    (lambda p: (p / "empty").mkdir() or str(p / "empty"), "holds no audio"),
])
def test_missing_inputs(tmp_path, codec_holder, capsys, make, words):
    assert codec_holder["run"](make(tmp_path), "-o", tmp_path / "o") == 1
    err = capsys.readouterr().err
    assert words in err and "0 done, 1 failed" in err
    assert FakeCodec.built == []


# ---- outputs: overwrite refusal, collisions, atomicity -----------------------------------------

def test_refuses_to_overwrite(tmp_path, codec_holder, capsys):
    src = tone(tmp_path / "a.wav")
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "a.wav").write_bytes(b"precious")
    assert codec_holder["run"](src, "-o", tmp_path / "o") == 1
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "o" / "a.wav").read_bytes() == b"precious"
    assert FakeCodec.built == []
    assert codec_holder["run"](src, "-o", tmp_path / "o", "--overwrite") == 0
    assert sf.info(str(tmp_path / "o" / "a.wav")).subtype == "FLOAT"


def test_never_overwrites_its_own_input(tmp_path, codec_holder, capsys):
    src = tone(tmp_path / "a.wav")
    before = src.read_bytes()
    assert codec_holder["run"](src, "-o", tmp_path, "--overwrite") == 1
    assert "overwritten by its own output" in capsys.readouterr().err
    assert src.read_bytes() == before


def test_two_inputs_with_one_output_name(tmp_path, codec_holder, capsys):
    tone(tmp_path / "in" / "a.wav")
    tone(tmp_path / "in" / "a.flac")
    assert codec_holder["run"](tmp_path / "in", "-o", tmp_path / "o") == 1
    err = capsys.readouterr().err
    assert "1 done, 1 failed" in err and "already writes" in err
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["a.wav"]


def test_output_folder_that_cannot_be_created(tmp_path, codec_holder, capsys):
    (tmp_path / "file").write_text("x")
    assert codec_holder["run"](tone(tmp_path / "a.wav"), "-o", tmp_path / "file" / "sub") == 1
    assert "Cannot create the output folder" in capsys.readouterr().err
    assert FakeCodec.built == []  # found out before loading the model


def test_output_folder_is_created_only_when_something_is_written(tmp_path, capsys):
    def missing(**kw):
        raise CheckpointError("No weights.")

    assert generate.main([str(tone(tmp_path / "a.wav")), "-o", str(tmp_path / "new" / "o")],
                         codec_factory=missing) == 1
    assert not (tmp_path / "new").exists()


def test_batch_keeps_going_and_summarises(tmp_path, codec_holder, capsys):
    tone(tmp_path / "in" / "a.wav")
    (tmp_path / "in" / "b.wav").write_bytes(b"RIFF but not really a wave file")
    tone(tmp_path / "in" / "c.wav")
    assert codec_holder["run"](tmp_path / "in", "-o", tmp_path / "o") == 1
    err = capsys.readouterr().err
    assert "2 done, 1 failed" in err and "b.wav" in err and "Traceback" not in err
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["a.wav", "c.wav"]  # no partial b.wav


def test_codec_errors_and_bugs_do_not_stop_the_batch(tmp_path, capsys):
    for n in "abc":
        tone(tmp_path / "in" / f"{n}.wav", seconds=0.1 + 0.1 * "abc".index(n))

    class Flaky(FakeCodec):
        def code2sound(self, codes, **kw):
            n = codes.shape[-1]
            if n == 3:
                raise MuCodecError("The decoder refused this file.")
            if n == 6:
                raise RuntimeError("an internal bug")
            return super().code2sound(codes, **kw)

    assert generate.main([str(tmp_path / "in"), "-o", str(tmp_path / "o")], codec_factory=lambda **kw: Flaky()) == 1
    err = capsys.readouterr().err
    assert "1 done, 2 failed" in err and "The decoder refused this file." in err
    assert "internal error RuntimeError: an internal bug" in err and "Traceback" in err  # bugs show where
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["c.wav"]


def test_interrupt_keeps_finished_files_and_writes_no_partial_one(tmp_path, capsys):
    tone(tmp_path / "in" / "a.wav", seconds=0.1)
    tone(tmp_path / "in" / "b.wav", seconds=0.2)

    class Interrupted(FakeCodec):
        def code2sound(self, codes, **kw):
            if codes.shape[-1] == 6:
                raise KeyboardInterrupt
            return super().code2sound(codes, **kw)

    assert generate.main([str(tmp_path / "in"), "-o", str(tmp_path / "o")],
                         codec_factory=lambda **kw: Interrupted()) == 130
    assert "interrupted" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["a.wav"]


def test_out_of_memory_is_one_sentence(tmp_path, capsys):
    class Hungry(FakeCodec):
        def sound2code(self, wav, batch_size=3):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    assert generate.main([str(tone(tmp_path / "a.wav")), "-o", str(tmp_path / "o")],
                         codec_factory=lambda **kw: Hungry()) == 1
    err = capsys.readouterr().err
    assert "Out of memory on cpu" in err and "--batch-size 1" in err and "Traceback" not in err


def test_non_finite_output_is_not_written(tmp_path, capsys):
    class Broken(FakeCodec):
        def code2sound(self, codes, **kw):
            return torch.full((2, codes.shape[-1] * 1920), float("nan"))

    assert generate.main([str(tone(tmp_path / "a.wav")), "-o", str(tmp_path / "o")],
                         codec_factory=lambda **kw: Broken()) == 1
    assert "NaN" in capsys.readouterr().err
    assert list((tmp_path / "o").iterdir()) == []


def test_write_failure_leaves_nothing(tmp_path, codec_holder, monkeypatch, capsys):
    monkeypatch.setattr(generate.os, "replace", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left")))
    assert codec_holder["run"](tone(tmp_path / "a.wav"), "-o", tmp_path / "o") == 1
    assert "No space left" in capsys.readouterr().err
    assert list((tmp_path / "o").iterdir()) == []


def test_quiet_prints_nothing_on_success(tmp_path, codec_holder, capsys):
    tone(tmp_path / "in" / "a.wav")
    tone(tmp_path / "in" / "b.wav")
    assert codec_holder["run"](tmp_path / "in", "-o", tmp_path / "o", "--quiet") == 0
    assert capsys.readouterr() == ("", "")


# ---- the official default and the weights message ----------------------------------------------

def test_no_arguments_reconstructs_the_demo_song(tmp_path, codec_holder, monkeypatch):
    (tmp_path / "test_wav").mkdir()
    (tmp_path / "test_wav" / "test.wav").write_bytes((REPO / "test_wav" / "test.wav").read_bytes())
    monkeypatch.setattr(generate, "REPO", tmp_path)
    assert codec_holder["run"]() == 0
    frames = sf.info(str(REPO / "test_wav" / "test.wav")).frames
    assert sf.info(str(tmp_path / "reconstruct" / "test.wav")).frames == frames
    assert FakeCodec.built[0]["path_or_repo"] == generate.HUB_REPO  # no weights in tmp_path


def test_demo_song_is_what_the_script_makes(tmp_path):
    subprocess.run([sys.executable, str(REPO / "tools" / "make_test_wav.py"), str(tmp_path / "t.wav")], check=True,
                   capture_output=True)
    assert (tmp_path / "t.wav").read_bytes() == (REPO / "test_wav" / "test.wav").read_bytes()
    info = sf.info(str(tmp_path / "t.wav"))
    assert (info.samplerate, info.channels, info.subtype) == (48000, 2, "PCM_16")
    assert info.duration <= 15 and os.path.getsize(tmp_path / "t.wav") < 2_000_000
    x, _ = sf.read(str(tmp_path / "t.wav"))
    assert 0.5 < np.abs(x).max() <= 0.8  # loud enough, and below the codec's 0.8 normalisation threshold
    assert np.corrcoef(x.T)[0, 1] < 0.99  # really stereo


def test_default_ckpt_prefers_the_repo_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(generate, "REPO", tmp_path)
    assert generate.default_ckpt() == generate.HUB_REPO
    for f in generate.CKPT_FILES:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_bytes(b"")
    assert generate.default_ckpt() == str(tmp_path)


def test_checkpoint_error_is_one_sentence(tmp_path, capsys):
    def missing(**kw):
        raise CheckpointError("MuCodec needs tools/audioldm_48k.pth, muq_dev/muq.pt and ckpt/mucodec.pt.")

    assert generate.main([str(tone(tmp_path / "a.wav")), "-o", str(tmp_path / "o")], codec_factory=missing) == 1
    err = capsys.readouterr().err
    assert err.strip().endswith("error: MuCodec needs tools/audioldm_48k.pth, muq_dev/muq.pt and ckpt/mucodec.pt.")
    assert not (tmp_path / "o").exists()


def test_bad_prompt_is_one_sentence(tmp_path, codec_holder, capsys):
    (tmp_path / "p.wav").write_bytes(b"junk")
    assert codec_holder["run"](tone(tmp_path / "a.wav"), "--prompt", tmp_path / "p.wav", "-o", tmp_path / "o") == 1
    err = capsys.readouterr().err
    assert "p.wav" in err and "Traceback" not in err


# ---- through a real process: exit codes, no tracebacks -----------------------------------------

def run_process(args, tmp_path, **env):
    e = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), PYTHONPATH=str(REPO), **env)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=tmp_path, env=e, timeout=300)


def test_process_batch_with_a_failure(tmp_path):
    tone(tmp_path / "in" / "a.wav")
    (tmp_path / "in" / "b.wav").write_bytes(b"junk")
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{str(REPO)!r}, {str(TESTS)!r}]
        import generate, test_cli
        sys.exit(generate.main(sys.argv[1:], codec_factory=test_cli.FakeCodec.from_pretrained))
    """))
    r = run_process([str(driver), "in"], tmp_path)
    assert r.returncode == 1, r.stderr
    assert "1 done, 1 failed" in r.stderr and "Traceback" not in r.stderr
    assert (tmp_path / "reconstruct" / "a.wav").is_file()  # ./reconstruct when INPUT is given
    assert not (tmp_path / "reconstruct" / "b.wav").exists()


def test_process_without_weights_explains_where_to_get_them(tmp_path):
    pytest.importorskip("mucodec.codec")
    (tmp_path / "empty").mkdir()
    tone(tmp_path / "a.wav")
    for ckpt in (["--ckpt", str(tmp_path / "empty")], [] if generate.default_ckpt() == generate.HUB_REPO else None):
        if ckpt is None:
            continue
        r = run_process([str(REPO / "generate.py"), "a.wav", "-o", "o", *ckpt], tmp_path)
        assert r.returncode == 1
        assert "Traceback" not in r.stderr, r.stderr
        assert "https://huggingface.co/MuCodec/mucodec" in r.stderr
        for f in ("audioldm_48k.pth", "muq.pt", "mucodec.pt"):
            assert f in r.stderr
        assert not (tmp_path / "o" / "a.wav").exists()


def test_process_help_is_fast_and_clean(tmp_path):
    r = run_process([str(REPO / "generate.py"), "--help"], tmp_path)
    assert r.returncode == 0 and "usage: generate.py" in r.stdout and r.stderr == ""


# ---- notebook API ----------------------------------------------------------------------------------

@pytest.fixture
def fake_default_codec(monkeypatch):
    codec = FakeCodec()
    monkeypatch.setattr(generate, "_codec", codec)
    monkeypatch.setattr(generate, "_codec_settings", (generate.default_ckpt(), generate.pick_device(), torch.float32))
    return codec


def test_notebook_api_with_paths_and_tensors(tmp_path, fake_default_codec):
    src = tone(tmp_path / "a.wav", seconds=0.6)
    codes = generate.sound2code(src)
    assert codes.shape == (1, 1, int(0.6 * 25) + 1) and codes.dtype == torch.int64
    mono = torch.from_numpy(sf.read(str(src), dtype="float32")[0][:, 0].copy())
    assert generate.sound2code(mono).shape == codes.shape  # (N,) is duplicated to stereo
    resampled = generate.sound2code(mono[::2].clone(), sample_rate=24000)
    assert resampled.shape == codes.shape
    wav = generate.code2sound(codes, seed=1)
    assert wav.shape == (2, codes.shape[-1] * 1920)
    assert torch.equal(wav, generate.code2sound(codes.reshape(-1), seed=1))
    token = save_codes(tmp_path / "a.mct", codes, num_samples=int(0.6 * 48000))
    assert generate.code2sound(token).shape == (2, int(0.6 * 48000))
    assert generate.sound2sound(src).shape == (2, int(0.6 * 48000))
    assert fake_default_codec.calls[-1][1]["num_steps"] == 50


def test_notebook_codec_is_built_once_per_settings(monkeypatch):
    import mucodec.codec

    monkeypatch.setattr(mucodec.codec.MuCodec, "from_pretrained", FakeCodec.from_pretrained)
    monkeypatch.setattr(generate, "_codec", None)
    monkeypatch.setattr(generate, "_codec_settings", None)
    first = generate.get_codec()
    assert generate.get_codec() is first and generate.get_codec(device=generate.pick_device()) is first
    assert generate.get_codec(ckpt="elsewhere") is not first
    assert [b["path_or_repo"] for b in FakeCodec.built] == [generate.default_ckpt(), "elsewhere"]
    assert FakeCodec.built[0]["encoder_only"] is False and FakeCodec.built[0]["dtype"] == torch.float32


def test_notebook_api_rejects_bad_tensors(fake_default_codec):
    with pytest.raises(AudioError, match="shape"):
        generate.sound2code(torch.zeros(2, 2, 100))
    with pytest.raises(AudioError, match="floating-point"):
        generate.sound2code(torch.zeros(2, 100, dtype=torch.int16))
    with pytest.raises(AudioError, match="NaN"):
        generate.sound2code(torch.full((2, 100), float("nan")))


def test_notebook_docstrings_give_shapes_and_defaults():
    assert "(1, 1, T)" in generate.sound2code.__doc__ and "48" in generate.sound2code.__doc__
    assert "(2, T * 1920)" in generate.code2sound.__doc__ and "20" in generate.code2sound.__doc__


# ---- the real codec on tiny checkpoints (runs once tests/conftest.py provides tiny_ckpt_dir) --------

@pytest.fixture
def tiny_ckpt(request):
    try:
        return request.getfixturevalue("tiny_ckpt_dir")
    except pytest.FixtureLookupError:
        pytest.skip("tests/conftest.py does not provide tiny_ckpt_dir yet")


def test_real_codec_encode_decode_reconstruct(tmp_path, tiny_ckpt, capsys):
    src = tmp_path / "test.wav"
    src.write_bytes((REPO / "test_wav" / "test.wav").read_bytes())
    n = sf.info(str(src)).frames
    common = ["--ckpt", str(tiny_ckpt), "--device", "cpu", "--steps", "2", "--seed", "0"]
    assert generate.main([str(src), "--encode", "-o", str(tmp_path / "tok"), *common]) == 0
    codes, header = load_codes(tmp_path / "tok" / "test.mct")
    assert codes.shape == (1, 1, int(n / 48000 * 25) + 1) and header["num_samples"] == n
    assert 0 <= int(codes.min()) and int(codes.max()) < 16384
    assert generate.main([str(tmp_path / "tok" / "test.mct"), "-o", str(tmp_path / "dec"), *common]) == 0
    assert generate.main([str(src), "-o", str(tmp_path / "rec"), *common]) == 0
    dec, rate = sf.read(str(tmp_path / "dec" / "test.wav"), dtype="float32")
    rec, _ = sf.read(str(tmp_path / "rec" / "test.wav"), dtype="float32")
    assert rate == 48000 and dec.shape == rec.shape == (n, 2) and np.isfinite(dec).all()
    # Same codes, same seed, same steps: decoding the token file equals reconstructing directly.
    assert np.array_equal(dec, rec)
    assert "Traceback" not in capsys.readouterr().err
