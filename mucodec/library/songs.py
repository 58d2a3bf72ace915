"""Songs: their ids, listing the inputs, and which job of ``--shard I/N`` a song belongs to."""
from __future__ import annotations

import glob
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import ArgumentError
from ..files import os_reason


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


def _identity(path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows a link; a looping link raises instead of answering
    except OSError:
        return False


def _holds(outer: str, inner: str) -> bool:
    """Whether the folder ``outer`` is ``inner`` or one of its ancestors (both real paths)."""
    return inner == outer or inner.startswith(outer.rstrip(os.sep) + os.sep)


def list_folder(folder, exts, exclude=None) -> tuple[list[tuple[Path, str]], list[tuple[str, str]]]:
    """Files under ``folder`` whose extension (lower case) is in ``exts`` -> ([(file, its '/'-separated path
    relative to ``folder``)] by path, [(entry, one sentence on why it was skipped)]).

    Hidden names and the folder ``exclude`` are left out. Links to folders are followed, but never one to a
    folder that holds the link (``up -> ..``: a loop) nor into a folder listed already (no file is listed
    twice); such a link is skipped, so a loop can neither hang nor fail the listing. Real folders are listed
    before links, so a file keeps its own path rather than a link's. A name with an extension in ``exts`` that
    is not a folder is kept whatever it is (a dangling or looping link, a pipe): whoever reads it reports it,
    so it is not a silent gap.
    """
    files, skipped, seen = [], [], {}
    blocked = _identity(exclude) if exclude is not None else None
    real, links = [(Path(folder), ())], []
    while real or links:
        d, rel = real.pop() if real else links.pop(0)
        key = _identity(d)
        if key is None or key == blocked:
            continue
        if key in seen:
            skipped.append((str(d), f"{d} leads to {seen[key]}, which is listed already; skipped."))
            continue
        seen[key] = d
        try:
            with os.scandir(d) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            skipped.append((str(d), f"Cannot list the folder {d} ({os_reason(e)}); skipped."))
            continue
        for e in entries:
            if e.name.startswith("."):
                continue
            p, r = d / e.name, rel + (e.name,)
            if not _is_dir(e):
                if p.suffix.lower() in exts:
                    files.append((p, "/".join(r)))
            elif not e.is_symlink():
                real.append((p, r))
            elif _holds(os.path.realpath(p), os.path.realpath(d)):
                skipped.append((str(p), f"{p} is a link to {os.path.realpath(p)}, a folder that holds it; skipped."))
            else:
                links.append((p, r))
    return sorted(files, key=lambda f: f[1].split("/")), skipped


def glob_files(pattern: str) -> list[Path]:
    """What a glob pattern matches (``**`` included), folders left out, by name."""
    return [Path(f) for f in sorted(glob.glob(pattern, recursive=True)) if not Path(f).is_dir()]


def expand_inputs(inputs, exts, out=None, what: str = "audio files", folder_files=None):
    """INPUT arguments (folders, searched by :func:`list_folder`; files; glob patterns) -> ([(file, its
    '/'-separated name: relative to its folder, else the file's name)], [(input, one-sentence problem)]).

    ``folder_files(folder)``: the files a folder stands for when it is more than a folder of files (a token
    library stands for its shards), or None to list it."""
    found, problems = [], []
    for arg in map(str, inputs):
        path = Path(arg)
        if path.is_dir():
            files = folder_files(path) if folder_files is not None else None
            if files is None:
                files, skipped = list_folder(path, exts, exclude=out)
                problems += skipped
            if not files:
                problems.append((arg, f"The folder {arg} holds no {what}."))
            found += files
        elif os.path.lexists(path):
            found.append((path, path.name))
        elif any(c in arg for c in "*?["):
            files = glob_files(arg)
            if not files:
                problems.append((arg, f"The pattern {arg} matches no file."))
            found += [(f, f.name) for f in files]
        else:
            problems.append((arg, f"{arg} does not exist."))
    return found, problems


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
