"""``mucodec-serve --engine ray``: the same HTTP application deployed on Ray Serve, to scale beyond one process.

Each replica loads the model and runs the ASGI application of :func:`serve.create_app` -- its handlers, its
model thread and the decode job's batcher -- unchanged; Ray Serve's proxy routes requests to replicas and
passes each window's audio through as it is streamed. Replicas are added while the requests at each exceed a
full batch (Serve's autoscaling on ongoing requests, which counts those queued in the replica), up to one
replica per GPU (``num_gpus=1`` each) where the cluster has GPUs, else ``max_replicas`` CPU replicas.

Ray is imported only inside the functions here, so importing this module costs nothing without the extra
(``pip install -r requirements-serve-ray.txt``). This module does not import :mod:`serve`: the application
factory is passed in, so the two never import each other.
"""
from __future__ import annotations

import signal
import time
from dataclasses import dataclass

from .errors import ArgumentError

DEPLOYMENT = "mucodec"  # the Serve application's and deployment's name


@dataclass(frozen=True)
class RayServeConfig:
    """How the application is spread over a Ray cluster (``--engine ray``'s options in :mod:`serve`)."""

    address: str | None = None  # a running cluster (None: RAY_ADDRESS, else a new local instance)
    max_replicas: int | None = None  # None: one per GPU of the cluster, else 1 (CPU)
    replica_cpus: float = 1.0  # CPUs reserved by each replica on a cluster without GPUs
    drain_seconds: float = 600.0  # on shutdown, how long a replica may finish its requests in flight

    def __post_init__(self):
        if self.max_replicas is not None and self.max_replicas < 1:
            raise ArgumentError(f"--max-replicas {self.max_replicas} is below 1; pass 1 or more.")
        if not self.replica_cpus > 0:
            raise ArgumentError(f"--replica-cpus {self.replica_cpus} is not above 0; pass a positive number.")
        if not self.drain_seconds >= 0:
            raise ArgumentError(f"drain_seconds {self.drain_seconds} is below 0; pass 0 or more.")


def _ray():
    try:
        import ray
        from ray import serve
    except ImportError:
        raise ArgumentError("--engine ray needs Ray Serve: pip install -r requirements-serve-ray.txt (or leave "
                            "--engine out for the plain server).") from None
    return ray, serve


class CodecReplica:
    """One replica: the model loaded by ``load()`` once, the application built around it by ``build_app``."""

    def __init__(self, load, build_app, config, api_key):
        self.codec_app = build_app(load(), config, api_key)

    def __serve_build_asgi_app__(self):
        return self.codec_app


def deployment(load, build_app, config, api_key=None, ray_config: RayServeConfig = RayServeConfig(), gpus=0):
    """The bound Serve application: replicas of ``build_app(load(), config, api_key)``.

    ``load``: a picklable function returning the codec (run once in each replica); ``config``: the
    :class:`serve_worker.ServeConfig` every replica serves with; ``gpus``: the cluster's GPUs."""
    _, serve = _ray()
    batch = config.decoding.batch_size
    replicas = ray_config.max_replicas or max(1, int(gpus))
    # a replica answers 503 itself beyond a full batch and its queue; Serve routes no more to it than that
    options = dict(max_ongoing_requests=batch + config.max_queue, graceful_shutdown_timeout_s=ray_config.drain_seconds,
                   autoscaling_config={"min_replicas": 1, "max_replicas": replicas, "target_ongoing_requests": batch},
                   ray_actor_options={"num_gpus": 1} if gpus else {"num_cpus": ray_config.replica_cpus})
    cls = serve.deployment(name=DEPLOYMENT, **options)(serve.ingress()(CodecReplica))
    return cls.bind(load, build_app, config, api_key)


def start(load, build_app, config, api_key, host: str, port: int, ray_config: RayServeConfig = RayServeConfig(),
          runtime_env: dict | None = None, blocking: bool = False):
    """Join (or start) Ray, start Serve's HTTP proxy on ``host:port`` and deploy the application.
    ``blocking``: serve until interrupted (the command line), else return once the replicas are up."""
    ray, serve = _ray()
    if not ray.is_initialized():
        ray.init(address=ray_config.address, runtime_env=runtime_env, include_dashboard=False)
    gpus = ray.cluster_resources().get("GPU", 0)
    serve.start(http_options={"host": host, "port": port})
    app = deployment(load, build_app, config, api_key, ray_config, gpus)
    serve.run(app, name=DEPLOYMENT, route_prefix="/")
    if blocking:
        _serve_until_stopped(ray, serve)


def _serve_until_stopped(ray, serve) -> None:
    """Wait for Ctrl-C or SIGTERM, then drain: Serve lets each replica finish its requests in flight (up to
    ``drain_seconds``) before it stops, as the plain server does on SIGTERM."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.delete(DEPLOYMENT)  # first, while the proxy still carries the streams of the requests in flight
        serve.shutdown()
        ray.shutdown()


def stop() -> None:
    """Remove the application and Serve's proxy (Ray itself stays up for its owner)."""
    _, serve = _ray()
    serve.shutdown()

