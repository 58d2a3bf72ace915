"""Flow decoder (conditioning, masks, normfeat, Euler/CFG solver) against the official
``inference_codes`` + ``solve_euler`` (golden rvq_cond.npz and cfm_solve.npz).

Tolerances (reference data README, "Suggested tolerances"):
* conditioning / normfeat / masking arrays: 1e-5 abs ("cond / from_codes <= 1e-5"): one
  Linear(1024, 512) and elementwise maths;
* cfm_solve: 1e-3 abs for everything downstream of a DiT call (latents, estimator inputs of
  steps >= 1, estimator outputs), the README bound for the 3-step solve; the first estimator
  input involves no DiT call and uses the conditioning bound 1e-5; the timesteps must be
  bit-identical (the accumulated float32 t is the quirk under test).

``step_inputs_*`` and ``step_outputs_*`` are stored as a fixed subset plus whole-array statistics
(``helpers.Sampled``; step_inputs: 100 000 elements of step 0 and 34 000 of each later step, with statistics
per step too, so step 0 alone is checked on 100 000 elements): ``max_err`` checks the subset and the
statistics of our full array at the same tolerance, which every full array within it satisfies.
"""
import contextlib

import numpy as np
import pytest
import torch
from torch import nn

import helpers
from helpers import golden, max_err
from mucodec.dit import DiTConfig
from mucodec.flow import FlowDecoder, FlowDecoderConfig, NormFeat

EST = "cfm_wrapper.estimator."
FLOW_PREFIXES = ("normfeat.", "cond_muencoder_emb.", "zero_cond_embedding1", EST)
COND_TOL = 1e-5
SOLVE_TOL = 1e-3


def flow_state_dict(select=lambda name: True) -> dict:
    """Synthetic FlowDecoder weights, checkpoint names mapped to ours."""
    sd = helpers.state_dict("mucodec", select=lambda n: n.startswith(FLOW_PREFIXES) and select(n))
    return {("estimator." + k[len(EST):] if k.startswith(EST) else k): v for k, v in sd.items()}


@pytest.fixture(scope="module")
def flow_full(full_codec):
    """The flow decoder loaded from a synthetic mucodec.pt through MuCodec.from_pretrained."""
    return full_codec.flow


@pytest.fixture(scope="module")
def flow_no_dit():
    """Official sizes and synthetic weights everywhere but a 1-layer stand-in DiT (never called
    by the tests using it)."""
    cfg = FlowDecoderConfig(dit=DiTConfig(num_layers=1, num_heads=2, head_dim=8, flow_t_size=16))
    fd = FlowDecoder(cfg)
    missing, unexpected = fd.load_state_dict(flow_state_dict(lambda n: not n.startswith(EST)), strict=False)
    assert not unexpected and all(k.startswith("estimator.") for k in missing)
    return fd.eval()


@pytest.fixture(scope="module")
def rvq():
    return golden("rvq_cond")


@pytest.fixture(scope="module")
def cfm():
    return golden("cfm_solve")


def t_(a):
    return torch.from_numpy(np.asarray(a))


class Recorder(nn.Module):
    """Stand-in estimator returning zeros and recording its (input, timestep) calls."""

    def __init__(self, out_channels):
        super().__init__()
        self.out_channels = out_channels
        self.calls = []

    def forward(self, x, t):
        self.calls.append((x.clone(), t.clone()))
        b, _, f, w = x.shape
        return torch.zeros(b, self.out_channels, f, w)


@contextlib.contextmanager
def estimator_replaced(fd, stand_in):
    """Swap the DiT for a stand-in (monkeypatch would delete a submodule on undo)."""
    real = fd.estimator
    fd.estimator = stand_in
    try:
        yield stand_in
    finally:
        fd.estimator = real


# --------------------------------------------------------------------------------------------
# names, config
# --------------------------------------------------------------------------------------------
def test_state_dict_names_and_shapes_match_checkpoint():
    with torch.device("meta"):
        fd = FlowDecoder(FlowDecoderConfig())
    ours = {k: tuple(v.shape) for k, v in fd.state_dict().items()}
    ref = {("estimator." + n[len(EST):] if n.startswith(EST) else n): tuple(s)
           for n, s, _ in helpers.entries("mucodec") if n.startswith(FLOW_PREFIXES)}
    assert ours == ref


def test_config_consistency_is_checked():
    with pytest.raises(ValueError):
        FlowDecoder(FlowDecoderConfig(latent_channels=16, dit=DiTConfig(num_layers=0)))
    assert FlowDecoderConfig().cond_features == 512


# --------------------------------------------------------------------------------------------
# normfeat, conditioning, masks (rvq_cond.npz)
# --------------------------------------------------------------------------------------------
def test_normfeat_statistics(flow_no_dit, rvq):
    nf = flow_no_dit.normfeat
    assert max_err(nf.mean, rvq["normfeat_mean"]) <= COND_TOL
    assert max_err(nf.std, rvq["normfeat_std"]) <= COND_TOL
    x = torch.randn(2, 32, 5, 32)
    torch.testing.assert_close(nf.unproject(nf.project(x)), x, atol=1e-5, rtol=0)


def test_normfeat_is_read_only():
    nf = NormFeat(4, 8)
    nf.counts.fill_(10.0)  # the official module would update its sums below 100000 counts
    nf.sum_x.normal_()
    nf.sum_x2.fill_(50.0)
    before = {k: v.clone() for k, v in nf.state_dict().items()}
    nf.project(torch.randn(3, 4, 6, 8))
    after = nf.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_condition(flow_no_dit, rvq):
    z_q = t_(rvq["from_codes_z_q"])
    with torch.no_grad():
        lin = flow_no_dit.cond_muencoder_emb(z_q.permute(0, 2, 1))
        cond = flow_no_dit.condition(z_q)
    assert cond.shape == (1, 32, 64, 32)
    assert max_err(lin, rvq["cond_linear"]) <= COND_TOL
    assert max_err(cond, rvq["cond_full"]) <= COND_TOL
    # code frames 2k, 2k+1 -> channels [0,16), [16,32) of latent frame k
    assert torch.equal(cond[0, 16:, 5], lin[0, 11].reshape(16, 32))
    with pytest.raises(ValueError):
        flow_no_dit.condition(z_q[:, :, :127])


def test_frame_masks():
    keep, prefix = FlowDecoder.frame_masks(8, 5, 2)
    assert keep.tolist() == [True] * 5 + [False] * 3
    assert prefix.tolist() == [True] * 2 + [False] * 6
    keep, prefix = FlowDecoder.frame_masks(8, 3, 6)  # official: mask 1 overrides, so kept up to 6
    assert keep.tolist() == [True] * 6 + [False] * 2 and int(prefix.sum()) == 6
    keep, prefix = FlowDecoder.frame_masks(8, 100, 100)
    assert bool(keep.all()) and bool(prefix.all())
    with pytest.raises(ValueError):
        FlowDecoder.frame_masks(8, -1, 0)


@pytest.mark.parametrize("tag", ["full", "masked"])
def test_masking_and_identity_solver(flow_no_dit, rvq, tag, monkeypatch):
    """``sample`` with the solver replaced by an identity, as the golden harness did."""
    store = {}

    def identity(noise, prefix, n_prefix, cond, num_steps, guidance_scale, callback=None):
        store.update(noise=noise.clone(), prefix=prefix, n_prefix=n_prefix, cond=cond,
                     num_steps=num_steps, guidance_scale=guidance_scale)
        return noise.clone()

    monkeypatch.setattr(flow_no_dit, "solve_euler", identity)
    noise = t_(rvq["noise_" + tag])
    true_latents = t_(rvq["true_latents"])
    out = flow_no_dit.sample(t_(rvq["from_codes_z_q"]), true_latents, int(rvq["latent_length_" + tag]),
                             int(rvq["incontext_length_" + tag]), noise, num_steps=3, guidance_scale=1.5)
    errs = {"cond_" + tag: max_err(store["cond"], rvq["cond_" + tag]),
            "incontext_x_" + tag: max_err(store["prefix"], rvq["incontext_x_" + tag]),
            "identity_solver_output_" + tag: max_err(out, rvq["identity_solver_output_" + tag])}
    print(errs)
    assert all(e <= COND_TOL for e in errs.values()), errs
    assert store["n_prefix"] == int(rvq["incontext_length_" + tag])
    assert torch.equal(store["noise"], noise)
    assert torch.equal(noise, t_(rvq["noise_" + tag])) and torch.equal(true_latents, t_(rvq["true_latents"]))
    if tag == "masked":  # frames >= 40 carry zero_cond_embedding1
        assert torch.equal(store["cond"][0, :, 40], flow_no_dit.zero_cond_embedding1.reshape(32, 32))


# --------------------------------------------------------------------------------------------
# solver mechanics with a stand-in estimator
# --------------------------------------------------------------------------------------------
def test_timesteps_are_accumulated_like_official(flow_no_dit, cfm):
    noise = t_(cfm["noise_prefix"])
    with estimator_replaced(flow_no_dit, Recorder(32)) as rec:
        flow_no_dit.solve_euler(noise, torch.zeros_like(noise), 0, torch.zeros_like(noise), 3, 1.5)
    ts = torch.stack([c[1] for c in rec.calls]).numpy()
    assert np.array_equal(ts, cfm["step_timesteps_prefix"])       # bit for bit
    assert ts[2, 0] != np.linspace(0, 1, 4, dtype=np.float32)[2]    # 0.6666666, not 0.6666667


def test_first_step_inputs(flow_no_dit, cfm):
    """Estimator input of step 0 (no DiT involved): [x, prefix, 0 | cond] stacked on channels."""
    for tag in ("noprefix", "prefix"):
        with estimator_replaced(flow_no_dit, Recorder(32)) as rec:
            flow_no_dit.sample(golden_z_q(cfm), t_(cfm["true_latents_" + tag]), 64,
                               int(cfm["incontext_length_" + tag]), t_(cfm["noise_" + tag]), 3, 1.5)
        err = max_err(rec.calls[0][0], cfm["step_inputs_" + tag][0])  # subset + statistics of step 0
        assert err <= COND_TOL, (tag, err)


def golden_z_q(cfm):
    """z_q of the cfm_solve codes: rvq_cond's golden ``from_codes_z_q`` of the same codes (keeps this
    test independent of the quantizer module)."""
    rvq = golden("rvq_cond")
    assert np.array_equal(rvq["codes"], cfm["codes"])
    return t_(rvq["from_codes_z_q"])


# --------------------------------------------------------------------------------------------
# tiny config: sizes are config values, batch > 1 with CFG
# --------------------------------------------------------------------------------------------
def tiny_flow():
    torch.manual_seed(0)
    cfg = FlowDecoderConfig(latent_channels=4, freq_bins=8, cond_dim=16,
                            dit=DiTConfig(in_channels=12, out_channels=4, num_heads=2, head_dim=8, num_layers=2,
                                          flow_t_size=16))
    fd = FlowDecoder(cfg)
    fd.normfeat.counts.fill_(1000.0)
    fd.normfeat.sum_x.normal_().mul_(100.0)
    fd.normfeat.sum_x2.copy_(fd.normfeat.sum_x ** 2 / 1000.0 + 1000.0 * (0.5 + torch.rand(4, 8)))
    return fd.eval()


def test_tiny_sizes_and_batched_cfg_matches_single_items():
    fd = tiny_flow()
    assert fd.cond_muencoder_emb.weight.shape == (2 * 8, 16)
    assert fd.zero_cond_embedding1.shape == (4 * 8,)
    assert fd.normfeat.sum_x.shape == (4, 8)
    b, frames = 3, 6
    z_q = torch.randn(b, 16, 2 * frames)
    true_latents = torch.randn(b, 4, frames, 8)
    noise = torch.randn(b, 4, frames, 8)
    noise_copy = noise.clone()
    steps = []
    for g in (1.5, 1.0):
        out = fd.sample(z_q, true_latents, 5, 2, noise, num_steps=3, guidance_scale=g,
                        callback=lambda s, n: steps.append((s, n)))
        assert out.shape == (b, 4, frames, 8)
        for i in range(b):
            one = fd.sample(z_q[i:i + 1], true_latents[i:i + 1], 5, 2, noise[i:i + 1], 3, g)
            torch.testing.assert_close(out[i:i + 1], one, atol=1e-5, rtol=0)
        # prefix frames are the given latents (through project/unproject rounding only)
        torch.testing.assert_close(out[:, :, :2], true_latents[:, :, :2], atol=1e-5, rtol=0)
        if g > 1:
            guided = out
    assert steps[:3] == [(1, 3), (2, 3), (3, 3)]
    assert torch.equal(noise, noise_copy)  # the caller's noise is not modified
    assert max_err(guided, out) > 1e-4    # guidance changes the result


def test_unguided_runs_one_batch():
    fd = tiny_flow()
    rec = Recorder(4)
    fd.estimator = rec
    fd.sample(torch.randn(2, 16, 8), torch.randn(2, 4, 4, 8), 4, 0, torch.randn(2, 4, 4, 8), 2, 1.0)
    assert [c[0].shape[0] for c in rec.calls] == [2, 2]
    rec.calls.clear()
    fd.sample(torch.randn(2, 16, 8), torch.randn(2, 4, 4, 8), 4, 0, torch.randn(2, 4, 4, 8), 2, 1.5)
    x, t = rec.calls[0]
    assert x.shape == (4, 12, 4, 8) and t.shape == (4,)
    assert torch.equal(x[:2, 8:], torch.zeros(2, 4, 4, 8))  # unconditional half: zero condition


def test_shape_mismatch_is_reported():
    fd = tiny_flow()
    with pytest.raises(ValueError):
        fd.sample(torch.randn(1, 16, 8), torch.randn(1, 4, 5, 8), 4, 0, torch.randn(1, 4, 4, 8), 2, 1.5)


# --------------------------------------------------------------------------------------------
# full size: 3 Euler steps with CFG 1.5 (cfm_solve.npz)
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("tag", ["noprefix", "prefix"])
def test_cfm_solve_matches_reference(flow_full, cfm, tag):
    calls = []
    hook = flow_full.estimator.register_forward_hook(
        lambda m, args, out: calls.append((args[0].clone(), args[1].clone(), out.clone())))
    try:
        lat = flow_full.sample(golden_z_q(cfm), t_(cfm["true_latents_" + tag]), 64,
                               int(cfm["incontext_length_" + tag]), t_(cfm["noise_" + tag]),
                               int(cfm["num_steps"]), float(cfm["guidance_scale"]))
    finally:
        hook.remove()
    inputs = torch.stack([c[0] for c in calls])
    timesteps = torch.stack([c[1] for c in calls])
    outputs = torch.stack([c[2] for c in calls])
    # step_inputs / step_outputs: subset + statistics (module docstring)
    errs = {"step_inputs_" + tag: max_err(inputs, cfm["step_inputs_" + tag]),
            "step_inputs0_" + tag: max_err(inputs[0], cfm["step_inputs_" + tag][0]),
            "step_timesteps_" + tag: max_err(timesteps, cfm["step_timesteps_" + tag]),
            "step_outputs_" + tag: max_err(outputs, cfm["step_outputs_" + tag]),
            "latents_" + tag: max_err(lat, cfm["latents_" + tag])}
    print("cfm_solve max abs errors:", errs)
    assert inputs.shape == cfm["step_inputs_" + tag].shape
    assert np.array_equal(timesteps.numpy(), cfm["step_timesteps_" + tag])
    assert errs["step_inputs0_" + tag] <= COND_TOL
    assert all(errs[k + tag] <= SOLVE_TOL for k in ("step_inputs_", "step_outputs_", "latents_")), errs
