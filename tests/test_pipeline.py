"""The whole official pipeline at full size (``pipeline_small.npz``), through real checkpoint files.

The reference ran ``MuCodec.sound2code`` on a 5 s clip and ``code2sound(num_steps=2)`` on its 126 codes
(one full 40.96 s window). Noise arrays are the exact normals the reference drew; ``noise_1`` is the
window's initial noise (``noise_0``, the fully masked first latent, cannot change the result).
"""
import numpy as np
import pytest
import torch

from synthetic import golden

# README "Suggested tolerances" (30-100x the reference's own thread-count noise):
LATENT_TOL = 1e-3  # cfm latents after 2 Euler steps of a 24-layer DiT
MEL_TOL = 1e-4  # VAE mel
WAV_TOL = 1e-4  # pipeline_small wav


@pytest.fixture(scope="module")
def ref():
    return golden("pipeline_small")


def _max_err(ours, ref):
    ours = ours.detach().cpu().numpy().astype(np.float64)
    assert ours.shape == ref.shape
    return float(np.abs(ours - ref).max())


def test_sound2code_matches_official(encoder_codec, ref, monkeypatch):
    windows = []
    real = encoder_codec.encode_windows

    def spy(x):
        codes = real(x)
        windows.append((x.clone(), codes))
        return codes

    monkeypatch.setattr(encoder_codec, "encode_windows", spy)
    codes = encoder_codec.sound2code(torch.from_numpy(ref["signal_48k"]))
    assert torch.equal(codes, torch.from_numpy(ref["codes"]))
    x = torch.cat([w for w, _ in windows])
    assert x.shape[0] == 2  # 5 s: repeated to two MuQ windows of 40.97 s
    peaks = x.abs().amax(-1).numpy()
    np.testing.assert_allclose(peaks, ref["window_peaks"], rtol=0, atol=1e-7)
    assert torch.equal(torch.cat([c for _, c in windows]), torch.from_numpy(ref["window_codes"]))


@pytest.mark.slow
def test_code2sound_matches_official(full_codec, ref, monkeypatch):
    seen = {}
    real_sample, real_decode = full_codec.flow.sample, full_codec.vae.decode

    def sample(z_q, true_latents, latent_length, incontext_length, noise, *a, **k):
        out = real_sample(z_q, true_latents, latent_length, incontext_length, noise, *a, **k)
        seen["latents"] = out.clone()
        return out

    def decode(z):
        mel = real_decode(z)
        seen["mel"] = mel.clone()
        return mel

    monkeypatch.setattr(full_codec.flow, "sample", sample)
    monkeypatch.setattr(full_codec.vae, "decode", decode)
    codes = torch.from_numpy(ref["codes"])
    wav = full_codec.code2sound(codes, num_steps=int(ref["num_steps"]), guidance_scale=1.5,
                                noise=[torch.from_numpy(ref["noise_1"])])
    assert _max_err(seen["latents"], ref["window0_latents"]) <= LATENT_TOL
    assert _max_err(seen["mel"], ref["window0_mel"]) <= MEL_TOL
    assert wav.shape == ref["wav"].shape == (2, 126 * 1920)
    assert _max_err(wav, ref["wav"]) <= WAV_TOL
