"""MuCodec token files (``.mct``): a small, versioned, self-checking container for codes.

Byte layout of version 2, the version written (all integers big-endian)::

    offset    size  field
    0         7     magic  b"MUCODEC"
    7         1     version = 2
    8         2     H = length of the header in bytes (uint16, at most 4096)
    10        H     header: a UTF-8 JSON object (fields below)
    10+H      P     payload: the codes bit-packed, P = ceil(bits * K * T / 8) bytes
    10+H+P    4     CRC-32 (zlib, uint32) of every byte before it: magic, version, H, header and payload

A version 2 file is therefore exactly 14 + H + P bytes, and its checksum is verified before the header
is parsed.

Version 1 (still read, no longer written) has the same first 10 + H + P bytes and no trailer; its
header carries one more required field, ``crc32``, the CRC-32 of the payload alone, so a version 1
header is not covered by any checksum.

Header fields (all required)::

    frame_rate            int    codes per second per codebook (25)                 [1, 10000]
    codebook_size         int    entries per codebook (16384); bits = ceil(log2(size)) = 14  [2, 2**32]
    num_codebooks         int    K (1)                                               [1, 64]
    num_codes             int    T, codes per codebook; K * T <= 2**24               [1, 2**24]
    sample_rate           int    rate of the audio the codes stand for (48000)       [1, 1000000]
    num_samples           int    length of that audio in samples at sample_rate (decoders cut to it);
                                 at least 1 and at most T * sample_rate / frame_rate
    duration              float  num_samples / sample_rate in seconds (informative; must agree within 1 ms)
    original_sample_rate  int or null   rate of the file the codes were made from    [1, 1000000]
    original_channels     int or null   channels of that file                        [1, 1024]
    layer                 int    MuQ encoder layer whose output was quantised (6)    [0, 1000]

The header must be a flat JSON object: no value may be an array or an object, no name may repeat,
and NaN/Infinity are refused. Readers keep fields they do not know (scalars only) in the header they
return and otherwise ignore them, so a later version may add fields.

Payload: the codes in time order (for K > 1, the K codes of frame 0, then of frame 1, ...), each
written as an unsigned ``bits``-bit integer, most significant bit first, with no gap between codes;
the last byte is padded with zero bits. At 25 Hz and 14 bits that is 43.75 bytes per second of music
(0.35 kbit/s) plus about 250 bytes of header and trailer.

Limits: the largest legal file holds 2**24 codes of 32 bits (64 MiB of payload; 186 hours at 25 Hz).
A reader refuses anything larger, and anything that is not a regular file, without reading it.

Reading never executes anything from the file (no pickle): the size, every field, the payload
length, the padding bits, the checksum and the code range are checked, and any problem raises a
:class:`~mucodec.errors.TokenFileError` whose one-sentence message names the file. Nothing is
unpacked before the header has passed every check (and, with ``expect``, matched the model).
"""
from __future__ import annotations

import json
import operator
import os
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from .errors import ArgumentError, CodesError, TokenFileError
from .files import NotRegularFile, open_regular, os_reason, write_atomic

MAGIC = b"MUCODEC"
VERSION = 2  # the version written
VERSIONS = (1, 2)  # the versions read
EXTENSION = ".mct"

_PREFIX = len(MAGIC) + 1 + 2  # magic, version byte, header length
_TRAILER = 4  # version 2: CRC-32 of everything before it
MAX_HEADER = 4096  # legitimate headers take about 250 bytes
MAX_CODES = 2 ** 24  # K * T
MAX_CODEBOOKS = 64
MAX_FILE = _PREFIX + MAX_HEADER + MAX_CODES * 32 // 8 + _TRAILER
_MAX_RATE = 1_000_000
_CHUNK = 1 << 16  # codes per step when (un)packing; a multiple of 8 so packed chunks end on a byte

# name -> (smallest, largest, may be null)
_INT_FIELDS = {
    "frame_rate": (1, 10_000, False),
    "codebook_size": (2, 2 ** 32, False),
    "num_codebooks": (1, MAX_CODEBOOKS, False),
    "num_codes": (1, MAX_CODES, False),
    "sample_rate": (1, _MAX_RATE, False),
    "num_samples": (1, MAX_CODES * _MAX_RATE, False),
    "original_sample_rate": (1, _MAX_RATE, True),
    "original_channels": (1, 1024, True),
    "layer": (0, 1000, False),
}
_V1_CRC_FIELD = ("crc32", (0, 2 ** 32 - 1, False))


def bits_per_code(codebook_size: int) -> int:
    """Bits one code takes: ceil(log2(codebook_size)), at least 1 (14 for 16384 entries)."""
    return max(1, (int(codebook_size) - 1).bit_length())


def payload_size(num_values: int, bits: int) -> int:
    """Bytes of the packed payload for ``num_values`` codes of ``bits`` bits each."""
    return (num_values * bits + 7) // 8


def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Pack non-negative integers < 2**bits <= 2**32 (1-D) MSB first into ceil(bits*n/8) bytes."""
    values = np.asarray(values).reshape(-1)
    parts = []
    # Chunked so the 32-bytes-per-code bit array stays small whatever the number of codes.
    for start in range(0, len(values), _CHUNK):
        v = np.ascontiguousarray(values[start:start + _CHUNK], dtype=">u4").view(np.uint8).reshape(-1, 4)
        parts.append(np.packbits(np.unpackbits(v, axis=1)[:, 32 - bits:].reshape(-1)).tobytes())
    return b"".join(parts)


def unpack_bits(data: bytes, num_values: int, bits: int) -> tuple[np.ndarray, bool]:
    """Inverse of :func:`pack_bits`: (int64 values of shape (n,), whether every bit after them is zero).

    ``data`` must hold at least ceil(bits*n/8) bytes. Memory: the output plus a bounded work area.
    """
    need = payload_size(num_values, bits)
    buf = np.frombuffer(data, dtype=np.uint8)
    if len(buf) < need:
        raise ValueError(f"{num_values} codes of {bits} bits need {need} bytes, got {len(buf)}")
    # A code of <= 32 bits starting at any bit lies inside the 8 bytes from its first byte on.
    padded = np.zeros(need + 8, dtype=np.uint8)
    padded[:need] = buf[:need]
    windows = np.lib.stride_tricks.sliding_window_view(padded, 8)
    out = np.empty(num_values, dtype=np.int64)
    mask = np.uint64((1 << bits) - 1)
    for start in range(0, num_values, _CHUNK):
        first_bit = np.arange(start, min(start + _CHUNK, num_values), dtype=np.uint64) * np.uint64(bits)
        word = windows[(first_bit >> np.uint64(3)).astype(np.intp)].view(">u8")[:, 0].astype(np.uint64)
        out[start:start + len(first_bit)] = (word >> (np.uint64(64 - bits) - (first_bit & np.uint64(7)))) & mask
    used = num_values * bits
    tail_clean = (used % 8 == 0 or not int(buf[need - 1]) & (0xFF >> (used % 8))) and not buf[need:].any()
    return out, bool(tail_clean)


# ---- codes ----------------------------------------------------------------------------------------

def validate_codes(codes, codebook_size: int, *, where: str = "codes",
                   num_codebooks: int | None = None) -> torch.Tensor:
    """Codes as a CPU LongTensor (1, K, T), from a torch tensor, numpy array or nested list of integers.

    Accepts shapes (T,), (K, T) and (1, K, T) and any integer dtype (uint64 included: the range is
    checked before converting, so nothing wraps). With ``num_codebooks``, K must equal it. Raises
    :class:`~mucodec.errors.CodesError` (a ``ValueError``) with one sentence starting with ``where``.
    """
    if isinstance(codes, (str, os.PathLike)):
        raise CodesError(f"{where} must be a code tensor, not the path {os.fsdecode(codes)!r}: pass the codes, "
                         f"or use load_codes(path) / code2sound(path).")
    if isinstance(codes, torch.Tensor):
        if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise CodesError(f"{where} must be integers, got {codes.dtype}: pass the LongTensor sound2code returned.")
        arr = codes.detach().cpu().numpy()
    else:
        try:
            arr = np.asarray(codes)
        except (ValueError, TypeError):
            raise CodesError(f"{where} must be an array of integers; pass the LongTensor sound2code "
                             f"returned.") from None
        if arr.dtype.kind not in "iu":
            raise CodesError(f"{where} must be integers, got dtype {arr.dtype}: pass the LongTensor sound2code "
                             f"returned.")
    shape = tuple(arr.shape)
    if arr.ndim == 3 and shape[0] == 1:
        arr = arr[0]
    elif arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or (num_codebooks is not None and arr.shape[0] != num_codebooks):
        wanted = "(1, K, T), (K, T) or (T,)" if num_codebooks is None else \
            f"(1, {num_codebooks}, T), ({num_codebooks}, T)" + (" or (T,)" if num_codebooks == 1 else "")
        raise CodesError(f"{where} must have shape {wanted}, got {shape}.")
    if arr.size == 0:
        raise CodesError(f"{where} contain no codes (shape {shape}); pass at least one code.")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= codebook_size:
        raise CodesError(f"{where} must lie in [0, {codebook_size - 1}], found values in [{lo}, {hi}]: they were "
                         f"not made by a model with a codebook of {codebook_size} entries.")
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.int64))[None]


# ---- header -----------------------------------------------------------------------------------------

def _header_problem(header: dict, version: int) -> str | None:
    """What is wrong with a parsed header (a phrase), or None: the one place header rules live."""
    fields = dict(_INT_FIELDS)
    if version == 1:
        fields.update([_V1_CRC_FIELD])
    for name, (lo, hi, nullable) in fields.items():
        if name not in header:
            return f"its header lacks the field '{name}'"
        value = header[name]
        if value is None and nullable:
            continue
        if type(value) is not int:  # bool is an int subclass but never a count
            return f"'{name}' has the invalid value {_short(value)}"
        if not lo <= value <= hi:
            return f"'{name}' is {_short(value)}, which is outside [{lo}, {hi}]"
    if "duration" not in header:
        return "its header lacks the field 'duration'"
    duration = header["duration"]
    # Comparisons, not float(): exact for ints of any size, and false for NaN.
    if type(duration) not in (int, float) or not 0 <= duration <= MAX_CODES * _MAX_RATE:
        return f"'duration' has the invalid value {_short(duration)}"
    k, t = header["num_codebooks"], header["num_codes"]
    if k * t > MAX_CODES:
        return f"{k} x {t} codes are more than a token file may hold ({MAX_CODES})"
    if header["num_samples"] * header["frame_rate"] > t * header["sample_rate"]:
        return (f"{t} codes at {header['frame_rate']} Hz cannot stand for {header['num_samples']} samples at "
                f"{header['sample_rate']} Hz")
    if abs(duration - header["num_samples"] / header["sample_rate"]) > 1e-3:
        return (f"its duration {duration} s does not match {header['num_samples']} samples at "
                f"{header['sample_rate']} Hz")
    return None


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# Escape pairs, quotes and brackets: enough to follow strings and nesting without parsing.
_STRUCTURE = re.compile(rb'\\.|["\[\]{}]', re.S)


def _is_flat(text: bytes) -> bool:
    """Whether no array or object opens inside another (outside strings), so json.loads cannot recurse.

    Stops at the second level, so a header of 4096 brackets costs two steps.
    """
    depth = 0
    in_string = False
    for match in _STRUCTURE.finditer(text):
        token = match.group()
        if token == b'"':
            in_string = not in_string
        elif in_string or len(token) == 2:
            continue
        elif token in b"[{":
            depth += 1
            if depth > 1:
                return False
        elif depth:  # a stray closing bracket is invalid JSON, and the parser stops there
            depth -= 1
    return True


class _Pairs(list):
    """The (name, value) pairs of a JSON object, kept as a list so repeated names can be seen."""


def _reject_constant(name):
    raise ValueError(f"{name} is not a number a token file may hold")


def _parse_header(text: bytes, damaged) -> dict:
    if not _is_flat(text):
        raise damaged("its header is not a flat JSON object (it nests arrays or objects)")
    try:
        pairs = json.loads(text.decode("utf-8"), object_pairs_hook=_Pairs, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise damaged("its header is not valid UTF-8 JSON") from None
    if not isinstance(pairs, _Pairs):
        raise damaged("its header is not a JSON object")
    seen = set()
    for name, _ in pairs:
        if name in seen:
            raise damaged(f"its header repeats the field {_short(name)}")
        seen.add(name)
    return dict(pairs)


def check_compatible(header: dict, expect, where) -> None:
    """Raise TokenFileError when the header of ``where`` differs from ``expect`` (field -> value) anywhere."""
    for field, ours in (expect or {}).items():
        value = header.get(field)
        if value != ours:
            raise TokenFileError(f"{where} was made with {field} {value}, but this model uses {ours}.")


# ---- bytes <-> codes ----------------------------------------------------------------------------------

def _int_or_same(value):
    if isinstance(value, (bool, np.bool_)):
        return value
    try:
        return operator.index(value)
    except TypeError:
        return value


def encode_tokens(codes, *, frame_rate: int = 25, codebook_size: int = 16384, sample_rate: int = 48000,
                  num_samples: int | None = None, original_sample_rate: int | None = None,
                  original_channels: int | None = None, layer: int = 6, where: str = "token data") -> bytes:
    """The bytes of a version-2 token file holding ``codes`` ((1, K, T), (K, T) or (T,) integers).

    ``num_samples`` is the length, at ``sample_rate``, of the audio the codes stand for; it defaults
    to T * sample_rate / frame_rate (what a decoder produces from T codes). Raises CodesError for bad
    codes and ArgumentError for a field the format cannot hold.
    """
    frame_rate, codebook_size, sample_rate = map(_int_or_same, (frame_rate, codebook_size, sample_rate))
    for name, value in (("frame_rate", frame_rate), ("codebook_size", codebook_size), ("sample_rate", sample_rate)):
        lo, hi, _ = _INT_FIELDS[name]
        if type(value) is not int or not lo <= value <= hi:
            raise ArgumentError(f"Cannot write {where}: {name} must be an integer in [{lo}, {hi}], got {value!r}.")
    arr = validate_codes(codes, codebook_size, where=f"the codes for {where}")[0].numpy()
    num_codebooks, num_codes = arr.shape
    if num_codebooks > MAX_CODEBOOKS or arr.size > MAX_CODES:
        raise CodesError(f"Cannot write {where}: {num_codebooks} x {num_codes} codes are more than a token file "
                         f"may hold ({MAX_CODEBOOKS} codebooks, {MAX_CODES} codes); split the audio.")
    if num_samples is None:
        num_samples = num_codes * sample_rate // frame_rate
    num_samples = _int_or_same(num_samples)
    header = {
        "frame_rate": frame_rate,
        "codebook_size": codebook_size,
        "num_codebooks": int(num_codebooks),
        "num_codes": int(num_codes),
        "sample_rate": sample_rate,
        "num_samples": num_samples,
        "duration": round(num_samples / sample_rate, 6) if type(num_samples) is int else None,
        "original_sample_rate": _int_or_same(original_sample_rate),
        "original_channels": _int_or_same(original_channels),
        "layer": _int_or_same(layer),
    }
    problem = _header_problem(header, VERSION)  # the writer holds itself to the reader's rules
    if problem:
        raise ArgumentError(f"Cannot write {where}: {problem}.")
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    body = MAGIC + bytes([VERSION]) + struct.pack(">H", len(text)) + text + pack_bits(arr.T.reshape(-1),
                                                                                      bits_per_code(codebook_size))
    return body + struct.pack(">I", zlib.crc32(body))


def decode_tokens(data: bytes, where: str = "token data", *, expect=None) -> tuple[torch.Tensor, dict]:
    """Parse the bytes of a token file: (codes LongTensor (1, K, T), header dict); checks everything.

    ``expect`` (field -> value, see :func:`check_compatible`) is checked once the header is valid and
    before any code is unpacked.
    """
    data = bytes(data)

    def damaged(problem: str) -> TokenFileError:
        return TokenFileError(f"{where} is damaged: {problem}; re-encode the audio.")

    if not data:
        raise TokenFileError(f"{where} is empty: it is not a MuCodec token file (re-encode the audio).")
    if data[: len(MAGIC)] != MAGIC:
        raise TokenFileError(f"{where} is not a MuCodec token file (it does not start with {MAGIC!r}).")
    if len(data) < _PREFIX:
        raise TokenFileError(f"{where} is truncated: it ends inside the file header; re-encode the audio.")
    version = data[len(MAGIC)]
    if version not in VERSIONS:
        raise TokenFileError(f"{where} has token-file version {version}, but this MuCodec reads only versions "
                             f"{', '.join(map(str, VERSIONS))}; update MuCodec.")
    if len(data) > MAX_FILE:
        raise damaged(f"it holds {len(data)} bytes, more than the largest token file ({MAX_FILE} bytes)")
    (size,) = struct.unpack(">H", data[len(MAGIC) + 1: _PREFIX])
    if size > MAX_HEADER:
        raise damaged(f"its header claims {size} bytes, more than the {MAX_HEADER} a header may take")
    trailer = _TRAILER if version >= 2 else 0
    if len(data) < _PREFIX + size + trailer:
        raise TokenFileError(f"{where} is truncated: it is too short for its {size}-byte header; re-encode the audio.")
    if trailer:
        (stored,) = struct.unpack(">I", data[-trailer:])
        if zlib.crc32(data[:-trailer]) != stored:
            raise damaged("its checksum does not match (the file was altered or cut)")
    header = _parse_header(data[_PREFIX: _PREFIX + size], damaged)
    problem = _header_problem(header, version)
    if problem:
        raise damaged(problem)
    bits = bits_per_code(header["codebook_size"])
    num_values = header["num_codebooks"] * header["num_codes"]
    payload = data[_PREFIX + size: len(data) - trailer]
    expected = payload_size(num_values, bits)
    if len(payload) != expected:
        raise damaged(f"{num_values} codes of {bits} bits need {expected} payload bytes but the file holds "
                      f"{len(payload)}")
    if version == 1 and zlib.crc32(payload) != header["crc32"]:
        raise damaged(f"the checksum of its codes does not match (CRC-32 {zlib.crc32(payload)} instead of "
                      f"{header['crc32']})")
    check_compatible(header, expect, where)
    values, padding_clean = unpack_bits(payload, num_values, bits)
    if not padding_clean:
        raise damaged("the padding bits after the last code are not zero")
    top = int(values.max())
    if top >= header["codebook_size"]:
        raise damaged(f"it holds code {top}, outside a codebook of {header['codebook_size']} entries")
    codes = values.reshape(header["num_codes"], header["num_codebooks"]).T
    return torch.from_numpy(np.ascontiguousarray(codes))[None], header


# ---- files --------------------------------------------------------------------------------------------

def _read_token_bytes(path: Path) -> bytes:
    """The bytes of ``path``, at most MAX_FILE of them; anything larger is refused unread."""
    try:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_FILE:
                if f.read(len(MAGIC)) != MAGIC:
                    raise TokenFileError(f"{path} is not a MuCodec token file (it does not start with {MAGIC!r}).")
                raise TokenFileError(f"{path} is damaged: it holds {size} bytes, more than the largest token file "
                                     f"({MAX_FILE} bytes); re-encode the audio.")
            data = f.read(MAX_FILE + 1)  # + 1: a file that grew after fstat is still caught by decode_tokens
    except NotRegularFile as e:
        raise TokenFileError(f"Cannot read token file {path}: it is {e.kind}, not a regular file.") from None
    except OSError as e:
        raise TokenFileError(f"Cannot read token file {path}: {os_reason(e)}.") from None
    return data or b""


def load_codes(path, *, expect=None) -> tuple[torch.Tensor, dict]:
    """Read the token file ``path``: (codes LongTensor (1, K, T), header dict; see the module doc).

    ``expect``: header fields the caller needs, e.g. ``{"codebook_size": 16384, "frame_rate": 25}``;
    a file made otherwise is refused (before its codes are unpacked). Raises TokenFileError (one
    sentence naming the file) when the file cannot be read, fails any check, or does not match.
    """
    path = Path(path)
    return decode_tokens(_read_token_bytes(path), where=str(path), expect=expect)


def is_token_path(path) -> bool:
    """Whether ``path`` is named like a token file (``.mct``, any case); says nothing of its content."""
    return Path(path).suffix.lower() == EXTENSION


def is_token_file(path) -> bool:
    """Whether ``path`` is a regular file starting with the token-file magic (a cheap sniff; no validation)."""
    try:
        with open_regular(path) as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:  # NotRegularFile included
        return False


def save_codes(path, codes, *, frame_rate: int = 25, codebook_size: int = 16384, sample_rate: int = 48000,
               num_samples: int | None = None, original_sample_rate: int | None = None,
               original_channels: int | None = None, layer: int = 6, before_commit=None) -> Path:
    """Write ``codes`` ((1, K, T), (K, T) or (T,) integers, T >= 1) to the token file ``path``.

    The file is written to a temporary file beside ``path`` and renamed over it, so a failure leaves
    neither a partial file nor a damaged older one. An existing file is replaced. Returns the path.
    Raises CodesError for bad codes, ArgumentError for a bad field, OutputError when writing fails.
    ``before_commit``: see :func:`files.open_atomic`.
    """
    path = Path(path)
    data = encode_tokens(codes, frame_rate=frame_rate, codebook_size=codebook_size, sample_rate=sample_rate,
                         num_samples=num_samples, original_sample_rate=original_sample_rate,
                         original_channels=original_channels, layer=layer, where=str(path))
    write_atomic(path, data, before_commit=before_commit)
    return path
