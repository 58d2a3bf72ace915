"""Audio encoded into bytes as it is decoded, for a listener who should not wait for the whole song.

:class:`AudioStream` takes the (2, n) pieces a decode gives out and returns, for each, the bytes of the audio
file that became final. It writes with the same library and settings as :func:`audio.audio_writer`, so:

- ``wav`` (32-bit float): the header is written first with the song's length, known from its codes before any
  window runs; the bytes, joined, equal the file ``compress.decode_file`` writes for the same samples.
- ``flac`` (24-bit): the header goes out with the song's length, but the encoder learns its smallest and
  largest frame sizes and the audio's MD5 only at the end, after the header was sent, so those fields stay
  "unknown" (zero, which the FLAC format allows); the samples equal the file's.
"""
from __future__ import annotations

import struct

import numpy as np
import soundfile
import torch

from . import audio
from .errors import ArgumentError, NumericalError

_WAV_PREFIX = 12  # "RIFF", size, "WAVE": the chunks follow
_HEAD = 4096  # bytes of the stream's start kept to check rewrites of the header against (WAV's is 88)


class _Tail:
    """A seekable file for libsndfile whose bytes leave as soon as they are taken: writes past what was taken
    are kept until :meth:`take`; rewrites of bytes already taken (libsndfile rewrites the header at its first
    write and at close) go into a shadow copy, compared with what was sent once the file is closed."""

    def __init__(self):
        self.base, self.pos, self.buf = 0, 0, bytearray()
        self.head, self.shadow = bytearray(), bytearray()  # the first bytes taken; what they were rewritten to

    def write(self, data) -> int:
        data, n = bytes(data), len(data)
        if self.pos < self.base:
            early = data[: self.base - self.pos]
            if self.pos + len(early) > len(self.shadow):
                raise RuntimeError("libsndfile rewrote audio bytes already sent")
            self.shadow[self.pos: self.pos + len(early)] = early
            self.pos += len(early)
            data = data[len(early):]
        at = self.pos - self.base
        if at > len(self.buf):
            self.buf.extend(bytes(at - len(self.buf)))
        self.buf[at: at + len(data)] = data
        self.pos += len(data)
        return n

    def seek(self, offset: int, whence: int = 0) -> int:
        end = self.base + len(self.buf)
        self.pos = offset if whence == 0 else (self.pos + offset if whence == 1 else end + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, n: int = -1) -> bytes:
        return b""  # libsndfile reads nothing back while writing these formats

    def take(self) -> bytes:
        out = bytes(self.buf)
        if len(self.head) < _HEAD:
            self.head.extend(out[: _HEAD - len(self.head)])
            self.shadow.extend(out[: _HEAD - len(self.shadow)])
        self.base += len(out)
        self.buf.clear()
        return out


def _set_wav_length(buf: bytearray, frames: int, channels: int) -> None:
    """Write ``frames`` into the RIFF, fact and data sizes of the float WAV header at the start of ``buf``."""
    data_bytes = frames * channels * 4
    at = _WAV_PREFIX
    while at + 8 <= len(buf):
        name, size = bytes(buf[at: at + 4]), struct.unpack("<I", buf[at + 4: at + 8])[0]
        if name == b"fact":
            buf[at + 8: at + 12] = struct.pack("<I", frames)
        elif name == b"data":
            buf[4:8] = struct.pack("<I", at + 8 + data_bytes - 8)
            buf[at + 4: at + 8] = struct.pack("<I", data_bytes)
            return
        at += 8 + size + (size & 1)
    raise RuntimeError("libsndfile wrote no data chunk header before the samples")


def _set_flac_length(buf: bytearray, frames: int) -> None:
    """Write ``frames`` into the 36-bit total-samples field of the STREAMINFO block that opens ``buf``."""
    if buf[:4] != b"fLaC" or buf[4] & 0x7F != 0:
        raise RuntimeError("libsndfile's FLAC stream does not start with its STREAMINFO block")
    at = 8 + 13  # "fLaC", the block header; then 108 bits of block and frame sizes, rate, channels, depth
    buf[at] = (buf[at] & 0xF0) | ((frames >> 32) & 0x0F)
    buf[at + 1: at + 5] = struct.pack(">I", frames & 0xFFFFFFFF)


class AudioStream:
    """One song encoded as it is decoded: :meth:`start` (the header), :meth:`write` per piece, :meth:`finish`."""

    def __init__(self, fmt: str, frames: int, sample_rate: int = audio.CODEC_SAMPLE_RATE, channels: int = 2):
        if fmt not in audio.AUDIO_FORMATS:
            raise ArgumentError(f"format {fmt!r} is not one of {', '.join(audio.AUDIO_FORMATS)}.")
        self.fmt, self.frames, self.channels, self.written = fmt, int(frames), channels, 0
        container, subtype = audio.AUDIO_FORMATS[fmt]
        self.clip = subtype != "FLOAT"
        self.tail, self.headed = _Tail(), False
        self.file = soundfile.SoundFile(self.tail, "w", sample_rate, channels, subtype=subtype, format=container)
        if subtype == "FLOAT":
            audio.drop_peak_chunk(self.file)  # as audio_writer: the same samples make the same bytes

    def start(self) -> tuple[bytes, int | None]:
        """(the header, the size of the whole stream where it is known before it ends: float WAV's)."""
        size = None
        if self.fmt == "wav":  # libsndfile writes a WAV header at once, FLAC's with the first samples
            size = len(self.tail.buf) + self.frames * self.channels * 4
        return self._take(), size

    def _take(self) -> bytes:
        if not self.headed and self.tail.buf:  # the length goes into the header before it leaves
            if self.fmt == "wav":
                _set_wav_length(self.tail.buf, self.frames, self.channels)
            else:
                _set_flac_length(self.tail.buf, self.frames)
            self.headed = True
        return self.tail.take()

    def write(self, piece: torch.Tensor) -> bytes:
        data = piece.detach().float().cpu()
        if not torch.isfinite(data).all():
            raise NumericalError("The decoder produced NaN or infinite samples; nothing more of this song was sent.")
        if self.clip:  # libsndfile would wrap out-of-range floats around instead
            data = data.clamp(-1.0, 1.0)
        self.file.write(np.ascontiguousarray(data.numpy().T))
        self.written += data.shape[-1]
        return self._take()

    def finish(self) -> bytes:
        """The last bytes; raises if the song's length or the WAV header sent differ from what was written."""
        self.file.close()
        rest = self._take()
        if self.written != self.frames:
            raise RuntimeError(f"the decode gave {self.written} samples, not the {self.frames} announced")
        if self.fmt == "wav" and self.tail.shadow != self.tail.head:
            raise RuntimeError("the WAV header sent differs from the one libsndfile wrote at the end")
        return rest

    def close(self) -> None:
        """Drop an unfinished stream."""
        try:
            self.file.close()
        except Exception:  # noqa: BLE001 - a stream given up has nothing left to report
            pass
