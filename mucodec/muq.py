"""MuQ encoder, cut to what MuCodec's tokenizer uses.

24 kHz mono -> mel dB (torchaudio semantics) -> normalised -> ``Conv2dSubsampling`` (100 Hz mel
frames -> 25 Hz vectors) -> the first ``num_layers`` layers of a rotary Wav2Vec2-Conformer
encoder (transformers 4.42.4 semantics). The output is HF ``hidden_states[num_layers]``: the
output of layer ``num_layers - 1``, before the encoder's final LayerNorm.

Not built, because the codec never needs them: ``pos_conv_embed`` (constructed but never applied
by the HF encoder), layers ``num_layers..``, the final LayerNorm, the 4096-way ``linear`` head,
the random-projection quantizer and ``cls_token``. State-dict names are the ``muq.pt`` names
without the leading ``model.``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from mucodec.audio import MelSpectrogramDB
from mucodec.errors import CheckpointError
from mucodec.kernels import Linear, linear


@dataclass
class MuQConfig:
    """Sizes of MuQ; defaults are the released ``muq.pt`` (official ``MuQConfig`` defaults and
    ``w2v2_config.json`` with hidden_size / num_hidden_layers overridden by encoder_dim / depth)."""

    sample_rate: int = 24000
    label_rate: int = 25  # output frames per second
    n_fft: int = 2048  # MuQ's 'melspec_2048' preprocessor (fixed in the official code)
    hop_length: int = 240
    n_mels: int = 128
    # 'melspec_2048' statistics hard-coded in the official MuQ (used when no stat file exists)
    mel_mean: float = 6.768444971712967
    mel_std: float = 18.417922652295623
    conv_dim: int = 512
    encoder_dim: int = 1024
    encoder_depth: int = 12  # layers in the checkpoint; MuQEncoder builds only the first few
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    conv_depthwise_kernel_size: int = 31
    rotary_embedding_base: float = 10000.0
    norm_eps: float = 1e-5  # every LayerNorm / BatchNorm the encoder path uses (torch defaults)

    def __post_init__(self):
        # the official code assumes 100 mel frames per second and knows 4x and 2x time folding
        if 100 // self.label_rate not in (2, 4):
            raise CheckpointError(f"MuQ label_rate {self.label_rate} is not supported; use 25 or 50.")

    @property
    def samples_per_frame(self) -> int:
        """The 24 kHz input is truncated to a multiple of this (960)."""
        return self.sample_rate // self.label_rate

    @property
    def time_strides(self) -> tuple:
        """Time strides of the two residual blocks (frequency stride is always 2)."""
        return (2, 2) if 100 // self.label_rate == 4 else (2, 1)

    @classmethod
    def from_fairseq(cls, cfg_model: Mapping) -> "MuQConfig":
        """Config from a fairseq checkpoint's ``cfg['model']`` (unknown keys are ignored).

        Reads the official ``MuQConfig`` fields that size the encoder path (label_rate, hop_length,
        n_mels, conv_dim, encoder_dim, encoder_depth) and, when present, the Wav2Vec2-Conformer
        keys of ``w2v2_config.json`` that size a layer. ``features`` is not read: the official
        encoder path always uses its ``melspec_2048`` preprocessor and statistics.
        """
        get = cfg_model.get
        if get("use_hubert_featurizer", False):
            raise CheckpointError("muq.pt uses the HuBERT featurizer; only the mel front end is supported.")
        if get("position_embeddings_type", "rotary") != "rotary" or get("hidden_act", "swish") != "swish":
            raise CheckpointError("muq.pt's conformer is not the rotary/swish Wav2Vec2-Conformer; it is not supported.")
        kwargs = {}
        for key in ("label_rate", "hop_length", "n_mels", "conv_dim", "encoder_dim", "encoder_depth",
                    "num_attention_heads", "intermediate_size", "conv_depthwise_kernel_size",
                    "rotary_embedding_base"):
            if get(key) is not None:
                kwargs[key] = type(getattr(cls, key))(get(key))
        return cls(**kwargs)


# ------------------------------------------------------------------------------------------------
# building blocks
# ------------------------------------------------------------------------------------------------
class BatchNorm(nn.BatchNorm1d):
    """Inference BatchNorm over dim 1 of any (B, C, ...) tensor, computed in place.

    Always uses the running statistics (never batch statistics, whatever ``.train()`` says) and
    overwrites its input, which is always a fresh convolution output here; this keeps one fewer
    copy of the large Conv2dSubsampling activations alive.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = (self.running_var + self.eps).sqrt().reciprocal() * self.weight
        shift = self.bias - self.running_mean * scale
        view = (-1,) + (1,) * (x.dim() - 2)
        return x.mul_(scale.view(view)).add_(shift.view(view))


class Res2dModule(nn.Module):
    """Residual block: ReLU(BN(conv(ReLU(BN(conv(x))))) + BN(conv_stride(x)))."""

    def __init__(self, in_dim: int, out_dim: int, stride: tuple, eps: float):
        super().__init__()
        self.conv1 = nn.Conv2d(in_dim, out_dim, 3, padding=1, stride=stride)
        self.bn1 = BatchNorm(out_dim, eps=eps)
        self.conv2 = nn.Conv2d(out_dim, out_dim, 3, padding=1)
        self.bn2 = BatchNorm(out_dim, eps=eps)
        # shortcut projection (present because the frequency stride is always 2)
        self.conv3 = nn.Conv2d(in_dim, out_dim, 3, padding=1, stride=stride)
        self.bn3 = BatchNorm(out_dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_dim, F, T) -> (B, out_dim, ceil(F/2), ceil(T/stride_t))."""
        h = F.relu_(self.bn1(conv2d(self.conv1, x)))
        h = self.bn2(self.conv2(h))
        h += self.bn3(conv2d(self.conv3, x))
        return F.relu_(h)


def conv2d(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)``; with one input channel as one matrix product over the 3x3 patches, channels-last.

    oneDNN's direct convolution of the single mel channel runs at 4-6 GFLOP/s (0.8 s of each 3-window
    encoder batch on a 2-core Zen 5 CPU, twice per batch); the patch product took 0.3 s there, with the same bits.
    Its output is laid out channels-last, so the 512-channel convolutions after it run channels-last too: oneDNN
    then skips reordering the 0.8 GB activations to its blocked layout and back, and its stride-2 kernel runs at
    340 instead of 220 GFLOP/s (a 3-minute encode took 24 s instead of 32 s, with 0.7 GB less peak memory, and
    the same codes: those convolutions only sum in another order, and the golden MuQ tests hold unchanged).
    """
    if conv.in_channels != 1 or x.device.type != "cpu":
        return conv(x)
    b, _, height, width = x.shape
    (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
    out_h, out_w = (height + 2 * ph - kh) // sh + 1, (width + 2 * pw - kw) // sw + 1
    patches = F.unfold(x, conv.kernel_size, padding=conv.padding, stride=conv.stride)  # (B, kh*kw, L)
    weight = conv.weight.reshape(1, conv.out_channels, kh * kw).transpose(1, 2).expand(b, -1, -1)
    out = torch.baddbmm(conv.bias.reshape(1, 1, -1), patches.transpose(1, 2), weight)  # (B, L, C)
    return out.view(b, out_h, out_w, conv.out_channels).permute(0, 3, 1, 2)


class Conv2dSubsampling(nn.Module):
    """Two residual blocks (frequency /4, time /4 at label rate 25) and a linear projection."""

    def __init__(self, cfg: MuQConfig):
        super().__init__()
        s0, s1 = cfg.time_strides
        self.conv = nn.Sequential(
            Res2dModule(1, cfg.conv_dim, (2, s0), cfg.norm_eps),
            Res2dModule(cfg.conv_dim, cfg.conv_dim, (2, s1), cfg.norm_eps),
        )
        self.linear = Linear(cfg.conv_dim * cfg.n_mels // 4, cfg.encoder_dim)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """(B, n_mels, T) -> (B, T', encoder_dim), features ordered (channel, freq)."""
        x = self.conv(mel[:, None])
        b, c, f, t = x.shape
        x = x.permute(0, 3, 1, 2).reshape(b, t, c * f)
        return self.linear(x)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.intermediate_dense = Linear(dim, hidden)
        self.output_dense = Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_dense(F.silu(self.intermediate_dense(x)))


class RotarySelfAttention(nn.Module):
    """HF Wav2Vec2-Conformer rotary self-attention.

    Quirk kept from the reference: the rotation is applied to the (LayerNorm-ed) *input* of
    ``linear_q`` and ``linear_k``, split into heads of ``head_dim``; values use the unrotated input.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.linear_q = Linear(dim, dim)
        self.linear_k = Linear(dim, dim)
        self.linear_v = Linear(dim, dim)
        self.linear_out = Linear(dim, dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x (B, T, D), cos/sin (T, 1, head_dim) -> (B, T, D)."""
        b, t, d = x.shape
        h = self.num_heads
        xh = x.view(b, t, h, d // h)
        half = d // h // 2
        rotated = torch.cat((-xh[..., half:], xh[..., :half]), dim=-1)
        qk_in = (xh * cos + rotated * sin).view(b, t, d)
        q = self.linear_q(qk_in).view(b, t, h, -1).transpose(1, 2)
        k = self.linear_k(qk_in).view(b, t, h, -1).transpose(1, 2)
        v = self.linear_v(x).view(b, t, h, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(head_dim)) v
        return self.linear_out(out.transpose(1, 2).reshape(b, t, d))


class ConvolutionModule(nn.Module):
    """LN -> pointwise (D -> 2D) -> GLU -> depthwise conv -> BN -> SiLU -> pointwise (no biases)."""

    def __init__(self, dim: int, kernel_size: int, eps: float):
        super().__init__()
        self.layer_norm = nn.LayerNorm(dim, eps=eps)
        self.pointwise_conv1 = nn.Conv1d(dim, 2 * dim, 1, bias=False)
        self.depthwise_conv = nn.Conv1d(dim, dim, kernel_size, padding=(kernel_size - 1) // 2, groups=dim, bias=False)
        self.batch_norm = BatchNorm(dim, eps=eps)
        self.pointwise_conv2 = nn.Conv1d(dim, dim, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, T, D)."""
        # The 1x1 convolutions are run as matmuls on (B, T, C) to avoid transposing twice.
        x = F.glu(linear(self.layer_norm(x), self.pointwise_conv1.weight[:, :, 0]), dim=-1)
        x = self.depthwise_conv(x.transpose(1, 2))
        x = F.silu(self.batch_norm(x)).transpose(1, 2)
        return linear(x, self.pointwise_conv2.weight[:, :, 0])


class ConformerLayer(nn.Module):
    """Macaron conformer block: ½FFN, MHSA, conv module, ½FFN, final LayerNorm (all pre-norm)."""

    def __init__(self, cfg: MuQConfig):
        super().__init__()
        d, eps = cfg.encoder_dim, cfg.norm_eps
        self.ffn1_layer_norm = nn.LayerNorm(d, eps=eps)
        self.ffn1 = FeedForward(d, cfg.intermediate_size)
        self.self_attn_layer_norm = nn.LayerNorm(d, eps=eps)
        self.self_attn = RotarySelfAttention(d, cfg.num_attention_heads)
        self.conv_module = ConvolutionModule(d, cfg.conv_depthwise_kernel_size, eps)
        self.ffn2_layer_norm = nn.LayerNorm(d, eps=eps)
        self.ffn2 = FeedForward(d, cfg.intermediate_size)
        self.final_layer_norm = nn.LayerNorm(d, eps=eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = self.ffn1(self.ffn1_layer_norm(x)) * 0.5 + x
        x = self.self_attn(self.self_attn_layer_norm(x), cos, sin) + x
        x = x + self.conv_module(x)
        x = self.ffn2(self.ffn2_layer_norm(x)) * 0.5 + x
        return self.final_layer_norm(x)


class ConformerEncoder(nn.Module):
    """The first layers of the HF encoder; the rotary table is rebuilt from ``inv_freq``."""

    def __init__(self, cfg: MuQConfig, num_layers: int):
        super().__init__()
        head_dim = cfg.encoder_dim // cfg.num_attention_heads
        # float32 arithmetic exactly as transformers builds it
        inv_freq = 1.0 / (cfg.rotary_embedding_base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.layers = nn.ModuleList(ConformerLayer(cfg) for _ in range(num_layers))

    def rotary(self, length: int):
        """cos, sin tables (length, 1, head_dim)."""
        freqs = torch.outer(torch.arange(length, device=self.inv_freq.device).float(), self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
        return emb.cos(), emb.sin()


class MuQEncoder(nn.Module):
    """MuQ up to ``hidden_states[num_layers]`` (the codec uses 6)."""

    def __init__(self, cfg: MuQConfig | None = None, num_layers: int = 6):
        super().__init__()
        cfg = cfg or MuQConfig()
        if not 0 <= num_layers <= cfg.encoder_depth:
            raise ValueError(f"num_layers must be in [0, {cfg.encoder_depth}], got {num_layers}")
        self.cfg = cfg
        self.mel = MelSpectrogramDB(cfg.sample_rate, cfg.n_fft, cfg.hop_length, cfg.n_mels)
        self.conv = Conv2dSubsampling(cfg)
        self.conformer = ConformerEncoder(cfg, num_layers)

    @torch.no_grad()
    def forward(self, wav: torch.Tensor, return_all: bool = False):
        """24 kHz mono (B, N) -> (B, N // 960, encoder_dim) at default sizes.

        The input is first truncated to a multiple of ``cfg.samples_per_frame`` samples (as
        ``MuQModel.forward``). With ``return_all`` a dict is returned instead, holding
        ``muq_source_24k`` (B, N'), ``mel_db`` (B, n_mels, N'/hop + 1), ``mel_norm``
        (B, n_mels, N'/hop), ``conv_out`` (B, T, D) and ``hidden_states`` (list of num_layers+1
        tensors (B, T, D); [0] = conv_out, [-1] = the normal output).
        """
        step = self.cfg.samples_per_frame
        if wav.dim() != 2 or wav.shape[-1] < step:
            raise ValueError(f"MuQ needs (batch, samples) with at least {step} samples, got {tuple(wav.shape)}")
        wav = wav[:, : wav.shape[-1] // step * step]
        # float32 features whatever the model dtype, as MuQ.preprocessing
        mel_db = self.mel(wav)
        # the last (half-empty, centre-padded) frame is dropped as in MuQ.preprocessing
        mel_norm = (mel_db[..., :-1] - self.cfg.mel_mean) / self.cfg.mel_std
        x = self.conv(mel_norm.to(self.conv.linear.weight.dtype))
        cos, sin = self.conformer.rotary(x.shape[1])
        hidden = [x] if return_all else None
        for layer in self.conformer.layers:
            x = layer(x, cos, sin)
            if return_all:
                hidden.append(x)
        if not return_all:
            return x
        return dict(muq_source_24k=wav, mel_db=mel_db, mel_norm=mel_norm, conv_out=hidden[0], hidden_states=hidden)
