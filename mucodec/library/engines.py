"""Which engine runs a job: the local one (:mod:`engine`) or Ray Data (:mod:`ray_engine`, imported only when
asked for, since it needs the ray extra). Both library jobs and the prepare job use them."""
from __future__ import annotations

import dataclasses

from .engine import Stats, run_local
from .store import Store


def run_on(engine: str, job, store: Store, todo: list, *, workers: int, progress: bool, extra_errors=(),
           log=None) -> tuple[Stats, int]:
    """(stats, devices used) of running ``todo`` through ``job`` on ``engine``: local or ray (Ray Data)."""
    if engine == "ray":
        from . import ray_engine

        return ray_engine.run(job, store, todo, workers=workers, progress=progress, extra_errors=extra_errors)
    return run_local(job, store, todo, workers=workers, progress=progress, extra_errors=extra_errors, log=log), 1


def joined(job, progress: bool):
    """``job`` (JobOptions) with the device its engine runs the model on: with ray, the cluster is joined (or
    a local instance started) here, and its device kind is the model's."""
    if job.engine != "ray":
        return job
    from . import ray_engine

    return dataclasses.replace(job, device=ray_engine.connect(job.address, progress))
