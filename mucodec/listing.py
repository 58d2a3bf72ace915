"""Listing inputs: the files of folders (links followed, loops skipped), glob patterns, INPUT arguments.

The one listing the command line, the library jobs and the evaluation share, so that a folder means the same
files, in the same order, whichever of them reads it.
"""
from __future__ import annotations

import glob
import os
from pathlib import Path

from .files import os_reason


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


def expand_inputs(inputs, exts, out=None, what: str = "audio files", folder_files=None, keep=None):
    """INPUT arguments (folders, searched by :func:`list_folder`; files; glob patterns) -> ([(file, its
    '/'-separated name: relative to its folder, else the file's name)], [(input, one-sentence problem)]).

    ``folder_files(folder)``: the files a folder stands for when it is more than a folder of files (a token
    library stands for its shards), or None to list it. ``keep(path)``: whether a file found in a folder or by
    a pattern is taken (a file named as an INPUT always is); None takes every one, so that whoever reads a
    dangling link or a pipe reports it."""
    found, problems = [], []
    for arg in map(str, inputs):
        path = Path(arg)
        if path.is_dir():
            files = folder_files(path) if folder_files is not None else None
            if files is None:
                files, skipped = list_folder(path, exts, exclude=out)
                problems += skipped
            if keep is not None:
                files = [(f, rel) for f, rel in files if keep(f)]
            if not files:
                problems.append((arg, f"The folder {arg} holds no {what}."))
            found += files
        elif os.path.lexists(path):
            found.append((path, path.name))
        elif any(c in arg for c in "*?["):
            files = [f for f in glob_files(arg) if keep is None or keep(f)]
            if not files:
                problems.append((arg, f"The pattern {arg} matches no file."))
            found += [(f, f.name) for f in files]
        else:
            problems.append((arg, f"{arg} does not exist."))
    return found, problems
