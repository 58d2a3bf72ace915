"""The CUDA path runs the same code as the CPU one (tiny models); skipped where CUDA is absent.

The CPU results are the reference: the noise is drawn on the CPU from the same seed, so a GPU decode
differs from the CPU decode only by kernel rounding (cuDNN convolutions may use TF32).
"""
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

SEED = 3


@pytest.fixture(scope="module")
def codes():
    return torch.randint(0, 16384, (1, 1, 1025), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def gpu_codec(tiny_ckpt_dir):
    from mucodec.codec import MuCodec

    return MuCodec.from_pretrained(tiny_ckpt_dir, device="cuda")


def rel(a, b):
    return float((a - b).norm() / b.norm())


def test_decode_on_cuda_matches_the_cpu(tiny_codec, gpu_codec, codes):
    cpu = tiny_codec.code2sound(codes, num_steps=2, seed=SEED)
    gpu = gpu_codec.code2sound(codes, num_steps=2, seed=SEED)
    assert gpu.device.type == "cpu" and gpu.shape == cpu.shape  # results come back to the CPU
    assert rel(gpu, cpu) < 1e-2


def test_encode_on_cuda_matches_the_cpu(tiny_codec, gpu_codec):
    t = torch.arange(3 * 48000) / 48000
    wav = torch.stack([0.4 * torch.sin(2 * torch.pi * 220 * t), 0.3 * torch.sin(2 * torch.pi * 330 * t)])
    cpu, gpu = tiny_codec.sound2code(wav), gpu_codec.sound2code(wav)
    assert gpu.device.type == "cpu" and gpu.shape == cpu.shape
    assert float((gpu == cpu).float().mean()) > 0.95  # an argmin near a tie may flip under TF32 convolutions


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_decode_stays_close_to_float32(tiny_ckpt_dir, gpu_codec, codes, dtype):
    from mucodec.codec import MuCodec

    half = MuCodec.from_pretrained(tiny_ckpt_dir, device="cuda", dtype=dtype)
    ref = gpu_codec.code2sound(codes, num_steps=2, seed=SEED)
    out = half.code2sound(codes, num_steps=2, seed=SEED)
    assert torch.isfinite(out).all() and rel(out, ref) < 0.05


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_vae_and_vocoder_stay_close_to_float32(tiny_ckpt_dir, gpu_codec, codes, dtype):
    from mucodec.codec import MuCodec

    half = MuCodec.from_pretrained(tiny_ckpt_dir, device="cuda", audioldm_dtype=dtype)
    ref = gpu_codec.code2sound(codes, num_steps=2, seed=SEED)
    out = half.code2sound(codes, num_steps=2, seed=SEED)
    assert out.dtype == torch.float32 and torch.isfinite(out).all() and 0 < rel(out, ref) < 0.05


def test_the_euler_loop_never_waits_for_the_gpu(gpu_codec):
    """No host synchronisation inside the step loop: the GPU can run ahead of Python."""
    flow = gpu_codec.flow
    cfg = gpu_codec.config
    g = torch.Generator().manual_seed(0)
    c, w = flow.cfg.latent_channels, flow.cfg.freq_bins
    noise = torch.randn(1, c, cfg.window_latents, w, generator=g).cuda()
    prefix = torch.zeros_like(noise)
    cond = torch.randn(1, c, cfg.window_latents, w, generator=g).cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.inference_mode():
            x = flow.solve_euler(noise, prefix, 16, cond, 3, 1.5)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(x).all()
