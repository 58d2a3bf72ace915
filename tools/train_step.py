#!/usr/bin/env python3
"""Time and peak memory of one fine-tuning step of the full-width decoder, at batch 1 on a full window.

    python3 tools/train_step.py --dit-blocks 2 [--bf16] [--lora 16] [--device cpu]
    python3 tools/train_step.py --ckpt DIR --device cuda --bf16      # the decoder of a checkpoint folder

Builds the released sizes of the flow decoder with random weights (no checkpoint is needed: a step's cost
does not depend on the values), keeps the DiT's first ``--dit-blocks`` blocks, and runs two optimiser steps
(AdamW, the objective of ``mucodec.training``) on random codes' embeddings and latents. Prints one JSON
line: the second step's seconds, the parameters trained, and the process's peak RSS (CPU) or the device's
peak allocation (CUDA). ``--ckpt`` takes the decoder, its sizes and its window from a checkpoint folder
instead (tools/gpu_check.py runs it on the full-size synthetic weights, and on the tests' tiny ones with
``--tiny``). A step's time and memory grow linearly with the blocks, so two runs (e.g. 1 and 2
blocks) give the cost of one block, and the full model's is ``base + 24 x block``. One measurement per process.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mucodec import lora  # noqa: E402
from mucodec.codec import CodecConfig  # noqa: E402
from mucodec.flow import FlowDecoder, FlowDecoderConfig  # noqa: E402
from mucodec.trainer import TrainOptions  # noqa: E402
from mucodec.training import Objective, cfm_loss, draw  # noqa: E402


def build(args) -> tuple[FlowDecoder, int]:
    """The flow decoder to train and the latent frames of its window."""
    if args.ckpt:
        from mucodec.codec import MuCodec

        codec = MuCodec.from_pretrained(args.ckpt, device=args.device, decoder_only=True)
        flow, frames = codec.flow, codec.config.window_latents
        flow.train()
    else:
        cfg = FlowDecoderConfig()
        cfg.dit.num_layers = args.dit_blocks or cfg.dit.num_layers  # built at that depth: peak memory is the process's
        flow, frames = FlowDecoder(cfg).to(args.device), CodecConfig().window_latents
        with torch.no_grad():  # statistics as a checkpoint has them: a step's cost does not depend on them
            flow.normfeat.counts.fill_(1.0)
            flow.normfeat.sum_x2.fill_(1.0)
    if args.dit_blocks and args.ckpt:
        del flow.estimator.transformer_blocks[args.dit_blocks:]
    return flow, frames


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dit-blocks", type=int, default=None, help="keep the DiT's first N blocks (default: all)")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--checkpoint-blocks", action="store_true", help="activation checkpointing")
    ap.add_argument("--lora", type=int, default=0, help="train LoRA adapters of this rank only (0: full)")
    ap.add_argument("--ckpt", default=None, help="checkpoint folder whose decoder to train (default: the "
                                                  "released sizes with random weights)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.manual_seed(0)
    flow, frames = build(args)
    flow.estimator.requires_grad_(True)
    flow.estimator.checkpoint_blocks = args.checkpoint_blocks
    flow.cond_muencoder_emb.requires_grad_(True)
    flow.zero_cond_embedding1.requires_grad_(True)
    if args.lora:
        lora.attach(flow, args.lora, TrainOptions().lora_alpha, seed=0)
        flow.to(args.device)
    params = [p for p in flow.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    cfg = flow.cfg
    z_q = torch.randn(1, cfg.cond_dim, 2 * frames, device=args.device)
    latents = torch.randn(1, cfg.latent_channels, frames, cfg.freq_bins, device=args.device)
    valid = torch.tensor([frames])
    gen = torch.Generator().manual_seed(0)
    amp = torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()
    seconds = None
    for _ in range(2):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        with amp:
            loss = cfm_loss(flow, z_q, latents, valid, draw(Objective(), tuple(latents.shape), gen), Objective())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() / 2 ** 20 if args.device.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps({"dit_blocks": len(flow.estimator.transformer_blocks), "ckpt": args.ckpt, "bf16": args.bf16, "checkpoint_blocks": args.checkpoint_blocks,
                      "lora": args.lora,
                      "device": args.device,
                      "step_seconds": round(seconds, 2), "trained_parameters": sum(p.numel() for p in params),
                      "peak_mib": round(peak), "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
