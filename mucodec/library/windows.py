"""The windows of a prepared folder as training reads them: all of them in memory (:func:`load_windows`), or a
few shards at a time (:class:`ShardStream`) for a library larger than memory.

A window's order is the prepared folder's: its shards by name, then their rows. The held-out windows (songs
chosen by :func:`prepare.is_holdout` of their id) are the validation set either way, in that order.
"""
from __future__ import annotations

import bisect
import json
from pathlib import Path

import numpy as np
import torch

from ..errors import ArgumentError
from ..training import SEED_STRIDE, Windows
from . import parquet
from .prepare import HOLDOUT, LATENT_DTYPES, is_holdout
from .store import committed_files

COLUMNS = ["valid", "codes", "latents"]


def _shards(out) -> list[Path]:
    shards = committed_files(Path(out) / "shards", ".parquet")
    if not shards:
        raise ArgumentError(f"{out} holds no prepared windows; prepare a music folder into it first.")
    return shards


def _latent_format(shard: Path) -> tuple[list[int], torch.dtype]:
    """(C, F, W) and the 16-bit dtype the latents of ``shard`` are stored in."""
    meta = parquet.arrow_parquet().read_schema(shard).metadata
    return json.loads(meta[b"mucodec.latent_shape"]), LATENT_DTYPES[
        json.loads(meta[b"mucodec.fingerprint"])["latent_dtype"]]


def _windows(table, shape, dtype, latent_dtype=None) -> Windows:
    """A pyarrow table of window rows (COLUMNS) as :class:`Windows`, latents in their stored dtype unless asked."""
    codes = np.stack(table.column("codes").to_numpy(zero_copy_only=False)).astype(np.int64)
    valid = np.asarray(table.column("valid").to_pylist(), dtype=np.int64)
    lat = torch.stack([torch.frombuffer(bytearray(b), dtype=torch.int16).view(dtype).reshape(shape)
                       for b in table.column("latents").to_pylist()])
    return Windows(torch.from_numpy(codes)[:, None], lat if latent_dtype is None else lat.to(latent_dtype),
                   torch.from_numpy(valid))


def _held(shard: Path, holdout: float) -> np.ndarray:
    """Per row of ``shard``, whether its song is held out (only the song ids are read)."""
    ids = parquet.shard_song_ids(shard)
    return np.array([is_holdout(s, holdout) for s in ids], dtype=bool)


def load_windows(out, holdout: float = HOLDOUT, latent_dtype: torch.dtype | None = None):
    """(training windows, held-out windows or None) of a prepared folder, every one in memory (about 1 MiB
    each at the released sizes, 120 MB per hour of audio); ``latent_dtype``: convert the stored latents."""
    shards = _shards(out)
    pa, pq = parquet.arrow(), parquet.arrow_parquet()
    shape, dtype = _latent_format(shards[0])
    table = pa.concat_tables([pq.read_table(f, columns=["song_id"] + COLUMNS) for f in shards])
    held = np.array([is_holdout(s, holdout) for s in table.column("song_id").to_pylist()], dtype=bool)

    def take(keep: bool):
        idx = np.flatnonzero(held == keep)
        return _windows(table.take(idx), shape, dtype, latent_dtype) if idx.size else None

    return take(False), take(True)


class ShardStream:
    """The training windows of a prepared folder, read ``buffer`` shards at a time: what :class:`Windows` is for
    the trainer (``len``, :meth:`batch`), in memory only the group of shards the current position reads.

    Every epoch shuffles the shards, cuts them into groups of ``buffer`` and shuffles the windows within each
    group; the stream runs through the groups in turn, so an epoch still takes every window once. A window's
    batch mates come from its group only: a larger buffer mixes more songs per batch and holds more in memory
    (a shard of 16 songs of 4 minutes is about 130 MB at the released sizes). The order is a function of the
    seed and the position alone, so a resumed run reads what the uninterrupted one would have.
    """

    def __init__(self, out, holdout: float = HOLDOUT, buffer: int = 4):
        if isinstance(buffer, bool) or not isinstance(buffer, int) or buffer < 1:
            raise ArgumentError(f"the stream's buffer must be a whole number of shards >= 1, got {buffer!r}.")
        shards = _shards(out)
        self.shape, self.dtype = _latent_format(shards[0])
        rows = [np.flatnonzero(~_held(s, holdout)) for s in shards]
        self.shards = [s for s, r in zip(shards, rows) if r.size]
        self.rows = [r for r in rows if r.size]
        self.buffer = buffer
        self.loads = 0  # groups read so far (the tests count them)
        self._plan_kept: tuple = (None, None)  # (key, value): the last epoch plan and group read stay
        self._group: tuple = (None, None)

    def __len__(self) -> int:
        return int(sum(r.size for r in self.rows))

    def _plan(self, epoch: int, seed: int) -> tuple[list[list[int]], list[int], list[torch.Tensor]]:
        """(groups of shard indices, each group's first position in the epoch, each group's window order)."""
        key = (epoch, seed)
        if self._plan_kept[0] != key:
            g = torch.Generator().manual_seed(seed * SEED_STRIDE + epoch)
            perm = torch.randperm(len(self.shards), generator=g).tolist()
            groups = [perm[i:i + self.buffer] for i in range(0, len(perm), self.buffer)]
            sizes = [sum(self.rows[s].size for s in group) for group in groups]
            orders = [torch.randperm(n, generator=g) for n in sizes]
            self._plan_kept = (key, (groups, np.concatenate([[0], np.cumsum(sizes)[:-1]]).tolist(), orders))
        return self._plan_kept[1]

    def _load(self, epoch: int, seed: int, k: int) -> Windows:
        """Group ``k`` of the epoch's plan, its windows in the shuffled order."""
        key = (epoch, seed, k)
        if self._group[0] != key:
            pa, pq = parquet.arrow(), parquet.arrow_parquet()
            groups, _, orders = self._plan(epoch, seed)
            self._group = (None, None)  # the previous group is let go before the next one is read
            table = pa.concat_tables([pq.read_table(self.shards[s], columns=COLUMNS).take(self.rows[s])
                                      for s in groups[k]])
            self._group = (key, _windows(table.take(orders[k].numpy()), self.shape, self.dtype))
            self.loads += 1
        return self._group[1]

    def batch(self, position: int, size: int, seed: int) -> tuple:
        """The ``size`` windows from ``position`` of the endless stream: codes, float32 latents, valid."""
        n, items = len(self), []
        for p in range(position, position + size):
            epoch, offset = divmod(p, n)
            starts = self._plan(epoch, seed)[1]
            k = bisect.bisect_right(starts, offset) - 1
            w = self._load(epoch, seed, k)
            items.append((w.codes[offset - starts[k]], w.latents[offset - starts[k]], w.valid[offset - starts[k]]))
        codes, latents, valid = zip(*items)
        return torch.stack(codes), torch.stack(latents).float(), torch.stack(valid)


def held_out_windows(out, holdout: float = HOLDOUT, limit: int | None = None) -> Windows | None:
    """The first ``limit`` held-out windows of a prepared folder (all with None), in memory, reading only the
    shards that hold them: the validation set of a streamed run."""
    pa, pq = parquet.arrow(), parquet.arrow_parquet()
    shards = _shards(out)
    shape, dtype = _latent_format(shards[0])
    parts, left = [], limit
    for shard in shards:
        idx = np.flatnonzero(_held(shard, holdout))
        if left is not None:
            idx = idx[:left]
            left -= idx.size
        if idx.size:
            parts.append(pq.read_table(shard, columns=COLUMNS).take(idx))
        if left == 0:
            break
    return _windows(pa.concat_tables(parts), shape, dtype) if parts else None
