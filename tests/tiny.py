"""Tiny MuCodec checkpoints in the official file layouts.

Same code, same time structure (48 kHz, 25 Hz codes, 40.96 s windows, 16384 codes), tiny widths,
so the windowing logic and the CLI run end to end in seconds. The sizes travel in each file
(muq.pt: fairseq ``cfg['model']``; mucodec.pt / audioldm_48k.pth: a ``mucodec_config`` entry),
which is how ``from_pretrained`` tells a tiny model from the official one.
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from mucodec.dit import DiTConfig
from mucodec.flow import FlowDecoder, FlowDecoderConfig
from mucodec.muq import MuQConfig, MuQEncoder
from mucodec.quantizer import Quantizer, QuantizerConfig
from mucodec.vae import MelVAE, VAEConfig
from mucodec.vocoder import HiFiGAN, VocoderConfig

MUQ = dict(label_rate=25, hop_length=240, n_mels=128, conv_dim=4, encoder_dim=16, encoder_depth=2,
           num_attention_heads=2, intermediate_size=32, conv_depthwise_kernel_size=5)
LAYER = 2
QUANTIZER = QuantizerConfig(input_dim=16, codebook_size=16384, codebook_dim=4)
FLOW = FlowDecoderConfig(cond_dim=16, dit=DiTConfig(num_heads=2, head_dim=8, num_layers=1, ff_mult=2))
VAE = VAEConfig(ch=4, ch_mult=(1, 1, 1, 1), num_res_blocks=1, norm_groups=2)
VOCODER = VocoderConfig(upsample_initial_channel=32, resblock_kernel_sizes=(3,),
                        resblock_dilation_sizes=((1,),))


def _plain(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _randomise(module: torch.nn.Module, seed: int) -> dict:
    """Random but well-scaled weights (fan-in normalised), as official names relative to the module."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in module.state_dict().items():
        if not t.is_floating_point():
            out[name] = t.clone()
        elif name.endswith(("running_var", "counts")):
            out[name] = t.clone() if name.endswith("running_var") else torch.full_like(t, 1.0)
        elif name.endswith(("sum_x2",)):
            out[name] = torch.ones_like(t)
        elif t.dim() >= 2:
            out[name] = torch.randn(t.shape, generator=g) / max(1, t[0].numel()) ** 0.5
        else:
            out[name] = 0.02 * torch.randn(t.shape, generator=g) + (1.0 if name.endswith("weight") else 0.0)
    return out


def write_tiny_checkpoints(folder: Path, seed: int = 0) -> Path:
    """Write tools/audioldm_48k.pth, muq_dev/muq.pt and ckpt/mucodec.pt with tiny models."""
    folder = Path(folder)
    for sub in ("tools", "muq_dev", "ckpt"):
        (folder / sub).mkdir(parents=True, exist_ok=True)

    muq = MuQEncoder(MuQConfig(**MUQ), num_layers=MUQ["encoder_depth"])
    torch.save({"args": argparse.Namespace(arch="muq"), "cfg": {"model": dict(MUQ, _name="muq")},
                "model": {"model." + k: v for k, v in _randomise(muq, seed).items()}},
               folder / "muq_dev/muq.pt")

    state = {"rvq_muencoder_emb.quantizers.0." + k: v for k, v in _randomise(Quantizer(QUANTIZER), seed + 1).items()}
    for k, v in _randomise(FlowDecoder(FLOW), seed + 2).items():
        state[("cfm_wrapper." + k) if k.startswith("estimator.") else k] = v
    config = {"codec": {"layer": LAYER}, "quantizer": _plain(QUANTIZER), "flow": _plain(FLOW)}
    torch.save({"state_dict": state, "mucodec_config": config}, folder / "ckpt/mucodec.pt")

    sd = {"first_stage_model." + k: v for k, v in _randomise(MelVAE(VAE, with_encoder=True), seed + 3).items()}
    sd.update({"first_stage_model.vocoder." + k: v for k, v in _randomise(HiFiGAN(VOCODER), seed + 4).items()})
    sd["scale_factor"] = torch.tensor(0.5)
    torch.save({"state_dict": sd, "mucodec_config": {"vae": _plain(VAE), "vocoder": _plain(VOCODER)}},
               folder / "tools/audioldm_48k.pth")
    return folder
