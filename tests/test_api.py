"""The notebook API (mucodec.api, re-exported by mucodec and generate.py) over the fake codec.

Its functions share the methods' signatures, load one model per settings and never replace it silently,
pick the precision the official code runs, and check every argument at the boundary with one-sentence errors.
"""
from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import generate
import mucodec
from fake_codec import FakeCodec, fake, tone  # noqa: F401  (fake: the autouse fixture installing FakeCodec)
from mucodec import api, cli, precision
from mucodec.codec import MuCodec
from mucodec.errors import ArgumentError, AudioError, CodesError, MuCodecError, TokenFileError
from mucodec.tokens import save_codes


# ---- the layers: generate.py and mucodec re-export the notebook functions -----------------------

def test_generate_is_a_thin_shim():
    assert generate.sound2code is mucodec.sound2code is api.sound2code
    assert generate.code2sound is mucodec.code2sound and generate.sound2sound is mucodec.sound2sound
    assert generate.cli is cli.cli
    own = [name for name, v in vars(generate).items() if inspect.isfunction(v) and v.__module__ == "generate"]
    assert own == []  # no logic of its own: every function comes from the package


def test_notebook_functions_share_the_methods_signatures():
    for name in ("sound2code", "code2sound", "sound2sound"):
        fn, method = inspect.signature(getattr(api, name)), inspect.signature(getattr(MuCodec, name))
        params = list(fn.parameters.values())
        assert [p.kind for p in params[1:]] == [inspect.Parameter.KEYWORD_ONLY] * (len(params) - 1), name
        assert list(fn.parameters)[1:] == list(method.parameters)[2:], name  # same options, same order
        assert all(p.kind == inspect.Parameter.KEYWORD_ONLY for p in list(method.parameters.values())[2:]), name


# ---- precision -----------------------------------------------------------------------------------

def test_load_model_warns_where_bfloat16_is_emulated(monkeypatch):
    monkeypatch.setattr(precision, "native_bfloat16", lambda device="cpu": torch.device(device).type != "cpu")
    with pytest.warns(RuntimeWarning, match="no native bfloat16"):
        api.load_model("somewhere", device="cpu", dtype="bfloat16")
    assert api.precision_warning(torch.float32, "cpu") is None and api.precision_warning("bfloat16", "cuda") is None


def test_load_model_takes_the_vae_and_vocoder_precision(monkeypatch):
    monkeypatch.setattr(precision, "native_bfloat16", lambda device="cpu": False)
    with pytest.raises(ArgumentError, match="audioldm_dtype 'int8' is not supported; use one of float32"):
        api.load_model("somewhere", device="cpu", audioldm_dtype="int8")
    with pytest.warns(RuntimeWarning, match="bfloat16 makes the VAE and vocoder several times slower"):
        first = api.load_model("somewhere", device="cpu", audioldm_dtype="bfloat16")
    assert FakeCodec.built[-1]["audioldm_dtype"] == torch.bfloat16 and FakeCodec.built[-1]["dtype"] == torch.float32
    assert api.load_model("somewhere", device="cpu", audioldm_dtype=torch.bfloat16) is first  # same settings
    api.load_model("somewhere", device="cpu")
    assert len(FakeCodec.built) == 2 and FakeCodec.built[-1]["audioldm_dtype"] == torch.float32


def test_the_bfloat16_probe_answers_on_this_machine():
    # a private torch probe: if a torch release drops or renames it, this says so instead of silently never warning
    assert isinstance(torch.ops.mkldnn._is_mkldnn_bf16_supported(), bool)
    assert api.native_bfloat16("cuda") is True


@pytest.mark.parametrize("device, dtype", [("cpu", torch.float32), ("cuda", torch.float16), ("cuda:1", torch.float16),
                                           ("mps", torch.float32)])
def test_auto_dtype_is_what_the_official_code_runs_on_the_device(device, dtype):
    # the official generate.py decodes under torch.autocast("cuda", float16); on other devices that is a no-op
    assert api.pick_dtype("auto", device) == api.pick_dtype(None, device) == dtype
    assert api.pick_dtype("bfloat16", device) == torch.bfloat16


# ---- notebook API ----------------------------------------------------------------------------------

def test_notebook_api_with_paths_and_tensors(tmp_path, fake):
    src = tone(tmp_path / "a.wav", seconds=0.6)
    codes = generate.sound2code(src)
    assert codes.shape == (1, 1, int(0.6 * 25) + 1) and codes.dtype == torch.int64
    mono = torch.from_numpy(sf.read(str(src), dtype="float32")[0][:, 0].copy())
    assert generate.sound2code(mono).shape == codes.shape  # (N,) is duplicated to stereo
    assert generate.sound2code(mono.numpy()).shape == codes.shape  # numpy arrays too
    resampled = generate.sound2code(mono[::2].clone(), sample_rate=24000)
    assert resampled.shape == codes.shape
    wav = generate.code2sound(codes, seed=1)
    assert wav.shape == (2, codes.shape[-1] * 1920)
    assert torch.equal(wav, generate.code2sound(codes.reshape(-1), seed=1))
    token = save_codes(tmp_path / "a.mct", codes, num_samples=int(0.6 * 48000))
    assert generate.code2sound(token).shape == (2, int(0.6 * 48000))
    assert generate.sound2sound(src).shape == (2, int(0.6 * 48000))
    assert fake[0].calls[-1][1]["num_steps"] == 50
    assert len(FakeCodec.built) == 1  # one default model for all of it


def test_notebook_model_is_loaded_once_per_settings_and_never_silently_replaced(tmp_path):
    first = api.load_model()
    assert api.load_model() is first and api.load_model(device=api.pick_device()) is first
    assert api.current_model() is first
    other = api.load_model("elsewhere")
    assert other is not first and api.current_model() is other
    generate.sound2code(torch.zeros(2, 4800))  # uses the model loaded last, not the default
    assert other.calls and not first.calls
    assert [b["path_or_repo"] for b in FakeCodec.built] == [api.default_checkpoint(), "elsewhere"]
    assert FakeCodec.built[0]["encoder_only"] is False and FakeCodec.built[0]["dtype"] == torch.float32


def test_notebook_api_rejects_bad_inputs():
    with pytest.raises(AudioError, match="shape"):
        generate.sound2code(torch.zeros(2, 2, 100))
    with pytest.raises(AudioError, match="floating-point"):
        generate.sound2code(torch.zeros(2, 100, dtype=torch.int16))
    with pytest.raises(AudioError, match="NaN"):
        generate.sound2code(torch.full((2, 100), float("nan")))


@pytest.mark.parametrize("call, error", [
    (lambda: api.sound2code(torch.zeros(2, 100), sample_rate=0), ArgumentError),
    (lambda: api.sound2code(torch.zeros(2, 100), sample_rate=-48000), ArgumentError),
    (lambda: api.sound2code(torch.zeros(2, 100), batch_size=-1), ArgumentError),
    (lambda: api.sound2code(torch.zeros(2, 100), batch_size=2.5), ArgumentError),
    (lambda: api.sound2code("x.wav", sample_rate=44100), ArgumentError),
    (lambda: api.code2sound([1, 2, 3], num_steps=0), ArgumentError),
    (lambda: api.code2sound([1, 2, 3], num_steps=True), ArgumentError),
    (lambda: api.code2sound([1, 2, 3], guidance_scale=float("nan")), ArgumentError),
    (lambda: api.code2sound([1, 2, 3], guidance_scale=float("inf")), ArgumentError),
    (lambda: api.code2sound([1, 2, 3], seed=2 ** 64), ArgumentError),
    (lambda: api.code2sound([1, 2, 3], seed=1, generator=torch.Generator()), ArgumentError),
    (lambda: api.code2sound([1, 2, 3], noise=torch.zeros(1, 32, 512, 32)), ArgumentError),
    (lambda: api.code2sound([1, 2, 3], noise=[torch.zeros(1, 32, 511, 32)]), ArgumentError),
    (lambda: api.code2sound([1, 2, 3], noise=[]), ArgumentError),
    (lambda: api.code2sound(torch.tensor([1.0, 2.0])), CodesError),
    (lambda: api.code2sound(np.array([2 ** 64 - 1], dtype=np.uint64)), CodesError),
    (lambda: api.code2sound(torch.tensor([16384])), CodesError),
    (lambda: api.code2sound(torch.zeros(1, 2, 3, dtype=torch.long)), CodesError),
    (lambda: api.code2sound(Path("nope.mct")), TokenFileError),
    (lambda: api.load_model(device="xpu"), ArgumentError),
    (lambda: api.load_model(123), ArgumentError),
    (lambda: mucodec.load_audio(None), AudioError),
    (lambda: api.sound2code(None), AudioError),
    (lambda: api.code2sound(None), CodesError),
    (lambda: api.load_model(dtype="int8"), ArgumentError),
])
def test_notebook_arguments_are_checked_at_the_boundary(call, error):
    with pytest.raises(error) as e:
        call()
    assert isinstance(e.value, MuCodecError)
    message = str(e.value)
    assert message.endswith(".") and "\n" not in message


def test_value_errors_stay_value_errors():
    with pytest.raises(ValueError):
        api.code2sound([1, 2, 3], num_steps=0)
    with pytest.raises(ValueError):
        api.code2sound(torch.tensor([16384]))


def test_notebook_docstrings_give_shapes_and_defaults():
    assert "(1, 1, T)" in generate.sound2code.__doc__ and "48" in generate.sound2code.__doc__
    assert "(2, T * 1920)" in generate.code2sound.__doc__ and "20" in generate.code2sound.__doc__
