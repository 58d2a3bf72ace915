"""The server's model thread: one thread owns the codec and the decode job's batcher, requests queue to it.

Decode requests become songs of :class:`library.decode.SongDecoder` -- the decode job's continuous batcher,
not a second one: window k of up to ``batch_size`` requests runs through the flow decoder together, and a
finished request's slot goes to the next one at the next window. Requests with other ``steps`` or
``guidance`` cannot share a flow-decoder batch, so each setting has its own batcher, stepped in turn.
Instead of files, :class:`StreamWriter` (the batcher's writer interface: open, write, close, abort, keyed by
request) turns each window's audio into bytes (:class:`audio_stream.AudioStream`) and hands them to the
request's connection as soon as the window finishes.

Each request's noise comes from its own seed, so its audio equals ``decode_file(..., seed=seed)`` alone,
whatever it is batched with (the batcher's guarantee, ``tests/test_decode_library.py``).

Nothing here imports the web stack: :mod:`serve` holds the HTTP side.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import itertools
import threading
import time
from dataclasses import dataclass

import torch

from . import tokens
from .audio_stream import AudioStream
from .errors import MuCodecError
from .library.decode import SongDecoder
from .settings import DecodingOptions


@dataclass(frozen=True)
class ServeConfig:
    """The server's limits and sizes (each has its command-line option in :mod:`serve`)."""

    # the decoding defaults of a request: steps, guidance, and the songs a batch steps together (batch_size)
    decoding: DecodingOptions = DecodingOptions()
    max_queue: int = 16  # requests waiting for a slot beyond the batch; more are refused (503)
    max_body_bytes: int = 64 * 2 ** 20  # a request body larger than this is refused (413)
    max_seconds: float = 15 * 60.0  # longest song decoded or encoded; longer is refused (413)
    retry_after: int = 10  # seconds a refused client is told to wait (Retry-After)


class JobFailed(Exception):
    """A request the server could not carry out (shutting down, an internal error): ``status`` and why."""

    def __init__(self, status: int, sentence: str):
        super().__init__(sentence)
        self.status, self.sentence = status, sentence


class NoMetrics:
    """What the worker reports, for a caller that records none."""

    def step(self, songs: int, slots: int, seconds: float) -> None: ...
    def first_audio(self, seconds: float) -> None: ...
    def finished(self, seconds: float, ok: bool) -> None: ...


class DecodeRequest:
    """One decode request: the batcher's song key, and the channel its bytes go back on.

    ``push`` is called on the model thread with bytes, ``("end",)`` or ``("error", status, sentence)``;
    it must hand them over to the connection without blocking."""

    _ids = itertools.count()

    def __init__(self, codes: torch.Tensor, num_samples: int | None, seed: int, fmt: str, opts, push):
        self.codes, self.num_samples, self.seed, self.fmt, self.opts, self.push = codes, num_samples, seed, fmt, \
            opts, push
        self.song_id = f"request-{next(self._ids)}"
        self.file = "the request body"
        self.frames = None  # the song's length in samples, once the batcher has it
        self.created, self.first, self.closed = time.monotonic(), None, False

    def where(self) -> str:
        return "the request"

    def send(self, data: bytes) -> None:
        if data and not self.closed:
            self.push(data)

    def end(self, status: int | None = None, sentence: str | None = None) -> bool:
        """Close the request once (finished, or failed with ``status``); False if it was already closed."""
        if self.closed:
            return False
        self.closed = True
        self.push(("end",) if status is None else ("error", status, sentence))
        return True


class StreamWriter:
    """The batcher's writer (as :class:`library.decode.AudioWriter`), writing into each request's connection.

    The header is held back and sent with the first window's audio, so the response starts only once there is
    audio (or an error, which can then still be a status code)."""

    def __init__(self, metrics):
        self.metrics, self.streams, self.failed = metrics, {}, []

    def open(self, req: DecodeRequest, dst=None) -> None:
        stream = AudioStream(req.fmt, req.frames)
        head, size = stream.start()
        self.streams[req] = [stream, head, size]

    def write(self, req: DecodeRequest, piece: torch.Tensor) -> None:
        entry = self.streams.get(req)
        if entry is None:
            return
        stream, head, size = entry
        try:
            data = stream.write(piece)
        except MuCodecError as e:  # NaN samples: this request fails, its batch goes on
            self.failed.append((req, str(e)))
            return
        if head is not None:
            entry[1] = None
            req.push(("start", size))
            req.first = time.monotonic()
            self.metrics.first_audio(req.first - req.created)
        req.send(head + data if head is not None else data)

    def close(self, req: DecodeRequest) -> cf.Future:
        fut = cf.Future()
        stream = self.streams.pop(req)[0]
        try:
            req.send(stream.finish())
        except Exception as e:  # noqa: BLE001 - the future carries why to the batcher
            fut.set_exception(e if isinstance(e, MuCodecError) else MuCodecError(f"internal error: {e}"))
        else:
            fut.set_result(None)
        return fut

    def abort(self, req: DecodeRequest) -> None:
        entry = self.streams.pop(req, None)
        if entry is not None:
            entry[0].close()

    def storage_error(self):
        return None  # nothing is stored

    def shutdown(self) -> None:
        for req in list(self.streams):
            self.abort(req)


class DecodeWorker:
    """The model thread. :meth:`admit` queues a request (False when the queue is full), :meth:`cancel` drops
    one whose client left (its slot is free at the next window), :meth:`stop` ends the thread."""

    def __init__(self, codec, config: ServeConfig, metrics=None):
        self.codec, self.config, self.metrics = codec, config, metrics or NoMetrics()
        self.cond = threading.Condition()
        self.inbox, self.gone, self.open, self.stopping = collections.deque(), [], 0, False
        self.decoders: dict = {}  # options without a seed -> the batcher of requests with those settings
        self.default_key = request_options(config)
        self._turn = 0
        self.thread = threading.Thread(target=self._run, name="mucodec-model", daemon=True)

    # ---- called from the connections' threads ----------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def admit(self, job) -> bool:
        """Queue a :class:`DecodeRequest` or an :class:`EncodeJob`; False when ``max_queue`` are waiting."""
        with self.cond:
            if self.stopping or self.open >= self.config.decoding.batch_size + self.config.max_queue:
                return False
            self.open += 1
            self.inbox.append(job)
            self.cond.notify()
            return True

    def cancel(self, req: DecodeRequest) -> None:
        with self.cond:
            self.gone.append(req)
            self.cond.notify()

    def stop(self, timeout: float | None = None) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join(timeout)

    def queue_depth(self) -> int:
        return len(self.inbox) + sum(len(d.waiting) for d in list(self.decoders.values()))

    def in_flight(self) -> int:
        return sum(len(d.active) for d in list(self.decoders.values()))

    # ---- the model thread ---------------------------------------------------------------------------
    def _busy(self) -> bool:
        return any(d.active or d.waiting for d in self.decoders.values())

    def _run(self) -> None:
        while True:
            with self.cond:
                while not (self.inbox or self.gone or self.stopping or self._busy()):
                    self.cond.wait()
                if self.stopping:
                    break
                jobs, gone = list(self.inbox), self.gone
                self.inbox.clear()
                self.gone = []
            try:
                for req in gone:
                    self._drop(req)
                for job in jobs:
                    self._take(job)
                self._step()
            except Exception as e:  # noqa: BLE001 - a bug fails the requests in the batchers, not the server
                why = f"internal error {type(e).__name__}: {e}"
                for job in jobs:  # those not yet taken when it happened
                    self._fail(job, 500, why)
                self._abort_all(500, why)
                self.decoders.clear()
        self._abort_all(503, "The server is shutting down; send the request again.")

    def _take(self, job) -> None:
        if isinstance(job, EncodeJob):
            job.run(self.codec)
            self._finished()
            return
        if job.closed:  # its client left before it was taken: nothing to compute
            return
        key = job.opts  # a request's seed travels with its song, not its options: they share batches
        dec = self.decoders.get(key)
        if dec is None:
            dec = self.decoders[key] = SongDecoder(self.codec, dataclasses.replace(key, seed=0), _no_path,
                                                   StreamWriter(self.metrics))
        try:
            job.frames = dec.submit(job, {"codes": job.codes, "num_samples": job.num_samples,
                                          "seed": job.seed}).num_samples
        except MuCodecError as e:
            self._close(job, 400, str(e))

    def _drop(self, req: DecodeRequest) -> None:
        if req.closed:
            return
        for dec in self.decoders.values():
            if dec.cancel(req):
                break
        self._close(req, 499, "The client disconnected.")

    def _step(self) -> None:
        busy = [d for d in self.decoders.values() if d.active or d.waiting]
        if not busy:
            return
        self._turn = (self._turn + 1) % len(busy)
        dec = busy[self._turn]
        started = time.monotonic()
        windows = dec.windows
        done = dec.step()
        self.metrics.step(dec.windows - windows, dec.batch_size, time.monotonic() - started)
        for req, why in dec.writer.failed:
            dec.cancel(req)
            self._close(req, 500, why)
        dec.writer.failed.clear()
        for req, _, why in done:
            self._close(req, None if why is None else 500, why)
        # the batcher of a setting no request uses any more goes, so that many settings cannot pile them up
        for key in [k for k, d in self.decoders.items() if k != self.default_key and not (d.active or d.waiting)]:
            del self.decoders[key]

    def _close(self, req: DecodeRequest, status: int | None, why: str | None) -> None:
        if req.end(status, why):
            self.metrics.finished(time.monotonic() - req.created, status is None)
            self._finished()

    def _finished(self) -> None:
        with self.cond:
            self.open -= 1

    def _abort_all(self, status: int, why: str) -> None:
        for dec in self.decoders.values():
            for req, _ in list(dec.waiting) + list(dec.active):
                dec.cancel(req)
                self._close(req, status, why)
        with self.cond:
            left = list(self.inbox)
            self.inbox.clear()
        for job in left:
            self._fail(job, status, why)

    def _fail(self, job, status: int, why: str) -> None:
        """Answer a request not yet answered with ``status`` and ``why``."""
        if isinstance(job, DecodeRequest):
            self._close(job, status, why)
        elif not job.future.done():
            job.future.set_exception(JobFailed(status, why))
            self._finished()


def _no_path(req) -> None:
    return None  # a request's audio goes to its connection, never to a file


class EncodeJob:
    """Audio -> token file bytes, run on the model thread between decode windows."""

    def __init__(self, wav: torch.Tensor, num_samples: int, original_sample_rate: int, original_channels: int):
        self.wav, self.num_samples = wav, num_samples
        self.original = (original_sample_rate, original_channels)
        self.future: cf.Future = cf.Future()

    def run(self, codec) -> None:
        try:
            codes = codec.sound2code(self.wav)
            spec = {k: v for k, v in codec.token_spec.items() if k != "num_codebooks"}
            data = tokens.encode_tokens(codes, num_samples=self.num_samples, original_sample_rate=self.original[0],
                                        original_channels=self.original[1], **spec)
        except Exception as e:  # noqa: BLE001 - the request fails, the server goes on
            self.future.set_exception(e)
        else:
            self.future.set_result((codes, data))


def request_options(config: ServeConfig, num_steps=None, guidance_scale=None) -> DecodingOptions:
    """A request's decoding options: the server's defaults with what the request sets (SettingError for a bad
    value), resolved, without a seed (each song carries its own)."""
    changes = {k: v for k, v in (("num_steps", num_steps), ("guidance_scale", guidance_scale)) if v is not None}
    return dataclasses.replace(config.decoding, seed=None, **changes).for_task("code2sound")
