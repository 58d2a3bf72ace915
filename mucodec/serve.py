"""Serve the codec over HTTP: token files in, audio streamed out window by window; audio in, token files out.

    python -m mucodec.serve --ckpt DIR --host 127.0.0.1 --port 8000      (or: mucodec-serve ...)

Endpoints (docs/serving.md): ``POST /v1/decode`` (a ``.mct`` or ``.npy`` token file, or JSON
``{"codes": [...]}``; query ``steps``, ``guidance``, ``seed``, ``format=wav|flac``) streams each decoder
window's audio as soon as it is final, its bytes joined equal to the file ``compress.decode_file`` writes for
the same codes and seed (float WAV; FLAC's samples); ``POST /v1/encode`` (audio -> ``.mct``, or JSON with
``?format=json``); ``GET /healthz``; ``GET /metrics`` (Prometheus text); ``GET /``: a page to upload a song
or a token file and hear it as it streams in.

One thread owns the model and the decode job's batcher (:mod:`serve_worker`); requests queue to it, so
concurrent decodes share the flow decoder's batches. Needs the ``serve`` extra (requirements-serve.txt).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import hmac
import io
import ipaddress
import json
import secrets
import sys
import threading
import time

import numpy as np
import soundfile
import torch
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from . import audio, serve_ray, tokens
from .errors import AudioError, MuCodecError, NumericalError, TokenFileError
from .serve_page import PAGE
from .serve_ray import RayServeConfig
from .serve_worker import DecodeRequest, DecodeWorker, EncodeJob, JobFailed, ServeConfig, request_options
from .settings import CODE2SOUND_STEPS, GUIDANCE_SCALE, DecodingOptions, build

MEDIA_TYPES = {"wav": "audio/wav", "flac": "audio/flac"}
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
RATE_WINDOW_SECONDS = 60.0  # windows per second are counted over this last span
BODY_KINDS = 'a .mct or .npy token file, or JSON {"codes": [...]}'


class Refusal(Exception):
    """A request answered with ``status`` and one sentence."""

    def __init__(self, status: int, sentence: str, headers: dict | None = None):
        super().__init__(sentence)
        self.status, self.sentence, self.headers = status, sentence, headers or {}

    def response(self) -> Response:
        return PlainTextResponse(self.sentence + "\n", self.status, headers=self.headers)


# ---- metrics -----------------------------------------------------------------------------------------
class Metrics:
    """The server's Prometheus metrics, in a registry of its own (two servers in one process do not mix)."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.queue = Gauge("mucodec_queue_depth", "Decode requests waiting for a batch slot.", registry=r)
        self.in_flight = Gauge("mucodec_songs_in_flight", "Songs in the decoder's batches.", registry=r)
        self.windows = Counter("mucodec_windows", "Decoder windows computed.", registry=r)
        self.rate = Gauge("mucodec_windows_per_second", "Decoder windows per second over the last minute.",
                          registry=r)
        self.fill = Gauge("mucodec_batch_fill", "Share of the batch slots that held a song, over all steps.",
                          registry=r)
        self.ttfa = Histogram("mucodec_time_to_first_audio_seconds", "From a decode request's arrival to its "
                              "first audio.", buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("mucodec_request_seconds", "From a decode request's arrival to its end.",
                                 ["outcome"], buckets=LATENCY_BUCKETS, registry=r)
        self._lock, self._recent, self._filled, self._slots = threading.Lock(), [], 0, 0
        self.rate.set_function(self._windows_per_second)

    def bind(self, worker: DecodeWorker) -> None:
        self.queue.set_function(worker.queue_depth)
        self.in_flight.set_function(worker.in_flight)

    def step(self, songs: int, slots: int, seconds: float) -> None:
        now = time.monotonic()
        self.windows.inc(songs)
        with self._lock:
            self._recent.append((now, songs))
            self._filled, self._slots = self._filled + songs, self._slots + slots
            self.fill.set(self._filled / self._slots)

    def _windows_per_second(self) -> float:
        since = time.monotonic() - RATE_WINDOW_SECONDS
        with self._lock:
            self._recent = [(t, n) for t, n in self._recent if t >= since]
            return sum(n for _, n in self._recent) / RATE_WINDOW_SECONDS

    def first_audio(self, seconds: float) -> None:
        self.ttfa.observe(seconds)

    def finished(self, seconds: float, ok: bool) -> None:
        self.latency.labels("ok" if ok else "failed").observe(seconds)


# ---- reading requests --------------------------------------------------------------------------------
async def read_body(request, limit: int) -> bytes:
    """The body, refused (413) as soon as it is larger than ``limit`` bytes."""
    too_big = Refusal(413, f"The request body is larger than the server's limit of {limit} bytes; send a "
                           f"shorter song.")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_big
    return bytes(body)


def read_codes_body(data: bytes, codec) -> tuple[torch.Tensor, int | None]:
    """(codes (1, 1, T), the audio's length in samples or None) of a decode request's body."""
    if not data:
        raise TokenFileError(f"The request body is empty; send {BODY_KINDS}.")
    num_samples = None
    if data.startswith(tokens.MAGIC):
        codes, header = tokens.decode_tokens(data, "The token file in the request body", expect=codec.token_spec)
        num_samples = int(header["num_samples"])
    elif data.startswith(b"\x93NUMPY"):
        try:
            codes = np.load(io.BytesIO(data), allow_pickle=False)
        except Exception as e:  # numpy says why in its own words
            raise TokenFileError(f"The .npy array in the request body cannot be read ({e}); save the codes with "
                                 f"numpy.save.") from None
    else:
        try:
            codes = json.loads(data)["codes"]
        except (ValueError, TypeError, KeyError):
            raise TokenFileError(f"The request body is not {BODY_KINDS}; send one of them.") from None
    return tokens.validate_codes(codes, codec.codebook_size, where="The codes in the request body",
                                 num_codebooks=1), num_samples


def read_audio_body(data: bytes, max_seconds: float) -> tuple[torch.Tensor, int, int]:
    """(stereo waveform at 48 kHz, the sent audio's rate, its channels) of an encode request's body."""
    try:
        with soundfile.SoundFile(io.BytesIO(data)) as f:
            rate, channels, frames = f.samplerate, f.channels, f.frames
            if frames > max_seconds * rate:
                raise Refusal(413, f"The audio sent lasts {frames / rate:.1f} s, longer than the server's limit of "
                                   f"{max_seconds:g} s; send a shorter song.")
            samples = f.read(dtype="float32", always_2d=True)
    except Refusal:
        raise
    except Exception as e:  # libsndfile reports every format problem the same way
        reason = str(getattr(e, "error_string", e)).rstrip(".")
        raise AudioError(f"The request body is not audio this server reads ({reason}); send WAV, FLAC or "
                         f"Ogg.") from None
    wav = audio.to_stereo(torch.from_numpy(np.ascontiguousarray(samples.T)), rate)
    return wav, rate, channels


def query_number(query, name: str, kind):
    value = query.get(name)
    if value is None or value == "":
        return None
    try:
        return kind(value)
    except ValueError:
        raise Refusal(400, f"The query parameter {name}={value!r} is not a {'whole ' if kind is int else ''}"
                           f"number; pass one.") from None


# ---- the application ---------------------------------------------------------------------------------
class Service:
    """The request handlers around one :class:`DecodeWorker`."""

    def __init__(self, codec, config: ServeConfig, api_key: str | None = None):
        self.codec, self.config, self.api_key = codec, config, api_key
        self.metrics = Metrics()
        self.worker = DecodeWorker(codec, config, self.metrics)
        self.metrics.bind(self.worker)

    def busy(self) -> Refusal:
        return Refusal(503, "The server's queue is full; send the request again later.",
                       {"Retry-After": str(self.config.retry_after)})

    def check_key(self, request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), self.api_key.encode()):
            raise Refusal(401, "The request lacks the server's API key; send it as 'Authorization: Bearer KEY'.")

    async def decode(self, request) -> Response:
        self.check_key(request)
        q = request.query_params
        fmt = q.get("format", "wav")
        if fmt not in MEDIA_TYPES:
            raise Refusal(400, f"format={fmt!r} is not one of {', '.join(MEDIA_TYPES)}; pass one of them.")
        opts = request_options(self.config, query_number(q, "steps", int), query_number(q, "guidance", float))
        seed = query_number(q, "seed", int)
        seed = secrets.randbits(63) if seed is None else DecodingOptions(seed=seed).seed  # checked as everywhere
        body = await read_body(request, self.config.max_body_bytes)
        # parsing and checking a large body takes a while: off the event loop, which serves the streams
        codes, num_samples = await asyncio.to_thread(read_codes_body, body, self.codec)
        seconds = codes.shape[-1] / self.codec.config.frame_rate
        if seconds > self.config.max_seconds:
            raise Refusal(413, f"The codes sent stand for {seconds:.1f} s of audio, longer than the server's limit "
                               f"of {self.config.max_seconds:g} s; send a shorter song.")
        loop, channel = asyncio.get_running_loop(), asyncio.Queue()
        req = DecodeRequest(codes, num_samples, seed, fmt, opts,
                            lambda item: loop.call_soon_threadsafe(channel.put_nowait, item))
        if not self.worker.admit(req):
            raise self.busy()
        try:
            first = await self._first(request, req, channel)  # the first window's audio, or why not
        except asyncio.CancelledError:
            self.worker.cancel(req)
            raise
        if first is None:  # the client left: nobody reads this answer
            return Response(status_code=499)
        if first[0] == "error":
            raise Refusal(first[1], first[2])
        headers = {"X-Seed": str(seed)}
        if first[1] is not None:
            headers["Content-Length"] = str(first[1])
        return StreamingResponse(self._stream(req, channel), media_type=MEDIA_TYPES[fmt], headers=headers)

    async def _first(self, request, req: DecodeRequest, channel: asyncio.Queue):
        """The request's first item; None once its client has gone, which frees its slot at the next window
        (a queued request, or one whose first window is being computed, sends nothing that could fail)."""
        getter = asyncio.ensure_future(channel.get())
        watcher = asyncio.ensure_future(_gone(request))
        try:
            await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                return getter.result()
            self.worker.cancel(req)
            return None
        finally:
            getter.cancel()
            watcher.cancel()

    async def _stream(self, req: DecodeRequest, channel: asyncio.Queue):
        try:
            while True:
                item = await channel.get()
                if isinstance(item, bytes):
                    yield item
                elif item[0] == "end":
                    return
                else:  # the song failed after its audio began: the connection is cut, not ended cleanly
                    raise RuntimeError(item[2])
        finally:
            self.worker.cancel(req)  # a no-op for a finished request; frees a gone client's slot

    async def encode(self, request) -> Response:
        self.check_key(request)
        fmt = request.query_params.get("format", "mct")
        if fmt not in ("mct", "json"):
            raise Refusal(400, f"format={fmt!r} is not one of mct, json; pass one of them.")
        data = await read_body(request, self.config.max_body_bytes)
        wav, rate, channels = await asyncio.to_thread(read_audio_body, data, self.config.max_seconds)
        job = EncodeJob(wav, wav.shape[-1], rate, channels)
        if not self.worker.admit(job):
            raise self.busy()
        try:
            codes, token_file = await asyncio.wrap_future(job.future)
        except JobFailed as e:
            raise Refusal(e.status, e.sentence) from None
        if fmt == "json":
            return JSONResponse({"codes": codes[0, 0].tolist(), "num_samples": wav.shape[-1],
                                 "frame_rate": self.codec.config.frame_rate})
        return Response(token_file, media_type="application/octet-stream")

    async def page(self, request) -> Response:
        return HTMLResponse(PAGE)

    async def healthz(self, request) -> Response:
        return PlainTextResponse("ok\n")

    async def metrics_text(self, request) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def _gone(request) -> None:
    """Returns when the client disconnects (the body is read: the server's next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _answer(handler):
    """A handler whose refusals and user errors become one-sentence answers (400 for a user's mistake)."""
    async def endpoint(request):
        try:
            return await handler(request)
        except Refusal as e:
            return e.response()
        except (MuCodecError, ValueError) as e:
            return Refusal(500 if isinstance(e, NumericalError) else 400, str(e)).response()
    return endpoint


def create_app(codec, config: ServeConfig | None = None, api_key: str | None = None) -> Starlette:
    """The ASGI application; the model thread runs from the app's startup to its shutdown."""
    service = Service(codec, config or ServeConfig(), api_key)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.worker.start()
        try:
            yield
        finally:
            service.worker.stop()

    routes = [Route("/v1/decode", _answer(service.decode), methods=["POST"]),
              Route("/v1/encode", _answer(service.encode), methods=["POST"]),
              Route("/healthz", service.healthz), Route("/metrics", service.metrics_text), Route("/", service.page)]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.service = service
    return app


# ---- the command line --------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    d = ServeConfig()
    p = argparse.ArgumentParser(prog="mucodec-serve", description="Serve the codec over HTTP (docs/serving.md).")
    p.add_argument("--ckpt", default=None, help="checkpoint folder or hub repo (default: the official release)")
    p.add_argument("--revision", default=None, help="branch, tag or commit of a hub repo")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/ requests")
    p.add_argument("--open", action="store_true", help="listen beyond this machine without an API key")
    p.add_argument("--batch", type=int, default=None,
                   help=f"songs per decoder batch (default {d.decoding.batch_size})")
    p.add_argument("--max-queue", type=int, default=d.max_queue,
                   help=f"requests waiting beyond the batch before 503 (default {d.max_queue})")
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes,
                   help=f"largest request body (default {d.max_body_bytes})")
    p.add_argument("--max-seconds", type=float, default=d.max_seconds,
                   help=f"longest song decoded or encoded (default {d.max_seconds:g})")
    p.add_argument("--steps", type=int, default=None,
                   help=f"default Euler steps per window (default {CODE2SOUND_STEPS}, the official code2sound's)")
    p.add_argument("--guidance", type=float, default=None, help=f"default guidance scale (default {GUIDANCE_SCALE})")
    r = RayServeConfig()
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local: this process (default); ray: replicas on Ray Serve (requirements-serve-ray.txt)")
    p.add_argument("--ray-address", default=r.address, help="with --engine ray: a running cluster (default: "
                   "RAY_ADDRESS, else a local instance)")
    p.add_argument("--max-replicas", type=int, default=r.max_replicas,
                   help="with --engine ray: most replicas autoscaling adds (default: one per GPU, else 1)")
    p.add_argument("--replica-cpus", type=float, default=r.replica_cpus,
                   help=f"with --engine ray and no GPU: CPUs each replica reserves (default {r.replica_cpus:g})")
    return p


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not is_loopback(args.host) and args.api_key is None and not args.open:
        print(f"mucodec-serve: --host {args.host} reaches beyond this machine; pass --api-key KEY, or --open to "
              f"serve without one.", file=sys.stderr)
        return 2
    if not is_loopback(args.host) and args.api_key is None:
        print(f"mucodec-serve: warning: serving on {args.host} without an API key (--open).", file=sys.stderr)
    try:  # a bad --steps, --guidance, --batch or Ray option is said before the model loads
        decoding = build(DecodingOptions, num_steps=args.steps, guidance_scale=args.guidance, batch_size=args.batch)
        config = ServeConfig(decoding=decoding, max_queue=args.max_queue, max_body_bytes=args.max_body_bytes,
                             max_seconds=args.max_seconds)
        load = functools.partial(load_codec, args.ckpt, args.device, args.revision)
        if args.engine == "ray":
            ray_config = RayServeConfig(args.ray_address, args.max_replicas, args.replica_cpus)
            serve_ray.start(load, create_app, config, args.api_key, args.host, args.port, ray_config,
                            runtime_env=package_env(), blocking=True)
            return 0
        app = create_app(load(), config, args.api_key)
    except MuCodecError as e:
        print(f"mucodec-serve: {e}", file=sys.stderr)
        return 2
    import uvicorn

    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


def load_codec(ckpt, device, revision):
    """The model a server process (or a Ray Serve replica) serves."""
    from .codec import MuCodec

    return MuCodec.from_pretrained(ckpt, device=device, revision=revision)


def package_env() -> dict:
    """Ray's runtime environment: this package travels to the replicas, as with the library's --engine ray."""
    from .library.ray_engine import runtime_env

    return runtime_env()

if __name__ == "__main__":
    sys.exit(main())
