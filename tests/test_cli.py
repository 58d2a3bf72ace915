"""The command line (mucodec.cli, run by generate.py), end to end.

Most tests run over the fake codec of ``fake_codec`` (real code around fast, deterministic model stages);
the tests at the end run the real MuCodec on the tiny checkpoints. The notebook API has its own tests
(test_api.py).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import generate
from fake_codec import FakeCodec, fake, tone  # noqa: F401  (fake: the autouse fixture installing FakeCodec)
from mucodec import api, checkpoint, cli, precision
from mucodec.codec import MuCodec
from mucodec.errors import CheckpointError, MuCodecError, NumericalError
from mucodec.tokens import load_codes, save_codes

REPO = Path(generate.__file__).resolve().parent
TESTS = Path(__file__).resolve().parent


def run(*argv) -> int:
    return cli.main([str(a) for a in argv])


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob(".*")]


# ---- usage ---------------------------------------------------------------------------------------

def test_help_lists_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"], prog="generate.py")
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for words in ("50 to reconstruct audio", "20 to decode a token file", "(default: 1.5)", "(default: 3)",
                  "float16 on CUDA", "(default: auto)", ".mct", "--overwrite", "--encode", "--prompt", "--seed",
                  "--quiet", "--revision", "tools/audioldm_48k.pth", "https://huggingface.co/MuCodec/mucodec",
                  "32-bit float WAV"):
        assert words in out, words


@pytest.mark.parametrize("argv, words", [
    (["x.wav", "--dtype", "float16", "--device", "cpu"], "needs a GPU"),
    (["x.wav", "--audioldm-dtype", "float16", "--device", "cpu"], "--audioldm-dtype float16 needs a GPU"),
    (["x.wav", "--encode", "--audioldm-dtype", "bfloat16"], "has no effect with --encode"),
    (["x.wav", "--dtype", "int8"], "invalid choice"),
    (["x.wav", "--steps", "0"], "--steps"),
    (["x.wav", "--steps", "100000"], "--steps"),
    (["x.wav", "--batch-size", "0"], "--batch-size"),
    (["x.wav", "--batch-size", "-1"], "--batch-size"),
    (["x.wav", "--encode", "--prompt", "p.wav"], "--prompt"),
    (["x.wav", "--device", "tpu9"], "nknown device"),
    (["x.wav", "--device", "xpu"], "not supported"),
    (["x.wav", "--guidance", "lots"], "invalid float"),
    (["x.wav", "--guidance", "nan"], "--guidance"),
    (["x.wav", "--guidance", "inf"], "--guidance"),
    (["x.wav", "--guidance", "0.5"], "--guidance"),
    (["x.wav", "--seed", str(2 ** 64)], "--seed"),
    (["x.wav", "--seed", "-1"], "--seed"),
])
def test_usage_errors_exit_2(capsys, argv, words):
    with pytest.raises(SystemExit) as e:
        run(*argv)
    assert e.value.code == 2
    assert words in capsys.readouterr().err
    assert FakeCodec.built == []


def test_cuda_device_without_cuda_is_a_usage_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit) as e:
        run("x.wav", "--device", "cuda")
    assert e.value.code == 2 and "CUDA is not available" in capsys.readouterr().err


def test_output_that_is_a_file_is_a_usage_error(tmp_path, capsys):
    (tmp_path / "out").write_text("x")
    with pytest.raises(SystemExit) as e:
        run(tone(tmp_path / "a.wav"), "-o", tmp_path / "out")
    assert e.value.code == 2 and "must name a folder" in capsys.readouterr().err


# ---- reconstruct, encode, decode ---------------------------------------------------------------

def test_reconstruct_one_file(tmp_path, fake, capsys):
    src = tone(tmp_path / "song.wav", seconds=2.77)
    assert run(src, "-o", tmp_path / "out" / "new") == 0
    dst = tmp_path / "out" / "new" / "song.wav"
    info = sf.info(str(dst))
    assert (info.samplerate, info.channels, info.subtype, info.frames) == (48000, 2, "FLOAT", int(2.77 * 48000))
    built = FakeCodec.built[0]
    assert built["device"] == "cpu" and built["dtype"] == torch.float32 and built["revision"] is None
    assert built["encoder_only"] is False and built["progress"] is False  # stderr is not a terminal here
    assert built["path_or_repo"] == api.default_checkpoint()
    calls = fake[0].calls
    assert calls[0] == ("encode", dict(batch_size=3, n=int(2.77 * 48000)))
    assert calls[1][1] == dict(num_steps=50, guidance_scale=1.5, prompt=None, seeded=False, fast_vocoder=True)
    assert f"-> {dst}" in capsys.readouterr().err
    assert leftovers(tmp_path) == []
    umask = os.umask(0)
    os.umask(umask)
    assert dst.stat().st_mode & 0o777 == 0o666 & ~umask  # a normal file, not a private temporary one


def test_streamed_output_equals_the_whole_decode(tmp_path, fake):
    src = tone(tmp_path / "a.wav", seconds=3.3)
    assert run(src, "-o", tmp_path / "o", "--seed", "5") == 0
    written, _ = sf.read(str(tmp_path / "o" / "a.wav"), dtype="float32")
    codec = fake[0]
    whole = codec.sound2sound(str(src), seed=5)
    assert np.array_equal(written.T, whole.numpy())


def test_flags_reach_the_codec(tmp_path, fake):
    src = tone(tmp_path / "a.wav")
    prompt = tone(tmp_path / "p.wav", seconds=0.3, rate=44100, channels=1)
    assert run(src, "-o", tmp_path / "o", "--steps", "7", "--guidance", "2.5", "--batch-size", "1", "--seed", "3",
               "--prompt", prompt, "--ckpt", "some/where", "--device", "cpu", "--official-vocoder",
               "--revision", "v1") == 0
    assert FakeCodec.built[0]["path_or_repo"] == "some/where" and FakeCodec.built[0]["revision"] == "v1"
    (_, enc), (_, dec) = fake[0].calls
    assert enc["batch_size"] == 1
    assert dec["num_steps"] == 7 and dec["guidance_scale"] == 2.5 and dec["seeded"] and not dec["fast_vocoder"]
    assert dec["prompt"].wav.shape == (2, int(0.3 * 48000)) and dec["prompt"].wav.dtype == torch.float32


@pytest.mark.parametrize("native", [True, False])
def test_bfloat16_on_the_cpu(tmp_path, monkeypatch, capsys, native):
    monkeypatch.setattr(precision, "native_bfloat16", lambda device="cpu": native)
    assert run(tone(tmp_path / "a.wav"), "-o", tmp_path / "o1", "--dtype", "bfloat16", "--device", "cpu", "-q") == 0
    assert FakeCodec.built[0]["dtype"] == torch.bfloat16
    # without native bfloat16 (measured: a DiT forward 7x slower than in float32) the user is told, even under -q
    warned = [line for line in capsys.readouterr().err.splitlines() if "no native bfloat16" in line]
    assert len(warned) == (0 if native else 1)
    assert not warned or warned[0].startswith("warning: ") and "use float32" in warned[0]
    # an encode never runs the flow decoder, so its dtype costs nothing there
    assert run("--encode", tone(tmp_path / "b.wav"), "-o", tmp_path / "o2", "--dtype", "bfloat16", "-q") == 0
    assert "no native bfloat16" not in capsys.readouterr().err


@pytest.mark.parametrize("native", [True, False])
def test_the_vae_and_vocoder_precision_is_asked_for(tmp_path, monkeypatch, capsys, native):
    monkeypatch.setattr(precision, "native_bfloat16", lambda device="cpu": native)
    assert run(tone(tmp_path / "a.wav"), "-o", tmp_path / "o1", "--device", "cpu", "-q") == 0
    assert FakeCodec.built[-1]["audioldm_dtype"] == torch.float32 and FakeCodec.built[-1]["dtype"] == torch.float32
    assert run(tone(tmp_path / "b.wav"), "-o", tmp_path / "o2", "--audioldm-dtype", "bfloat16", "--device", "cpu",
               "-q") == 0
    assert FakeCodec.built[-1]["audioldm_dtype"] == torch.bfloat16 and FakeCodec.built[-1]["dtype"] == torch.float32
    warned = [line for line in capsys.readouterr().err.splitlines() if "no native bfloat16" in line]
    assert len(warned) == (0 if native else 1) and all("the VAE and vocoder" in w for w in warned)


def test_seed_makes_output_reproducible(tmp_path):
    src = tone(tmp_path / "a.wav")
    for name in ("s1", "s2"):
        assert run(src, "-o", tmp_path / name, "--seed", "11") == 0
    assert run(src, "-o", tmp_path / "r") == 0
    s1, s2, r = (sf.read(str(tmp_path / n / "a.wav"))[0] for n in ("s1", "s2", "r"))
    assert np.array_equal(s1, s2) and not np.array_equal(s1, r)


def test_encode_then_decode(tmp_path, fake):
    src = tone(tmp_path / "in" / "mono.flac", seconds=1.3, rate=44100, channels=1)
    assert run("--encode", src, "-o", tmp_path / "tok") == 0
    assert FakeCodec.built[-1]["encoder_only"] is True
    assert [c[0] for c in fake[-1].calls] == ["encode"]
    token = tmp_path / "tok" / "mono.mct"
    codes, header = load_codes(token)
    n48 = round(1.3 * 48000)
    assert codes.shape == (1, 1, int(n48 / 48000 * 25) + 1)
    assert header["num_samples"] == n48 and header["original_sample_rate"] == 44100
    assert header["original_channels"] == 1 and header["layer"] == 6
    assert os.path.getsize(token) < 300 + 14 * codes.shape[-1] / 8 + 1

    assert run(token, "-o", tmp_path / "dec") == 0
    assert FakeCodec.built[-1]["encoder_only"] is False
    (_, dec), = fake[-1].calls
    assert dec["num_steps"] == 20  # the official code2sound default for token files
    assert sf.info(str(tmp_path / "dec" / "mono.wav")).frames == n48  # cut to the original length


def test_token_file_is_recognised_by_content_not_only_name(tmp_path):
    save_codes(tmp_path / "weird.bin", torch.tensor([1, 2, 3]), num_samples=4000)
    assert run(tmp_path / "weird.bin", "-o", tmp_path / "o") == 0
    assert sf.info(str(tmp_path / "o" / "weird.wav")).frames == 4000


def test_encode_refuses_token_files(tmp_path, capsys):
    save_codes(tmp_path / "t.mct", torch.tensor([1, 2, 3]))
    assert run("--encode", tmp_path / "t.mct", "-o", tmp_path / "o") == 1
    assert "already a token file" in capsys.readouterr().err
    assert FakeCodec.built == []  # nothing to do: the model is not even loaded


def test_incompatible_token_file_is_refused(tmp_path, capsys):
    save_codes(tmp_path / "t.mct", torch.tensor([1, 2, 3]), codebook_size=1024)
    assert run(tmp_path / "t.mct", "-o", tmp_path / "o") == 1
    assert "was made with codebook_size 1024, but this model uses 16384" in capsys.readouterr().err
    assert not (tmp_path / "o" / "t.wav").exists()


@pytest.mark.parametrize("damage", ["truncated", "empty", "text"])
def test_damaged_token_file_is_named_as_a_token_file(tmp_path, capsys, damage):
    path = save_codes(tmp_path / "t.mct", torch.tensor([1, 2, 3]))
    data = {"truncated": path.read_bytes()[:-1], "empty": b"", "text": b"hello, not codes"}[damage]
    path.write_bytes(data)
    assert run(path, "-o", tmp_path / "o") == 1
    err = capsys.readouterr().err
    assert "t.mct" in err and "Traceback" not in err and "WAV or FLAC" not in err
    assert "token file" in err or "damaged" in err
    assert list((tmp_path / "o").iterdir()) == []


# ---- inputs: folders, globs, missing and odd things --------------------------------------------

def test_folder_is_searched_recursively(tmp_path):
    music = tmp_path / "music"
    tone(music / "a.wav")
    tone(music / "sub" / "b.flac")
    tone(music / "sub" / "deeper" / "c.ogg")
    tone(music / "d.AIFF", format="AIFF")
    save_codes(music / "sub" / "e.mct", torch.tensor([5, 6]))
    tone(music / ".hidden.wav")
    tone(music / ".cache" / "f.wav")
    (music / "notes.txt").write_text("not audio")
    assert run(music, "-o", tmp_path / "out") == 0
    out = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert out == ["a.wav", "d.wav", "sub/b.wav", "sub/deeper/c.wav", "sub/e.wav"]


def test_output_folder_inside_input_folder_is_not_an_input(tmp_path):
    tone(tmp_path / "a.wav")
    assert run(tmp_path, "-o", tmp_path / "out") == 0
    assert run(tmp_path, "-o", tmp_path / "out", "--overwrite") == 0
    assert sorted(p.name for p in (tmp_path / "out").rglob("*")) == ["a.wav"]


def test_glob_patterns(tmp_path):
    for name in ("x1.flac", "x2.flac", "y.wav", "deep/x3.flac"):
        tone(tmp_path / name)
    assert run(str(tmp_path / "*.flac"), str(tmp_path / "**" / "x3.*"), "-o", tmp_path / "o") == 0
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["x1.wav", "x2.wav", "x3.wav"]


def test_same_file_twice_is_done_once(tmp_path, fake):
    src = tone(tmp_path / "a.wav")
    assert run(src, str(tmp_path / "*.wav"), "-o", tmp_path / "o") == 0
    assert len(fake[0].calls) == 2  # one encode, one decode


@pytest.mark.parametrize("make, words", [
    (lambda p: str(p / "nope.wav"), "does not exist"),
    (lambda p: str(p / "*.nothing"), "matches no file"),
    (lambda p: (p / "empty").mkdir() or str(p / "empty"), "holds no audio"),
    (lambda p: "/dev/zero", "not a regular file"),
    (lambda p: os.mkfifo(p / "pipe.wav") or str(p / "pipe.wav"), "not a regular file"),
])
def test_missing_and_odd_inputs(tmp_path, capsys, make, words):
    result = []
    worker = threading.Thread(target=lambda: result.append(run(make(tmp_path), "-o", tmp_path / "o")), daemon=True)
    worker.start()
    worker.join(60)  # a named pipe must be refused, not opened: opening one blocks forever
    assert result == [1]
    err = capsys.readouterr().err
    assert words in err and "0 done, 1 failed" in err
    assert FakeCodec.built == []


def test_long_file_names_can_be_written(tmp_path):
    name = "n" * 240  # legal (255 bytes is the limit); the temporary name must fit as well
    src = tone(tmp_path / "in" / f"{name}.wav")
    assert run(src, "-o", tmp_path / "o") == 0
    assert (tmp_path / "o" / f"{name}.wav").is_file()
    assert run("--encode", src, "-o", tmp_path / "t") == 0
    assert (tmp_path / "t" / f"{name}.mct").is_file()


# ---- outputs: overwrite refusal, collisions, atomicity -----------------------------------------

def test_refuses_to_overwrite(tmp_path, capsys):
    src = tone(tmp_path / "a.wav")
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "a.wav").write_bytes(b"precious")
    assert run(src, "-o", tmp_path / "o") == 1
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "o" / "a.wav").read_bytes() == b"precious"
    assert FakeCodec.built == []
    assert run(src, "-o", tmp_path / "o", "--overwrite") == 0
    assert sf.info(str(tmp_path / "o" / "a.wav")).subtype == "FLOAT"


def test_never_overwrites_its_own_input(tmp_path, capsys):
    src = tone(tmp_path / "a.wav")
    before = src.read_bytes()
    assert run(src, "-o", tmp_path, "--overwrite") == 1
    assert "overwritten by its own output" in capsys.readouterr().err
    assert src.read_bytes() == before


def test_two_inputs_with_one_output_name(tmp_path, capsys):
    tone(tmp_path / "in" / "a.wav")
    tone(tmp_path / "in" / "a.flac")
    assert run(tmp_path / "in", "-o", tmp_path / "o") == 1
    err = capsys.readouterr().err
    assert "1 done, 1 failed" in err and "already writes" in err
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["a.wav"]


def test_output_folder_that_cannot_be_created(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert run(tone(tmp_path / "a.wav"), "-o", tmp_path / "file" / "sub") == 1
    assert "Cannot create the output folder" in capsys.readouterr().err
    assert FakeCodec.built == []  # found out before loading the model


def test_output_folder_is_created_only_when_something_is_written(tmp_path, monkeypatch):
    def missing(*a, **kw):
        raise CheckpointError("No weights.")

    monkeypatch.setattr(MuCodec, "from_pretrained", missing)
    assert run(tone(tmp_path / "a.wav"), "-o", tmp_path / "new" / "o") == 1
    assert not (tmp_path / "new").exists()


def test_batch_keeps_going_and_summarises(tmp_path, capsys):
    tone(tmp_path / "in" / "a.wav")
    (tmp_path / "in" / "b.wav").write_bytes(b"RIFF but not really a wave file")
    tone(tmp_path / "in" / "c.wav")
    assert run(tmp_path / "in", "-o", tmp_path / "o") == 1
    err = capsys.readouterr().err
    assert "2 done, 1 failed" in err and "b.wav" in err and "Traceback" not in err
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["a.wav", "c.wav"]  # no partial b.wav


def _broken(monkeypatch, decode):
    """Make the fake decoder call ``decode(codes, pieces)`` for its pieces."""
    real = FakeCodec.decode_checked

    def decode_checked(self, codes, limit, opts, generator, prompt, noise):
        return decode(codes, real(self, codes, limit, opts, generator, prompt, noise))

    monkeypatch.setattr(FakeCodec, "decode_checked", decode_checked)


def test_codec_errors_and_bugs_do_not_stop_the_batch(tmp_path, capsys, monkeypatch):
    for n in "abc":
        tone(tmp_path / "in" / f"{n}.wav", seconds=0.1 + 0.1 * "abc".index(n))

    def decode(codes, pieces):
        if codes.shape[-1] == 3:
            raise MuCodecError("The decoder refused this file.")
        if codes.shape[-1] == 6:
            raise RuntimeError("an internal bug")
        yield from pieces

    _broken(monkeypatch, decode)
    assert run(tmp_path / "in", "-o", tmp_path / "o") == 1
    err = capsys.readouterr().err
    assert "1 done, 2 failed" in err and "The decoder refused this file." in err
    assert "internal error RuntimeError: an internal bug" in err and "Traceback" in err  # bugs show where
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["c.wav"]


def test_failure_midway_through_a_stream_leaves_nothing(tmp_path, capsys, monkeypatch):
    def decode(codes, pieces):
        for i, piece in enumerate(pieces):
            if i == 1:
                raise NumericalError("the flow decoder produced NaN or infinite values; ckpt/mucodec.pt is damaged.")
            yield piece

    _broken(monkeypatch, decode)
    assert run(tone(tmp_path / "a.wav", seconds=3), "-o", tmp_path / "o") == 1
    assert "NaN" in capsys.readouterr().err
    assert list((tmp_path / "o").iterdir()) == []


def test_interrupt_keeps_finished_files_and_writes_no_partial_one(tmp_path, capsys, monkeypatch):
    tone(tmp_path / "in" / "a.wav", seconds=0.1)
    tone(tmp_path / "in" / "b.wav", seconds=2.2)

    def decode(codes, pieces):
        for i, piece in enumerate(pieces):
            if i == 1:
                raise KeyboardInterrupt
            yield piece

    _broken(monkeypatch, decode)
    assert run(tmp_path / "in", "-o", tmp_path / "o") == 130
    assert "interrupted" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["a.wav"]


def test_out_of_memory_is_one_sentence(tmp_path, capsys, monkeypatch):
    def hungry(self, wav, batch_size):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(FakeCodec, "_encode", hungry)
    assert run(tone(tmp_path / "a.wav"), "-o", tmp_path / "o") == 1
    err = capsys.readouterr().err
    assert "Out of memory on cpu" in err and "--batch-size 1" in err and "Traceback" not in err


def test_non_finite_output_is_not_written(tmp_path, capsys, monkeypatch):
    def decode(codes, pieces):
        for piece in pieces:
            yield torch.full_like(piece, float("inf"))

    _broken(monkeypatch, decode)
    assert run(tone(tmp_path / "a.wav"), "-o", tmp_path / "o") == 1
    err = capsys.readouterr().err.split("\n", 1)[1]  # after the "loading ... (float32)" line
    assert "NaN or infinite" in err and "float32" not in err  # no advice to use the precision it already uses
    assert list((tmp_path / "o").iterdir()) == []


def test_write_failure_leaves_nothing(tmp_path, monkeypatch, capsys):
    import mucodec.files

    monkeypatch.setattr(mucodec.files.os, "replace", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left")))
    assert run(tone(tmp_path / "a.wav"), "-o", tmp_path / "o") == 1
    assert f"no space is left on {tmp_path / 'o'}; free space on {tmp_path / 'o'}" in capsys.readouterr().err
    assert list((tmp_path / "o").iterdir()) == []


def test_quiet_prints_nothing_on_success(tmp_path, capsys):
    tone(tmp_path / "in" / "a.wav")
    tone(tmp_path / "in" / "b.wav")
    assert run(tmp_path / "in", "-o", tmp_path / "o", "--quiet") == 0
    assert capsys.readouterr() == ("", "")


# ---- prompt ------------------------------------------------------------------------------------

@pytest.mark.parametrize("content, words", [(b"junk", "p.wav"), (None, "a prompt needs at least")])
def test_bad_prompt_fails_once_before_any_file(tmp_path, capsys, content, words):
    prompt = tmp_path / "p.wav"
    if content is None:
        tone(prompt, seconds=0.01)  # readable, but shorter than one latent frame
    else:
        prompt.write_bytes(content)
    for n in "abc":
        tone(tmp_path / "in" / f"{n}.wav")
    assert run(tmp_path / "in", "--prompt", prompt, "-o", tmp_path / "o") == 1
    err = capsys.readouterr().err
    assert err.count("p.wav") == 1 and words in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


# ---- the official default and the weights message ----------------------------------------------

def test_no_arguments_reconstructs_the_demo_song(tmp_path, monkeypatch):
    (tmp_path / "test_wav").mkdir()
    (tmp_path / "test_wav" / "test.wav").write_bytes((REPO / "test_wav" / "test.wav").read_bytes())
    monkeypatch.setattr(checkpoint, "REPO_ROOT", tmp_path)
    assert run() == 0
    frames = sf.info(str(REPO / "test_wav" / "test.wav")).frames
    assert sf.info(str(tmp_path / "reconstruct" / "test.wav")).frames == frames
    assert FakeCodec.built[0]["path_or_repo"] == "MuCodec/mucodec"  # no weights in tmp_path


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


def test_checkpoint_error_is_one_sentence(tmp_path, capsys, monkeypatch):
    def missing(*a, **kw):
        raise CheckpointError("MuCodec needs tools/audioldm_48k.pth, muq_dev/muq.pt and ckpt/mucodec.pt.")

    monkeypatch.setattr(MuCodec, "from_pretrained", missing)
    assert run(tone(tmp_path / "a.wav"), "-o", tmp_path / "o") == 1
    err = capsys.readouterr().err
    assert err.strip().endswith("error: MuCodec needs tools/audioldm_48k.pth, muq_dev/muq.pt and ckpt/mucodec.pt.")
    assert not (tmp_path / "o").exists()


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
        import fake_codec
        from mucodec import cli
        from mucodec.codec import MuCodec
        MuCodec.from_pretrained = fake_codec.FakeCodec.from_pretrained
        sys.exit(cli.main(sys.argv[1:]))
    """))
    r = run_process([str(driver), "in"], tmp_path)
    assert r.returncode == 1, r.stderr
    assert "1 done, 1 failed" in r.stderr and "Traceback" not in r.stderr
    assert (tmp_path / "reconstruct" / "a.wav").is_file()  # ./reconstruct when INPUT is given
    assert not (tmp_path / "reconstruct" / "b.wav").exists()


@pytest.mark.parametrize("entry", [["generate.py"], ["-m", "mucodec"]])
def test_process_without_weights_explains_where_to_get_them(tmp_path, entry):
    (tmp_path / "empty").mkdir()
    tone(tmp_path / "a.wav")
    script = [str(REPO / entry[0])] if entry[0].endswith(".py") else entry
    r = run_process([*script, "a.wav", "-o", "o", "--ckpt", str(tmp_path / "empty")], tmp_path)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr, r.stderr
    assert "https://huggingface.co/MuCodec/mucodec" in r.stderr
    for f in ("audioldm_48k.pth", "muq.pt", "mucodec.pt"):
        assert f in r.stderr
    assert not (tmp_path / "o" / "a.wav").exists()


def test_process_help_is_fast_and_clean(tmp_path):
    r = run_process([str(REPO / "generate.py"), "--help"], tmp_path)
    assert r.returncode == 0 and "usage: generate.py" in r.stdout and r.stderr == ""
    r = run_process(["-m", "mucodec", "--help"], tmp_path)
    assert r.returncode == 0 and "usage: python -m mucodec" in r.stdout and r.stderr == ""


def test_process_bad_command_line_exits_2(tmp_path):
    r = run_process([str(REPO / "generate.py"), "a.wav", "--steps", "0"], tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr


# ---- the real codec on tiny checkpoints ---------------------------------------------------------

@pytest.fixture
def real(monkeypatch):
    monkeypatch.undo()  # the real from_pretrained


def test_real_codec_encode_decode_reconstruct(tmp_path, real, tiny_ckpt_dir, capsys):
    src = tmp_path / "test.wav"
    src.write_bytes((REPO / "test_wav" / "test.wav").read_bytes())
    n = sf.info(str(src)).frames
    common = ["--ckpt", str(tiny_ckpt_dir), "--device", "cpu", "--steps", "2", "--seed", "0"]
    assert cli.main([str(src), "--encode", "-o", str(tmp_path / "tok"), *common]) == 0
    codes, header = load_codes(tmp_path / "tok" / "test.mct")
    assert codes.shape == (1, 1, int(n / 48000 * 25) + 1) and header["num_samples"] == n
    assert 0 <= int(codes.min()) and int(codes.max()) < 16384
    assert cli.main([str(tmp_path / "tok" / "test.mct"), "-o", str(tmp_path / "dec"), *common]) == 0
    assert cli.main([str(src), "-o", str(tmp_path / "rec"), *common]) == 0
    dec, rate = sf.read(str(tmp_path / "dec" / "test.wav"), dtype="float32")
    rec, _ = sf.read(str(tmp_path / "rec" / "test.wav"), dtype="float32")
    assert rate == 48000 and dec.shape == rec.shape == (n, 2) and np.isfinite(dec).all()
    # Same codes, same seed, same steps: decoding the token file equals reconstructing directly.
    assert np.array_equal(dec, rec)
    codec = MuCodec.from_pretrained(tiny_ckpt_dir, device="cpu")
    # ... and both equal the notebook API's whole-array result (the files were streamed window by window)
    assert np.array_equal(dec.T, codec.code2sound(tmp_path / "tok" / "test.mct", num_steps=2, seed=0).numpy())
    assert "Traceback" not in capsys.readouterr().err
