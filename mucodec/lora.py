"""Low-rank adapters (LoRA) on the DiT's attention and feed-forward projections, for cards too small for
full fine-tuning.

Each adapted ``Linear`` keeps its weight ``W`` (out, in) frozen and gains ``A`` (rank, in) and ``B``
(out, rank); it then computes with ``W + (alpha / rank) B A``. ``B`` starts at zero, so a fresh adapter
leaves the model exactly as loaded, and ``A`` starts as ``nn.Linear``'s own initialisation. The sum is a
parametrisation of the ``weight`` attribute (``torch.nn.utils.parametrize``), not a wrapper module: code
that reads ``proj.weight`` directly (the fused GELU projection) sees the adapted weight too, and the
DiT keeps its structure. :func:`merged` computes the plain weights for a checkpoint of the official layout.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from .errors import ArgumentError

# the projections adapted in every DiT block (names inside a block)
TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2")
ADAPTER = ".parametrizations.weight."  # in a parameter's name: part of an adapted weight
ORIGINAL = ADAPTER + "original"


class LowRank(nn.Module):
    """The parametrisation ``W -> W + scale * B @ A`` of one weight."""

    def __init__(self, out_features: int, in_features: int, rank: int, scale: float, generator: torch.Generator):
        super().__init__()
        a = torch.empty(rank, in_features)
        # nn.Linear's initialisation (kaiming uniform, a = sqrt(5)), drawn from the run's own generator
        bound = 1 / math.sqrt(in_features)
        self.lora_A = nn.Parameter(a.uniform_(-bound, bound, generator=generator))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        self.scale = scale

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.scale * (self.lora_B @ self.lora_A).to(weight.dtype)


def attach(flow, rank: int, alpha: float, seed: int) -> list[str]:
    """Adapt the projections of every block of ``flow.estimator`` with rank-``rank`` adapters scaled by
    ``alpha / rank``; make the adapters the only trainable parameters of ``flow``. Returns their names."""
    if rank < 1:
        raise ArgumentError(f"the LoRA rank must be a whole number >= 1, got {rank}.")
    g = torch.Generator().manual_seed(seed)
    for block in flow.estimator.transformer_blocks:
        for target in TARGETS:
            linear = block.get_submodule(target)
            if parametrize.is_parametrized(linear, "weight"):
                raise ArgumentError("the decoder already has LoRA adapters; load it again to attach new ones.")
            out_features, in_features = linear.weight.shape
            if rank > min(out_features, in_features):
                raise ArgumentError(f"the LoRA rank {rank} exceeds the projections' size {min(linear.weight.shape)}.")
            parametrize.register_parametrization(
                linear, "weight", LowRank(out_features, in_features, rank, alpha / rank, g))
    names = []
    for name, p in flow.named_parameters():
        p.requires_grad_(is_adapter(name))
        if p.requires_grad:
            names.append(name)
    return names


def is_adapter(name: str) -> bool:
    return ADAPTER in name and not name.endswith(ORIGINAL)


def merged(flow, adapters: dict) -> dict:
    """The plain weights (FlowDecoder names, e.g. ``estimator.transformer_blocks.0.attn1.to_q.weight``) of
    every adapted projection of ``flow``, with the adapter tensors ``adapters`` (names as :func:`attach`
    returns them) in place of the current ones: computed as the forward pass computes them."""
    out = {}
    with torch.no_grad():
        for name, module in flow.named_modules():
            if not parametrize.is_parametrized(module, "weight"):
                continue
            prefix = f"{name}.parametrizations.weight."
            low = module.parametrizations.weight[0]
            a, b = adapters[prefix + "0.lora_A"], adapters[prefix + "0.lora_B"]
            w = module.parametrizations.weight.original
            out[f"{name}.weight"] = w + low.scale * (b.to(w.device) @ a.to(w.device)).to(w.dtype)
    return out
