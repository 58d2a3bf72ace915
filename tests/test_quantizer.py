"""Quantizer (descript_quantize3 VectorQuantize) against muq_layer / rvq_cond golden data."""
import pytest
import torch
import torch.nn.functional as F

import helpers
from helpers import golden, max_err
from mucodec.checkpoint import fold_weight_norm
from mucodec.errors import TokenFileError
from mucodec.quantizer import Quantizer, QuantizerConfig

PREFIX = "rvq_muencoder_emb.quantizers.0."
# README "Suggested tolerances": RVQ codes exact; cond / from_codes <= 1e-5. z_e is a single
# 1x1 conv of the given embedding, held to the same 1e-5.
TOL = 1e-5


def build_quantizer_full() -> Quantizer:
    sd = fold_weight_norm(helpers.state_dict("mucodec", prefix=PREFIX, strip=PREFIX))
    sd.pop("stale_counter")  # training-only buffer of the official module
    quantizer = Quantizer(QuantizerConfig())
    quantizer.load_state_dict(sd, strict=True)
    return quantizer


@pytest.fixture(scope="module")
def quantizer_full(encoder_codec):
    """The quantizer loaded from a synthetic mucodec.pt (old-style weight norm) by from_pretrained."""
    return encoder_codec.quantizer


def test_loader_folds_weight_norm_like_the_rule(quantizer_full):
    direct = build_quantizer_full().state_dict()
    assert all(torch.equal(direct[k], v) for k, v in quantizer_full.state_dict().items())


@pytest.fixture(scope="module")
def muq_layer():
    return golden("muq_layer")


def test_state_dict_names():
    assert set(Quantizer().state_dict()) == {
        "in_proj.weight", "in_proj.bias", "out_proj.weight", "out_proj.bias", "codebook.weight"}


def test_encode_golden_embedding(quantizer_full, muq_layer):
    codes, z_e = quantizer_full.encode(torch.from_numpy(muq_layer["muencoder_emb"]))
    assert codes.dtype == torch.int64
    assert torch.equal(codes, torch.from_numpy(muq_layer["codes"]))
    assert max_err(z_e, muq_layer["rvq_z_e"]) <= TOL
    z_q, _ = quantizer_full.from_codes(codes)
    # the reference's forward computes out_proj(z_e + (z_q - z_e)): equal to out_proj(z_q) up to rounding
    assert max_err(z_q, muq_layer["rvq_z_q"]) <= TOL


def test_encode_random_embedding(quantizer_full, muq_layer):
    """100 distinct codes (the MuQ case has only 6)."""
    codes, z_e = quantizer_full.encode(torch.from_numpy(muq_layer["rand_emb"]))
    assert torch.equal(codes, torch.from_numpy(muq_layer["rand_codes"]))
    assert max_err(z_e, muq_layer["rand_z_e"]) <= TOL
    assert max_err(quantizer_full.from_codes(codes)[0], muq_layer["rand_z_q"]) <= TOL


def test_from_codes_golden(quantizer_full):
    ref = golden("rvq_cond")
    z_q, z_p = quantizer_full.from_codes(torch.from_numpy(ref["codes"]))
    assert max_err(z_q, ref["from_codes_z_q"]) <= TOL
    assert max_err(z_p, ref["from_codes_z_p"]) <= TOL


def _tiny():
    q = Quantizer(QuantizerConfig(input_dim=4, codebook_size=3, codebook_dim=4))
    with torch.no_grad():
        q.in_proj.weight.copy_(torch.eye(4)[:, :, None])
        q.in_proj.bias.zero_()
        # row 0 is short and points along x; row 1 is long and points mostly along y
        q.codebook.weight.copy_(torch.tensor([[0.1, 0, 0, 0], [3.0, 4.0, 0, 0], [0, 0, 1.0, 0]]))
    return q


def test_nearest_neighbour_is_cosine():
    q = _tiny()
    # cos to rows 0/1: 0.94 / 0.84, but Euclidean distances 4.18 / 2.69 would pick row 1
    z = torch.tensor([[4.0], [1.5], [0.0], [0.0]])[None]  # (1, 4, 1)
    codes, z_e = q.encode(z)
    assert codes.tolist() == [[[0]]]
    assert torch.equal(z_e, z)
    z_q, z_p = q.from_codes(codes)
    assert torch.equal(z_p[0, :, 0], q.codebook.weight[0])  # raw, un-normalised row
    assert torch.allclose(z_q, F.conv1d(z_p, q.out_proj.weight, q.out_proj.bias))


def test_shapes_follow_config():
    q = Quantizer(QuantizerConfig(input_dim=16, codebook_size=10, codebook_dim=3))
    codes, z_e = q.encode(torch.randn(2, 16, 7))
    assert codes.shape == (2, 1, 7) and z_e.shape == (2, 3, 7)
    assert int(codes.max()) < 10
    z_q, z_p = q.from_codes(codes)
    assert z_q.shape == (2, 16, 7) and z_p.shape == (2, 3, 7)


@pytest.mark.parametrize("bad", [torch.tensor([[[0, 16384]]]), torch.tensor([[[-1, 3]]]),
                                 torch.tensor([[[1.0, 2.0]]]), torch.zeros(1, 2, 3, dtype=torch.long)])
def test_from_codes_rejects(quantizer_full, bad):
    with pytest.raises(TokenFileError, match=r"codes must"):
        quantizer_full.from_codes(bad)


def test_out_of_range_message(quantizer_full):
    with pytest.raises(TokenFileError, match=r"codes must be in \[0, 16384\)"):
        quantizer_full.from_codes(torch.tensor([[[5, 20000]]]))
