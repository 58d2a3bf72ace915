"""The declarative table of where each model stage's tensors live (:data:`STAGES`), and
:class:`Checkpoints`, which applies it: every file is checked (a regular, readable file of the right kind),
every size stored in a file is validated, and every tensor a stage needs is checked against those sizes
before a module is built. Reading and checking one file is :mod:`checkpoint`'s.
"""
from __future__ import annotations

import contextlib
import math
import operator
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .checkpoint import (CONFIG_KEY, FILES, HUB_URL, Opaque, assign, bad_size, check_shapes, fold_weight_norm,
                         make_config, put_them, read_checkpoint, skip_init, state_dict_of, subdict)
from .errors import CheckpointError
from .flow import FlowDecoder, FlowDecoderConfig
from .muq import MuQConfig, MuQEncoder
from .quantizer import Quantizer, QuantizerConfig
from .vae import MelVAE, VAEConfig
from .vocoder import HiFiGAN, VocoderConfig


@dataclass(frozen=True)
class Stage:
    """How one module is read.

    ``sources``: (file role, prefix in the file, prefix in the module); later sources overwrite
    earlier ones, as the official non-strict load of mucodec.pt puts its MuQ copy over muq.pt's.
    ``sizes``: (file role, section of its ``mucodec_config``, config class); section None is the
    fairseq ``cfg['model']``. ``probes``: (size, tensor, dim) pairs compared before a module that
    cannot be built on the meta device is built for real.
    """

    sources: tuple
    sizes: tuple
    build: Callable  # (config, Checkpoints) -> nn.Module
    fold_weight_norm: bool = False
    probes: tuple = ()


def _muq(cfg: MuQConfig, c: "Checkpoints"):
    layer = c.layer
    if not isinstance(layer, bool):
        with contextlib.suppress(TypeError):
            layer = operator.index(layer)  # numpy and torch integers too, but never a float
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 < layer <= cfg.encoder_depth:
        raise CheckpointError(f"layer {layer!r} does not exist in {c.files['muq']}: use 1..{cfg.encoder_depth}.")
    if cfg.encoder_dim % cfg.num_attention_heads:
        raise CheckpointError(f"{c.files['muq']}: cfg['model']['num_attention_heads'] is {cfg.num_attention_heads}, "
                              f"which does not divide encoder_dim {cfg.encoder_dim}; use the official file from {HUB_URL}.")
    return MuQEncoder(cfg, num_layers=layer)


STAGES = {
    "muq": Stage(
        sources=(("muq", "model.", ""), ("mucodec", "muencoder.model.", "")),
        sizes=("muq", None, MuQConfig), build=_muq,
        probes=(("conv_dim", "conv.conv.0.conv1.weight", 0), ("encoder_dim", "conv.linear.weight", 0),
                ("intermediate_size", "conformer.layers.0.ffn1.intermediate_dense.weight", 0),
                ("conv_depthwise_kernel_size", "conformer.layers.0.conv_module.depthwise_conv.weight", 2))),
    "quantizer": Stage(
        sources=(("mucodec", "rvq_muencoder_emb.quantizers.0.", ""),),
        sizes=("mucodec", "quantizer", QuantizerConfig), build=lambda cfg, c: Quantizer(cfg), fold_weight_norm=True,
        probes=(("input_dim", "in_proj.weight", 1), ("codebook_dim", "in_proj.weight", 0),
                ("codebook_size", "codebook.weight", 0))),
    "flow": Stage(
        sources=(("mucodec", "cfm_wrapper.estimator.", "estimator."), ("mucodec", "normfeat.", "normfeat."),
                 ("mucodec", "cond_muencoder_emb.", "cond_muencoder_emb."),
                 ("mucodec", "zero_cond_embedding1", "zero_cond_embedding1")),
        sizes=("mucodec", "flow", FlowDecoderConfig), build=lambda cfg, c: FlowDecoder(cfg)),
    "vae": Stage(  # the decoder half: code2sound
        sources=(("audioldm", "first_stage_model.", ""),),
        sizes=("audioldm", "vae", VAEConfig),
        build=lambda cfg, c: MelVAE(cfg, c.scale_factor(), with_encoder=False, with_decoder=True)),
    "vae_encoder": Stage(  # the encoder half: prompts only, loaded on the first one
        sources=(("audioldm", "first_stage_model.", ""),),
        sizes=("audioldm", "vae", VAEConfig),
        build=lambda cfg, c: MelVAE(cfg, c.scale_factor(), with_encoder=True, with_decoder=False)),
    "vocoder": Stage(
        sources=(("audioldm", "first_stage_model.vocoder.", ""),),
        sizes=("audioldm", "vocoder", VocoderConfig), build=lambda cfg, c: HiFiGAN(cfg)),
}
ENCODER_STAGES = ("muq", "quantizer")
DECODER_STAGES = ("flow", "vae", "vocoder")


def roles_of(stages) -> tuple:
    """The files (roles of :data:`FILES`) the stages read, in FILES order."""
    used = {role for s in stages for role, _, _ in STAGES[s].sources} | {STAGES[s].sizes[0] for s in stages}
    return tuple(r for r in FILES if r in used)


class Checkpoints:
    """The checkpoint files of one model, each read once on first use and checked to be the right kind.

    ``layer``: the MuQ hidden state the codes are taken from (needed by the "muq" stage).
    """

    def __init__(self, files: dict, layer: int | None = None):
        self.files = {role: Path(p) for role, p in files.items()}
        self.layer = layer
        self._objs = {}

    def obj(self, role: str) -> dict:
        if role not in self._objs:
            if role not in self.files:
                raise CheckpointError(f"{FILES[role]} was not loaded: {put_them()}.")
            self._objs[role] = read_checkpoint(self.files[role], role)
        return self._objs[role]

    def sizes(self, role: str, section: str | None, cls):
        """The validated config ``cls`` stored in the file ``role``: ``mucodec_config[section]``, or
        for section None the fairseq ``cfg['model']`` (defaults where the file stores none)."""
        obj, path = self.obj(role), self.files[role]
        if section is None:
            # A config object pickled as such (not fairseq's plain containers) was read as a placeholder:
            # it holds no sizes we can read, so the defaults apply and the tensor checks still guard them.
            cfg = None if isinstance(obj.get("cfg"), Opaque) else obj.get("cfg")
            if cfg is not None and not isinstance(cfg, dict):
                raise bad_size(path, "cfg", cfg, "a dict (a fairseq config)")
            model = None if isinstance((cfg or {}).get("model"), Opaque) else (cfg or {}).get("model")
            make_config(cls, model, path, "cfg['model']")  # validates every field MuQ reads
            try:
                return cls.from_fairseq(model) if model is not None else cls()
            except CheckpointError as e:
                raise CheckpointError(e.args[0] if str(path) in e.args[0] else f"{path}: {e.args[0]}") from None
        sizes = obj.get(CONFIG_KEY)
        if sizes is not None and not isinstance(sizes, dict):
            raise bad_size(path, CONFIG_KEY, sizes, "a dict of sizes")
        return make_config(cls, (sizes or {}).get(section), path, f"{CONFIG_KEY}[{section!r}]")

    def scale_factor(self) -> float:
        """The VAE latent scaling stored beside the weights in audioldm_48k.pth."""
        path, t = self.files["audioldm"], state_dict_of(self.obj("audioldm")).get("scale_factor")
        if t is None:
            raise CheckpointError(f"{path} lacks the tensor 'scale_factor': it is not the AudioLDM-48k checkpoint "
                                  f"MuCodec uses; download it again from {HUB_URL}.")
        if t.numel() != 1 or not t.is_floating_point() or not math.isfinite(float(t)) or float(t) <= 0:
            raise CheckpointError(f"{path}: 'scale_factor' must be one positive finite number, got "
                                  f"{tuple(t.shape)} {t.dtype}; download the file again from {HUB_URL}.")
        return float(t)

    def source(self, name: str) -> str:
        """The file(s) stage ``name`` was read from, for messages about its weights."""
        used = [str(self.files[role]) for role, prefix, _ in STAGES[name].sources
                if role in self.files and any(k.startswith(prefix) for k in state_dict_of(self.obj(role)))]
        return " and ".join(dict.fromkeys(used)) or str(self.files[STAGES[name].sources[0][0]])

    def sources(self, names) -> dict[str, str]:
        """{file role or stage: the file(s) it was read from}, so an error about a module's output can name
        the file to replace (a stage read from two files names both)."""
        return {**{role: str(p) for role, p in self.files.items()}, **{n: self.source(n) for n in names}}

    def load(self, names) -> dict[str, torch.nn.Module]:
        """Build and load the stages ``names``; every file, size and tensor is checked before any is built."""
        plans = {name: self._plan(name) for name in names}
        return {name: self._build(name, *plan) for name, plan in plans.items()}

    # ----------------------------------------------------------------------------------------------
    def _plan(self, name: str):
        stage = STAGES[name]
        cfg = self.sizes(*stage.sizes)
        state, origin = {}, {}
        for role, prefix, new in stage.sources:
            part = subdict(state_dict_of(self.obj(role)), prefix, new)
            state.update(part)
            origin.update({k: (self.files[role], prefix + k[len(new):]) for k in part})
        if stage.fold_weight_norm:
            try:
                state = fold_weight_norm(state)
            except RuntimeError:
                raise CheckpointError(f"{self.files[stage.sources[0][0]]}: the weight-norm pairs under "
                                      f"'{stage.sources[0][1]}' do not fit together; download the file again "
                                      f"from {HUB_URL}.") from None

        def where(k):
            if k in origin:
                return origin[k]
            role, prefix, new = max((s for s in stage.sources if k.startswith(s[2])), key=lambda s: len(s[2]),
                                    default=stage.sources[0])
            return self.files[role], prefix + k[len(new):]

        for key, tensor, dim in stage.probes:
            got, want = state.get(tensor), getattr(cfg, key)
            if got is not None and got.dim() > dim and got.shape[dim] != want:
                path, in_file = where(tensor)
                sizes_path = self.files[stage.sizes[0]]
                there = "" if path == sizes_path else f" in {path}"
                raise CheckpointError(
                    f"{sizes_path}: {self._size_key(stage, key)} is {want}, but '{in_file}'{there} has size "
                    f"{got.shape[dim]} on dim {dim}; the sizes do not match the weights: use the official files "
                    f"from {HUB_URL}.")
        expected = self._meta_shapes(stage, cfg)
        if expected is not None:
            check_shapes(expected, state, where)
        return cfg, state, where

    @staticmethod
    def _size_key(stage, key):
        return f"cfg['model'][{key!r}]" if stage.sizes[1] is None else f"{CONFIG_KEY}[{stage.sizes[1]!r}][{key!r}]"

    def _meta_shapes(self, stage, cfg):
        """Parameter shapes of the stage built on the meta device (no memory), or None where the module
        computes a buffer from data while it is built (MuQ's mel filterbank): that one relies on its probes."""
        try:
            with torch.device("meta"):
                module = self._construct(stage, cfg)
        except NotImplementedError:
            return None
        except RuntimeError as e:
            if "meta" not in str(e):
                raise
            return None
        return module.state_dict()

    def _construct(self, stage, cfg):
        try:
            with skip_init():
                return stage.build(cfg, self)
        except ValueError as e:  # a module's own consistency checks of its sizes
            section = "cfg['model']" if stage.sizes[1] is None else f"{CONFIG_KEY}[{stage.sizes[1]!r}]"
            raise CheckpointError(f"{self.files[stage.sizes[0]]}: the sizes in {section} do not fit together "
                                  f"({str(e).rstrip('.')}); use the official file from {HUB_URL}.") from None

    def _build(self, name, cfg, state, where):
        module = self._construct(STAGES[name], cfg)
        check_shapes(module.state_dict(), state, where)
        return assign(module, state, self.source(name))


def load_stages(files: dict, stages, layer: int | None = None) -> dict[str, torch.nn.Module]:
    """``{stage: module}`` for the stages of :data:`STAGES`, read from ``files`` ({role: path})."""
    return Checkpoints(files, layer).load(stages)
