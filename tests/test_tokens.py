"""The token file format (mucodec/tokens.py): exact round trips, exact sizes, and every rejection."""
from __future__ import annotations

import json
import math
import struct
import time
import zlib

import numpy as np
import pytest
import torch

from mucodec.errors import TokenFileError
from mucodec.tokens import (EXTENSION, MAGIC, VERSION, bits_per_code, decode_tokens, encode_tokens, is_token_file,
                            load_codes, pack_bits, save_codes, unpack_bits)

PREFIX = len(MAGIC) + 3


def header_size(data: bytes) -> int:
    return PREFIX + struct.unpack(">H", data[len(MAGIC) + 1:PREFIX])[0]


def rebuild(header: dict, payload: bytes, version: int = VERSION) -> bytes:
    text = json.dumps(header).encode()
    return MAGIC + bytes([version]) + struct.pack(">H", len(text)) + text + payload


def split(data: bytes) -> tuple[dict, bytes]:
    h = header_size(data)
    return json.loads(data[PREFIX:h]), data[h:]


@pytest.mark.parametrize("T", [1, 7, 8, 9, 1000, 100_000])
def test_round_trip_and_exact_size(tmp_path, T):
    codes = torch.randint(0, 16384, (1, 1, T), generator=torch.Generator().manual_seed(T))
    codes[0, 0, 0] = 16383  # the largest code uses all 14 bits
    path = save_codes(tmp_path / f"x{EXTENSION}", codes, num_samples=(T - 1) * 1920 + 7,
                      original_sample_rate=44100, original_channels=1)
    data = path.read_bytes()
    assert len(data) == header_size(data) + math.ceil(14 * T / 8)
    assert header_size(data) < 300
    back, header = load_codes(path)
    assert back.dtype == torch.int64 and back.shape == (1, 1, T)
    assert torch.equal(back, codes)
    assert header["num_codes"] == T and header["num_samples"] == (T - 1) * 1920 + 7
    assert header["frame_rate"] == 25 and header["codebook_size"] == 16384 and header["num_codebooks"] == 1
    assert header["sample_rate"] == 48000 and header["layer"] == 6
    assert header["original_sample_rate"] == 44100 and header["original_channels"] == 1
    assert header["duration"] == pytest.approx(header["num_samples"] / 48000, abs=1e-6)
    assert is_token_file(path)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_bit_layout_is_msb_first():
    # 14-bit codes 0b10000000000001 and 0b11111111111111 -> 28 bits + 4 zero padding bits.
    assert pack_bits(np.array([0x2001, 0x3FFF]), 14) == bytes([0b10000000, 0b00000111, 0b11111111, 0b11110000])
    values, clean = unpack_bits(bytes([0b10000000, 0b00000111, 0b11111111, 0b11110000]), 2, 14)
    assert values.tolist() == [0x2001, 0x3FFF] and clean


@pytest.mark.parametrize("size", [2, 3, 1000, 16384, 65536, 2 ** 20 + 1, 2 ** 32])
def test_other_codebook_sizes_and_codebooks(size):
    gen = torch.Generator().manual_seed(size % 1000)
    codes = (torch.rand(1, 3, 11, generator=gen, dtype=torch.float64) * size).long()
    data = encode_tokens(codes, codebook_size=size)
    assert len(data) - header_size(data) == math.ceil(bits_per_code(size) * 33 / 8)
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


# ---- writing: bad codes are refused and leave no file -----------------------------------------

@pytest.mark.parametrize("codes, words", [
    (torch.tensor([[[0, 16384]]]), "[0, 16383]"),
    (torch.tensor([[[-1, 5]]]), "[0, 16383]"),
    (torch.tensor([[[0.0, 1.0]]]), "integer"),
    (np.array([1.0, 2.0]), "integers"),
    (torch.tensor([True, False]), "integer"),
    (torch.zeros(1, 1, 0, dtype=torch.long), "no codes"),
    (torch.zeros(2, 1, 5, dtype=torch.long), "shape"),
])
def test_save_rejects_bad_codes_and_writes_nothing(tmp_path, codes, words):
    path = tmp_path / "bad.mct"
    with pytest.raises(TokenFileError) as e:
        save_codes(path, codes)
    assert words in str(e.value) and str(path) in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_save_replaces_atomically_and_failure_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "x.mct"
    save_codes(path, torch.tensor([1, 2, 3]))
    old = path.read_bytes()

    def broken(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("mucodec.tokens.os.replace", broken)
    with pytest.raises(TokenFileError, match="No space left"):
        save_codes(path, torch.tensor([4, 5, 6]))
    assert path.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.mct"]  # the temporary file is gone
    monkeypatch.undo()
    save_codes(path, torch.tensor([4, 5, 6]))
    assert load_codes(path)[0].tolist() == [[[4, 5, 6]]]


def test_save_into_missing_folder_is_one_clear_error(tmp_path):
    with pytest.raises(TokenFileError, match="Cannot write"):
        save_codes(tmp_path / "nope" / "x.mct", torch.tensor([1]))


# ---- reading: every kind of damage is one sentence naming the file ----------------------------

CODES = list(range(0, 16384, 43))  # 382 codes: 5348 bits, so the last byte has 4 padding bits


def good_bytes() -> bytes:
    return encode_tokens(torch.tensor(CODES), num_samples=480000, original_sample_rate=44100, original_channels=2)


@pytest.fixture
def good() -> bytes:
    return good_bytes()


def damaged(good: bytes):
    header, payload = split(good)

    def with_header(**change):
        h = dict(header)
        for k, v in change.items():
            if v is KeyError:
                h.pop(k)
            else:
                h[k] = v
        return rebuild(h, payload)

    over = pack_bits(np.array([65535]), 16)  # a 16-bit code that a 65535-entry codebook cannot hold
    padded = bytearray(payload)
    padded[-1] |= 1
    return {
        "empty file": (b"", "not a MuCodec token file"),
        "bad magic": (b"RIFF" + good[4:], "not a MuCodec token file"),
        "magic only": (MAGIC, "truncated"),
        "unknown version": (MAGIC + bytes([2]) + good[len(MAGIC) + 1:], "version 2"),
        "truncated header": (good[:PREFIX + 20], "truncated"),
        "bad json": (rebuild(header, payload)[:PREFIX] + b"{" * (header_size(good) - PREFIX) + payload, "JSON"),
        "not utf8": (good[:PREFIX] + b"\xff" * (header_size(good) - PREFIX) + payload, "JSON"),
        "json list": (rebuild([1, 2], payload), "JSON object"),
        "missing field": (with_header(num_codes=KeyError), "'num_codes'"),
        "missing crc": (with_header(crc32=KeyError), "'crc32'"),
        "string field": (with_header(codebook_size="16384"), "'codebook_size'"),
        "float field": (with_header(num_codes=400.0), "'num_codes'"),
        "bool field": (with_header(layer=True), "'layer'"),
        "null field": (with_header(frame_rate=None), "'frame_rate'"),
        "zero codes": (with_header(num_codes=0), "'num_codes'"),
        "negative layer": (with_header(layer=-1), "'layer'"),
        "tiny codebook": (with_header(codebook_size=1), "codebook_size"),
        "wrong duration": (with_header(duration=99.0), "duration"),
        "nan duration": (with_header(duration=float("nan")), "JSON"),
        "too many samples": (with_header(num_samples=10 ** 9, duration=10 ** 9 / 48000), "cannot stand for"),
        "more codes than payload": (with_header(num_codes=header["num_codes"] + 1), "payload bytes"),
        "payload cut": (good[:-1], "payload bytes"),
        "payload extra": (good + b"\0", "payload bytes"),
        "checksum": (good[:-2] + bytes([good[-2] ^ 0x10]) + good[-1:], "checksum"),
        "padding bits": (with_header(crc32=zlib.crc32(bytes(padded)))[:-len(payload)] + bytes(padded), "padding"),
        "code out of range": (rebuild(dict(header, num_codes=1, codebook_size=65535, num_samples=1920, duration=0.04,
                                           crc32=zlib.crc32(over)), over), "outside a codebook"),
    }


CASES = list(damaged(good_bytes()))


@pytest.mark.parametrize("case", CASES)
def test_load_rejects_damage_with_one_sentence(tmp_path, good, case):
    data, words = damaged(good)[case]
    path = tmp_path / "song.mct"
    path.write_bytes(data)
    with pytest.raises(TokenFileError) as e:
        load_codes(path)
    msg = str(e.value)
    assert words in msg, msg
    assert str(path) in msg and "\n" not in msg and msg.endswith(".")


def test_the_untouched_file_loads(good):
    codes, header = decode_tokens(good)
    assert codes.tolist() == [[CODES]]
    assert header["original_sample_rate"] == 44100


def test_unknown_header_fields_are_ignored(good):
    header, payload = split(good)
    codes, back = decode_tokens(rebuild(dict(header, comment="made on a Tuesday"), payload))
    assert torch.equal(codes, decode_tokens(good)[0]) and back["comment"] == "made on a Tuesday"


def test_missing_file_is_one_clear_error(tmp_path):
    with pytest.raises(TokenFileError, match="Cannot read token file .*nope.mct"):
        load_codes(tmp_path / "nope.mct")


def test_reader_never_unpickles(tmp_path):
    # A torch.save / pickle file must be refused by the magic check, not executed.
    path = tmp_path / "evil.mct"
    torch.save({"codes": torch.arange(3)}, path)
    with pytest.raises(TokenFileError, match="not a MuCodec token file"):
        load_codes(path)
    assert not is_token_file(path)
