"""The output folder of a job: what made it, which songs it holds, and error rows, each committed atomically.

    fingerprint.json          what made the output (weights, settings); output made differently is refused.
                              Its "machines" list (threads, processor, GPU) is only recorded: a resume on
                              another machine adds to it and warns, since near-tie codes may differ there
    manifest[-I-of-N].jsonl   the songs of one job: song_id, path, size, mtime
    errors/<job>-<n>.jsonl    failed songs: song_id, path, stage, message, time
    report[-I-of-N].json      the last run

Which songs are committed is the job's to say (:meth:`Store.committed`: shard files or .mct files for the
encode job, audio files for a decode job), always from the committed files themselves, read back at every
start: a crash between two steps can neither lose nor duplicate a committed song.
"""
from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path

from .. import tokens
from ..errors import OutputError
from .songs import job_tag

# The fingerprint key that is recorded but never refused: which machines wrote into the folder.
MACHINES = "machines"

_NUMBERED = re.compile(r"^(?P<tag>[a-z0-9-]+?)-(?P<seq>\d{6})\.[a-z]+$")
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.\d+\.[0-9a-f]{8}\.tmp$")  # tokens.open_atomic's names


def machine(device, engine: str = "local") -> dict:
    """What beyond weights, code and settings decides float rounding, and so the rare near-tie code.

    Thread count and processor change the summation order of the CPU kernels; a GPU model its kernels.
    A Ray job runs its models on the cluster's machines, which the driver cannot name.
    """
    import torch

    if engine == "ray":
        return {"engine": "ray"}
    kind = torch.device(device).type
    out = {"device": kind, "torch": torch.__version__}
    if kind == "cuda":
        out["gpu"] = torch.cuda.get_device_name(torch.device(device))
    else:
        out["threads"] = torch.get_num_threads()
        out["cpu"] = _cpu_name()
    return out


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


@dataclass
class State:
    committed: set[str]  # song ids whose output is committed
    errors: dict[str, dict]  # song id -> its latest error row, for songs not committed since


class Store:
    """The output folder of one job (``shard`` = (I, N) or None): its files, state and atomic commits.

    A job subclasses it and defines :meth:`committed`; :meth:`folders`, :meth:`song_files` and
    :meth:`other_files` when it writes more than error rows.
    """

    what = "output"  # what the folder holds, in the refusal messages
    machine_effect = "the results can differ in their last bits"  # what another machine can change

    def __init__(self, out, shard: tuple[int, int] | None = None):
        self.out, self.shard = Path(out), shard
        self.tag = job_tag(shard)
        suffix = "" if shard is None else f"-{self.tag}"
        self.manifest_path = self.out / f"manifest{suffix}.jsonl"
        self.report_path = self.out / f"report{suffix}.json"
        self.fingerprint_path = self.out / "fingerprint.json"
        self.errors = self.out / "errors"
        self._seq = None

    # ---- what a job defines --------------------------------------------------------------------
    def committed(self, songs) -> set[str]:
        """The ids among ``songs`` whose output is committed, read from the committed files."""
        raise NotImplementedError

    def folders(self) -> list[tuple[Path, str]]:
        """(folder, suffix) of the files commits write, named ``<job>-<n><suffix>`` (folders made by :meth:`prepare`)."""
        return [(self.errors, ".jsonl")]

    def song_files(self, song) -> list[Path]:
        """The files one song's output may be written to (discarded by ``overwrite``)."""
        return []

    def other_files(self) -> list[Path]:
        """The job's other files that ``overwrite`` discards."""
        return []

    # ---- setup ---------------------------------------------------------------------------------
    def prepare(self, songs, fp: dict, overwrite: bool, say) -> None:
        """Create the folders, refuse output made differently (or discard it with ``overwrite``), clean the
        temporary files a crashed run of this job left, and write this job's manifest.

        ``fp[MACHINES]`` (a list of :func:`machine` records) is compared apart: when this machine is not among
        those that wrote the folder before, a warning sentence is passed to ``say``."""
        try:
            for d in (self.out, *(d for d, _ in self.folders())):
                d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"Cannot create the output folder {self.out}: {e.strerror or e}.") from None
        old = self.read_fingerprint()
        here = fp.get(MACHINES, [])
        fp = {k: v for k, v in fp.items() if k != MACHINES}
        seen = [] if old is None or overwrite else old.pop(MACHINES, [])
        if overwrite:
            self._discard(songs)
        elif old is not None and old != fp:
            diff = [k for k in sorted(set(old) | set(fp)) if old.get(k) != fp.get(k)]
            what = ", ".join(f"{k} {_short(old.get(k))} there, {_short(fp.get(k))} now" for k in diff)
            raise OutputError(f"{self.out} holds {self.what} made differently ({what}); pass --overwrite to "
                              f"discard them, or choose another -o folder.")
        elif old is None and any(self._commit_files()):
            raise OutputError(f"{self.out} holds {self.what} but no fingerprint.json, so what made them is "
                              f"unknown; pass --overwrite to discard them, or choose another -o folder.")
        new_machines = [m for m in here if m not in seen]
        warning = None
        if seen and new_machines:
            warning = (f"warning: {self.out} holds {self.what} made on another machine ({_machine_words(seen[-1])}; "
                       f"now {_machine_words(new_machines[0])}): {self.machine_effect}, so resume on the same kind of "
                       f"machine where the output must be reproducible.")
        if old != fp or overwrite or new_machines:
            tokens.write_atomic(self.fingerprint_path, dumps({**fp, MACHINES: seen + new_machines}))
        self._clean_temporaries(songs)
        tokens.write_atomic(self.manifest_path, b"".join(dumps(s.manifest_row(), indent=None) for s in songs))
        if warning:
            say(warning)

    def read_fingerprint(self) -> dict | None:
        """The fingerprint.json of the folder, machines included (None when there is none)."""
        try:
            return json.loads(self.fingerprint_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise OutputError(f"Cannot read {self.fingerprint_path} ({e}); pass --overwrite to start over.") from None

    def _commit_files(self) -> list[Path]:
        return [f for d, suffix in self.folders() for f in committed_files(d, suffix)]

    def _discard(self, songs) -> None:
        for f in [*self._commit_files(), *self.out.glob("manifest*.jsonl"), *self.out.glob("report*.json"),
                  self.fingerprint_path, *self.other_files(), *(p for s in songs for p in self.song_files(s))]:
            with contextlib.suppress(FileNotFoundError):
                f.unlink()

    def _clean_temporaries(self, songs) -> None:
        """Remove the hidden temporary files a killed run of this job left (never another job's)."""
        names = collections.defaultdict(set)
        for s in songs:
            for p in self.song_files(s):
                names[p.parent].add(p.name)
        for d, _ in self.folders():
            for tmp in d.glob(f".{self.tag}-*.tmp"):
                with contextlib.suppress(OSError):
                    tmp.unlink()
        for d, keep in names.items():
            with contextlib.suppress(OSError):
                for tmp in d.glob(".*.tmp"):
                    m = _TEMPORARY.match(tmp.name)
                    if m and m.group("name") in keep:
                        tmp.unlink()

    # ---- state ---------------------------------------------------------------------------------
    def state(self, songs=None) -> State:
        """Committed ids and outstanding errors, read from the committed files themselves."""
        committed = self.committed(list(songs or ()))
        errors = {}
        for row in read_errors(self.out):
            if row["song_id"] not in committed:
                errors[row["song_id"]] = row
        return State(committed, errors)

    def next_name(self) -> str:
        """A fresh ``<job>-<n>`` for the next commit of this job."""
        if self._seq is None:
            seqs = [int(m.group("seq")) for f in self._commit_files()
                    if (m := _NUMBERED.match(f.name)) and m.group("tag") == self.tag]
            self._seq = max(seqs, default=-1) + 1
        name, self._seq = f"{self.tag}-{self._seq:06d}", self._seq + 1
        return name

    # ---- commits -------------------------------------------------------------------------------
    def write_errors(self, name: str, rows: list[dict]) -> None:
        if rows:
            tokens.write_atomic(self.errors / f"{name}.jsonl", b"".join(dumps(e, indent=None) for e in rows))

    def write_report(self, rep: dict) -> None:
        with contextlib.suppress(OutputError):  # the work is committed; a report that cannot be written is no failure
            tokens.write_atomic(self.report_path, dumps(rep))


def committed_files(folder: Path, suffix: str = "") -> list[Path]:
    """The committed files of ``folder`` ending in ``suffix``, by name."""
    # hidden names are temporary files of unfinished commits: never part of the state
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob(f"*{suffix}") if not p.name.startswith(".") and p.is_file())


def error_row(sid: str, path: str, stage: str, message: str) -> dict:
    return {"song_id": sid, "path": path, "stage": stage, "message": message, "time": time.time()}


def read_errors(out) -> list[dict]:
    """Every error row under ``out/errors``, oldest first (a song retried and failed again has several)."""
    rows = []
    for f in committed_files(Path(out) / "errors", ".jsonl"):
        rows += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return sorted(rows, key=lambda r: r["time"])


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def dumps(obj, indent=2) -> bytes:
    return (json.dumps(obj, indent=indent, sort_keys=True) + "\n").encode()


def _short(v) -> str:
    s = json.dumps(v, sort_keys=True) if not isinstance(v, str) else v
    return s if len(s) <= 40 else s[:37] + "..."


def _machine_words(m: dict) -> str:
    if "engine" in m:
        return "a Ray cluster"
    if "gpu" in m:
        return f"{m['gpu']}, torch {m.get('torch')}"
    return f"{m.get('threads')} threads of {m.get('cpu')}, torch {m.get('torch')}"
