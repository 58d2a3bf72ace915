"""from_pretrained on checkpoint folders: what is read, what overrides what, and the errors."""
import os
import shutil
import threading

import pytest
import torch

from helpers import deny_opening
from mucodec.checkpoint import FILES
from mucodec.stages import ENCODER_STAGES, load_stages, roles_of
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


# --------------------------------------------------------------------------------------------------
# The table, the hub revision, and what is checked before anything is built
# --------------------------------------------------------------------------------------------------
def test_stage_table_loads_each_stage_and_names_its_files(folder):
    files = {role: folder / rel for role, rel in FILES.items()}
    assert roles_of(ENCODER_STAGES) == ("muq", "mucodec") and roles_of(["vocoder"]) == ("audioldm",)
    m = load_stages(files, ["quantizer", "vae_encoder", "vocoder"])
    assert m["vae_encoder"].encoder is not None and m["vae_encoder"].decoder is None
    assert m["quantizer"].codebook.weight.shape[0] == 16384

    codec = MuCodec.from_pretrained(folder, device="cpu")
    assert codec._sources["muq"] == str(files["muq"]) and codec._sources["flow"] == str(files["mucodec"])
    assert codec._sources["vocoder"] == codec._sources["audioldm"] == str(files["audioldm"])

    def add_copy(obj):  # a MuQ copy in mucodec.pt: the muq stage comes from both files
        obj["state_dict"]["muencoder.model.conv.linear.bias"] = torch.zeros(16)

    _rewrite(files["mucodec"], add_copy)
    codec = MuCodec.from_pretrained(folder, device="cpu", encoder_only=True)
    assert str(files["muq"]) in codec._sources["muq"] and str(files["mucodec"]) in codec._sources["muq"]


def test_prompt_encoder_goes_through_the_table(tiny_ckpt_dir):
    codec = MuCodec.from_pretrained(tiny_ckpt_dir, device="cpu")
    encoder = codec.vae_encoder()
    assert encoder.encoder is not None and encoder.scale_factor == 0.5
    assert codec._sources["vae_encoder"] == str(tiny_ckpt_dir / "tools/audioldm_48k.pth")


def test_revision_is_passed_to_the_hub(tiny_ckpt_dir, monkeypatch):
    import huggingface_hub

    calls = []
    by_name = {rel.rsplit("/", 1)[-1]: tiny_ckpt_dir / rel for rel in FILES.values()}

    def fake_download(repo_id, filename, revision=None, **kw):
        calls.append((repo_id, filename, revision))
        return str(by_name[filename])

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    codec = MuCodec.from_pretrained("someone/mucodec", device="cpu", encoder_only=True, revision="v1.0")
    assert codec.muq is not None
    assert sorted(calls) == [("someone/mucodec", "mucodec.pt", "v1.0"), ("someone/mucodec", "muq.pt", "v1.0")]

    def offline(repo_id, filename, revision=None, **kw):
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(CheckpointError) as e:
        MuCodec.from_pretrained("someone/mucodec", device="cpu", revision="v1.0")
    assert "revision 'v1.0'" in str(e.value) and "muq_dev/muq.pt" in str(e.value)


def test_sizes_that_do_not_match_the_tensors_fail_before_any_real_build(folder, monkeypatch):
    import mucodec.stages as ck

    real_builds = []
    for name in ("FlowDecoder", "MuQEncoder", "Quantizer", "MelVAE", "HiFiGAN"):
        cls = getattr(ck, name)

        def counting(*a, _cls=cls, **k):
            if torch.empty(0).device.type != "meta":
                real_builds.append(_cls.__name__)
            return _cls(*a, **k)

        monkeypatch.setattr(ck, name, counting)

    def two_dit_layers(obj):  # the file has one DiT block
        obj["mucodec_config"]["flow"]["dit"]["num_layers"] = 2

    _rewrite(folder / "ckpt/mucodec.pt", two_dit_layers)
    with pytest.raises(CheckpointError) as e:
        MuCodec.from_pretrained(folder, device="cpu")
    assert "cfm_wrapper.estimator.transformer_blocks.1." in str(e.value) and "ckpt/mucodec.pt" in str(e.value)
    assert real_builds == []  # the check ran on meta modules; nothing was built for real


def test_muq_size_that_does_not_match_its_weight_names_the_key(folder):
    def wider(obj):
        obj["cfg"]["model"]["encoder_dim"] = 32

    _rewrite(folder / "muq_dev/muq.pt", wider)
    with pytest.raises(CheckpointError) as e:
        MuCodec.from_pretrained(folder, device="cpu", encoder_only=True)
    msg = str(e.value)
    assert "muq_dev/muq.pt: cfg['model']['encoder_dim'] is 32" in msg and "model.conv.linear.weight" in msg


@pytest.mark.parametrize("value", [-3, 0, "16", True, [16], {"x": 1}, 10**12])
def test_bad_size_in_muq_cfg_is_one_sentence_naming_file_and_key(folder, value):
    def edit(obj):
        obj["cfg"]["model"]["encoder_dim"] = value

    _rewrite(folder / "muq_dev/muq.pt", edit)
    with pytest.raises(CheckpointError) as e:
        MuCodec.from_pretrained(folder, device="cpu", encoder_only=True)
    assert "muq_dev/muq.pt: cfg['model']['encoder_dim'] is" in str(e.value)


@pytest.mark.parametrize("file, section, key, value", [
    ("ckpt/mucodec.pt", "quantizer", "codebook_dim", -1),
    ("ckpt/mucodec.pt", "codec", "layer", "2"),
    ("ckpt/mucodec.pt", "codec", "input_peak", float("nan")),
    ("tools/audioldm_48k.pth", "vae", "ch", 10**12),
    ("tools/audioldm_48k.pth", "vocoder", "upsample_rates", 4),
])
def test_bad_size_in_mucodec_config_names_file_and_key(folder, file, section, key, value):
    def edit(obj):
        obj["mucodec_config"].setdefault(section, {})[key] = value

    _rewrite(folder / file, edit)
    with pytest.raises(CheckpointError) as e:
        MuCodec.from_pretrained(folder, device="cpu")
    assert f"{file}: mucodec_config[{section!r}][{key!r}] is" in str(e.value)


def test_mucodec_config_of_the_wrong_type(folder):
    def edit(obj):
        obj["mucodec_config"] = ["not", "a", "dict"]

    _rewrite(folder / "ckpt/mucodec.pt", edit)
    with pytest.raises(CheckpointError) as e:
        MuCodec.from_pretrained(folder, device="cpu", encoder_only=True)
    assert "ckpt/mucodec.pt: mucodec_config is" in str(e.value)


def test_damaged_scale_factor(folder):
    def edit(obj):
        obj["state_dict"]["scale_factor"] = torch.tensor(float("inf"))

    _rewrite(folder / "tools/audioldm_48k.pth", edit)
    with pytest.raises(CheckpointError) as e:
        MuCodec.from_pretrained(folder, device="cpu")
    assert "audioldm_48k.pth: 'scale_factor'" in str(e.value)


@pytest.mark.parametrize("layer", [0, 3, 2.0, True, "2"])
def test_bad_layer_argument(tiny_ckpt_dir, layer):
    with pytest.raises(CheckpointError) as e:
        MuCodec.from_pretrained(tiny_ckpt_dir, device="cpu", encoder_only=True, layer=layer)
    assert f"layer {layer!r} does not exist" in str(e.value) and "use 1..2" in str(e.value)


# --------------------------------------------------------------------------------------------------
# Files in the wrong place, and what the OS says
# --------------------------------------------------------------------------------------------------
def test_checkpoint_saved_under_another_name(folder):
    shutil.copy(folder / "muq_dev/muq.pt", folder / "ckpt/mucodec.pt")
    with pytest.raises(CheckpointError) as e:
        MuCodec.from_pretrained(folder, device="cpu", encoder_only=True)
    msg = str(e.value)
    assert "ckpt/mucodec.pt holds a MuQ checkpoint (muq.pt)" in msg and "put the files in their places" in msg
    for rel in FILES.values():
        assert rel in msg


def test_swapped_audioldm_and_muq(folder):
    a, m = folder / "tools/audioldm_48k.pth", folder / "muq_dev/muq.pt"
    tmp = folder / "swap"
    a.rename(tmp), m.rename(a), tmp.rename(m)
    with pytest.raises(CheckpointError) as e:
        MuCodec.from_pretrained(folder, device="cpu")
    assert "holds an AudioLDM-48k checkpoint (audioldm_48k.pth)" in str(e.value)


def test_directory_in_place_of_a_file_is_not_missing(folder):
    path = folder / "muq_dev/muq.pt"
    path.unlink()
    path.mkdir()
    with pytest.raises(CheckpointError) as e:
        MuCodec.from_pretrained(folder, device="cpu", encoder_only=True)
    assert f"{path} is not a regular file (it is a folder)" in str(e.value)


def test_fifo_in_place_of_a_file_does_not_hang(folder):
    path = folder / "tools/audioldm_48k.pth"
    path.unlink()
    os.mkfifo(path)
    result = []

    def load():
        try:
            MuCodec.from_pretrained(folder, device="cpu")
        except CheckpointError as e:
            result.append(str(e))

    t = threading.Thread(target=load, daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive(), "loading blocked on a FIFO"
    assert result and "is not a regular file (it is a named pipe)" in result[0]


def test_device_in_place_of_a_file(folder):
    path = folder / "ckpt/mucodec.pt"
    path.unlink()
    path.symlink_to("/dev/zero")
    with pytest.raises(CheckpointError) as e:
        MuCodec.from_pretrained(folder, device="cpu", encoder_only=True)
    assert "is not a regular file (it is a device)" in str(e.value)


def test_permission_denied_is_not_called_damaged(folder, monkeypatch):
    path = folder / "muq_dev/muq.pt"
    deny_opening(monkeypatch, path)
    with pytest.raises(CheckpointError) as e:
        MuCodec.from_pretrained(folder, device="cpu", encoder_only=True)
    assert f"{path} cannot be read: permission denied" in str(e.value)


def test_intact_fairseq_muq_pt_loads_under_torch_force_weights_only(tiny_ckpt_dir, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "1")
    codec = MuCodec.from_pretrained(tiny_ckpt_dir, device="cpu", encoder_only=True)
    assert codec.sound2code(torch.zeros(2, 48000)).shape == (1, 1, 26)
    assert os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] == "1"


def test_sizes_that_do_not_fit_together(folder):
    def edit(obj):
        obj["mucodec_config"]["flow"]["dit"]["in_channels"] = 48

    _rewrite(folder / "ckpt/mucodec.pt", edit)
    with pytest.raises(CheckpointError) as e:
        MuCodec.from_pretrained(folder, device="cpu")
    assert "ckpt/mucodec.pt: the sizes in mucodec_config['flow'] do not fit together" in str(e.value)


@pytest.mark.parametrize("kwargs, words", [
    (dict(path_or_repo=123), "path_or_repo must be a folder or a hub repo id"),
    (dict(device="tpu"), "Unknown device"),
    (dict(device="xpu"), "not supported"),
])
def test_bad_arguments_are_one_sentence(tiny_ckpt_dir, kwargs, words):
    from mucodec.errors import ArgumentError

    kwargs.setdefault("path_or_repo", tiny_ckpt_dir)
    with pytest.raises(ArgumentError, match=words):
        MuCodec.from_pretrained(**kwargs)
