"""Songs: their ids, the songs of the inputs, and which job of ``--shard I/N`` a song belongs to."""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass

from ..errors import ArgumentError
from ..listing import expand_inputs


def song_id(rel_path: str) -> str:
    """The id of a song: 16 hex digits of the SHA-1 of its ``/``-separated path relative to its input folder
    (two ``01.flac`` in different folders are two songs; the same file listed twice is one)."""
    return hashlib.sha1(rel_path.encode("utf-8", "surrogateescape")).hexdigest()[:16]


@dataclass(frozen=True)
class Song:
    song_id: str
    path: str  # relative to its input folder, '/'-separated: what the output records
    file: str  # where to read it on this machine (never written to the output)
    size: int
    mtime: float

    def manifest_row(self) -> dict:
        return {"song_id": self.song_id, "path": self.path, "size": self.size, "mtime": self.mtime}


def scan(inputs, out=None) -> tuple[list[Song], list[tuple[str, str]]]:
    """INPUT arguments (see :func:`expand_inputs`) -> (songs sorted by path, [(input, one-sentence problem)]).
    Hidden files and anything inside ``out`` are skipped; a name with an audio extension that is not a regular
    file is kept, so that it becomes an error row, not a silent gap."""
    from ..audio import audio_extensions

    found: dict[str, Song] = {}
    files, problems = expand_inputs(inputs, audio_extensions(), out)
    for f, rel in files:
        sid = song_id(rel)
        if sid in found:
            if found[sid].file != str(f):
                problems.append((str(f), f"{f} has the same relative path '{rel}' as {found[sid].file}; "
                                         "encode the two folders into separate outputs."))
            continue
        try:
            st = os.stat(f)
            size, mtime = st.st_size, st.st_mtime
        except OSError:
            size, mtime = 0, 0.0
        found[sid] = Song(sid, rel, str(f), size, mtime)
    return sorted(found.values(), key=lambda s: s.path), problems


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N' (1 <= I <= N) -> (I, N); ArgumentError otherwise."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        raise ArgumentError(f"--shard {text} is not a shard; write I/N with 1 <= I <= N, e.g. 3/8.")
    return int(m.group(1)), int(m.group(2))


def in_shard(sid: str, shard: tuple[int, int] | None) -> bool:
    """Whether song ``sid`` belongs to job ``shard`` = (I, N): by its id alone, so the N jobs never overlap,
    cover every song, and do not depend on the order files are listed in."""
    return shard is None or int(sid, 16) % shard[1] == shard[0] - 1


def job_tag(shard: tuple[int, int] | None) -> str:
    return "all" if shard is None else f"{shard[0]}-of-{shard[1]}"
