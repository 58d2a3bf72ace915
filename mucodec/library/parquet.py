"""Parquet shards of a token library: their schema, writing one, and reading a library back.

pyarrow is imported only here, and only when parquet is written or read, so everything else runs without it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import files
from ..errors import ArgumentError, OutputError
from .store import committed_files


def arrow():
    """pyarrow, or one sentence naming its install command."""
    try:
        import pyarrow
    except ImportError:
        raise ArgumentError("Parquet output needs pyarrow: pip install -r requirements-library.txt "
                            "(or use --format mct).") from None
    return pyarrow


def arrow_parquet():
    """pyarrow.parquet, or the same sentence as :func:`arrow`."""
    arrow()
    import pyarrow.parquet
    return pyarrow.parquet


def require_pyarrow() -> None:
    """A missing pyarrow as one sentence now, rather than a traceback after the first shard."""
    arrow()


def _schema(fp: dict | None):
    pa = arrow()
    return pa.schema([("song_id", pa.string()), ("path", pa.string()), ("duration", pa.float64()),
                      ("sample_rate", pa.int32()), ("channels", pa.int32()), ("num_samples", pa.int64()),
                      ("num_codes", pa.int32()), ("codes", pa.list_(pa.uint16()))],
                     metadata={b"mucodec.fingerprint": json.dumps(fp, sort_keys=True).encode()} if fp else None)


def write_shard(path: Path, rows: list[dict], fp: dict | None = None, before_commit=None) -> None:
    """Write ``rows`` (dicts holding at least the schema's columns) as one parquet file, by atomic rename once
    its footer reads back with every row (``before_commit``: see :func:`files.open_atomic`)."""
    pa = arrow()
    schema = _schema(fp)
    lengths = np.array([len(r["codes"]) for r in rows], dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    flat = np.concatenate([np.asarray(r["codes"], dtype=np.uint16) for r in rows]) if rows else np.zeros(0, np.uint16)
    columns = [pa.array([r[name] for r in rows], type=schema.field(name).type) for name in schema.names[:-1]]
    columns.append(pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=pa.uint16())))
    write_table(path, pa.Table.from_arrays(columns, schema=schema), before_commit)


def write_table(path: Path, table, before_commit=None) -> None:
    """Write a pyarrow table as one parquet file, by atomic rename once its footer reads back with every row."""
    pq = arrow_parquet()

    def check(tmp: Path) -> None:
        try:
            n = pq.read_metadata(tmp).num_rows
        except Exception as e:
            n = f"no readable footer ({e})"
        if n != table.num_rows:
            raise OutputError(f"Cannot write {path}: the shard written holds {n} rows, not {table.num_rows}; check "
                              f"the disk holding {path.parent} and run the same command again.")

    with files.open_atomic(path, check=check, before_commit=before_commit) as f:
        pq.write_table(table, f)


def shard_song_ids(path: Path) -> list[str]:
    """The song ids of one shard."""
    return arrow_parquet().read_table(path, columns=["song_id"]).column("song_id").to_pylist()


def shard_rows(path: Path) -> int:
    return arrow_parquet().read_metadata(path).num_rows


def read_library(out, columns=None):
    """All committed songs of ``out`` as one pyarrow Table sorted by path (``columns``: a subset)."""
    pa, pq = arrow(), arrow_parquet()
    shards = committed_files(Path(out) / "shards", ".parquet")
    if not shards:
        return _schema(None).empty_table() if columns is None else _schema(None).empty_table().select(columns)
    table = pa.concat_tables([pq.read_table(f, columns=columns) for f in shards])
    if "path" in table.column_names:
        table = table.sort_by("path")
    return table


def iter_codes(out):
    """(song_id, path, codes uint16 array) for every committed song of ``out``, by path."""
    table = read_library(out, columns=["song_id", "path", "codes"])
    for sid, path, codes in zip(table.column("song_id").to_pylist(), table.column("path").to_pylist(),
                                table.column("codes")):
        yield sid, path, codes.values.to_numpy(zero_copy_only=False).astype(np.uint16, copy=False)


@dataclass
class FlatCodes:
    """Every song's codes end to end, for language-model training: song ``k`` is
    ``codes[offsets[k]:offsets[k + 1]]``."""

    codes: np.ndarray  # uint16 (total,)
    offsets: np.ndarray  # int64 (songs + 1,)
    song_ids: list[str]
    paths: list[str]

    def __len__(self) -> int:
        return len(self.song_ids)

    def __getitem__(self, k: int) -> np.ndarray:
        return self.codes[self.offsets[k]:self.offsets[k + 1]]


def load_flat(out) -> FlatCodes:
    """The committed songs of ``out`` (by path) as one flat uint16 array plus offsets."""
    table = read_library(out, columns=["song_id", "path", "codes"])
    col = table.column("codes").combine_chunks() if table.num_rows else None
    if col is None:
        return FlatCodes(np.zeros(0, np.uint16), np.zeros(1, np.int64), [], [])
    offsets = col.offsets.to_numpy().astype(np.int64)
    codes = col.values.to_numpy(zero_copy_only=False).astype(np.uint16, copy=False)
    return FlatCodes(codes[offsets[0]:offsets[-1]], offsets - offsets[0], table.column("song_id").to_pylist(),
                     table.column("path").to_pylist())
