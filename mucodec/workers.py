"""Worker processes: one picklable function run on each item of a list, in order, in spawned processes.

At most ``prefetch`` items are done ahead of the consumer, so memory stays bounded whatever the list's
length; an item that kills its process takes no other item with it; and no worker outlives its parent,
however the parent dies.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import multiprocessing
import os
import signal
import threading
import time

from .errors import MuCodecError

PARENT_POLL_SECONDS = 0.5


def default_workers() -> int:
    """Worker processes: one core is left to the model (more help little: reading is the cheap part)."""
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def call_safely(fn, item) -> dict:
    """``fn(item)``, with any failure turned into {'error': message}: a worker must never die of a bad file."""
    try:
        return fn(item)
    except MuCodecError as e:
        return {"error": str(e)}
    except Exception as e:  # a bug or a decoder crash on one file: reported as that file's error
        return {"error": f"internal error {type(e).__name__}: {e}"}


def _exit_with_parent(parent: int) -> None:
    # Each worker holds both ends of the pool's pipes, so no end-of-file ever tells it that its parent is
    # gone: without this a SIGKILLed run leaves its workers, and through their inherited descriptor
    # multiprocessing's resource tracker, running forever. Polling works on every system, and unlike
    # Linux's parent-death signal it does not fire when merely the thread that started the worker ends.
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_SECONDS)
    os._exit(1)


def _init_worker(parent: int) -> None:
    # Ctrl-C goes to the whole process group: the parent decides what to keep, workers just stop with it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(parent,), name="exit-with-parent", daemon=True).start()
    import torch

    torch.set_num_threads(1)


class Reader:
    """Items -> ``(item, read(item))`` in order, ``workers`` spawned processes at a time (0: in this process).

    ``read`` is a module-level function (it is pickled by name) returning a dict, ``{'error': message}`` for
    an item it cannot use. ``items`` have a ``path`` naming them in messages.
    """

    def __init__(self, read, items: list, workers: int, prefetch: int | None = None):
        self.read, self.items, self.workers = read, items, workers
        self.prefetch = prefetch or 2 * workers + 1
        self.pool = None

    def _pool(self):
        # spawn, not fork: this process already runs torch threads, and a forked copy of them can deadlock
        return cf.ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                      initializer=_init_worker, initargs=(os.getpid(),))

    def __iter__(self):
        if self.workers == 0:
            for item in self.items:
                yield item, call_safely(self.read, item)
            return
        self.pool = self._pool()
        pending, queue = collections.deque(), collections.deque(self.items)
        solo = 0  # items at the front of the queue to read one at a time, after a worker died among them
        crashes = successes = 0
        try:
            while True:
                while len(pending) < (1 if solo else self.prefetch) and queue:
                    item = queue.popleft()
                    pending.append((item, self.pool.submit(call_safely, self.read, item)))
                if not pending:
                    return
                item, fut = pending.popleft()
                try:
                    got = fut.result()
                except cf.process.BrokenProcessPool:
                    suspects = [item] + [x for x, _ in pending]
                    pending.clear()
                    self.pool.shutdown(wait=False, cancel_futures=True)
                    self.pool = self._pool()
                    if len(suspects) > 1:  # any of them may be the culprit: read them again, alone
                        queue.extendleft(reversed(suspects))
                        solo = len(suspects)
                        continue
                    crashes += 1
                    solo = max(solo - 1, 0)
                    if not successes and crashes >= 3:
                        raise MuCodecError("The worker processes die before reading any file; run with "
                                           "--workers 0 to read in this process.")
                    got = {"error": f"Reading {item.path} crashed its worker process; check or re-export the file."}
                else:
                    successes += "error" not in got
                    solo = max(solo - 1, 0)
                yield item, got
        finally:
            self.pool.shutdown(wait=False, cancel_futures=True)
