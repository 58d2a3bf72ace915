"""Damaged weights are caught at the stage boundary and blamed on the right file (tiny checkpoints).

A checkpoint whose tensors hold NaN loads (checking 1.5 B parameters at every load would cost more
than it saves); the first window through the damaged stage then fails with one sentence naming the
file, and nothing is written.
"""
import shutil

import pytest
import torch

from mucodec import cli, compress
from mucodec.codec import MuCodec
from mucodec.errors import NumericalError
from mucodec.settings import DecodingOptions
from mucodec.tokens import save_codes


def damaged_copy(src, dst, rel, pick):
    """Copy the checkpoint folder and set to NaN the first tensor of ``rel`` whose name ``pick`` accepts."""
    shutil.copytree(src, dst)
    obj = torch.load(dst / rel, weights_only=False)
    state = obj.get("state_dict") or obj.get("model") or obj
    name = next(k for k in state if pick(k) and state[k].is_floating_point() and state[k].dim() >= 2)
    state[name] = torch.full_like(state[name], float("nan"))
    torch.save(obj, dst / rel)
    return dst


@pytest.mark.parametrize("rel, pick, stage, named", [
    ("muq_dev/muq.pt", lambda k: k.startswith("model.conformer.layers.0."), "The MuQ encoder", "muq.pt"),
    ("ckpt/mucodec.pt", lambda k: k.startswith("rvq_muencoder_emb.") and "in_proj" in k, "The quantizer",
     "mucodec.pt"),
])
def test_nan_encoder_weights_name_their_file(tiny_ckpt_dir, tmp_path, capsys, rel, pick, stage, named):
    folder = damaged_copy(tiny_ckpt_dir, tmp_path / "ckpt", rel, pick)
    codec = MuCodec.from_pretrained(folder, device="cpu", encoder_only=True)
    with pytest.raises(NumericalError, match=f"^{stage} produced NaN .*{named} is damaged; download it again\\.$"):
        codec.sound2code(torch.zeros(2, 48000) + 0.1)
    # through the command line: one sentence, exit 1, no token file
    torch.manual_seed(0)
    src = tmp_path / "a.wav"
    import soundfile

    soundfile.write(src, (0.1 * torch.randn(48000, 2)).numpy(), 48000)
    assert cli.main([str(src), "--encode", "--ckpt", str(folder), "-o", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert stage in err and named in err and "Traceback" not in err
    assert not (tmp_path / "o" / "a.mct").exists()


@pytest.mark.parametrize("rel, pick, stage, named", [
    ("ckpt/mucodec.pt", lambda k: k.startswith("cfm_wrapper.estimator."), "The flow decoder", "mucodec.pt"),
    ("tools/audioldm_48k.pth", lambda k: k.startswith("first_stage_model.vocoder."), "The VAE and vocoder",
     "audioldm_48k.pth"),
])
def test_nan_decoder_weights_name_their_file(tiny_ckpt_dir, tmp_path, rel, pick, stage, named):
    folder = damaged_copy(tiny_ckpt_dir, tmp_path / "ckpt", rel, pick)
    codec = MuCodec.from_pretrained(folder, device="cpu")  # loads: the damage shows when the stage runs
    with pytest.raises(NumericalError, match=f"^{stage} produced NaN .*{named} is damaged; download it again\\.$"):
        codec.code2sound(torch.arange(30), num_steps=1, seed=0)
    token = save_codes(tmp_path / "t.mct", torch.arange(30), layer=codec.layer)
    with pytest.raises(NumericalError):
        compress.decode_file(codec, token, tmp_path / "out.wav", DecodingOptions(num_steps=1, seed=0))
    assert not (tmp_path / "out.wav").exists() and not list(tmp_path.glob(".out.wav*"))
