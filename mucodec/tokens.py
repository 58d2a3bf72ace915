"""MuCodec token files (``.mct``): a small, versioned, self-checking container for codes.

Byte layout of version 1 (all integers big-endian)::

    offset  size  field
    0       7     magic  b"MUCODEC"
    7       1     version = 1
    8       2     H = length of the header in bytes (uint16)
    10      H     header: a UTF-8 JSON object (fields below)
    10+H    P     payload: the codes bit-packed, P = ceil(bits * K * T / 8) bytes

Header fields (all required; readers ignore fields they do not know)::

    frame_rate            int    codes per second per codebook (25)
    codebook_size         int    number of entries per codebook (16384); bits = ceil(log2(size)) = 14
    num_codebooks         int    K (1)
    num_codes             int    T, codes per codebook (>= 1)
    sample_rate           int    rate of the audio the codes stand for (48000)
    num_samples           int    length of that audio in samples at sample_rate (decoders cut to it)
    duration              float  num_samples / sample_rate in seconds (informative, checked)
    original_sample_rate  int or null   rate of the file the codes were made from
    original_channels     int or null   channels of that file
    layer                 int    MuQ encoder layer whose output was quantised (6)
    crc32                 int    zlib CRC-32 of the payload

Payload: the codes in time order (for K > 1, the K codes of frame 0, then of frame 1, ...), each
written as an unsigned ``bits``-bit integer, most significant bit first, with no gap between codes;
the last byte is padded with zero bits. At 25 Hz and 14 bits that is 43.75 bytes per second of music
(0.35 kbit/s) plus a header of about 250 bytes.

Reading never executes anything from the file (no pickle): every field, the payload length, the
padding bits, the checksum and the code range are checked, and any problem raises a
:class:`~mucodec.errors.TokenFileError` whose one-sentence message names the file.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from .errors import TokenFileError

MAGIC = b"MUCODEC"
VERSION = 1
EXTENSION = ".mct"
_PREFIX = len(MAGIC) + 1 + 2  # magic, version byte, header length
_MAX_HEADER = 0xFFFF

# name -> (types accepted, may be null); bool is rejected separately because it is an int in Python.
_FIELDS = {
    "frame_rate": (int, False),
    "codebook_size": (int, False),
    "num_codebooks": (int, False),
    "num_codes": (int, False),
    "sample_rate": (int, False),
    "num_samples": (int, False),
    "duration": ((int, float), False),
    "original_sample_rate": (int, True),
    "original_channels": (int, True),
    "layer": (int, False),
    "crc32": (int, False),
}


def bits_per_code(codebook_size: int) -> int:
    """Bits one code takes: ceil(log2(codebook_size)), at least 1 (14 for 16384 entries)."""
    return max(1, math.ceil(math.log2(codebook_size)))


def payload_size(num_values: int, bits: int) -> int:
    """Bytes of the packed payload for ``num_values`` codes of ``bits`` bits each."""
    return (num_values * bits + 7) // 8


def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Pack non-negative integers < 2**bits (1-D) MSB first into ceil(bits*n/8) bytes."""
    v = np.ascontiguousarray(values, dtype=">u4").view(np.uint8).reshape(-1, 4)
    # Each value's 32 big-endian bits; keep the low `bits`, so the stream is just their concatenation.
    b = np.unpackbits(v, axis=1)[:, 32 - bits:]
    return np.packbits(b.reshape(-1)).tobytes()


def unpack_bits(data: bytes, num_values: int, bits: int) -> tuple[np.ndarray, bool]:
    """Inverse of :func:`pack_bits`: (int64 values of shape (n,), whether the padding bits are all zero)."""
    b = np.unpackbits(np.frombuffer(data, dtype=np.uint8))
    n = num_values * bits
    padding_clean = not b[n:].any()
    b = b[:n].reshape(num_values, bits)
    b = np.concatenate([np.zeros((num_values, 32 - bits), dtype=np.uint8), b], axis=1)
    values = np.packbits(b, axis=1).view(">u4").reshape(-1).astype(np.int64)
    return values, padding_clean


def _as_code_array(codes, codebook_size: int, where: str) -> np.ndarray:
    """Codes as an int64 array (K, T), checked for shape, integer type and range."""
    if isinstance(codes, torch.Tensor):
        if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise TokenFileError(f"Cannot write {where}: codes must be an integer tensor, got {codes.dtype}.")
        arr = codes.detach().cpu().numpy()
    else:
        arr = np.asarray(codes)
        if arr.dtype.kind not in "iu":
            raise TokenFileError(f"Cannot write {where}: codes must be integers, got dtype {arr.dtype}.")
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    elif arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2:
        raise TokenFileError(
            f"Cannot write {where}: codes must have shape (1, K, T), (K, T) or (T,), got {tuple(codes.shape)}.")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise TokenFileError(f"Cannot write {where}: there are no codes (shape {tuple(codes.shape)}).")
    arr = arr.astype(np.int64)
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= codebook_size:
        raise TokenFileError(
            f"Cannot write {where}: codes must lie in [0, {codebook_size - 1}], found values in [{lo}, {hi}].")
    return arr


def encode_tokens(codes, *, frame_rate: int = 25, codebook_size: int = 16384, sample_rate: int = 48000,
                  num_samples: int | None = None, original_sample_rate: int | None = None,
                  original_channels: int | None = None, layer: int = 6, where: str = "token data") -> bytes:
    """The bytes of a token file holding ``codes`` (LongTensor (1, K, T), (K, T) or (T,)).

    ``num_samples`` is the length, at ``sample_rate``, of the audio the codes stand for; it defaults
    to T * sample_rate / frame_rate (what a decoder produces from T codes).
    """
    for name, value in (("frame_rate", frame_rate), ("codebook_size", codebook_size), ("sample_rate", sample_rate)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise TokenFileError(f"Cannot write {where}: {name} must be a positive integer, got {value!r}.")
    if codebook_size < 2 or codebook_size > 2 ** 32:
        raise TokenFileError(f"Cannot write {where}: codebook_size must lie in [2, 2**32], got {codebook_size}.")
    arr = _as_code_array(codes, codebook_size, where)
    num_codebooks, num_codes = arr.shape
    if num_samples is None:
        num_samples = num_codes * sample_rate // frame_rate
    header = {
        "frame_rate": frame_rate,
        "codebook_size": codebook_size,
        "num_codebooks": int(num_codebooks),
        "num_codes": int(num_codes),
        "sample_rate": sample_rate,
        "num_samples": int(num_samples),
        "duration": round(int(num_samples) / sample_rate, 6),
        "original_sample_rate": None if original_sample_rate is None else int(original_sample_rate),
        "original_channels": None if original_channels is None else int(original_channels),
        "layer": int(layer),
    }
    payload = pack_bits(arr.T.reshape(-1), bits_per_code(codebook_size))
    header["crc32"] = zlib.crc32(payload)
    _check_header(header, where)  # the writer holds itself to the reader's rules
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    return MAGIC + bytes([VERSION]) + struct.pack(">H", len(text)) + text + payload


def _check_header(header, where: str) -> None:
    if not isinstance(header, dict):
        raise TokenFileError(f"{where} is damaged: its header is not a JSON object.")
    for name, (types, nullable) in _FIELDS.items():
        if name not in header:
            raise TokenFileError(f"{where} is damaged: its header lacks the field '{name}'.")
        value = header[name]
        if value is None and nullable:
            continue
        if isinstance(value, bool) or not isinstance(value, types):
            raise TokenFileError(f"{where} is damaged: header field '{name}' has the invalid value {value!r}.")
    positive = ("frame_rate", "num_codebooks", "num_codes", "sample_rate", "original_sample_rate", "original_channels")
    for name in positive:
        if header[name] is not None and header[name] < 1:
            raise TokenFileError(f"{where} is damaged: header field '{name}' must be positive, got {header[name]}.")
    for name in ("num_samples", "layer", "crc32"):
        if header[name] < 0:
            raise TokenFileError(f"{where} is damaged: header field '{name}' must not be negative, got {header[name]}.")
    if not 2 <= header["codebook_size"] <= 2 ** 32:
        raise TokenFileError(f"{where} is damaged: codebook_size {header['codebook_size']} is not in [2, 2**32].")
    if header["num_samples"] * header["frame_rate"] > header["num_codes"] * header["sample_rate"]:
        raise TokenFileError(f"{where} is damaged: {header['num_codes']} codes at {header['frame_rate']} Hz cannot "
                             f"stand for {header['num_samples']} samples at {header['sample_rate']} Hz.")
    if abs(header["duration"] - header["num_samples"] / header["sample_rate"]) > 1e-3:
        raise TokenFileError(f"{where} is damaged: its duration {header['duration']} s does not match "
                             f"{header['num_samples']} samples at {header['sample_rate']} Hz.")


def _reject_constant(name):
    raise ValueError(f"{name} is not a number a token file may hold")


def decode_tokens(data: bytes, where: str = "token data") -> tuple[torch.Tensor, dict]:
    """Parse the bytes of a token file: (codes LongTensor (1, K, T), header dict); checks everything."""
    if len(data) < len(MAGIC) or data[: len(MAGIC)] != MAGIC:
        raise TokenFileError(f"{where} is not a MuCodec token file (it does not start with {MAGIC!r}).")
    if len(data) < _PREFIX:
        raise TokenFileError(f"{where} is truncated: it ends inside the file header.")
    version = data[len(MAGIC)]
    if version != VERSION:
        raise TokenFileError(f"{where} has token-file version {version}, but this MuCodec reads only version "
                             f"{VERSION}; update MuCodec.")
    (size,) = struct.unpack(">H", data[len(MAGIC) + 1: _PREFIX])
    if len(data) < _PREFIX + size:
        raise TokenFileError(f"{where} is truncated: its header needs {size} bytes but only "
                             f"{len(data) - _PREFIX} follow.")
    try:
        header = json.loads(data[_PREFIX: _PREFIX + size].decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError):
        raise TokenFileError(f"{where} is damaged: its header is not valid UTF-8 JSON.") from None
    _check_header(header, where)
    bits = bits_per_code(header["codebook_size"])
    num_values = header["num_codebooks"] * header["num_codes"]
    payload = data[_PREFIX + size:]
    expected = payload_size(num_values, bits)
    if len(payload) != expected:
        raise TokenFileError(f"{where} is damaged: {num_values} codes of {bits} bits need {expected} payload bytes "
                             f"but the file holds {len(payload)}.")
    if zlib.crc32(payload) != header["crc32"]:
        raise TokenFileError(f"{where} is damaged: the checksum of its codes does not match (CRC-32 "
                             f"{zlib.crc32(payload)} instead of {header['crc32']}).")
    values, padding_clean = unpack_bits(payload, num_values, bits)
    if not padding_clean:
        raise TokenFileError(f"{where} is damaged: the padding bits after the last code are not zero.")
    if num_values and int(values.max()) >= header["codebook_size"]:
        raise TokenFileError(f"{where} is damaged: it holds code {int(values.max())}, outside a codebook of "
                             f"{header['codebook_size']} entries.")
    codes = torch.from_numpy(values.reshape(header["num_codes"], header["num_codebooks"]).T.copy())[None]
    return codes, header


def save_codes(path, codes, *, frame_rate: int = 25, codebook_size: int = 16384, sample_rate: int = 48000,
               num_samples: int | None = None, original_sample_rate: int | None = None,
               original_channels: int | None = None, layer: int = 6) -> Path:
    """Write ``codes`` (LongTensor (1, K, T), (K, T) or (T,), T >= 1) to the token file ``path``.

    The file is written to a temporary file beside ``path`` and renamed over it, so a failure leaves
    neither a partial file nor a damaged older one. An existing file is replaced. Returns the path.
    Raises TokenFileError for codes that are not integers or lie outside [0, codebook_size).
    """
    path = Path(path)
    data = encode_tokens(codes, frame_rate=frame_rate, codebook_size=codebook_size, sample_rate=sample_rate,
                         num_samples=num_samples, original_sample_rate=original_sample_rate,
                         original_channels=original_channels, layer=layer, where=str(path))
    write_atomic(path, data)
    return path


@contextlib.contextmanager
def open_atomic(path):
    """Binary file object whose content replaces ``path`` only when the block succeeds.

    Writes go to a hidden temporary file in the same folder (created with the usual permissions,
    0666 minus the umask), which is renamed over ``path`` at the end and removed on any failure.
    """
    path = Path(path)
    while True:
        tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_atomic(path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    try:
        with open_atomic(path) as f:
            f.write(data)
    except OSError as e:
        raise TokenFileError(f"Cannot write {path}: {e.strerror or e}.") from None


def load_codes(path) -> tuple[torch.Tensor, dict]:
    """Read the token file ``path``: (codes LongTensor (1, K, T), header dict; see the module doc).

    Raises TokenFileError (one sentence naming the file) when the file cannot be read or fails
    any check.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise TokenFileError(f"Cannot read token file {path}: {e.strerror or e}.") from None
    return decode_tokens(data, where=str(path))


def is_token_file(path) -> bool:
    """Whether ``path`` starts with the token-file magic (a cheap sniff; it does not validate)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False
