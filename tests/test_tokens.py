"""The token file format (mucodec/tokens.py): exact round trips, exact sizes, and every rejection."""
from __future__ import annotations

import json
import math
import os
import random
import stat
import struct
import threading
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from mucodec import files, tokens
from mucodec.errors import ArgumentError, CodesError, OutputError, StorageError, TokenFileError
from mucodec.tokens import (EXTENSION, MAGIC, MAX_FILE, MAX_HEADER, VERSION, bits_per_code, check_compatible,
                            decode_tokens, encode_tokens, is_token_file, is_token_path, load_codes, pack_bits,
                            save_codes, unpack_bits, validate_codes)

PREFIX = len(MAGIC) + 3
TRAILER = 4
FIELDS = ("frame_rate", "codebook_size", "sample_rate", "num_samples", "original_sample_rate", "original_channels",
          "layer")


def header_size(data: bytes) -> int:
    return PREFIX + struct.unpack(">H", data[len(MAGIC) + 1:PREFIX])[0]


def split(data: bytes) -> tuple[dict, bytes]:
    """(header, payload) of a file of either version."""
    h = header_size(data)
    return json.loads(data[PREFIX:h]), data[h:len(data) - (TRAILER if data[len(MAGIC)] >= 2 else 0)]


def build(header, payload: bytes, version: int = VERSION, text: bytes | None = None) -> bytes:
    """A file from its parts; version 2 gets a correct trailer, so only the reader's checks stand in the way."""
    text = json.dumps(header).encode() if text is None else text
    body = MAGIC + bytes([version]) + struct.pack(">H", len(text)) + text + payload
    return body + struct.pack(">I", zlib.crc32(body)) if version >= 2 else body


def as_version(data: bytes, version: int) -> bytes:
    header, payload = split(data)
    if version == 1:
        header["crc32"] = zlib.crc32(payload)
    return build(header, payload, version)


@pytest.mark.parametrize("T", [1, 7, 8, 9, 1000, 100_000])
def test_round_trip_and_exact_size(tmp_path, T):
    codes = torch.randint(0, 16384, (1, 1, T), generator=torch.Generator().manual_seed(T))
    codes[0, 0, 0] = 16383  # the largest code uses all 14 bits
    path = save_codes(tmp_path / f"x{EXTENSION}", codes, num_samples=(T - 1) * 1920 + 7,
                      original_sample_rate=44100, original_channels=1)
    data = path.read_bytes()
    assert data[len(MAGIC)] == VERSION == 2
    assert len(data) == header_size(data) + math.ceil(14 * T / 8) + TRAILER
    assert header_size(data) < 300
    assert data[-TRAILER:] == struct.pack(">I", zlib.crc32(data[:-TRAILER]))
    back, header = load_codes(path)
    assert back.dtype == torch.int64 and back.shape == (1, 1, T)
    assert torch.equal(back, codes)
    assert header["num_codes"] == T and header["num_samples"] == (T - 1) * 1920 + 7
    assert header["frame_rate"] == 25 and header["codebook_size"] == 16384 and header["num_codebooks"] == 1
    assert header["sample_rate"] == 48000 and header["layer"] == 6
    assert header["original_sample_rate"] == 44100 and header["original_channels"] == 1
    assert header["duration"] == pytest.approx(header["num_samples"] / 48000, abs=1e-6)
    assert is_token_file(path) and is_token_path(path)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_bit_layout_is_msb_first():
    # 14-bit codes 0b10000000000001 and 0b11111111111111 -> 28 bits + 4 zero padding bits.
    assert pack_bits(np.array([0x2001, 0x3FFF]), 14) == bytes([0b10000000, 0b00000111, 0b11111111, 0b11110000])
    values, clean = unpack_bits(bytes([0b10000000, 0b00000111, 0b11111111, 0b11110000]), 2, 14)
    assert values.tolist() == [0x2001, 0x3FFF] and clean
    assert not unpack_bits(bytes([0b10000000, 0b00000111, 0b11111111, 0b11111000]), 2, 14)[1]


@pytest.mark.parametrize("bits", range(1, 33))
def test_pack_unpack_every_width_across_chunks(bits):
    n = tokens._CHUNK + 13  # crosses a chunk boundary with a ragged last chunk
    values = np.random.default_rng(bits).integers(0, 2 ** bits, n, dtype=np.int64)
    values[:2] = [0, 2 ** bits - 1]
    packed = pack_bits(values, bits)
    assert len(packed) == math.ceil(n * bits / 8)
    back, clean = unpack_bits(packed, n, bits)
    assert clean and back.dtype == np.int64 and np.array_equal(back, values)


@pytest.mark.parametrize("size", [2, 3, 1000, 16384, 65536, 2 ** 20 + 1, 2 ** 32])
def test_other_codebook_sizes_and_codebooks(size):
    gen = torch.Generator().manual_seed(size % 1000)
    codes = (torch.rand(1, 3, 11, generator=gen, dtype=torch.float64) * size).long()
    data = encode_tokens(codes, codebook_size=size)
    assert len(data) - header_size(data) - TRAILER == math.ceil(bits_per_code(size) * 33 / 8)
    back, header = decode_tokens(data)
    assert torch.equal(back, codes) and header["num_codebooks"] == 3


def test_accepts_flat_shapes_and_numpy():
    codes = np.arange(20, dtype=np.int32)
    for c in (codes, codes[None], torch.from_numpy(codes)[None, None], torch.from_numpy(codes).to(torch.int16)):
        back, _ = decode_tokens(encode_tokens(c))
        assert back.tolist() == [[list(range(20))]]


def test_pack_speed_100k_codes():
    codes = torch.randint(0, 16384, (1, 1, 100_000))
    start = time.perf_counter()
    back, _ = decode_tokens(encode_tokens(codes))
    elapsed = time.perf_counter() - start
    assert torch.equal(back, codes)
    assert elapsed < 0.5, f"100k codes took {elapsed:.3f} s to pack and unpack"


def test_one_hour_file_loads_in_milliseconds(tmp_path):
    codes = torch.randint(0, 16384, (1, 1, 90_000))
    path = save_codes(tmp_path / "hour.mct", codes)
    load_codes(path)  # warm up
    start = time.perf_counter()
    back, header = load_codes(path)
    elapsed = time.perf_counter() - start
    assert torch.equal(back, codes) and header["duration"] == 3600
    assert elapsed < 0.05, f"a 1-hour token file took {elapsed * 1000:.1f} ms to load"


# ---- codes: one validator for every caller -------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32, np.uint64, np.int8, np.int16, np.int32, np.int64])
def test_validate_codes_accepts_every_integer_dtype(dtype):
    arr = np.array([0, 5, 100], dtype=dtype)
    for c in (arr, torch.from_numpy(arr)):
        out = validate_codes(c, 128)
        assert out.dtype == torch.int64 and out.shape == (1, 1, 3) and out.tolist() == [[[0, 5, 100]]]
    assert validate_codes(arr.reshape(1, 3), 128).shape == (1, 1, 3)
    assert validate_codes(np.zeros((1, 2, 4), dtype), 128).shape == (1, 2, 4)
    assert validate_codes([[1, 2], [3, 4]], 128, num_codebooks=2).tolist() == [[[1, 2], [3, 4]]]


@pytest.mark.parametrize("codes, words", [
    (torch.tensor([[[0, 16384]]]), "[0, 16383]"),
    (torch.tensor([[[-1, 5]]]), "[0, 16383]"),
    (np.array([1, 2 ** 63 + 5], dtype=np.uint64), "9223372036854775813"),  # would wrap to a negative int64
    (torch.tensor([2 ** 64 - 1], dtype=torch.uint64), "18446744073709551615"),
    (torch.tensor([[[0.0, 1.0]]]), "integer"),
    (np.array([1.0, 2.0]), "integers"),
    (torch.tensor([True, False]), "integer"),
    (np.array([1 + 2j]), "integers"),
    ([1, 2 ** 70], "integers"),
    ([[1, 2], [3]], "integers"),
    (torch.zeros(1, 1, 0, dtype=torch.long), "no codes"),
    (np.zeros((2, 0), dtype=np.int64), "no codes"),
    (torch.zeros(2, 1, 5, dtype=torch.long), "shape"),
    (torch.zeros(1, 1, 1, 5, dtype=torch.long), "shape"),
    ("song.mct", "load_codes(path)"),
    (Path("song.mct"), "code2sound(path)"),
])
def test_bad_codes_are_one_codes_error(tmp_path, codes, words):
    with pytest.raises(CodesError) as e:
        validate_codes(codes, 16384)
    msg = str(e.value)
    assert isinstance(e.value, ValueError) and words in msg and msg.startswith("codes ") and msg.endswith(".")
    assert "\n" not in msg
    path = tmp_path / "bad.mct"  # save_codes uses the same validator and writes nothing
    with pytest.raises(CodesError) as e:
        save_codes(path, codes)
    assert words in str(e.value) and str(path) in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_validate_codes_can_require_the_number_of_codebooks():
    assert validate_codes(torch.arange(4), 16, num_codebooks=1).shape == (1, 1, 4)
    with pytest.raises(CodesError, match=r"shape \(1, 1, T\)"):
        validate_codes(torch.zeros(1, 2, 4, dtype=torch.long), 16, num_codebooks=1)


def test_codes_errors_name_the_caller():
    with pytest.raises(CodesError, match="^the codes of song 3 must lie"):
        validate_codes([99], 16, where="the codes of song 3")


@pytest.mark.parametrize("change, words", [
    (dict(sample_rate=0), "sample_rate"), (dict(frame_rate=25.0), "frame_rate"), (dict(codebook_size=1), "codebook"),
    (dict(layer=-1), "'layer'"), (dict(num_samples=10 ** 9), "cannot stand for"),
    (dict(original_channels=0), "channels"),
])
def test_fields_the_format_cannot_hold_are_argument_errors(tmp_path, change, words):
    with pytest.raises(ArgumentError, match=words):
        save_codes(tmp_path / "x.mct", [1, 2, 3], **change)
    assert list(tmp_path.iterdir()) == []


def test_numpy_integers_are_fine_as_fields():
    data = encode_tokens([1, 2], sample_rate=np.int64(48000), num_samples=np.int32(3000), layer=np.uint8(6))
    assert decode_tokens(data)[1]["num_samples"] == 3000


# ---- writing: atomic, and every failure is one OutputError ---------------------------------------------

def test_save_replaces_atomically_and_failure_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "x.mct"
    save_codes(path, torch.tensor([1, 2, 3]))
    old = path.read_bytes()

    def broken(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("mucodec.files.os.replace", broken)
    with pytest.raises(StorageError, match=f"^Cannot write {path}: no space is left on {tmp_path}; free space on "
                                           f"{tmp_path}, or choose another output folder, and run the same "
                                           "command again.$"):
        save_codes(path, torch.tensor([4, 5, 6]))
    assert path.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.mct"]  # the temporary file is gone
    monkeypatch.undo()
    save_codes(path, torch.tensor([4, 5, 6]))
    assert load_codes(path)[0].tolist() == [[[4, 5, 6]]]


def test_open_atomic_leaves_nothing_behind_and_reports_its_own_failures(tmp_path):
    for error in (OSError(5, "Input/output error"), KeyError("a bug stays a bug")):
        with pytest.raises(type(error)) as e:  # the caller's own errors pass through unchanged
            with files.open_atomic(tmp_path / "a.wav") as f:
                f.write(b"half")
                raise error
        assert e.value is error
    assert list(tmp_path.iterdir()) == []

    with files.inject_fault(after=2), pytest.raises(StorageError, match=f"^Cannot write {tmp_path / 'b.mct'}: no "
                                                                        "space is left on "):
        files.write_atomic(tmp_path / "b.mct", b"data")
    assert list(tmp_path.iterdir()) == []


def test_save_into_missing_folder_says_to_create_it(tmp_path):
    path = tmp_path / "nope" / "x.mct"
    with pytest.raises(OutputError) as e:
        save_codes(path, torch.tensor([1]))
    assert str(e.value) == f"Cannot write {path}: No such file or directory (create the folder {path.parent} first)."


def test_permission_denied_on_write_is_reported_as_is(tmp_path, monkeypatch):
    real_open = os.open

    def denied(p, *a, **k):
        if Path(p).parent == tmp_path:
            raise PermissionError(13, "Permission denied")
        return real_open(p, *a, **k)

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(OutputError, match=f"^Cannot write {tmp_path / 'x.mct'}: Permission denied.$"):
        save_codes(tmp_path / "x.mct", torch.tensor([1]))
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("stem", ["a" * 236, "é" * 123, "音" * 82])  # 240 characters, 250 and 250 bytes
def test_long_file_names_round_trip(tmp_path, stem):
    path = tmp_path / (stem + ".mct")
    assert len(os.fsencode(path.name)) <= 255
    save_codes(path, torch.tensor([7, 8, 9]))
    assert load_codes(path)[0].tolist() == [[[7, 8, 9]]]
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    names = {files.temporary_name(path.name) for _ in range(50)}
    assert len(names) == 50 and all(n.startswith(".") and len(os.fsencode(n)) <= 255 for n in names)


def test_a_name_too_long_for_the_file_system_is_one_output_error(tmp_path):
    path = tmp_path / ("a" * 300 + ".mct")
    with pytest.raises(OutputError, match="File name too long"):
        save_codes(path, torch.tensor([1]))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(TokenFileError, match="File name too long"):
        load_codes(path)


# ---- reading: every kind of damage is one sentence naming the file ----------------------------

CODES = list(range(0, 16384, 43))  # 382 codes: 5348 bits, so the last byte has 4 padding bits


def good_bytes(version: int = VERSION) -> bytes:
    data = encode_tokens(torch.tensor(CODES), num_samples=480000, original_sample_rate=44100, original_channels=2)
    return as_version(data, version)


def damaged(good: bytes, version: int):
    header, payload = split(good)

    def with_header(**change):
        h = dict(header)
        for k, v in change.items():
            if v is KeyError:
                h.pop(k)
            else:
                h[k] = v
        return build(h, payload, version)

    over = pack_bits(np.array([65535]), 16)  # a 16-bit code that a 65535-entry codebook cannot hold
    padded = bytearray(payload)
    padded[-1] |= 1
    text = json.dumps(header).encode()
    cases = {
        "empty file": (b"", "is empty: it is not a MuCodec token file"),
        "bad magic": (b"RIFF" + good[4:], "not a MuCodec token file"),
        "magic only": (MAGIC, "truncated"),
        "unknown version": (MAGIC + bytes([3]) + good[len(MAGIC) + 1:], "version 3"),
        "version zero": (MAGIC + bytes([0]) + good[len(MAGIC) + 1:], "version 0"),
        "truncated header": (good[:PREFIX + 20], "truncated"),
        "header too long": (good[:len(MAGIC) + 1] + struct.pack(">H", MAX_HEADER + 1) + good[PREFIX:], "claims 4097"),
        "bad json": (build(None, payload, version, b"{" * len(text)), "JSON"),
        "not utf8": (build(None, payload, version, b"\xff" * len(text)), "JSON"),
        "json list": (build([1, 2], payload, version), "JSON object"),
        "json string": (build("hi", payload, version), "JSON object"),
        "deep nesting": (build(None, payload, version, b"[" * 4000 + b"]" * 96), "flat JSON object"),
        "deep objects": (build(None, payload, version, b'{"a":' * 800), "flat JSON object"),
        "nested value": (with_header(layer=[6]), "flat JSON object"),
        "nested unknown field": (with_header(extra={"a": 1}), "flat JSON object"),
        "repeated field": (build(None, payload, version, text[:-1] + b', "layer": 6}'), "repeats the field 'layer'"),
        "missing field": (with_header(num_codes=KeyError), "'num_codes'"),
        "string field": (with_header(codebook_size="16384"), "'codebook_size'"),
        "float field": (with_header(num_codes=400.0), "'num_codes'"),
        "bool field": (with_header(layer=True), "'layer'"),
        "null field": (with_header(frame_rate=None), "'frame_rate'"),
        "zero codes": (with_header(num_codes=0), "'num_codes'"),
        "negative layer": (with_header(layer=-1), "'layer'"),
        "huge layer": (with_header(layer=10 ** 400), "'layer'"),
        "tiny codebook": (with_header(codebook_size=1), "codebook_size"),
        "codebook over 2**32": (with_header(codebook_size=2 ** 32 + 1), "codebook_size"),
        "too many codebooks": (with_header(num_codebooks=65), "'num_codebooks'"),
        "too many codes": (with_header(num_codebooks=64, num_codes=2 ** 18 + 1), "more than a token file may hold"),
        "huge sample rate": (with_header(sample_rate=10 ** 7), "'sample_rate'"),
        "zero samples": (with_header(num_samples=0, duration=0), "'num_samples'"),
        "wrong duration": (with_header(duration=99.0), "duration"),
        "string duration": (with_header(duration="10"), "duration"),
        "huge duration": (with_header(duration=10 ** 400), "duration"),
        "infinite duration": (build(None, payload, version, text.replace(b'"duration": 10.0', b'"duration": 1e999')),
                              "duration"),
        "nan duration": (with_header(duration=float("nan")), "JSON"),
        "too many samples": (with_header(num_samples=10 ** 9, duration=10 ** 9 / 48000), "cannot stand for"),
        "more codes than payload": (with_header(num_codes=header["num_codes"] + 1), "payload bytes"),
        "payload cut": (build(header, payload[:-1], version), "payload bytes"),
        "payload extra": (build(header, payload + b"\0", version), "payload bytes"),
        "padding bits": (build(dict(header, crc32=zlib.crc32(padded)), bytes(padded), version), "padding"),
        "code out of range": (build(dict(header, num_codes=1, codebook_size=65535, num_samples=1920, duration=0.04,
                                         crc32=zlib.crc32(over)), over, version), "outside a codebook"),
    }
    if version == 1:
        cases.update({
            "missing crc": (with_header(crc32=KeyError), "'crc32'"),
            "checksum": (good[:-2] + bytes([good[-2] ^ 0x10]) + good[-1:], "checksum"),
            "payload cut unsealed": (good[:-1], "payload bytes"),
        })
    else:
        cases.update({
            "checksum of payload": (good[:-6] + bytes([good[-6] ^ 0x10]) + good[-5:], "checksum"),
            "checksum of header": (good.replace(b'"layer": 6', b'"layer": 7'), "checksum"),
            "trailer flipped": (good[:-1] + bytes([good[-1] ^ 1]), "checksum"),
            "cut in the trailer": (good[:-1], "checksum"),
            "cut in the payload": (good[:-9], "checksum"),
            "no trailer": (good[:-TRAILER], "checksum"),
            "cut right after the header": (good[:header_size(good) + 2], "truncated"),
            "extra byte": (good + b"\0", "checksum"),
        })
    return cases


CASES = [(v, case) for v in (1, 2) for case in damaged(good_bytes(v), v)]


@pytest.mark.parametrize("version, case", CASES)
def test_load_rejects_damage_with_one_sentence(tmp_path, version, case):
    data, words = damaged(good_bytes(version), version)[case]
    path = tmp_path / "song.mct"
    path.write_bytes(data)
    with pytest.raises(TokenFileError) as e:
        load_codes(path)
    msg = str(e.value)
    assert words in msg, msg
    assert msg.startswith(str(path)) and "\n" not in msg and msg.endswith(".") and len(msg) < 300 + len(str(path))


@pytest.mark.parametrize("version", [1, 2])
def test_the_untouched_file_loads(version):
    codes, header = decode_tokens(good_bytes(version))
    assert codes.tolist() == [[CODES]]
    assert header["original_sample_rate"] == 44100
    assert ("crc32" in header) == (version == 1)


def test_version_1_header_is_not_covered_but_version_2_is():
    # The reason for version 2: the same edit of a header goes unnoticed in version 1.
    v1, v2 = (good_bytes(v).replace(b'"layer": 6', b'"layer": 7') for v in (1, 2))
    assert decode_tokens(v1)[1]["layer"] == 7
    with pytest.raises(TokenFileError, match="checksum"):
        decode_tokens(v2)


@pytest.mark.parametrize("version", [1, 2])
def test_unknown_scalar_header_fields_are_kept_and_ignored(version):
    good = good_bytes(version)
    header, payload = split(good)
    extra = {"comment": "made on a Tuesday [live] {take 2} \" \\", "rating": 4.5, "tags": None}
    codes, back = decode_tokens(build(dict(header, **extra), payload, version))
    assert torch.equal(codes, decode_tokens(good)[0]) and all(back[k] == v for k, v in extra.items())


def test_missing_file_is_one_clear_error(tmp_path):
    with pytest.raises(TokenFileError, match="^Cannot read token file .*nope.mct: No such file or directory.$"):
        load_codes(tmp_path / "nope.mct")


def test_reader_never_unpickles(tmp_path):
    # A torch.save / pickle file must be refused by the magic check, not executed.
    path = tmp_path / "evil.mct"
    torch.save({"codes": torch.arange(3)}, path)
    with pytest.raises(TokenFileError, match="not a MuCodec token file"):
        load_codes(path)
    assert not is_token_file(path)


def test_token_paths_are_known_by_their_extension(tmp_path):
    assert is_token_path("a.mct") and is_token_path("a.MCT") and is_token_path(Path("x/y.Mct"))
    assert not is_token_path("a.wav") and not is_token_path("mct") and not is_token_path("a.mct.wav")
    empty = tmp_path / "empty.mct"
    empty.touch()
    assert is_token_path(empty) and not is_token_file(empty)
    with pytest.raises(TokenFileError) as e:
        load_codes(empty)
    assert str(e.value) == f"{empty} is empty: it is not a MuCodec token file (re-encode the audio)."


# ---- reading: compatibility is decided before anything is unpacked ----------------------------

OURS = {"frame_rate": 25, "codebook_size": 16384, "sample_rate": 48000, "layer": 6, "num_codebooks": 1}


def test_mismatching_expect_raises_before_unpacking(tmp_path, monkeypatch):
    # Two-entry codebooks: 1 bit per code, so the codes take 64 times the file's size once unpacked.
    path = save_codes(tmp_path / "tiny.mct", torch.zeros(200_000, dtype=torch.long), codebook_size=2)

    def must_not_unpack(*a, **k):
        raise AssertionError("unpacked the payload before checking compatibility")

    monkeypatch.setattr(tokens, "unpack_bits", must_not_unpack)
    with pytest.raises(TokenFileError) as e:
        load_codes(path, expect=OURS)
    assert str(e.value) == f"{path} was made with codebook_size 2, but this model uses 16384."
    monkeypatch.undo()
    assert load_codes(path, expect=dict(OURS, codebook_size=2))[0].shape == (1, 1, 200_000)


@pytest.mark.parametrize("field, value", [("frame_rate", 50), ("sample_rate", 44100), ("layer", 7)])
def test_every_expected_field_is_checked(field, value):
    data = encode_tokens([1, 2, 3], **{field: value})
    with pytest.raises(TokenFileError, match=f"^x.mct was made with {field} {value}, but this model uses "):
        decode_tokens(data, "x.mct", expect=OURS)
    assert decode_tokens(data, expect={field: value})[0].tolist() == [[[1, 2, 3]]]


def test_check_compatible_is_silent_when_everything_matches():
    header = decode_tokens(encode_tokens([[1, 2], [3, 4]]))[1]
    check_compatible(header, dict(OURS, num_codebooks=2), "x")
    check_compatible(header, None, "x")
    with pytest.raises(TokenFileError, match="^x was made with num_codebooks 2, but this model uses 1.$"):
        check_compatible(header, OURS, "x")


# ---- reading: only regular files, and never more than a token file can hold ---------------------

def load_within(path, seconds: float = 5.0):
    """load_codes(path) in a thread, so a reader that blocks fails the test instead of hanging it."""
    result = {}

    def target():
        try:
            result["value"] = load_codes(path)
        except BaseException as e:  # handed to the test thread
            result["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"load_codes({path}) blocked"
    if "error" in result:
        raise result["error"]
    return result["value"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_a_named_pipe_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.mct"
    os.mkfifo(fifo)
    with pytest.raises(TokenFileError) as e:
        load_within(fifo)
    assert str(e.value) == f"Cannot read token file {fifo}: it is a named pipe, not a regular file."
    start = time.perf_counter()
    assert not is_token_file(fifo)
    assert time.perf_counter() - start < 1


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero here")
def test_a_device_is_refused_without_reading_it():
    with pytest.raises(TokenFileError, match="^Cannot read token file /dev/zero: it is a device, not a regular file.$"):
        load_within("/dev/zero")
    assert not is_token_file("/dev/zero")


def test_a_folder_is_refused(tmp_path):
    folder = tmp_path / "songs.mct"
    folder.mkdir()
    with pytest.raises(TokenFileError, match="it is a folder, not a regular file.$"):
        load_codes(folder)
    assert not is_token_file(folder)


def test_permission_denied_on_read_is_reported_as_is(tmp_path, monkeypatch):
    path = save_codes(tmp_path / "x.mct", torch.tensor([1]))
    path.chmod(0)
    if os.access(path, os.R_OK):  # as root, chmod does not stop reading: simulate the refusal instead
        real_open = os.open

        def denied(p, *a, **k):
            if Path(p) == path:
                raise PermissionError(13, "Permission denied")
            return real_open(p, *a, **k)

        monkeypatch.setattr(os, "open", denied)
    with pytest.raises(TokenFileError) as e:
        load_codes(path)
    assert str(e.value) == f"Cannot read token file {path}: Permission denied."
    assert not is_token_file(path)
    path.chmod(stat.S_IRUSR | stat.S_IWUSR)


@pytest.mark.parametrize("start, words", [(MAGIC + bytes([2]), "more than the largest token file"),
                                          (b"RIFF", "not a MuCodec token file")])
def test_a_file_larger_than_any_token_file_is_refused_unread(tmp_path, start, words):
    path = tmp_path / "big.mct"
    with open(path, "wb") as f:  # sparse: 1 GiB that takes no disk and would take seconds to read
        f.write(start)
        f.truncate(2 ** 30)
    begin = time.perf_counter()
    with pytest.raises(TokenFileError, match=words):
        load_codes(path)
    assert time.perf_counter() - begin < 0.2
    with pytest.raises(TokenFileError, match="more than the largest"):
        decode_tokens(MAGIC + bytes([2]) + bytes(MAX_FILE))


# ---- fuzz: whatever the bytes, the reader either loads valid codes or raises TokenFileError ------

def seed_files() -> list[bytes]:
    rng = np.random.default_rng(0)
    files = []
    for size, k, t in [(2, 1, 1), (3, 2, 5), (1000, 1, 40), (16384, 1, 50), (16384, 3, 9), (2 ** 32, 1, 6)]:
        codes = torch.from_numpy(rng.integers(0, size, (1, k, t), dtype=np.int64))
        data = encode_tokens(codes, codebook_size=size, num_samples=t * 1920 - 5, original_sample_rate=44100)
        files += [data, as_version(data, 1)]
    return files


def random_json(rng: random.Random, depth: int = 0):
    kind = rng.randrange(12)
    if kind == 0:
        return rng.choice([-1, 1]) * rng.choice([2 ** rng.randrange(130), 10 ** rng.randrange(1, 1300)])
    if kind == 1:
        return rng.randrange(-3, 70000)
    if kind == 2:
        return rng.choice([0.0, -0.5, 1.5, 25.0, 1e308, -1e-300, rng.uniform(-1e6, 1e6)])
    if kind == 3:
        return rng.choice(["NaN", "Infinity", "-Infinity", "", "25", "16384", "\u0000", "é" * 50])
    if kind == 4:
        return rng.choice([True, False, None])
    if kind == 5 and depth < 3:
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(3))]
    if kind == 6 and depth < 3:
        return {str(rng.randrange(9)): random_json(rng, depth + 1) for _ in range(rng.randrange(3))}
    if kind == 7:
        return rng.choice([[[[[1]]]], {"a": {"b": {"c": []}}}, [], {}])
    return rng.randrange(0, 100)


def mutate(rng: random.Random, data: bytes) -> bytes:
    version = data[len(MAGIC)]
    header, payload = split(data)
    seal = rng.random() < 0.7  # re-seal version 2 so the mutation gets past the checksum to the other checks

    def sealed(raw: bytes) -> bytes:
        if version >= 2 and seal and len(raw) >= TRAILER:
            return raw[:-TRAILER] + struct.pack(">I", zlib.crc32(raw[:-TRAILER]))
        return raw

    kind = rng.randrange(10)
    if kind == 0:  # bit flips
        raw = bytearray(data)
        for _ in range(rng.randrange(1, 4)):
            raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
        return sealed(bytes(raw))
    if kind == 1:  # truncation
        return sealed(data[:rng.randrange(len(data))])
    if kind == 2:  # insertion
        at = rng.randrange(len(data) + 1)
        return sealed(data[:at] + rng.randbytes(rng.randrange(1, 9)) + data[at:])
    if kind in (3, 4):  # one field replaced, removed or added
        name = rng.choice(list(header) + ["extra", "num_codes", "codebook_size", "num_samples"])
        if rng.random() < 0.1:
            header.pop(name, None)
        else:
            header[name] = random_json(rng)
        return build(header, payload, version)
    if kind == 5:  # consistent-looking but different numbers: may well load, and must then re-encode
        header["codebook_size"] = rng.choice([2, 3, 255, 16384, 65536, 2 ** 32])
        header["num_codebooks"] = rng.choice([1, 2, 3])
        header["num_codes"] = max(1, len(payload) * 8 // bits_per_code(header["codebook_size"])
                                  // header["num_codebooks"] - rng.randrange(2))
        if version == 1:
            header["crc32"] = zlib.crc32(payload)
        return build(header, payload, version)
    if kind == 6:  # the header text replaced by nesting, garbage or near-JSON
        text = rng.choice([b"[" * rng.randrange(1, 5000), b'{"a":' * rng.randrange(1, 900), rng.randbytes(40),
                           json.dumps(header).encode()[:-rng.randrange(1, 5)], b"{}", b"null", b'{"a":1,"a":1}',
                           json.dumps(dict(header, **{rng.choice(list(header)): float("nan")})).encode()])
        return build(None, payload, version, text[:0xFFFF])
    if kind == 7:  # the header length field
        return sealed(data[:len(MAGIC) + 1] + struct.pack(">H", rng.randrange(0x10000)) + data[PREFIX:])
    if kind == 8:  # random payload of the right length
        payload = rng.randbytes(len(payload))
        if version == 1:
            header["crc32"] = zlib.crc32(payload)
        return build(header, payload, version)
    return rng.choice([b"", MAGIC, MAGIC + bytes([rng.choice([1, 2, 3])])]) + rng.randbytes(rng.randrange(64))


def test_fuzz_the_reader():
    rng = random.Random(20240611)
    seeds = seed_files()
    outcomes = {"loaded": 0, "refused": 0}
    start = time.perf_counter()
    for i in range(12_000):
        data = mutate(rng, rng.choice(seeds))
        traced = i % 4 == 0  # tracing every case would triple the run time
        if traced:
            tracemalloc.start()
        try:
            codes, header = decode_tokens(data, "fuzz.mct")
        except TokenFileError as e:
            msg = str(e)
            assert msg.startswith("fuzz.mct ") and msg.endswith(".") and "\n" not in msg, (i, msg)
            outcomes["refused"] += 1
            continue
        finally:
            if traced:
                peak = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
                # Fixed costs (JSON, regex) plus at most int64 codes for 1-bit codes: 64 bytes per file byte.
                assert peak < 2 ** 18 + 80 * len(data), (i, peak, len(data))
        outcomes["loaded"] += 1
        assert codes.dtype == torch.int64 and codes.numel() <= 8 * len(data)
        again, header_again = decode_tokens(encode_tokens(codes, **{k: header[k] for k in FIELDS}))
        assert torch.equal(again, codes), i
        assert all(header_again[k] == header[k] for k in FIELDS + ("num_codebooks", "num_codes")), i
        assert abs(header_again["duration"] - header["duration"]) <= 1e-3, i
    elapsed = time.perf_counter() - start
    assert outcomes["loaded"] > 500 and outcomes["refused"] > 8000, outcomes
    print(f"fuzz: {sum(outcomes.values())} cases in {elapsed:.2f} s, {outcomes}")


def test_unpacking_memory_is_proportional_to_the_codes():
    n = 2 ** 20
    data = encode_tokens(torch.ones(n, dtype=torch.long), codebook_size=2)  # 128 KiB of 1-bit codes
    tracemalloc.start()
    try:
        codes, _ = decode_tokens(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert codes.sum() == n
    # The int64 codes plus a bounded work area; unpacking bit by bit would take 4 times as much.
    assert peak < 1.5 * 8 * n, f"unpacking {8 * n} bytes of codes peaked at {peak} bytes"
