"""The shared matrix-product kernel (mucodec/kernels.py): oneDNN for float32 and bfloat16 on the CPU (with a
fused GELU), F.linear otherwise."""
import pytest
import torch
import torch.nn.functional as F

import mucodec.kernels as kernels
from mucodec.dit import DiT, DiTConfig
from mucodec.kernels import Linear, cpu_bfloat16, linear
from mucodec.muq import MuQConfig, MuQEncoder

needs_onednn = pytest.mark.skipif(kernels._ONEDNN_LINEAR is None, reason="this torch build has no oneDNN linear")


@pytest.mark.parametrize("shape, bias", [((7, 24), True), ((2, 5, 24), False), ((3, 1, 24), True)])
def test_linear_computes_f_linear(shape, bias):
    torch.manual_seed(0)
    x, w = torch.randn(shape), torch.randn(40, 24)
    b = torch.randn(40) if bias else None
    out = linear(x, w, b)
    assert out.shape == shape[:-1] + (40,) and out.dtype == torch.float32
    # float32 sums of 24 products of unit-scale numbers, in another order: a few ulps of ~5
    torch.testing.assert_close(out, F.linear(x, w, b), atol=1e-5, rtol=1e-5)
    # a transposed (non-contiguous) input gives the same numbers as its contiguous copy
    xt = torch.randn(24, 9).t()
    assert torch.equal(linear(xt, w, b), linear(xt.contiguous(), w, b))


def test_linear_module_keeps_the_state_dict_of_nn_linear():
    torch.manual_seed(0)
    plain = torch.nn.Linear(6, 4)
    ours = Linear(6, 4)
    ours.load_state_dict(plain.state_dict())
    assert list(ours.state_dict()) == ["weight", "bias"] and isinstance(ours, torch.nn.Linear)
    x = torch.randn(3, 6)
    torch.testing.assert_close(ours(x), plain(x), atol=1e-6, rtol=1e-6)


@needs_onednn
def test_which_products_run_through_onednn(monkeypatch):
    calls = []
    real = kernels._ONEDNN_LINEAR

    def spy(*args):
        calls.append((args[0].dtype, args[1].dtype))
        return real(*args)

    monkeypatch.setattr(kernels, "_ONEDNN_LINEAR", spy)
    torch.manual_seed(0)
    x, w, b = torch.randn(4, 8), torch.randn(5, 8), torch.randn(5)
    linear(x, w, b)
    assert calls == [(torch.float32, torch.float32)]
    linear(x.double(), w.double())
    with torch.autocast("cpu", dtype=torch.float16):
        linear(x, w, b)
    assert len(calls) == 1
    if not kernels._ONEDNN_BFLOAT16:
        return
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, expect = linear(x, w, b), F.linear(x, w, b)
    # autocast's rounding of every operand, then oneDNN's product: autocast's own bits
    assert calls[1:] == [(torch.bfloat16, torch.bfloat16)] and out.dtype == torch.bfloat16
    assert torch.equal(out, expect)
    xb, wb, bb = x.bfloat16(), w.bfloat16(), b.bfloat16()
    assert torch.equal(linear(xb, wb, bb), F.linear(xb, wb, bb)) and len(calls) == 3
    with pytest.raises(RuntimeError):  # mixed precisions outside autocast are F.linear's to refuse
        linear(xb, w)
    assert len(calls) == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fused_gelu_is_gelu_of_the_product(dtype):
    torch.manual_seed(0)
    x, w, b = torch.randn(64, 256), torch.randn(512, 256) * 0.06, torch.randn(512) * 0.5
    xd, wd, bd = x.to(dtype), w.to(dtype), b.to(dtype)
    exact = F.gelu(F.linear(xd.double(), wd.double(), bd.double()), approximate="tanh")
    fused = linear(xd, wd, bd, "gelu_tanh")
    separate = F.gelu(F.linear(xd, wd, bd), approximate="tanh")
    assert fused.dtype == dtype and fused.shape == (64, 512)
    if dtype == torch.float32:
        # sums of 256 products of unit-scale numbers in another order, and another tanh: a few ulps of ~3
        torch.testing.assert_close(fused, separate, atol=2e-6, rtol=1e-6)
    else:
        # rounded to bf16 once instead of before and after the GELU: no further from the exact values
        err = lambda y: ((y.double() - exact).norm() / exact.norm()).item()
        assert err(fused) <= err(separate) < 4e-3
    with pytest.raises(ValueError, match="activation must be one of"):
        linear(xd, wd, bd, "relu")


@needs_onednn
def test_a_window_gives_the_same_bits_alone_and_batched():
    """Windows are encoded and decoded in batches whose size must not change a window's numbers: rows of one
    product at the encoder's window size (1024 frames x 1024 features) equal the window's own product."""
    torch.manual_seed(0)
    t, d = 1024, 1024
    x, w, b = torch.randn(3 * t, d), torch.randn(d, d) * 0.03, torch.randn(d)
    batched = linear(x, w, b)
    for i in range(3):
        assert torch.equal(linear(x[i * t:(i + 1) * t].clone(), w, b), batched[i * t:(i + 1) * t])


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_item_gives_the_same_bits_whatever_its_batch(dtype):
    """A batched input's items are its own products: oneDNN on AVX2 sums a row in an order that depends on the
    rows of the product at most sizes (tiny models' included), and a song in a batch must equal it alone."""
    if dtype == torch.bfloat16 and not cpu_bfloat16():
        pytest.skip("no bfloat16 products on this CPU")
    torch.manual_seed(1)
    for t, k, n in ((100, 64, 64), (37, 32, 96), (512, 128, 512)):
        x, w, b = torch.randn(5, t, k, dtype=dtype), torch.randn(n, k, dtype=dtype), torch.randn(n, dtype=dtype)
        batched = linear(x, w, b, "gelu_tanh")
        assert batched.shape == (5, t, n) and batched.dtype == dtype
        for size in (1, 2, 3):
            part = linear(x[:size].clone(), w, b, "gelu_tanh")
            assert torch.equal(part, batched[:size]), (t, k, n, size)
        assert torch.equal(linear(x[3:4], w, b, "gelu_tanh")[0], linear(x[3], w, b, "gelu_tanh"))


@needs_onednn
def test_the_encoder_and_the_dit_use_it(monkeypatch):
    calls = []
    real = kernels._ONEDNN_LINEAR
    monkeypatch.setattr(kernels, "_ONEDNN_LINEAR", lambda *a: calls.append(a[1].shape) or real(*a))
    torch.manual_seed(0)
    cfg = MuQConfig(n_fft=256, n_mels=16, conv_dim=8, encoder_dim=64, encoder_depth=3, num_attention_heads=4,
                    intermediate_size=96, conv_depthwise_kernel_size=7)
    with torch.inference_mode():
        MuQEncoder(cfg, num_layers=2)(torch.randn(1, 5 * 960))
    # the front end's projection, then per layer 2 x 2 feed-forward + 4 attention + 2 pointwise products
    assert len(calls) == 1 + 2 * 10
    calls.clear()
    dit = DiT(DiTConfig(num_layers=2, num_heads=2, head_dim=8, flow_t_size=16, sample_size=16))
    with torch.inference_mode():
        dit(torch.randn(1, 96, 8, 4), torch.tensor([0.5]))
    # timestep MLP (2) + adaLN (1), per block 4 projections + 2 feed-forward + the attention's two products
    # per head (8 tokens fit one score block), the output projection
    assert len(calls) == 3 + 2 * (6 + 2 * 2) + 1


@needs_onednn
def test_the_benchmark_counts_the_onednn_products():
    """tools/bench.py's GFLOP/s would read half of the truth if the counter took oneDNN's linear as free."""
    import runpy
    from pathlib import Path

    bench = runpy.run_path(str(Path(__file__).resolve().parent.parent / "tools" / "bench.py"), run_name="bench")
    x, w = torch.randn(2, 5, 64), torch.randn(32, 64)
    assert bench["flops_of"](lambda: linear(x, w)) == 2 * (2 * 5) * 64 * 32


@needs_onednn
def test_a_strided_weight_reaches_onednn_contiguous(monkeypatch):
    """oneDNN takes a weight with strided rows through a reference kernel about a thousand times slower
    (the attention's per-head key blocks are such views), so linear hands it a contiguous copy."""
    seen = []
    real = kernels._ONEDNN_LINEAR
    monkeypatch.setattr(kernels, "_ONEDNN_LINEAR", lambda *a: seen.append(a[1].is_contiguous()) or real(*a))
    torch.manual_seed(0)
    x, w = torch.randn(6, 24), torch.randn(40, 48)[:, :24]
    torch.testing.assert_close(linear(x, w), F.linear(x, w), atol=1e-5, rtol=1e-5)
    assert seen == [True]
