"""from_pretrained on checkpoint folders: what is read, what overrides what, and the errors."""
import shutil

import pytest
import torch

from mucodec.codec import MuCodec
from mucodec.errors import CheckpointError


@pytest.fixture
def folder(tiny_ckpt_dir, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt_dir, dst)
    return dst


def _rewrite(path, edit):
    obj = torch.load(path, weights_only=False)
    edit(obj)
    torch.save(obj, path)


def test_encoder_only_never_opens_the_decoder_files(folder):
    (folder / "tools/audioldm_48k.pth").unlink()  # a decoder-only file: encoding must not need it
    codec = MuCodec.from_pretrained(folder, device="cpu", encoder_only=True)
    assert codec.flow is None and codec.vae is None and codec.vocoder is None
    assert codec.sound2code(torch.zeros(2, 48000)).shape == (1, 1, 26)
    with pytest.raises(CheckpointError):
        codec.code2sound(torch.zeros(1, 1, 4, dtype=torch.long))
    with pytest.raises(CheckpointError) as e:
        MuCodec.from_pretrained(folder, device="cpu")
    assert "tools/audioldm_48k.pth" in str(e.value)


def test_muencoder_copy_in_mucodec_pt_overrides_muq_pt(folder, tiny_ckpt_dir):
    base = MuCodec.from_pretrained(tiny_ckpt_dir, device="cpu", encoder_only=True)
    name = "conformer.layers.0.self_attn.linear_q.weight"
    new = torch.full_like(base.muq.state_dict()[name], 0.01)

    def add_copy(obj):
        obj["state_dict"]["muencoder.model." + name] = new

    _rewrite(folder / "ckpt/mucodec.pt", add_copy)
    codec = MuCodec.from_pretrained(folder, device="cpu", encoder_only=True)
    assert torch.equal(codec.muq.state_dict()[name], new)
    other = "conv.linear.weight"  # not in the copy: still muq.pt's
    assert torch.equal(codec.muq.state_dict()[other], base.muq.state_dict()[other])


def test_missing_tensor_names_file_key_and_shape(folder):
    key = "cfm_wrapper.estimator.proj_out.weight"

    def drop(obj):
        del obj["state_dict"][key]

    _rewrite(folder / "ckpt/mucodec.pt", drop)
    with pytest.raises(CheckpointError) as e:
        MuCodec.from_pretrained(folder, device="cpu")
    msg = str(e.value)
    assert "mucodec.pt" in msg and key in msg and "expected shape" in msg


def test_misshaped_tensor_is_reported(folder):
    key = "model.conv.linear.weight"

    def reshape(obj):
        obj["model"][key] = obj["model"][key][:, :-1]

    _rewrite(folder / "muq_dev/muq.pt", reshape)
    with pytest.raises(CheckpointError) as e:
        MuCodec.from_pretrained(folder, device="cpu", encoder_only=True)
    assert "muq.pt" in str(e.value) and key in str(e.value)


def test_weight_norm_parametrization_names_load_too(folder, tiny_ckpt_dir):
    """mucodec.pt saved by a newer torch: parametrizations.weight.original0/1 instead of weight_g/_v."""
    base = MuCodec.from_pretrained(tiny_ckpt_dir, device="cpu", encoder_only=True)
    p = "rvq_muencoder_emb.quantizers.0.in_proj."
    w = base.quantizer.state_dict()["in_proj.weight"]

    def to_parametrization(obj):
        sd = obj["state_dict"]
        del sd[p + "weight"]
        norm = w.norm(dim=(1, 2), keepdim=True)
        sd[p + "parametrizations.weight.original0"] = norm
        sd[p + "parametrizations.weight.original1"] = w

    _rewrite(folder / "ckpt/mucodec.pt", to_parametrization)
    codec = MuCodec.from_pretrained(folder, device="cpu", encoder_only=True)
    torch.testing.assert_close(codec.quantizer.state_dict()["in_proj.weight"], w, rtol=1e-6, atol=1e-7)


def test_layer_out_of_range_is_a_clear_error(tiny_ckpt_dir):
    with pytest.raises(CheckpointError) as e:
        MuCodec.from_pretrained(tiny_ckpt_dir, device="cpu", encoder_only=True, layer=9)
    assert "layer 9" in str(e.value)


def test_package_api(tiny_ckpt_dir):
    import mucodec

    codec = mucodec.MuCodec.from_pretrained(tiny_ckpt_dir, device="cpu", encoder_only=True)
    assert isinstance(codec, MuCodec) and codec.sample_rate == 48000 and codec.frame_rate == 25
    assert issubclass(mucodec.CheckpointError, mucodec.MuCodecError)
    assert callable(mucodec.load_audio) and callable(mucodec.save_codes) and callable(mucodec.load_codes)
