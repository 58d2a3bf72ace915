"""DiT velocity network against the official Transformer2DModel (golden dit_forward.npz).

Tolerances (reference data README, "Suggested tolerances"): one DiT forward <= 2e-4 abs,
applied to every intermediate of that forward. The two closed-form tables (timestep sinusoid,
2-D positions) use 1e-6: they are elementwise float32/float64 math in the reference's op order,
so only last-ulp differences of sin/cos are acceptable (computing the timestep arguments in
float64 instead would already be off by ~5e-5 at t*1000 ~ 800).

``pos_embed_32x16``, ``patch_embed_out``, ``block0_out`` and ``block_last_out`` are stored as a fixed subset
of 100 000 elements plus whole-array statistics (``helpers.Sampled``): ``max_err`` checks the subset and the
statistics of our full array at the same tolerance, which every full array within it satisfies.
"""
import contextlib

import numpy as np
import pytest
import torch

from helpers import entries, golden, max_err
import mucodec.dit
from mucodec import kernels
from mucodec.dit import DiT, DiTConfig, FlowTimestepEmbedding, chunked_attention, modulated_norm, sincos_pos_embed_2d

PREFIX = "cfm_wrapper.estimator."
DIT_TOL = 2e-4
TABLE_TOL = 1e-6


@pytest.fixture(scope="module")
def dit_full(full_codec):
    """The DiT loaded from a synthetic mucodec.pt through MuCodec.from_pretrained."""
    return full_codec.flow.estimator


@pytest.fixture(scope="module")
def gold():
    return golden("dit_forward")


def test_config_matches_transformer2d_json():
    c = DiTConfig()
    assert (c.in_channels, c.out_channels, c.patch_size, c.num_layers) == (96, 32, 2, 24)
    assert c.hidden_size == 22 * 72 == 1584
    # diffusers: interpolation_scale = max(384 // 64, 1), base_size = 384 // patch
    assert c.interpolation_scale == 6 and c.base_size == 192


def test_state_dict_names_and_shapes_match_checkpoint():
    with torch.device("meta"):
        dit = DiT(DiTConfig())
    ours = {k: tuple(v.shape) for k, v in dit.state_dict().items()}
    ref = {n[len(PREFIX):]: tuple(s) for n, s, _ in entries("mucodec") if n.startswith(PREFIX)}
    assert ours == ref


def test_pos_embed_table(gold):
    c = DiTConfig()
    pe = sincos_pos_embed_2d(c.hidden_size, 32, 16, c.base_size, c.interpolation_scale, c.max_period)
    assert pe.dtype == torch.float32 and pe.shape == (512, 1584)
    assert max_err(pe, gold["pos_embed_32x16"]) <= TABLE_TOL  # subset + statistics (module docstring)


def test_timestep_sinusoid(gold):
    emb = FlowTimestepEmbedding(DiTConfig())
    s = emb.sinusoid(torch.from_numpy(gold["timestep"]))
    assert s.shape == (2, 512)
    assert max_err(s, gold["timestep_sinusoid"]) <= TABLE_TOL


def test_pos_embed_is_cached_per_grid():
    dit = DiT(DiTConfig(num_layers=1, num_heads=2, head_dim=8, flow_t_size=16))
    a = dit.pos_embed.positions(4, 16)
    assert dit.pos_embed.positions(4, 16) is a
    assert dit.pos_embed.positions(8, 16).shape == (128, 16)


@contextlib.contextmanager
def recorded(module, name, calls):
    """Record (args, output) of every call of ``module.name`` made from inside the module's own forward."""
    real = getattr(module, name)

    def spy(*args):
        out = real(*args)
        calls.append((args, out))
        return out

    setattr(module, name, spy)
    try:
        yield calls
    finally:
        delattr(module, name)  # the class's method again


@pytest.mark.slow
def test_forward_intermediates_match_reference(dit_full, gold):
    """One forward of the full-size DiT; its own intermediates are recorded on the way and compared.

    ``forward`` must be exactly the composition of the steps: every value a step receives is the one the
    previous step returned (checked bit for bit below), so the intermediates compared with the reference
    are the ones that make up this forward's output."""
    x = torch.from_numpy(gold["x"])
    t = torch.from_numpy(gold["timestep"])
    steps = {name: [] for name in ("embed_patches", "embed_timestep", "project_out")}
    blocks = []
    hooks = [b.register_forward_hook(lambda m, args, out: blocks.append((args, out)))
             for b in dit_full.transformer_blocks]
    try:
        with contextlib.ExitStack() as stack, torch.no_grad():
            for name, calls in steps.items():
                stack.enter_context(recorded(dit_full, name, calls))
            out = dit_full(x, t)
    finally:
        for h in hooks:
            h.remove()
    assert [len(c) for c in steps.values()] == [1, 1, 1] and len(blocks) == len(dit_full.transformer_blocks)
    (x_in,), h = steps["embed_patches"][0]
    (t_in, _), (adaln, embedded) = steps["embed_timestep"][0]
    (h_last, embedded_in, height, width), out_steps = steps["project_out"][0]
    # the composition: patches -> block 0 -> ... -> block 23 -> project_out, every block modulated by adaln
    assert torch.equal(x_in, x) and torch.equal(t_in, t.float())
    for i, ((h_in, adaln_in), h_out) in enumerate(blocks):
        assert torch.equal(h_in, h if i == 0 else blocks[i - 1][1]) and torch.equal(adaln_in, adaln), i
    assert torch.equal(h_last, blocks[-1][1]) and torch.equal(embedded_in, embedded) and (height, width) == (32, 16)
    assert torch.equal(out, out_steps)  # forward is exactly the composition of the steps
    errs = {"adaln_timestep": max_err(adaln, gold["adaln_timestep"]),
            "adaln_embedded_timestep": max_err(embedded, gold["adaln_embedded_timestep"]),
            # patch_embed_out, block0_out, block_last_out: subset + statistics (module docstring)
            "patch_embed_out": max_err(h, gold["patch_embed_out"]),
            "block0_out": max_err(blocks[0][1], gold["block0_out"]),
            "block_last_out": max_err(blocks[-1][1], gold["block_last_out"]),
            "output": max_err(out, gold["output"])}
    print("dit_forward max abs errors:", errs)
    assert out.shape == (2, 32, 64, 32)
    assert all(e <= DIT_TOL for e in errs.values()), errs


def tiny_config(**kw):
    args = dict(in_channels=6, out_channels=2, num_heads=2, head_dim=8, num_layers=2, flow_t_size=16)
    return DiTConfig(**{**args, **kw})


def test_tiny_config_sizes_follow_config():
    torch.manual_seed(0)
    dit = DiT(tiny_config())
    shapes = {k: tuple(v.shape) for k, v in dit.state_dict().items()}
    assert len(dit.transformer_blocks) == 2
    assert shapes["pos_embed.proj.weight"] == (16, 6, 2, 2)
    assert shapes["adaln_single.emb.timestep_embedder.linear_1.weight"] == (16, 16)
    assert shapes["adaln_single.linear.weight"] == (96, 16)
    assert shapes["transformer_blocks.1.ff.net.0.proj.weight"] == (64, 16)
    assert shapes["proj_out.weight"] == (8, 16)
    x = torch.randn(3, 6, 12, 8)
    t = torch.tensor([0.0, 0.3, 0.9])
    with torch.no_grad():
        out = dit(x, t)
        assert out.shape == (3, 2, 12, 8)
        # each item is independent of the others in the batch
        for i in range(3):
            torch.testing.assert_close(dit(x[i:i + 1], t[i:i + 1]), out[i:i + 1], atol=1e-6, rtol=0)
        # the timestep matters
        assert max_err(dit(x, torch.tensor([0.5, 0.5, 0.5])), out) > 1e-3


def test_input_shape_is_checked():
    dit = DiT(tiny_config())
    with pytest.raises(ValueError):
        dit(torch.randn(1, 5, 12, 8), torch.zeros(1))
    with pytest.raises(ValueError):
        dit(torch.randn(1, 6, 13, 8), torch.zeros(1))


def test_unpatchify_order():
    """Output features of a patch are ordered (dy, dx, channel), like upstream's einsum."""
    dit = DiT(tiny_config(num_layers=0))
    d = dit.cfg.hidden_size
    h = torch.zeros(1, 2 * 1, d)  # grid 2 x 1 patches
    with torch.no_grad():
        dit.scale_shift_table.zero_()
        dit.proj_out.weight.zero_()
        dit.proj_out.bias.copy_(torch.arange(8, dtype=torch.float32))  # (dy, dx, c) = 2 x 2 x 2
        out = dit.project_out(h, torch.zeros(1, d), 2, 1)
    expect = np.arange(8).reshape(2, 2, 2).transpose(2, 0, 1)  # (c, dy, dx) of one patch
    assert out.shape == (1, 2, 4, 2)
    assert np.array_equal(out[0, :, 0:2, :].numpy(), expect)
    assert np.array_equal(out[0, :, 2:4, :].numpy(), expect)


def test_modulated_norm_is_the_three_operations_in_one_pass():
    """layer_norm's affine weights apply each item's (1 + scale) and shift: the official norm, multiply and add
    to within an ulp (an FMA rounds once where they round twice), and no further from the exact values; under autocast it hands the projections their
    input already rounded to the autocast precision, as autocast would round it."""
    torch.manual_seed(0)
    x = torch.randn(3, 70, 40) * 3 + 1
    shift, scale = torch.randn(3, 1, 40), torch.randn(3, 1, 40) * 0.2
    three = torch.nn.functional.layer_norm(x, (40,), eps=1e-6) * (1 + scale) + shift
    exact = torch.nn.functional.layer_norm(x.double(), (40,), eps=1e-6) * (1 + scale.double()) + shift.double()
    out = modulated_norm(x, shift, scale, 1e-6)
    assert out.dtype == torch.float32
    ulp = torch.finfo(torch.float32).eps * float(three.abs().max())  # of the largest value
    assert float((out - three).abs().max()) <= ulp
    assert (out.double() - exact).norm() <= (three.double() - exact).norm()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rounded = modulated_norm(x, shift, scale, 1e-6)
    assert rounded.dtype == torch.bfloat16 and torch.equal(rounded, out.bfloat16())


@pytest.mark.slow
def test_bfloat16_autocast_stays_close_to_the_reference(dit_full, gold):
    """The reduced-precision path (CPU/GPU autocast around the DiT; sinusoids, norms and softmax statistics
    stay float32 inside; on the CPU the attention runs as chunked bf16 products): measured 0.64 % relative L2
    error on the golden forward, with torch's fused attention kernel and with the chunked one alike, bounded
    here at 1.5 %. The first item of the golden batch alone (0.64 %; the second 0.65 %): the products run item
    by item, so one item tests the same arithmetic at half the time on a CPU that emulates bf16."""
    x, t = torch.from_numpy(gold["x"][:1]), torch.from_numpy(gold["timestep"][:1])
    ref = torch.from_numpy(gold["output"][:1]).double()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = dit_full(x, t)
    rel = float((out.double() - ref).norm() / ref.norm())  # (the sampler adds it to its float32 state)
    print(f"bf16 autocast DiT forward: relative L2 error {rel:.4f}")
    assert 0 < rel <= 0.015


@pytest.mark.parametrize("queries", [1, 4, 10, 16])
def test_chunked_attention_equals_the_fused_kernel(queries):
    """Every query block, the last partial one included, lands in its own rows of the output."""
    torch.manual_seed(3)
    q, k, v = (torch.randn(2, 3, 10, 8) for _ in range(3))
    expect = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(chunked_attention(q, k, v, queries), expect, atol=1e-6, rtol=0)


def test_attention_on_the_cpu_is_chunked_by_score_bytes(monkeypatch):
    """On the CPU every block takes the chunked products, with as many queries as fit the score block in
    the precision it runs in (float32 only where oneDNN runs its products), and a block of 0 bytes keeps
    torch's fused kernel."""
    calls = []

    def counting(*args):
        calls.append(args[-1])
        return chunked_attention(*args)

    monkeypatch.setattr(mucodec.dit, "chunked_attention", counting)
    torch.manual_seed(0)
    x, t = torch.randn(2, 6, 12, 8), torch.tensor([0.2, 0.7])
    tokens = (12 // 2) * (8 // 2)
    dit = DiT(tiny_config(cpu_attention_block=5 * tokens * 2))  # 5 bf16 queries, 2 float32 ones (2.5)
    dit_fused = DiT(tiny_config(cpu_attention_block=0))
    dit_fused.load_state_dict(dit.state_dict())
    with torch.no_grad():
        exact = dit_fused(x, t)
        assert calls == []
        chunked32 = dit(x, t)
        assert calls == ([2, 2] if kernels.onednn_float32() else [])
        torch.testing.assert_close(chunked32, exact, atol=1e-5, rtol=0)
        calls.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            chunked = dit(x, t)
        assert calls == [5, 5]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fused = dit_fused(x, t)
        assert calls == [5, 5]
    for out in (chunked, fused):
        assert float((out.float() - exact).norm() / exact.norm()) < 0.02


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linears_stored_rounded_give_what_autocast_gives(dtype):
    """Autocast rounds each float32 Linear weight at every call; rounded once and stored, they give the same
    output bit for bit (float16 autocast on the CPU included), at half the memory."""
    torch.manual_seed(0)
    x, t = torch.randn(2, 6, 12, 8), torch.tensor([0.2, 0.7])
    dit = DiT(tiny_config())
    stored = DiT(tiny_config())
    stored.load_state_dict(dit.state_dict())
    stored.store_linears_in(dtype)
    assert stored.transformer_blocks[0].ff.net["2"].weight.dtype == dtype
    assert stored.pos_embed.proj.weight.dtype == torch.float32  # a convolution, not a Linear
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        expect, got = dit(x, t), stored(x, t)
    assert torch.equal(got, expect)
    assert sum(p.numel() * p.element_size() for p in stored.parameters()) < \
        0.6 * sum(p.numel() * p.element_size() for p in dit.parameters())


def test_the_codec_stores_the_dit_rounded_only_where_it_autocasts(tiny_ckpt_dir):
    from mucodec.codec import MuCodec

    def linear_dtype(codec):
        return codec.flow.estimator.transformer_blocks[0].attn1.to_q.weight.dtype

    assert linear_dtype(MuCodec.from_pretrained(tiny_ckpt_dir, device="cpu")) == torch.float32
    assert linear_dtype(MuCodec.from_pretrained(tiny_ckpt_dir, device="cpu", dtype=torch.bfloat16)) == torch.bfloat16
