"""HiFi-GAN 48 kHz vocoder: sizes from the config, the official chunk schedule, and golden numbers.

Golden data: vae_vocoder.npz. Tolerance 2e-5 abs on waveforms (reference data README "Suggested
tolerances"; a 1-thread rerun of the reference moves `wav_long` by 3.7e-6).
"""
import numpy as np
import pytest
import torch

import helpers
from helpers import max_err
from mucodec.vocoder import HiFiGAN, VocoderConfig, chunk_schedule, crossfade_chunks

TOL = 2e-5
OFFICIAL = VocoderConfig()
# The official upsampling structure (hop 480, kernels 12,10,8,4,4) with few channels.
NARROW = VocoderConfig(upsample_initial_channel=32, resblock_kernel_sizes=(3, 15),
                       resblock_dilation_sizes=((1, 3, 5), (1, 3, 5)))


@pytest.fixture(scope="module")
def vocoder_full(full_codec):
    """The vocoder loaded from a synthetic audioldm_48k.pth through MuCodec.from_pretrained."""
    return full_codec.vocoder


@pytest.fixture(scope="module")
def golden():
    return helpers.golden("vae_vocoder")


def _random_vocoder(cfg, seed=0):
    voc = HiFiGAN(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    for p in voc.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.1  # keeps activations O(1) through ~60 convs
    return voc


# ---- tiny configs ------------------------------------------------------------------------------

def test_tiny_config_shapes_and_length():
    cfg = VocoderConfig(num_mels=8, upsample_rates=(3, 2), upsample_kernel_sizes=(6, 4), upsample_initial_channel=16,
                        resblock_kernel_sizes=(3, 5), resblock_dilation_sizes=((1, 2), (1, 3)), hop_length=6,
                        conv_pre_kernel=5, conv_post_kernel=3)
    voc = _random_vocoder(cfg)
    sd = voc.state_dict()
    assert sd["conv_pre.weight"].shape == (16, 8, 5)
    assert sd["ups.0.weight"].shape == (16, 8, 6)  # ConvTranspose1d weight: (in, out, k)
    assert sd["ups.1.weight"].shape == (8, 4, 4)
    assert sd["resblocks.1.convs1.1.weight"].shape == (8, 8, 5) and voc.resblocks[1].convs1[1].dilation == (3,)
    assert sd["resblocks.3.convs2.0.weight"].shape == (4, 4, 5)
    assert len(voc.resblocks) == 4 and len(voc.resblocks[0].convs1) == 2
    assert sd["conv_post.weight"].shape == (1, 4, 3)
    # (T-1)*3 - 2*1 + 6 = 3T+1 samples, then (3T+1-1)*2 - 2*1 + 4 = 6T+2
    assert voc(torch.randn(2, 8, 10)).shape == (2, 62) and voc.num_samples(10) == 62


def test_hop_length_must_match_rates():
    with pytest.raises(ValueError):
        VocoderConfig(upsample_rates=(6, 5, 4, 2), upsample_kernel_sizes=(12, 10, 8, 4))


def test_chunk_schedule_frames():
    assert chunk_schedule(100, OFFICIAL) == [(0, 100)]
    assert chunk_schedule(1024, OFFICIAL) == [(0, 1024)]
    assert chunk_schedule(1300, OFFICIAL) == [(0, 1024), (256, 1280), (512, 1300)]
    sched = chunk_schedule(4096, OFFICIAL)
    assert len(sched) == 13 and sched[-1] == (3072, 4096) and all(e - s == 1024 for s, e in sched)


@pytest.mark.parametrize("frames, calls, expected", [
    # one call of T frames gives 480*T + 16 samples, cut to a multiple of 1024
    (100, 1, 48016 // 1024 * 1024),  # 47104: the cut loses real samples
    (1024, 1, 491520),  # 491536 -> 491520
    # later full chunks add 491520 - 768*480 = 122880; a short last chunk adds 480*n + 16 - 368640
    (1300, 3, 491520 + 122880 + (480 * 788 + 16 - 368640)),  # 624016
    (4096, 13, 491520 + 12 * 122880),  # 1966080 = 40.96 s
])
def test_vocode_lengths_and_calls(frames, calls, expected):
    voc = _random_vocoder(VocoderConfig(upsample_initial_channel=32, resblock_kernel_sizes=(3,),
                                        resblock_dilation_sizes=((1, 3, 5),)))
    seen = []
    wav = voc.vocode(torch.randn(1, 1, frames, 256), progress=lambda done, total: seen.append((done, total)))
    assert wav.shape == (1, expected) and wav.dtype == torch.float32
    assert seen == [(i + 1, calls) for i in range(calls)]


def test_crossfade_arithmetic():
    # Constant chunks 1, 2, 3 with the lengths of T = 1300: 491536, 491536, 378256 samples.
    chunks = [torch.full((1, n), float(v)) for v, n in ((1, 491536), (2, 491536), (3, 378256))]
    wav = crossfade_chunks(iter(chunks), OFFICIAL)[0].double()
    ov = 368640
    assert wav.shape == (624016,)
    assert torch.all(wav[:122880] == 1) and torch.all(wav[614400:] == 3)
    ramp = torch.from_numpy(np.linspace(0, 1, ov))
    i = torch.arange(0, 122880, 4099)
    expected = (1 * (1 - ramp[i]) + 2 * ramp[i]).float().double()  # float64 blend stored as float32
    assert torch.equal(wav[122880 + i], expected)


@pytest.mark.parametrize("cfg, frames", [
    (NARROW, 1300),
    (NARROW, 4096),
    (VocoderConfig(upsample_initial_channel=32, resblock_kernel_sizes=(3, 15),
                   resblock_dilation_sizes=((1, 3, 5), (1, 3, 5)), chunk_frames=128, chunk_hop_frames=32), 300),
    # chunks shorter than two radii are run whole
    (VocoderConfig(upsample_initial_channel=32, resblock_kernel_sizes=(3, 15),
                   resblock_dilation_sizes=((1, 3, 5), (1, 3, 5)), chunk_frames=40, chunk_hop_frames=8), 100),
])
def test_shared_overlaps_equal_official_chunks(cfg, frames):
    voc = _random_vocoder(cfg, seed=1)
    mel = torch.randn(2, 1, frames, cfg.num_mels)
    a = voc.vocode(mel)
    b = voc.vocode(mel, share_overlaps=True)
    assert a.shape == b.shape
    assert (a - b).abs().max().item() <= 1e-6  # float rounding only; a wrong edge differs by O(0.1)
    assert a.abs().max().item() > 1e-2


SMALL_CHUNKS = VocoderConfig(upsample_initial_channel=32, resblock_kernel_sizes=(3, 15),
                             resblock_dilation_sizes=((1, 3, 5), (1, 3, 5)), chunk_frames=128, chunk_hop_frames=32)


@pytest.fixture(scope="module")
def small_chunks():
    """A vocoder with 128-frame chunks, a mel of 300 frames, and its whole output in both schedules."""
    voc = _random_vocoder(SMALL_CHUNKS, seed=3)
    mel = torch.randn(2, 1, 300, 256, generator=torch.Generator().manual_seed(3))
    return voc, mel, {share: voc.vocode(mel, share_overlaps=share) for share in (False, True)}


@pytest.mark.parametrize("share_overlaps", [False, True])
@pytest.mark.parametrize("num_samples, chunks_run", [
    # 300 frames: 7 chunks, 0:128, 32:160, ..., 192:300. Each chunk's last 96 frames (46080 samples) are
    # crossfaded with the next, so after K chunks the first K * 32 * 480 = K * 15360 samples are final.
    (1, 1), (15360, 1), (15361, 2), (30720, 2), (30721, 3), (92161, 7), (144016, 7), (10 ** 7, 7)])
def test_num_samples_runs_only_the_chunks_that_reach_them(monkeypatch, small_chunks, num_samples, chunks_run,
                                                          share_overlaps):
    voc, mel, wholes = small_chunks
    whole = wholes[share_overlaps]
    assert whole.shape == (2, 144016)
    frames = []
    forward = HiFiGAN.forward
    monkeypatch.setattr(HiFiGAN, "forward", lambda self, x: frames.append(x.shape[-1]) or forward(self, x))
    part = voc.vocode(mel, share_overlaps=share_overlaps, num_samples=num_samples)
    assert part.shape == (2, min(num_samples, whole.shape[-1]))
    if share_overlaps:  # the cut mel is split into other pieces: float rounding only
        assert (part - whole[:, :num_samples]).abs().max().item() <= 1e-6
        assert max(frames) <= min(300, 32 * (chunks_run - 1) + 128) + voc.radius()
    else:
        assert torch.equal(part, whole[:, :num_samples])
        assert len(frames) == chunks_run


def test_num_samples_must_be_positive():
    with pytest.raises(ValueError, match="num_samples"):
        _random_vocoder(NARROW).vocode(torch.randn(1, 1, 10, 256), num_samples=0)


def test_radius_bounds_the_receptive_field():
    voc = _random_vocoder(NARROW, seed=2)
    mel = torch.randn(1, 256, 120)
    f0, r, hop = 60, voc.radius(), NARROW.hop_length
    mel2 = mel.clone()
    mel2[:, :, f0] += 1.0
    changed = torch.nonzero(voc(mel2)[0] != voc(mel)[0]).flatten()
    assert len(changed) > 0
    assert changed.min().item() >= (f0 - r) * hop and changed.max().item() < (f0 + r + 1) * hop


# ---- full size ---------------------------------------------------------------------------------

def test_full_names_and_shapes(vocoder_full):
    ours = {k: tuple(v.shape) for k, v in vocoder_full.state_dict().items()}
    ref = {n[len("vocoder."):]: tuple(s) for n, s, _ in helpers.entries("audioldm_48k") if n.startswith("vocoder.")}
    assert ours == ref
    assert vocoder_full.num_samples(1024) == 480 * 1024 + 16


def test_wav_golden(vocoder_full, golden):
    wav = vocoder_full.vocode(torch.from_numpy(golden["mel"]))  # (2, 1, 128, 256): one call, 61456 samples -> 61440
    assert wav.shape == golden["wav"].shape == (2, 61440)
    err = max_err(wav, golden["wav"])
    assert err <= TOL, err


@pytest.mark.slow
@pytest.mark.parametrize("share_overlaps", [False, True], ids=["official_chunks", "shared_overlaps"])
def test_wav_long_golden(vocoder_full, golden, share_overlaps):
    # 1300 frames: calls on frames 0:1024, 256:1280, 512:1300 joined by 768-frame crossfades
    wav = vocoder_full.vocode(torch.from_numpy(golden["mel_long"]), share_overlaps=share_overlaps)
    assert wav.shape == golden["wav_long"].shape == (1, 624016)
    # wav_long is stored as a fixed subset of 100 000 samples plus whole-array statistics (helpers.Sampled):
    # max_err checks both at the same tolerance, which every full waveform within it satisfies.
    err = max_err(wav, golden["wav_long"])
    assert err <= TOL, err
