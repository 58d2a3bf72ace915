"""HiFi-GAN 48 kHz vocoder of AudioLDM-48k: log-mel (256 bins, hop 480) -> waveform.

``state_dict()`` keys are the checkpoint keys minus ``first_stage_model.vocoder.``; the official
module removes weight norm before loading, so every weight is a plain ``.weight``.

``HiFiGAN.vocode`` reproduces the official ``vocoder_chunk_infer``: the network runs on chunks of
1024 mel frames every 256 frames and the chunk outputs are crossfaded (see ``chunk_schedule``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .audio import crossfade

# progress(done, total) is called after each network call of ``vocode``.
Progress = Callable[[int, int], None]


@dataclass
class VocoderConfig:
    """Sizes of the 48 kHz HiFi-GAN (``Generator_old``) and of its official chunked inference."""

    num_mels: int = 256
    upsample_rates: tuple[int, ...] = (6, 5, 4, 2, 2)
    upsample_kernel_sizes: tuple[int, ...] = (12, 10, 8, 4, 4)
    upsample_initial_channel: int = 1536
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11, 15)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5), (1, 3, 5))
    conv_pre_kernel: int = 7
    conv_post_kernel: int = 7
    lrelu_slope: float = 0.1
    final_lrelu_slope: float = 0.01  # the official final leaky_relu uses torch's default slope
    hop_length: int = 480  # samples per mel frame = product of upsample_rates
    sampling_rate: int = 48000
    chunk_frames: int = 1024
    chunk_hop_frames: int = 256

    def __post_init__(self):
        prod = 1
        for r in self.upsample_rates:
            prod *= r
        if prod != self.hop_length:
            raise ValueError(f"hop_length {self.hop_length} != product of upsample_rates {prod}")
        if not 0 < self.chunk_hop_frames <= self.chunk_frames:
            raise ValueError("need 0 < chunk_hop_frames <= chunk_frames")


class ResBlock(nn.Module):
    """HiFi-GAN ResBlock1: for each dilation d, x += conv_k(lrelu(conv_{k,d}(lrelu(x)))). (B,C,L) -> same."""

    def __init__(self, cfg: VocoderConfig, ch: int, kernel: int, dilations: tuple[int, ...]):
        super().__init__()
        self.slope = cfg.lrelu_slope
        self.convs1 = nn.ModuleList(
            nn.Conv1d(ch, ch, kernel, dilation=d, padding=(kernel - 1) * d // 2) for d in dilations)
        self.convs2 = nn.ModuleList(
            nn.Conv1d(ch, ch, kernel, padding=(kernel - 1) // 2) for _ in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c1, c2 in zip(self.convs1, self.convs2):
            h = c1(F.leaky_relu(x, self.slope))
            h = c2(F.leaky_relu_(h, self.slope))
            x = h.add_(x)
        return x

    def radius(self) -> int:
        """Samples each side of an output sample that can influence it."""
        return sum(c.padding[0] for c in self.convs1) + sum(c.padding[0] for c in self.convs2)


class HiFiGAN(nn.Module):
    """HiFi-GAN generator: mel (B, num_mels, T) -> waveform (B, hop_length*T + extra), extra = 16 officially."""

    def __init__(self, cfg: VocoderConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or VocoderConfig()
        c0 = cfg.upsample_initial_channel
        self.conv_pre = nn.Conv1d(cfg.num_mels, c0, cfg.conv_pre_kernel, padding=(cfg.conv_pre_kernel - 1) // 2)
        self.ups = nn.ModuleList(
            nn.ConvTranspose1d(c0 // 2 ** i, c0 // 2 ** (i + 1), k, u, padding=(k - u) // 2)
            for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes)))
        self.resblocks = nn.ModuleList(
            ResBlock(cfg, c0 // 2 ** (i + 1), k, d)
            for i in range(len(cfg.upsample_rates))
            for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes))
        self.conv_post = nn.Conv1d(c0 // 2 ** len(cfg.upsample_rates), 1, cfg.conv_post_kernel,
                                   padding=(cfg.conv_post_kernel - 1) // 2)

    def num_samples(self, frames: int) -> int:
        """Output length of ``forward`` for ``frames`` mel frames."""
        n = frames
        for up in self.ups:
            n = (n - 1) * up.stride[0] - 2 * up.padding[0] + up.kernel_size[0]
        return n

    def radius(self) -> int:
        """Mel frames each side of a frame that can influence its output samples (an upper bound).

        Outputs farther than this from both ends of the input do not depend on where the input
        was cut, which ``vocode(..., share_overlaps=True)`` relies on.
        """
        r = self.conv_post.padding[0]
        n_k = len(self.cfg.resblock_kernel_sizes)
        for i in reversed(range(len(self.ups))):
            r += max(b.radius() for b in self.resblocks[i * n_k:(i + 1) * n_k])
            up = self.ups[i]
            r = (r + up.kernel_size[0]) // up.stride[0] + 1
        return r + self.conv_pre.padding[0]

    @torch.no_grad()
    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """mel (B, num_mels, T) log-mel -> waveform (B, num_samples(T)) in [-1, 1]."""
        x = self.conv_pre(mel)
        n_k = len(self.cfg.resblock_kernel_sizes)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, self.cfg.lrelu_slope))
            xs = self.resblocks[i * n_k](x)
            for blk in self.resblocks[i * n_k + 1:(i + 1) * n_k]:
                xs.add_(blk(x))
            x = xs.div_(n_k)
        x = self.conv_post(F.leaky_relu_(x, self.cfg.final_lrelu_slope))
        return torch.tanh(x).squeeze(1)

    @torch.no_grad()
    def vocode(self, mel: torch.Tensor, progress: Progress | None = None,
               share_overlaps: bool = False, num_samples: int | None = None) -> torch.Tensor:
        """Mel image (B, 1, T, num_mels) -> waveform (B, N) float32, as the official ``decode_to_waveform``.

        N follows ``chunk_schedule``: 1966080 for a 4096-frame window, 624016 for 1300 frames.
        With ``share_overlaps`` the network runs once over the whole mel (in pieces with margins)
        plus short pieces at the chunk edges instead of once per chunk (each frame is covered by
        4 chunks officially); chunk outputs then equal the official ones up to float rounding,
        at ~2.5x less compute for a 4096-frame window.
        ``num_samples``: only the first ``num_samples`` samples are wanted (the end of a song in its last
        window). Chunks that cannot reach them are not run, and the output is cut to at most that
        length; its samples are those of the whole output, as each chunk reads only its own frames.
        """
        if mel.dim() != 4 or mel.shape[1] != 1 or mel.shape[3] != self.cfg.num_mels:
            raise ValueError(f"mel must be (B, 1, T, {self.cfg.num_mels}), got {tuple(mel.shape)}")
        if mel.shape[2] == 0:
            raise ValueError("mel has no frames")
        mel = mel.squeeze(1).transpose(1, 2)
        chunks = chunk_schedule(mel.shape[-1], self.cfg)
        if num_samples is not None:
            if num_samples < 1:
                raise ValueError(f"num_samples must be at least 1, got {num_samples}")
            chunks = self.chunks_reaching(chunks, num_samples)
            # the first K official chunks are exactly the schedule of the mel cut where chunk K ends
            mel = mel[:, :, :chunks[-1][1]]
        if share_overlaps:
            outputs = _shared_chunks(self, mel, chunks, progress)
        else:
            outputs = _direct_chunks(self, mel, chunks, progress)
        wav = crossfade_chunks(outputs, self.cfg)
        return wav if num_samples is None else wav[:, :num_samples].contiguous()

    def chunks_reaching(self, chunks: list[tuple[int, int]], num_samples: int) -> list[tuple[int, int]]:
        """The first chunks of ``chunks`` whose joined output fixes the first ``num_samples`` samples.

        Mirrors :func:`crossfade_chunks`: after a chunk is joined, everything before the last ``ov``
        samples is final (the next chunk crossfades only into those).
        """
        n = self.num_samples(chunks[0][1] - chunks[0][0]) // self.cfg.chunk_frames * self.cfg.chunk_frames
        ov = int(float(n) * (self.cfg.chunk_frames - self.cfg.chunk_hop_frames) / self.cfg.chunk_frames)
        length = n
        for k in range(1, len(chunks)):
            if length - ov >= num_samples:
                return chunks[:k]
            length += min(self.num_samples(chunks[k][1] - chunks[k][0]), n) - ov
        return chunks


def chunk_schedule(frames: int, cfg: VocoderConfig) -> list[tuple[int, int]]:
    """Mel frame ranges [start, end) of the official vocoder calls.

    Chunks of ``chunk_frames`` start every ``chunk_hop_frames``; the first chunk that reaches the
    end of the mel is the last one (it may be shorter).
    """
    out = []
    for start in range(0, frames, cfg.chunk_hop_frames):
        out.append((start, min(start + cfg.chunk_frames, frames)))
        if start + cfg.chunk_frames >= frames:
            break
    return out


def crossfade_chunks(outputs, cfg: VocoderConfig) -> torch.Tensor:
    """Join chunk waveforms (B, n_k) exactly as the official ``vocoder_chunk_infer`` does.

    The first chunk is cut to a multiple of ``chunk_frames`` samples (sic: a frame count used as
    a sample count; 491536 -> 491520); later chunks are cut to that length, their first
    ``overlap/chunk`` part is crossfaded with the end of the output (float64 ramp, result stored
    as float32) and the rest appended, so a short last chunk keeps its extra samples.
    """
    wav = None
    for cur in outputs:
        if wav is None:
            n = cur.shape[-1] // cfg.chunk_frames * cfg.chunk_frames
            wav = cur[:, :n]
            ov = int(float(n) * (cfg.chunk_frames - cfg.chunk_hop_frames) / cfg.chunk_frames)
            continue
        cur = cur[:, :n]
        wav = torch.cat([wav[:, :-ov], crossfade(wav[:, -ov:], cur[:, :ov]), cur[:, ov:]], dim=-1)
    return wav.contiguous()


def _direct_chunks(model: HiFiGAN, mel: torch.Tensor, chunks, progress: Progress | None):
    for i, (s, e) in enumerate(chunks):
        out = model(mel[:, :, s:e])
        if progress is not None:
            progress(i + 1, len(chunks))
        yield out


def _shared_chunks(model: HiFiGAN, mel: torch.Tensor, chunks, progress: Progress | None):
    """The official chunk outputs, rebuilt from one pass over the whole mel plus the chunk edges.

    A chunk's output differs from the whole-mel output only within ``radius`` frames of its cuts
    (the network zero-pads at the chunk ends), so a chunk = the whole-mel output in its interior
    + the ends of short passes that start (end) at the chunk's own start (end). The whole-mel
    output is computed in pieces of ``chunk_frames`` with ``radius`` frames of margin; the edge
    passes (2 radii each) are stacked on the batch axis, ``chunk_frames`` frames per call.
    """
    frames, hop, r = mel.shape[-1], model.cfg.hop_length, model.radius()
    extra = model.num_samples(frames) - hop * frames
    pieces = [(s, min(s + model.cfg.chunk_frames, frames)) for s in range(0, frames, model.cfg.chunk_frames)]
    edged = [(s, e) for s, e in chunks if s > 0 or e < frames]
    short = [c for c in edged if c[1] - c[0] < 2 * r]  # too short to have an interior: run whole
    # a left edge and a right edge starting at the same frame are the same pass
    starts = sorted({a for s, e in edged if (s, e) not in short
                     for a in ([s] if s > 0 else []) + ([e - 2 * r] if e < frames else [])})
    group = max(1, model.cfg.chunk_frames // (2 * r))
    total = len(pieces) + len(short) + -(-len(starts) // group)
    done = 0

    def run(x: torch.Tensor) -> torch.Tensor:
        nonlocal done
        out = model(x)
        done += 1
        if progress is not None:
            progress(done, total)
        return out

    parts = []
    for s, e in pieces:
        a, b = max(0, s - r), min(frames, e + r)
        parts.append(run(mel[:, :, a:b])[:, (s - a) * hop:(e - a) * hop + (extra if e == frames else 0)])
    whole = torch.cat(parts, dim=-1)
    del parts
    edges = {}
    for g in range(0, len(starts), group):
        batch = starts[g:g + group]
        outs = run(torch.cat([mel[:, :, a:a + 2 * r] for a in batch])).chunk(len(batch))
        edges.update(zip(batch, outs))
    for s, e in chunks:
        if (s, e) in short:
            yield run(mel[:, :, s:e])
            continue
        out = whole[:, s * hop:e * hop + extra].clone()
        if s > 0:
            out[:, :r * hop] = edges[s][:, :r * hop]
        if e < frames:
            out[:, -(r * hop + extra):] = edges[e - 2 * r][:, -(r * hop + extra):]
        yield out
