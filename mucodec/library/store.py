"""The output folder of a job: what made it, which songs it holds, and error rows, each committed atomically.

    fingerprint.json          what made the output (weights, settings); output made differently is refused.
                              Its "machines" list (threads, processor, GPU) is only recorded: a resume on
                              another machine adds to it and warns, since near-tie codes may differ there
    manifest[-I-of-N].jsonl   the songs of one job (song_id, path, ...), then one line per committed output:
                              {"output": its path in the folder, "bytes", "sha256", and "frames" for audio},
                              appended (and synced) before the output's rename: what the file must be
    errors/<job>-<n>.jsonl    failed songs: song_id, path, stage, message, time
    report[-I-of-N].json      the last run

Which songs are committed is the job's to say (:meth:`Store.committed`: shard files or .mct files for the
encode job, audio files for a decode job), always from the committed files themselves, read back at every
start and checked against their manifest lines (:meth:`Store.output_problem`: a ``stat`` each; the checksum too
with ``verify``): a crash between two steps can neither lose nor duplicate a committed song, and an output that
was truncated, lost or never recorded is done again, with a line that says so.
"""
from __future__ import annotations

import collections
import contextlib
import json
import platform
import re
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .. import files
from ..errors import OutputError, StorageError
from .songs import job_tag

# The fingerprint key that is recorded but never refused: which machines wrote into the folder.
MACHINES = "machines"

_NUMBERED = re.compile(r"^(?P<tag>[a-z0-9-]+?)-(?P<seq>\d{6})\.[a-z]+$")
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.\d+\.[0-9a-f]{8}\.tmp$")  # files.open_atomic's names


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

    def __init__(self, out, shard: tuple[int, int] | None = None, verify: bool = False):
        self.out, self.shard, self.verify = Path(out), shard, verify
        self.tag = job_tag(shard)
        suffix = "" if shard is None else f"-{self.tag}"
        self.manifest_path = self.out / f"manifest{suffix}.jsonl"
        self.report_path = self.out / f"report{suffix}.json"
        self.fingerprint_path = self.out / "fingerprint.json"
        self.errors = self.out / "errors"
        self._seq = None
        self.records: dict[str, dict] | None = None  # output path in the folder -> its manifest line
        self.redone: list[tuple[Path, str]] = []  # outputs found damaged or missing, and why
        self.say = lambda msg: None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        # a Ray task gets the folder, not this process's lock, log or records (it reads the records itself)
        return {**self.__dict__, "_lock": None, "say": None, "records": None, "redone": []}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock(), say=lambda msg: None)

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
            files.write_atomic(self.fingerprint_path, dumps({**fp, MACHINES: seen + new_machines}))
        self._clean_temporaries(songs)
        self.say = say
        own = [r for r in self._read_manifest(self.manifest_path) if "output" in r]
        files.write_atomic(self.manifest_path, b"".join(dumps(r, indent=None) for r in
                                                        [*(s.manifest_row() for s in songs), *own]))
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

    # ---- what each committed output must be ------------------------------------------------------
    def read_records(self) -> dict[str, dict]:
        """Every output line of every manifest in the folder (the last line of an output wins)."""
        records = {}
        for m in sorted(self.out.glob("manifest*.jsonl")):
            for row in self._read_manifest(m):
                if isinstance(row.get("output"), str):
                    records[row["output"]] = row
        return records

    @staticmethod
    def _read_manifest(path: Path) -> list[dict]:
        rows = []
        for line in files.read_lines(path):
            with contextlib.suppress(ValueError):  # a line torn by a crash: its output is done again
                row = json.loads(line)
                if isinstance(row, dict):
                    rows.append(row)
        return rows

    def record(self, path, info: dict) -> None:
        """Append what the output ``path`` must be (``info``: bytes, sha256, frames) to this job's manifest,
        before ``path`` is renamed into place (the ``before_commit`` of :func:`files.open_atomic`)."""
        rel = Path(path).relative_to(self.out).as_posix()
        row = {"output": rel, **info}
        with self._lock:
            files.append_line(self.manifest_path, dumps(row, indent=None))
            if self.records is not None:
                self.records[rel] = row

    def output_problem(self, path) -> str | None:
        """None when the committed output ``path`` is what its manifest line says; else what is wrong with it."""
        return self._inspect(Path(path))[1]

    def checked(self, path) -> bool:
        """Whether the output ``path`` exists and checks; a damaged or lost one is noted, to be said and redone."""
        present, problem = self._inspect(Path(path))
        if problem is not None:
            self.redone.append((Path(path), problem))
        return present and problem is None

    def _inspect(self, path: Path) -> tuple[bool, str | None]:
        # one stat per output: resuming a large folder checks every song
        if self.records is None:
            self.records = self.read_records()
        rec = self.records.get(path.relative_to(self.out).as_posix())
        try:
            st = path.stat()
        except FileNotFoundError:
            return False, (None if rec is None else "it is missing")
        except OSError as e:
            return False, f"it cannot be read ({files.os_reason(e)})"
        if rec is None:
            return stat.S_ISREG(st.st_mode), "no record of its commit is in the manifest"
        if st.st_size != rec.get("bytes"):
            return True, f"it holds {st.st_size:,} bytes where {rec.get('bytes'):,} were written"
        if self.verify and files.sha256(path) != rec.get("sha256"):
            return True, "its checksum differs from the one recorded when it was written"
        return stat.S_ISREG(st.st_mode), None

    def stored_bytes(self) -> int | None:
        """The mean size of this folder's recorded outputs (None when there is none), to tell what the rest of
        a job needs."""
        sizes = [r["bytes"] for r in (self.records or {}).values() if isinstance(r.get("bytes"), int)]
        return sum(sizes) // len(sizes) if sizes else None

    def storage_error(self, e: StorageError, todo: list) -> StorageError:
        """``e`` said of the output folder, with the space that the songs of ``todo`` still left need, where the
        outputs already recorded tell it."""
        self.records = self.read_records()
        left = len(todo) - len(self.committed(todo))
        mean = self.stored_bytes()
        return files.job_storage_error(e, self.out, mean * left if mean and left > 0 else None)

    # ---- state ---------------------------------------------------------------------------------
    def state(self, songs=None) -> State:
        """Committed ids and outstanding errors, read from the committed files themselves."""
        self.redone = []
        self.records = self.read_records()  # other processes (workers, Ray actors) commit too
        committed = self.committed(list(songs or ()))
        self._say_redone()
        errors = {}
        for row in read_errors(self.out):
            if row["song_id"] not in committed:
                errors[row["song_id"]] = row
        return State(committed, errors)

    def _say_redone(self, shown: int = 10) -> None:
        for path, why in self.redone[:shown]:
            self.say(f"warning: {path.relative_to(self.out).as_posix()} is done again: {why}.")
        if len(self.redone) > shown:
            self.say(f"warning: {len(self.redone) - shown} more outputs are done again (damaged, missing or "
                     f"unrecorded).")

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
            files.write_atomic(self.errors / f"{name}.jsonl", b"".join(dumps(e, indent=None) for e in rows))

    def write_report(self, rep: dict) -> None:
        try:
            files.write_atomic(self.report_path, dumps(rep))
        except StorageError:
            raise  # a full disk is said, whatever it stopped
        except OutputError:
            pass  # the work is committed; a report that cannot be written is no failure


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
