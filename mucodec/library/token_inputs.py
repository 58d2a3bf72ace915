"""Token inputs of the decode job: which INPUT arguments name tokens, the songs they hold, and reading one
song's codes (in the worker processes).

Inputs (:func:`scan_tokens`), anything a tokenising or language-model pipeline writes:

    a token library written by ``--encode``    its ``shards/*.parquet`` (named by the ``path`` column)
    any parquet table                          an integer list column of codes (``codes``, else the only
                                               one); ``path``, ``id``, ``song_id`` or ``name`` names the
                                               output, else ``<table>/<row>``
    ``.mct`` token files                       one song each, named by the file
    ``.npy`` arrays of integer codes           (T,), (1, T) or (1, 1, T): one song; (N, T): N songs,
                                               ``<array>/<row>``
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import audio, tokens
from ..errors import MuCodecError, TokenFileError
from ..listing import expand_inputs, glob_files, list_folder
from .songs import song_id
from .store import error_row

TOKEN_EXTENSIONS = (tokens.EXTENSION, ".npy", ".parquet")
NAME_COLUMNS = ("path", "id", "song_id", "name")  # the first one a table has names its songs' outputs


@dataclass(frozen=True)
class TokenSong:
    """One song of the decode job: where its codes are (``file``, and ``row`` of a table or array; -1 for a
    whole file) and the name its audio gets (``path``, '/'-separated, without extension)."""

    song_id: str
    path: str
    file: str
    row: int = -1

    def manifest_row(self) -> dict:
        return {"song_id": self.song_id, "path": self.path, "source": self.file, "row": self.row}

    def where(self) -> str:
        return self.file if self.row < 0 else f"row {self.row} of {self.file}"

# ------------------------------------------------------------------------------------------------
# listing the inputs
# ------------------------------------------------------------------------------------------------
def is_token_input(arg) -> bool:
    """Whether a command-line INPUT names tokens: a token file, array or table, or a folder of them (a token
    library, or a folder holding token files and no audio)."""
    p = Path(arg)
    if p.is_dir():
        if _library_shards(p):
            return True
        listed, _ = list_folder(p, set(TOKEN_EXTENSIONS) | audio.audio_extensions())
        return bool(listed) and all(Path(f).suffix.lower() in TOKEN_EXTENSIONS for f, _ in listed)
    if p.is_file():
        return p.suffix.lower() in TOKEN_EXTENSIONS or tokens.is_token_file(p)
    return any(c in str(arg) for c in "*?[") and any(Path(f).suffix.lower() in TOKEN_EXTENSIONS
                                                     for f in glob_files(str(arg)))


def _library_shards(folder: Path) -> list[Path]:
    """The shards of a token library written by ``--encode`` (its .mct copies, if any, are the same songs)."""
    if not (folder / "fingerprint.json").is_file():
        return []
    return sorted(p for p in (folder / "shards").glob("*.parquet") if not p.name.startswith("."))


def scan_tokens(inputs, out=None) -> tuple[list[TokenSong], list[tuple[str, str]], list[dict], int]:
    """INPUT arguments -> (songs by name, [(input, one-sentence problem)], error rows of songs that cannot be
    planned: two songs whose audio would get the same name, the later one fails; and the number of songs that
    a token library's index places in shards that cannot be read)."""
    def shards(folder: Path):
        return [(f, f.name) for f in _library_shards(folder)] or None

    listed, problems = expand_inputs(inputs, set(TOKEN_EXTENSIONS), out, "token files (.mct, .npy, .parquet)",
                                    shards)
    found, lost = [], []
    for f, rel in listed:
        found += _songs_of(Path(f), rel[: -len(f.suffix)] if f.suffix.lower() in TOKEN_EXTENSIONS else rel, problems,
                           lost)
    return (*_plan_names(found, problems), sum(lost))


def _plan_names(found: list[TokenSong], problems) -> tuple[list[TokenSong], list, list[dict]]:
    songs, errors, by_name, by_id = [], [], {}, {}
    for s in found:
        first = by_id.get(s.song_id)
        if first is not None and (first.file, first.row) == (s.file, s.row):
            continue  # the same song listed twice (a file named by two inputs)
        other = by_name.get(s.path.lower()) or first  # case-folded: the disk may not tell case apart
        if other is not None:
            errors.append(error_row(s.song_id, s.path, "plan", f"{s.where()} would be written to {s.path}, as "
                                                               f"{other.where()} is; rename one of them."))
            continue
        by_name[s.path.lower()] = by_id[s.song_id] = s
        songs.append(s)
    return sorted(songs, key=lambda s: s.path), problems, errors


def _songs_of(file: Path, name: str, problems, lost: list) -> list[TokenSong]:
    """The songs one input file holds (a file that cannot be listed is one song that fails when read; a
    library's shard that cannot be read loses the songs its index gives it, counted into ``lost``)."""
    suffix = file.suffix.lower()
    try:
        if suffix == ".parquet":
            return _table_songs(file, name)
        if suffix == ".npy":
            rows = _npy_rows(file)
            if rows is not None:
                return [TokenSong(song_id(f"{name}/{r:06d}"), f"{name}/{r:06d}", str(file), r) for r in range(rows)]
    except MuCodecError as e:
        n = _indexed_songs(file)
        if n:
            lost.append(n)
            problems.append((str(file), f"{n} songs in {file} cannot be read, as the index of its library records "
                                        f"them; encode them again, or restore the shard ({e})"))
        else:
            problems.append((str(file), str(e)))
        return []
    return [TokenSong(song_id(name), name, str(file))]


def _indexed_songs(shard: Path) -> int | None:
    """How many songs the index of a token library gives one of its shards (None: not a library's shard)."""
    if shard.parent.name != "shards" or not _library_shards(shard.parent.parent):
        return None
    for index in sorted(shard.parent.parent.glob("index*.json")):
        with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
            for entry in json.loads(index.read_text()).get("shards", []):
                if entry.get("file") == f"shards/{shard.name}":
                    return int(entry["songs"])
    return None


def _npy_rows(file: Path) -> int | None:
    """N for an (N, T) array with N > 1 (N songs), None for one song (its shape is checked when read)."""
    try:
        shape = np.load(file, mmap_mode="r", allow_pickle=False).shape
    except Exception:  # unreadable: the read reports it as this song's error
        return None
    return shape[0] if len(shape) == 2 and shape[0] > 1 else None


def _table_songs(file: Path, prefix: str) -> list[TokenSong]:
    """The rows of a parquet table as songs: named by its first name column, else ``<prefix>/<row>``."""
    pq = _parquet()
    try:
        schema = pq.read_schema(file)
        _codes_column(schema, file)
        names = [c for c in NAME_COLUMNS if c in schema.names]
        cols = [c for c in (names[:1] + (["song_id"] if "song_id" in schema.names else [])) if c]
        table = pq.read_table(file, columns=sorted(set(cols))) if cols else None
        rows = pq.ParquetFile(file).metadata.num_rows
    except MuCodecError:
        raise
    except Exception as e:
        raise TokenFileError(f"Cannot read the parquet table {file} ({e}); check or re-export it.") from None
    songs = []
    for r in range(rows):
        if names:
            value = str(table.column(names[0])[r].as_py())
            name = value.rsplit(".", 1)[0] if names[0] == "path" and "." in Path(value).name else value
        else:
            name = f"{prefix}/{r:06d}"
        sid = str(table.column("song_id")[r].as_py()) if "song_id" in schema.names else song_id(name)
        songs.append(TokenSong(sid, _safe_name(name, file, r), str(file), r))
    return songs


def _safe_name(name: str, file, row: int) -> str:
    """A relative '/'-separated name that stays inside the output folder, else TokenFileError."""
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if not parts or ".." in parts or name.startswith("/") or any(p.startswith(".") for p in parts):
        raise TokenFileError(f"Row {row} of {file} names its song {name!r}, which is not a relative path without "
                             f"hidden parts; rename it in the table.")
    return "/".join(parts)


def _codes_column(schema, file) -> str:
    import pyarrow as pa

    def integer_list(t):
        return (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_integer(t.value_type)

    if "codes" in schema.names and integer_list(schema.field("codes").type):
        return "codes"
    found = [f.name for f in schema if integer_list(f.type)]
    if len(found) != 1:
        what = "no column" if not found else f"{len(found)} columns ({', '.join(found)})"
        raise TokenFileError(f"{file} has {what} of integer lists; name the column of codes 'codes'.")
    return found[0]


def _parquet():
    from .parquet import require_pyarrow

    require_pyarrow()
    import pyarrow.parquet as pq

    return pq


# ------------------------------------------------------------------------------------------------
# reading codes (worker processes)
# ------------------------------------------------------------------------------------------------
def read_tokens(song: TokenSong) -> dict:
    """One song's codes as stored: {'codes': integer array, 'num_samples': int or None, 'header': the token
    file's header or None}. Token files are checked here (checksum, header, payload); whether the codes suit
    the model is checked by the batcher, in the process that holds the model, with the one validator."""
    suffix = Path(song.file).suffix.lower()
    if suffix == ".parquet":
        codes, num_samples = _table_row(song.file, song.row)
        return {"codes": codes, "num_samples": num_samples, "header": None}
    if suffix == ".npy":
        return {"codes": _npy_codes(song.file, song.row), "num_samples": None, "header": None}
    t, header = tokens.load_codes(song.file)
    return {"codes": t.numpy(), "num_samples": int(header["num_samples"]), "header": header}


def _npy_codes(file: str, row: int) -> np.ndarray:
    try:
        arr = np.load(file, mmap_mode="r", allow_pickle=False)
    except Exception as e:
        raise TokenFileError(f"Cannot read {file} as a numpy array ({e}); save the codes with numpy.save.") from None
    return np.array(arr[row] if row >= 0 else arr)


def _table_row(file: str, row: int) -> tuple[np.ndarray, int | None]:
    codes, lengths = _table(file, os.stat(file).st_mtime_ns)
    if row >= len(codes):
        raise TokenFileError(f"{file} has {len(codes)} rows, not {row + 1}; it changed since the job was planned.")
    value = codes[row]
    if not value.is_valid:
        raise TokenFileError(f"Row {row} of {file} has no codes (null).")
    n = None if lengths is None else lengths[row].as_py()
    return np.array(value.values.to_numpy(zero_copy_only=False)), None if n is None else int(n)


@functools.lru_cache(maxsize=2)
def _table(file: str, mtime_ns: int):
    """(codes column, num_samples column or None) of a table, kept while its rows are read in order."""
    pq = _parquet()
    try:
        schema = pq.read_schema(file)
        col = _codes_column(schema, file)
        lengths = "num_samples" if "num_samples" in schema.names else None
        table = pq.read_table(file, columns=[col] + ([lengths] if lengths else []))
    except MuCodecError:
        raise
    except Exception as e:
        raise TokenFileError(f"Cannot read the parquet table {file} ({e}); check or re-export it.") from None
    return table.column(col).combine_chunks(), table.column(lengths).combine_chunks() if lengths else None
