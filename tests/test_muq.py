"""MuQ encoder against the reference's muq_layer golden data (synthetic full-size weights)."""
import re

import pytest
import torch

import helpers
from helpers import golden, max_err
from mucodec.errors import CheckpointError
from mucodec.muq import MuQConfig, MuQEncoder, conv2d

NUM_LAYERS = 6  # MuCodec(layer_num=7) uses hidden_states[6]
# README "Suggested tolerances": front end <= 1e-4 abs on normalised values / 1e-3 dB;
# MuQ hidden states <= 1e-4 abs (observed thread-count noise of the reference: 2.4e-6).
MEL_DB_TOL, FRONT_TOL, HIDDEN_TOL = 1e-3, 1e-4, 1e-4


def build_muq_full() -> MuQEncoder:
    model = MuQEncoder(MuQConfig(), num_layers=NUM_LAYERS)
    keys = set(model.state_dict())
    sd = helpers.state_dict("muq", prefix="model.", strip="model.", select=lambda n: n[len("model."):] in keys)
    model.load_state_dict(sd, strict=True)
    return model


@pytest.fixture(scope="module")
def muq_full(encoder_codec):
    """Full-size MuQ loaded from a synthetic muq.pt through MuCodec.from_pretrained."""
    return encoder_codec.muq


@pytest.fixture(scope="module")
def muq_layer():
    # tests/data keeps hidden_states 0..NUM_LAYERS only: the layers MuCodec computes and these tests compare
    return golden("muq_layer")


@pytest.fixture(scope="module")
def muq_run(muq_full, muq_layer):
    """All intermediates of one forward on the reference's 24 kHz input (1, 72500)."""
    return muq_full(torch.from_numpy(muq_layer["wav_24k"]), return_all=True)


def test_state_dict_is_muq_pt_minus_unused(muq_full):
    """Exactly conv.* and conformer.layers.0-5.* of muq.pt, same shapes, nothing else."""
    wanted = re.compile(r"model\.(conv\.|conformer\.layers\.[0-5]\.)")
    ref = {e["name"][len("model."):]: tuple(e["shape"]) for e in helpers.manifest("muq")["entries"]
           if wanted.match(e["name"])}
    ours = {k: tuple(v.shape) for k, v in muq_full.state_dict().items()}
    assert ours == ref


def test_front_end(muq_run, muq_layer):
    # truncation to a multiple of 960 samples is a slice: exact
    assert torch.equal(muq_run["muq_source_24k"], torch.from_numpy(muq_layer["muq_source_24k"]))
    assert max_err(muq_run["mel_db"], muq_layer["mel_db"]) <= MEL_DB_TOL
    assert max_err(muq_run["mel_norm"], muq_layer["mel_norm"]) <= FRONT_TOL


def test_conv_subsampling(muq_run, muq_layer):
    assert max_err(muq_run["conv_out"], muq_layer["conv_out"]) <= HIDDEN_TOL


@pytest.mark.parametrize("k", range(NUM_LAYERS + 1))
def test_hidden_states(muq_run, muq_layer, k):
    assert max_err(muq_run["hidden_states"][k], muq_layer["hidden_states"][k]) <= HIDDEN_TOL


def test_plain_forward_is_last_hidden_state(muq_full, muq_run, muq_layer):
    out = muq_full(torch.from_numpy(muq_layer["wav_24k"]))
    assert torch.equal(out, muq_run["hidden_states"][NUM_LAYERS])
    assert max_err(out.permute(0, 2, 1), muq_layer["muencoder_emb"]) <= HIDDEN_TOL


def test_codes_end_to_end(muq_run, muq_layer, encoder_codec):
    """Our MuQ + our quantizer give the reference's codes exactly (decision margin >= 1.9e-4)."""
    quantizer = encoder_codec.quantizer
    codes, z_e = quantizer.encode(muq_run["hidden_states"][NUM_LAYERS].permute(0, 2, 1))
    assert torch.equal(codes, torch.from_numpy(muq_layer["codes"]))
    assert torch.equal(codes, torch.from_numpy(muq_layer["rvq_codes_fwd"]))
    assert max_err(z_e, muq_layer["rvq_z_e"]) <= HIDDEN_TOL  # a projection of hidden_states[6]


def test_rotary_inv_freq_is_computed_and_exact(muq_full):
    ref = golden("computed_buffers")["muencoder.model.conformer.embed_positions.inv_freq"]
    assert torch.equal(muq_full.conformer.inv_freq, torch.from_numpy(ref))
    assert not any("inv_freq" in k or k.startswith("mel.") for k in muq_full.state_dict())


# ------------------------------------------------------------------------------------------------
# tiny configs: every size comes from the config
# ------------------------------------------------------------------------------------------------
TINY = dict(n_fft=256, n_mels=16, conv_dim=8, encoder_dim=64, encoder_depth=3, num_attention_heads=4,
            intermediate_size=96, conv_depthwise_kernel_size=7)


@pytest.mark.parametrize("label_rate, frames", [(25, 5), (50, 10)])
def test_tiny_config_shapes(label_rate, frames):
    torch.manual_seed(0)
    cfg = MuQConfig(label_rate=label_rate, **TINY)
    model = MuQEncoder(cfg, num_layers=2)
    sd = model.state_dict()
    assert sd["conv.linear.weight"].shape == (64, 8 * 16 // 4)
    assert sd["conformer.layers.1.ffn1.intermediate_dense.weight"].shape == (96, 64)
    assert sd["conformer.layers.1.conv_module.depthwise_conv.weight"].shape == (64, 1, 7)
    assert "conformer.layers.2.ffn1.intermediate_dense.weight" not in sd
    n = 5 * 960 + 123  # truncated to 5 * 960 samples
    out = model(torch.randn(2, n), return_all=True)
    assert out["mel_db"].shape == (2, 16, 5 * 960 // 240 + 1)
    assert out["mel_norm"].shape == (2, 16, 5 * 960 // 240)
    assert len(out["hidden_states"]) == 3
    assert out["hidden_states"][-1].shape == (2, frames, 64)
    assert torch.isfinite(out["hidden_states"][-1]).all()


def test_batchnorm_ignores_train_mode():
    """Inference only: .train() must not switch to batch statistics."""
    torch.manual_seed(0)
    model = MuQEncoder(MuQConfig(**TINY), num_layers=1)
    for name, buf in model.named_buffers():
        if name.endswith("running_mean"):
            buf.normal_()
    x = torch.randn(1, 4800)
    a = model.eval()(x)
    b = model.train()(x)
    assert torch.equal(a, b)


def test_from_fairseq():
    cfg = MuQConfig.from_fairseq({
        "_name": "muq", "label_rate": 25, "features": ["melspec_2048"], "hop_length": 240, "n_mels": 128,
        "conv_dim": 512, "encoder_dim": 768, "encoder_depth": 8, "codebook_size": 4096, "mask_prob": 0.6,
        "stat_path": None, "w2v2_config_path": None, "num_attention_heads": 12,
    })
    assert cfg == MuQConfig(encoder_dim=768, encoder_depth=8, num_attention_heads=12)
    assert MuQConfig.from_fairseq({}) == MuQConfig()
    assert MuQConfig.from_fairseq({"label_rate": 50}).time_strides == (2, 1)
    with pytest.raises(CheckpointError):
        MuQConfig.from_fairseq({"label_rate": 10})
    with pytest.raises(CheckpointError):
        MuQConfig.from_fairseq({"use_hubert_featurizer": True})


def test_fetch_codes_batch_path(encoder_codec, muq_layer):
    """The codec's per-window path (per-channel limit, mix, resample, MuQ, RVQ) on the golden input."""
    x = torch.from_numpy(muq_layer["signal_48k"])[None]
    assert torch.equal(encoder_codec.encode_windows(x), torch.from_numpy(muq_layer["codes"]))


def test_build_from_manifest_matches_loaded(muq_full):
    """The loader maps muq.pt's names onto exactly the tensors the synthetic rule gives them."""
    direct = build_muq_full().state_dict()
    loaded = muq_full.state_dict()
    assert direct.keys() == loaded.keys()
    assert all(torch.equal(direct[k], loaded[k]) for k in direct)


@pytest.mark.parametrize("stride", [(2, 2), (2, 1)])
def test_single_channel_convolution_as_a_patch_product(stride):
    """The first block's two convolutions of the mel image (one input channel) run as a matrix product over
    3x3 patches; odd sizes check the padding and the output grid."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(1, 6, 3, padding=1, stride=stride)
    x = torch.randn(2, 1, 13, 21)
    with torch.no_grad():
        out = conv2d(conv, x)
        torch.testing.assert_close(out, conv(x), atol=1e-6, rtol=0)
        # the layout the following 512-channel convolutions run fastest in, and keep
        assert out.is_contiguous(memory_format=torch.channels_last)
        many = torch.nn.Conv2d(3, 6, 3, padding=1, stride=stride)
        y = torch.randn(2, 3, 13, 21)
        assert torch.equal(conv2d(many, y), many(y))
