"""Issue 17, item 1: every process a run starts exits within seconds when the run is SIGKILLed.

The run is started in a session of its own; once its worker processes exist the driver alone is killed,
and then no live process of that session may remain (workers, and multiprocessing's resource tracker,
which lives as long as any process holds its pipe). Processes are found through /proc.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_library import common, make_music

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="finds processes through /proc")


def session(sid: int) -> dict[int, str]:
    """pid -> command line of every live process of session ``sid`` (zombies have exited: left out)."""
    found = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmdline = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # it exited meanwhile
            continue
        state, _ppid, _pgrp, sess = stat[stat.rindex(")") + 2:].split()[:4]
        if int(sess) == sid and state != "Z":
            found[int(d.name)] = cmdline
    return found


def wait_for(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_killed_encode_leaves_no_process(tmp_path, tiny_ckpt_dir):
    music = make_music(tmp_path / "music", [(f"s{k:02d}.wav", 48000 * 30, 48000, 2) for k in range(12)])
    argv = [sys.executable, str(REPO / "generate.py"), "--encode", str(music), "-o", str(tmp_path / "tok"),
            "--workers", "2", *common(str(tiny_ckpt_dir))]
    proc = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        workers = lambda: [c for c in session(proc.pid).values() if "spawn_main" in c]  # noqa: E731
        assert wait_for(lambda: len(workers()) == 2 or proc.poll() is not None, 120)
        assert proc.poll() is None, "the run ended before its workers were seen; give it more songs"
        assert any("resource_tracker" in c for c in session(proc.pid).values())
        proc.kill()
        proc.wait()
        assert wait_for(lambda: not session(proc.pid), 10), f"still running: {session(proc.pid)}"
    finally:
        for pid in session(proc.pid):  # a failing test leaves nothing behind either
            os.kill(pid, signal.SIGKILL)
