"""Checkpoint reading: never executes code, maps the documented naming variants, clear errors."""
import os
import pickle

import pytest
import torch

from helpers import deny_opening
from mucodec import checkpoint
from mucodec.checkpoint import (
    default_checkpoint,
    fold_weight_norm,
    kind_of,
    load_module,
    make_config,
    read_checkpoint,
    resolve_files,
    state_dict_of,
    subdict,
)
from mucodec.errors import CheckpointError
from mucodec.flow import FlowDecoderConfig
from mucodec.quantizer import QuantizerConfig
from mucodec.vocoder import VocoderConfig

MARKER_ENV = "MUCODEC_PWNED_MARKER"


class _Payload:
    """Pickles as a call to os.system: what a malicious checkpoint would carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_reduce_payload_is_never_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": {"model.w": torch.ones(2)}, "extra_state": _Payload(marker)}, path)
    obj = read_checkpoint(path)
    assert not marker.exists(), "loading executed code from the checkpoint"
    assert torch.equal(state_dict_of(obj)["model.w"], torch.ones(2))
    assert "system" in repr(obj["extra_state"])  # an inert placeholder stands in for the call


def test_malicious_payload_in_legacy_format_is_never_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil_legacy.pt"
    torch.save({"w": torch.ones(3), "x": _Payload(marker)}, path, _use_new_zipfile_serialization=False)
    obj = read_checkpoint(path)
    assert not marker.exists()
    assert torch.equal(obj["w"], torch.ones(3))


def test_plain_pickle_with_payload_fails_cleanly_without_running(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "raw.pkl"
    path.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(CheckpointError):
        read_checkpoint(path)
    assert not marker.exists()


def test_missing_file_names_the_file_and_where_to_get_it(tmp_path):
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(tmp_path / "nope.pt")
    assert "nope.pt" in str(e.value) and "huggingface.co/MuCodec/mucodec" in str(e.value)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04broken zip"])
def test_damaged_file_is_a_clear_error(tmp_path, content):
    path = tmp_path / "mucodec.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(path)
    assert str(path) in str(e.value) and "download it again" in str(e.value)


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "mucodec.pt"
    torch.save({"w": torch.randn(1000)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        read_checkpoint(path)


def test_missing_folder_lists_all_three_files(tmp_path):
    with pytest.raises(CheckpointError) as e:
        resolve_files(tmp_path)
    msg = str(e.value)
    for rel in ("tools/audioldm_48k.pth", "muq_dev/muq.pt", "ckpt/mucodec.pt"):
        assert rel in msg
    assert "huggingface.co/MuCodec/mucodec" in msg


def test_default_checkpoint_prefers_the_repo_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "REPO_ROOT", tmp_path)
    assert default_checkpoint() == "MuCodec/mucodec"
    for f in ("tools/audioldm_48k.pth", "muq_dev/muq.pt", "ckpt/mucodec.pt"):
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_bytes(b"")
    assert default_checkpoint() == str(tmp_path)


def test_hub_offline_without_cache_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(CheckpointError) as e:
        resolve_files("MuCodec/mucodec")
    assert "muq_dev/muq.pt" in str(e.value) and "huggingface.co/MuCodec/mucodec" in str(e.value)


def test_both_weight_norm_namings_give_the_weight_torch_computes():
    conv = torch.nn.utils.weight_norm(torch.nn.Conv1d(8, 4, 1))
    old = {k: v.detach().clone() for k, v in conv.state_dict().items()}
    expected = conv.weight.detach().clone()  # what the official forward uses
    folded = fold_weight_norm(old)
    assert set(folded) == {"weight", "bias"} and torch.equal(folded["weight"], expected)

    named = {"q.weight_g": old["weight_g"], "q.weight_v": old["weight_v"], "q.bias": old["bias"]}
    folded = fold_weight_norm(named)
    assert set(folded) == {"q.weight", "q.bias"}
    assert torch.equal(folded["q.weight"], expected)

    new = {"q.parametrizations.weight.original0": old["weight_g"],
           "q.parametrizations.weight.original1": old["weight_v"], "q.bias": old["bias"]}
    assert torch.equal(fold_weight_norm(new)["q.weight"], expected)


def test_weight_norm_over_last_dim_is_folded_per_that_dim():
    conv = torch.nn.utils.parametrizations.weight_norm(torch.nn.Conv1d(4, 6, 5, groups=2), dim=2)
    sd = {k: v.detach() for k, v in conv.state_dict().items()}
    assert torch.allclose(fold_weight_norm(sd)["weight"], conv.weight.detach(), rtol=0, atol=1e-7)


def test_prefix_mapping_and_wrapped_dicts():
    t = torch.zeros(1)
    assert state_dict_of({"state_dict": {"a": t}, "x": 1}) == {"a": t}
    assert state_dict_of({"model": {"model.a": t}, "cfg": {}}) == {"model.a": t}
    assert state_dict_of({"a": t, "step": 3}) == {"a": t}
    assert subdict({"first_stage_model.x.w": t, "other": t}, "first_stage_model.") == {"x.w": t}
    assert subdict({"cfm_wrapper.estimator.p": t}, "cfm_wrapper.estimator.", "estimator.") == {"estimator.p": t}


def test_missing_and_misshaped_tensors_name_file_key_and_shape():
    m = torch.nn.Linear(3, 2)
    with pytest.raises(CheckpointError) as e:
        load_module(m, {"weight": torch.zeros(2, 3)}, "ckpt/mucodec.pt", "cond_muencoder_emb.")
    assert "ckpt/mucodec.pt" in str(e.value) and "cond_muencoder_emb.bias" in str(e.value) and "(2,)" in str(e.value)
    with pytest.raises(CheckpointError) as e:
        load_module(m, {"weight": torch.zeros(3, 3), "bias": torch.zeros(2)}, "ckpt/mucodec.pt", "c.")
    assert "c.weight" in str(e.value) and "(3, 3)" in str(e.value) and "(2, 3)" in str(e.value)


def test_extra_tensors_are_ignored():
    m = torch.nn.Linear(3, 2)
    state = {"weight": torch.ones(2, 3), "bias": torch.ones(2), "head.weight": torch.ones(9)}
    load_module(m, state, "x.pt")
    assert torch.equal(m.weight.detach(), torch.ones(2, 3))


# --------------------------------------------------------------------------------------------------
# What the OS says about a path, the kind of file, and the TORCH_FORCE_* variables
# --------------------------------------------------------------------------------------------------
def test_directory_fifo_and_device_are_not_regular_files(tmp_path):
    (tmp_path / "muq.pt").mkdir()
    fifo = tmp_path / "fifo.pt"
    os.mkfifo(fifo)  # opening it for reading would block: it must be recognised from os.stat alone
    dev = tmp_path / "zero.pt"
    dev.symlink_to("/dev/zero")
    for path in (tmp_path / "muq.pt", fifo, dev):
        with pytest.raises(CheckpointError) as e:
            read_checkpoint(path)
        assert str(path) in str(e.value) and "not a regular file" in str(e.value)


def test_permission_denied_is_reported_as_such(tmp_path, monkeypatch):
    path = tmp_path / "mucodec.pt"
    torch.save({"w": torch.ones(2)}, path)
    deny_opening(monkeypatch, path)
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(path)
    assert str(path) in str(e.value) and "permission denied" in str(e.value)
    assert "download it again" not in str(e.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="file modes do not stop root")
def test_unreadable_file_mode_is_permission_denied(tmp_path):
    path = tmp_path / "mucodec.pt"
    torch.save({"w": torch.ones(2)}, path)
    path.chmod(0)
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(path)
    assert "permission denied" in str(e.value)


def _fairseq_like(path, marker=None):
    """A muq.pt as fairseq writes it: tensors beside pickled non-tensor objects."""
    import argparse

    obj = {"args": argparse.Namespace(arch="muq"), "cfg": {"model": {"encoder_dim": 2}},
           "model": {"model.w": torch.ones(2)}}
    if marker is not None:
        obj["extra_state"] = _Payload(marker)
    torch.save(obj, path)


@pytest.mark.parametrize("env", ["TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "both"])
def test_torch_force_variables_neither_break_nor_unlock_loading(tmp_path, monkeypatch, env):
    for name in (["TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] if env == "both" else [env]):
        monkeypatch.setenv(name, "1")
    before = dict(os.environ)
    path, marker = tmp_path / "muq.pt", tmp_path / "pwned"
    _fairseq_like(path, marker)
    obj = read_checkpoint(path, "muq")
    assert torch.equal(obj["model"]["model.w"], torch.ones(2)) and obj["cfg"]["model"]["encoder_dim"] == 2
    assert not marker.exists(), "loading executed code from the checkpoint"
    assert dict(os.environ) == before  # the variables are only lifted around the load


def test_file_of_another_kind_is_named_as_such(tmp_path):
    path = tmp_path / "mucodec.pt"
    _fairseq_like(path)
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(path, "mucodec")
    msg = str(e.value)
    assert str(path) in msg and "holds a MuQ checkpoint (muq.pt)" in msg and "ckpt/mucodec.pt" in msg

    torch.save({"state_dict": {"first_stage_model.x": torch.ones(1), "scale_factor": torch.tensor(1.0)}}, path)
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(path, "muq")
    assert "holds an AudioLDM-48k checkpoint" in str(e.value)

    torch.save({"weights": torch.ones(1)}, path)
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(path, "audioldm")
    assert "none of the three MuCodec checkpoints" in str(e.value)
    assert read_checkpoint(path)["weights"].shape == (1,)  # without a role any state dict is read


def test_kinds_are_recognised_by_their_keys():
    t = torch.zeros(1)
    assert kind_of({"cfg": {}, "model": {"model.a": t}}) == "muq"
    assert kind_of({"rvq_muencoder_emb.quantizers.0.codebook.weight": t}) == "mucodec"
    assert kind_of({"state_dict": {"cfm_wrapper.estimator.x": t}}) == "mucodec"
    assert kind_of({"state_dict": {"first_stage_model.x": t, "scale_factor": t}}) == "audioldm"
    assert kind_of({"a": t}) is None


# --------------------------------------------------------------------------------------------------
# Sizes stored in a file
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [-3, 0, "16", True, [16], {"a": 1}, 10**12, 16.5, float("nan")])
def test_bad_int_size_names_file_and_key(value):
    with pytest.raises(CheckpointError) as e:
        make_config(QuantizerConfig, {"input_dim": value}, "ckpt/mucodec.pt", "mucodec_config['quantizer']")
    msg = str(e.value)
    assert msg.startswith("ckpt/mucodec.pt: mucodec_config['quantizer']['input_dim'] is ")
    assert "positive integer" in msg


def test_sizes_nested_lists_floats_and_unknown_keys():
    cfg = make_config(VocoderConfig, {"upsample_rates": [2.0, 3], "upsample_kernel_sizes": [4, 6], "hop_length": 6,
                                      "resblock_kernel_sizes": [3], "resblock_dilation_sizes": [[1, 3]],
                                      "lrelu_slope": 0.2, "not_a_field": "ignored", "num_mels": None}, "a.pth", "k")
    assert cfg.upsample_rates == (2, 3) and cfg.resblock_dilation_sizes == ((1, 3),) and cfg.lrelu_slope == 0.2
    assert cfg.num_mels == VocoderConfig().num_mels
    for bad, key in [({"upsample_rates": "abc"}, "k['upsample_rates']"), ({"upsample_rates": []}, "k['upsample_rates']"),
                     ({"resblock_dilation_sizes": [[1, -1]]}, "k['resblock_dilation_sizes'][0][1]"),
                     ({"lrelu_slope": float("inf")}, "k['lrelu_slope']"), ({"lrelu_slope": "0.1"}, "k['lrelu_slope']")]:
        with pytest.raises(CheckpointError) as e:
            make_config(VocoderConfig, bad, "a.pth", "k")
        assert f"a.pth: {key} is" in str(e.value)
    with pytest.raises(CheckpointError) as e:
        make_config(FlowDecoderConfig, {"dit": 3}, "m.pt", "c")
    assert "m.pt: c['dit'] is 3; it must be a dict" in str(e.value)
    with pytest.raises(CheckpointError) as e:
        make_config(FlowDecoderConfig, {"dit": {"num_layers": 10**6}}, "m.pt", "c")
    assert "c['dit']['num_layers'] is 1000000" in str(e.value)
    with pytest.raises(CheckpointError) as e:  # each value fine, together not: the config's own check
        make_config(VocoderConfig, {"hop_length": 7}, "a.pth", "k")
    assert "a.pth: the sizes in k do not fit together" in str(e.value)
