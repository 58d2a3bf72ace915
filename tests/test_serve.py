"""The HTTP server (mucodec.serve) on the tiny checkpoints, over real loopback HTTP with httpx.

A streamed decode's bytes joined equal the file ``compress.decode_file`` writes for the same codes and seed, and
its first audio arrives while later windows are still to be computed; concurrent requests share the decode
job's batcher and each equals its solo decode; bad bodies get 400 and one sentence, oversize 413, a full queue
503 with Retry-After, and the server answers /healthz after each; a client that leaves frees its slot; a NaN
fails its request only; SIGTERM lets the requests in flight finish.

As in test_decode_library.py, the VAE and vocoder are replaced by a cheap function of the latents (the real
ones take ~20 s per window even at tiny width on a small CPU): they run per song, after the batched flow
decoder, on the same code path in the server and in ``decode_file``.
"""
from __future__ import annotations

import concurrent.futures as cf
import io
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("starlette")
pytest.importorskip("prometheus_client")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from mucodec import compress, decoding, serve, serve_worker  # noqa: E402
from mucodec.codec import MuCodec  # noqa: E402
from mucodec.serve_worker import ServeConfig  # noqa: E402
from mucodec.settings import DecodingOptions  # noqa: E402
from mucodec.tokens import encode_tokens  # noqa: E402
from test_decode_library import cheap_wave, random_codes  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SPC = 1920


@pytest.fixture(scope="module")
def codec(tiny_ckpt_dir):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(MuCodec, "latents_to_wave", cheap_wave)
        yield MuCodec.from_pretrained(tiny_ckpt_dir, device="cpu")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    """A real uvicorn server on a free loopback port, in a thread."""

    def __init__(self, codec, batch_size=None, **config):
        decoding = DecodingOptions(num_steps=1, **({} if batch_size is None else {"batch_size": batch_size}))
        self.app = serve.create_app(codec, ServeConfig(decoding=decoding, **config))
        self.service = self.app.state.service
        port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        self.client = httpx.Client(base_url=self.url, timeout=60)

    def healthy(self) -> bool:
        return self.client.get("/healthz").status_code == 200

    def close(self) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def server(codec):
    s = Running(codec, batch_size=4)
    yield s
    s.close()


def token_file(codec, codes: np.ndarray, num_samples=None) -> bytes:
    spec = {k: v for k, v in codec.token_spec.items() if k != "num_codebooks"}
    return encode_tokens(torch.from_numpy(codes), num_samples=num_samples, **spec)


def solo(codec, tmp_path: Path, data: bytes, seed: int, fmt: str = "wav") -> bytes:
    """What decode_file writes for the token file ``data`` with ``seed``, one step per window."""
    src, dst = tmp_path / f"solo-{seed}.mct", tmp_path / f"solo-{seed}.{fmt}"
    src.write_bytes(data)
    compress.decode_file(codec, src, dst, DecodingOptions(seed=seed, num_steps=1))
    return dst.read_bytes()


def one_sentence(text: str) -> bool:
    return text.endswith(".\n") and text.count("\n") == 1 and len(text) < 400


# ---- streaming ---------------------------------------------------------------------------------

def test_streamed_wav_equals_decode_file_and_starts_before_the_last_window(server, codec, tmp_path, monkeypatch):
    codes = random_codes(2500, 1)  # 3 windows for its num_samples
    data = token_file(codec, codes, num_samples=2500 * SPC - 777)
    windows_started = []
    real = MuCodec.decode_window

    def timed(self, *a, **k):
        windows_started.append(time.monotonic())
        return real(self, *a, **k)

    monkeypatch.setattr(MuCodec, "decode_window", timed)
    chunks = []
    with server.client.stream("POST", "/v1/decode?seed=5&steps=1", content=data) as r:
        assert r.status_code == 200
        assert r.headers["x-seed"] == "5" and r.headers["content-type"] == "audio/wav"
        for chunk in r.iter_raw():
            chunks.append((time.monotonic(), chunk))
    monkeypatch.undo()
    assert len(windows_started) == 3
    assert chunks[0][0] < windows_started[-1]  # the first audio came before the last window began
    body = b"".join(c for _, c in chunks)
    assert int(r.headers["content-length"]) == len(body)
    assert body == solo(codec, tmp_path, data, 5)  # bit for bit, header included


def test_streamed_flac_holds_the_samples_of_decode_file(server, codec, tmp_path):
    data = token_file(codec, random_codes(900, 2))
    r = server.client.post("/v1/decode?seed=9&format=flac", content=data)
    assert r.status_code == 200 and r.headers["content-type"] == "audio/flac"
    got, rate = sf.read(io.BytesIO(r.content), dtype="float32")
    expected, _ = sf.read(io.BytesIO(solo(codec, tmp_path, data, 9, "flac")), dtype="float32")
    assert rate == 48000 and got.shape == expected.shape == (900 * SPC, 2)
    assert np.array_equal(got, expected)


def test_json_and_npy_bodies_decode_like_the_token_file(server, codec, tmp_path):
    codes = random_codes(300, 3)
    expected = solo(codec, tmp_path, token_file(codec, codes), 11)
    buf = io.BytesIO()
    np.save(buf, codes.astype(np.int32)[None])
    assert server.client.post("/v1/decode?seed=11", content=buf.getvalue()).content == expected
    assert server.client.post("/v1/decode?seed=11", json={"codes": codes.tolist()}).content == expected


# ---- batching across requests ------------------------------------------------------------------

def test_concurrent_requests_share_batches_and_each_equals_its_solo_decode(server, codec, tmp_path):
    lengths = [50, 900, 120, 300, 10, 700, 400, 600]  # 1 window each, one of 2
    bodies = [token_file(codec, random_codes(n, 20 + k)) for k, n in enumerate(lengths)]
    before = {k: d.counters() for k, d in server.service.worker.decoders.items()}

    def ask(k):
        seed = "" if k == 0 else f"&seed={100 + k}"  # one without a seed: the server draws it
        r = server.client.post(f"/v1/decode?steps=1{seed}", content=bodies[k])
        return r.status_code, int(r.headers["x-seed"]), r.content

    with cf.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8)))
    for k, (status, seed, body) in enumerate(answers):
        assert status == 200
        if k:
            assert seed == 100 + k
        assert body == solo(codec, tmp_path, bodies[k], seed), k
    after = server.service.worker.decoders[server.service.worker.default_key].counters()
    old = before.get(server.service.worker.default_key, {"steps": 0, "slots_filled": 0})
    steps, filled = after["steps"] - old["steps"], after["slots_filled"] - old["slots_filled"]
    windows = sum(len(decoding.decode_windows(codec, n)) for n in lengths)
    assert filled == windows and steps < windows  # windows of several requests ran as one batch


def test_each_song_of_a_step_is_handed_out_before_the_next_songs_vocoder_runs(codec, monkeypatch):
    events = []

    def logged_wave(self, latents, fast_vocoder=True, num_samples=None):
        events.append("vocoder")
        return cheap_wave(self, latents)

    monkeypatch.setattr(MuCodec, "latents_to_wave", logged_wave)
    songs = [decoding.start_decode(codec, torch.from_numpy(random_codes(n, n)), seed=n) for n in (100, 200, 300)]
    handed = {}

    def on_song(i, pieces):
        events.append(f"song {i}")
        handed[i] = pieces

    out = decoding.decode_step(codec, songs, DecodingOptions(num_steps=1), on_song=on_song)
    assert events == ["vocoder", "song 0", "vocoder", "song 1", "vocoder", "song 2"]
    assert all(handed[i] is out[i] for i in range(3))


def test_other_settings_get_a_batcher_of_their_own_that_goes_when_idle(server, codec, tmp_path):
    r = server.client.post("/v1/decode?seed=4&steps=2&guidance=1", json={"codes": [5, 6, 7]})
    assert r.status_code == 200
    path = tmp_path / "x.wav"
    compress.decode_file(codec, torch.tensor([5, 6, 7]), path, DecodingOptions(seed=4, num_steps=2, guidance_scale=1.0))
    assert r.content == path.read_bytes()
    wait_until(lambda: set(server.service.worker.decoders) <= {server.service.worker.default_key},
               "an idle batcher of other settings was kept")


# ---- bad input and limits ----------------------------------------------------------------------

def bad_bodies(codec) -> dict:
    npy_float, npy_rows = io.BytesIO(), io.BytesIO()
    np.save(npy_float, np.zeros(10, np.float32))
    np.save(npy_rows, np.zeros((2, 10), np.int64))
    damaged = bytearray(token_file(codec, random_codes(40, 4)))
    damaged[-10] ^= 0xFF
    other = encode_tokens(torch.from_numpy(random_codes(40, 4) % 1024), codebook_size=1024)
    return {
        "empty": ("", b""), "garbage": ("", b"\x00garbage bytes"), "json without codes": ("", b'{"code": [1]}'),
        "float codes": ("", b'{"codes": [1.5, 2]}'), "codes out of range": ("", b'{"codes": [1, 16384]}'),
        "negative codes": ("", b'{"codes": [-1]}'), "no codes": ("", b'{"codes": []}'),
        "a path": ("", b'{"codes": "/etc/passwd"}'), "huge codes": ("", b'{"codes": [100000000000000000000000]}'),
        "npy of floats": ("", npy_float.getvalue()), "npy of two songs": ("", npy_rows.getvalue()),
        "damaged token file": ("", bytes(damaged)), "another model's tokens": ("", other),
        "steps": ("steps=0", b'{"codes": [1]}'), "steps not a number": ("steps=x", b'{"codes": [1]}'),
        "guidance": ("guidance=0.5", b'{"codes": [1]}'), "seed": ("seed=-1", b'{"codes": [1]}'),
        "format": ("format=mp3", b'{"codes": [1]}'),
    }


def test_every_bad_body_gets_400_and_one_sentence(server, codec):
    for name, (query, body) in bad_bodies(codec).items():
        r = server.client.post(f"/v1/decode?{query}", content=body)
        assert r.status_code == 400, (name, r.text)
        assert one_sentence(r.text), (name, r.text)
        assert server.healthy()
    for query in ("", "?format=xml"):
        r = server.client.post(f"/v1/encode{query}", content=b"not audio")
        assert r.status_code == 400 and one_sentence(r.text) and server.healthy()


def test_oversize_bodies_and_songs_get_413(codec):
    s = Running(codec, max_body_bytes=2000, max_seconds=10.0)
    try:
        r = s.client.post("/v1/decode", content=b"x" * 2001)
        assert r.status_code == 413 and "2000 bytes" in r.text and one_sentence(r.text)
        assert s.healthy()
        r = s.client.post("/v1/decode", content=token_file(codec, random_codes(251, 5)))  # 10.04 s
        assert r.status_code == 413 and "10 s" in r.text and one_sentence(r.text)
        assert s.healthy()
        wav = io.BytesIO()
        sf.write(wav, np.zeros((11 * 8000, 1), np.float32), 8000, format="WAV")
        r = s.client.post("/v1/encode", content=wav.getvalue())
        assert r.status_code == 413 and one_sentence(r.text) and s.healthy()
    finally:
        s.close()


def slow_windows(monkeypatch, seconds: float) -> None:
    real = MuCodec.decode_window

    def slow(self, *a, **k):
        time.sleep(seconds)
        return real(self, *a, **k)

    monkeypatch.setattr(MuCodec, "decode_window", slow)


def test_a_full_queue_answers_503_with_retry_after_and_a_gone_client_frees_its_slot(codec, monkeypatch):
    slow_windows(monkeypatch, 0.2)
    s = Running(codec, batch_size=1, max_queue=0)
    try:
        long = token_file(codec, random_codes(8000, 6))  # 11 windows
        with s.client.stream("POST", "/v1/decode?seed=1", content=long) as r:
            assert r.status_code == 200
            audio = r.iter_raw()  # kept: a generator dropped would close the connection and free the slot
            next(audio)  # the first window's audio: the request holds the only slot
            busy = s.client.post("/v1/decode", json={"codes": [1, 2, 3]})
            assert busy.status_code == 503 and one_sentence(busy.text)
            assert int(busy.headers["retry-after"]) == ServeConfig().retry_after
            assert s.healthy()
        # the client left after one window: its slot is free at the next one, long before its 11 windows
        wait_until(lambda: not (s.service.worker.in_flight() or s.service.worker.open),
                   "the slot of a gone client was not freed")
        assert s.service.worker.decoders[s.service.worker.default_key].windows < 11
        assert s.client.post("/v1/decode", json={"codes": [1, 2, 3]}).status_code == 200
    finally:
        s.close()


def test_a_client_that_leaves_before_its_first_audio_frees_its_place_at_the_next_window(codec, monkeypatch):
    slow_windows(monkeypatch, 0.2)
    s = Running(codec, batch_size=1)
    try:
        worker = s.service.worker
        with s.client.stream("POST", "/v1/decode?seed=1", content=token_file(codec, random_codes(8000, 6))) as r:
            audio = r.iter_raw()  # kept: a generator dropped would close the connection
            next(audio)  # this request holds the only slot for 11 windows
            body = json.dumps({"codes": [1, 2, 3]}).encode()
            with socket.create_connection(s.url.removeprefix("http://").split(":")) as raw:
                raw.sendall(b"POST /v1/decode HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                            b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                wait_until(lambda: worker.queue_depth() == 1, "the second request was not queued")
            # gone before any audio of it: dropped from the queue while the first request still decodes
            windows = worker.decoders[worker.default_key].windows
            wait_until(lambda: worker.queue_depth() == 0 and worker.open == 1, "a gone client kept its place")
            assert worker.decoders[worker.default_key].windows <= windows + 2  # within a couple of windows
            assert worker.in_flight() == 1  # the first request decodes on
        wait_until(lambda: worker.open == 0, "the slot of a gone client was not freed")
    finally:
        s.close()


def test_a_nan_fails_its_request_only(server, codec, monkeypatch):
    def nan_wave(self, latents, fast_vocoder=True, num_samples=None):
        return cheap_wave(self, latents) * float("nan")

    monkeypatch.setattr(MuCodec, "latents_to_wave", nan_wave)
    r = server.client.post("/v1/decode?seed=1", json={"codes": [1, 2, 3]})
    assert r.status_code == 500 and "NaN" in r.text and one_sentence(r.text)
    monkeypatch.setattr(MuCodec, "latents_to_wave", cheap_wave)
    assert server.client.post("/v1/decode?seed=1", json={"codes": [1, 2, 3]}).status_code == 200


def test_a_nan_in_a_shared_batch_fails_only_its_own_request(codec, monkeypatch, tmp_path):
    from_codes, sample, poisoned, batches = codec.quantizer.from_codes, codec.flow.sample, [], []

    def marking(codes):  # the song whose codes are all 7 is the one the flow decoder fails
        poisoned[:] = [(codes == 7).flatten(1).all(1)]
        return from_codes(codes)

    def nan_sample(*a, **k):
        time.sleep(0.3)  # slow enough for the second request to join the first one's batch
        latents, bad = sample(*a, **k), poisoned[0]
        if bad.any():
            batches.append(len(bad))
            latents = torch.where(bad[:, None, None, None], float("nan"), latents)
        return latents

    monkeypatch.setattr(codec.quantizer, "from_codes", marking)
    monkeypatch.setattr(codec.flow, "sample", nan_sample)
    data = token_file(codec, random_codes(3300, 21))  # 4 windows
    s = Running(codec, batch_size=2)
    try:
        with s.client.stream("POST", "/v1/decode?seed=21", content=data) as r:
            audio = r.iter_raw()
            chunks = [next(audio)]
            nan = s.client.post("/v1/decode?seed=22", json={"codes": [7] * 300})
            chunks += list(audio)
        assert nan.status_code == 500 and "NaN" in nan.text and one_sentence(nan.text)
        assert batches == [2]  # it failed inside a batch it shared
        monkeypatch.undo()
        assert r.status_code == 200 and b"".join(chunks) == solo(codec, tmp_path, data, 21)
        assert s.healthy()
    finally:
        s.close()


def test_an_internal_error_fails_the_requests_in_hand_not_the_server(server, monkeypatch):
    def boom(self, req, dst=None):
        raise RuntimeError("boom")

    monkeypatch.setattr(serve_worker.StreamWriter, "open", boom)
    r = server.client.post("/v1/decode?seed=1", json={"codes": [1, 2, 3]})
    assert r.status_code == 500 and "internal error RuntimeError: boom" in r.text
    monkeypatch.undo()
    assert server.client.post("/v1/decode?seed=1", json={"codes": [1, 2, 3]}).status_code == 200
    wait_until(lambda: server.service.worker.open == 0, "a request was left counted")  # none is lost


def wait_until(done, why: str, seconds: float = 5.0) -> None:
    """The worker closes a request just after its last bytes leave: its counters settle a moment later."""
    deadline = time.monotonic() + seconds
    while not done():
        assert time.monotonic() < deadline, why
        time.sleep(0.02)


# ---- encode, metrics, the command line ---------------------------------------------------------

def test_encode_returns_what_encode_file_writes(server, codec, tmp_path):
    wav = tmp_path / "in.wav"
    sf.write(wav, np.random.default_rng(0).uniform(-0.5, 0.5, (44100, 1)).astype(np.float32), 44100)
    compress.encode_file(codec, wav, tmp_path / "in.mct")
    r = server.client.post("/v1/encode", content=wav.read_bytes())
    assert r.status_code == 200 and r.content == (tmp_path / "in.mct").read_bytes()
    j = server.client.post("/v1/encode?format=json", content=wav.read_bytes()).json()
    codes, _ = __import__("mucodec").tokens.decode_tokens(r.content)
    assert j["codes"] == codes[0, 0].tolist() and j["num_samples"] == 48000


def test_metrics_are_prometheus_text(server):
    server.client.post("/v1/decode?seed=1", json={"codes": [1, 2, 3]})
    r = server.client.get("/metrics")
    assert r.status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    for name in ("mucodec_queue_depth", "mucodec_songs_in_flight", "mucodec_windows", "mucodec_windows_per_second",
                 "mucodec_batch_fill", "mucodec_time_to_first_audio_seconds", "mucodec_request_seconds"):
        assert name in families, name
    value = {s.name: s.value for f in families.values() for s in f.samples}
    assert value["mucodec_windows_total"] >= 1 and value["mucodec_time_to_first_audio_seconds_count"] >= 1
    assert 0 < value["mucodec_batch_fill"] <= 1 and value["mucodec_queue_depth"] == 0


def test_the_page_uploads_to_the_endpoints_and_shows_the_figures(server):
    r = server.client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    for needed in ('"/v1/encode"', '"/v1/decode?"', "time to first audio", "real-time factor", 'type="file"'):
        assert needed in r.text, needed


def test_listening_beyond_this_machine_asks_for_a_key(capsys):
    assert serve.main(["--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "--api-key" in err and err.count("\n") == 1


def test_the_api_key_is_required_when_set(codec):
    s = Running(codec)
    s.service.api_key = "k3y"
    try:
        assert s.client.post("/v1/decode", json={"codes": [1]}).status_code == 401
        ok = s.client.post("/v1/decode", json={"codes": [1]}, headers={"Authorization": "Bearer k3y"})
        assert ok.status_code == 200 and s.healthy()
    finally:
        s.close()


SERVER_SCRIPT = """
import sys
sys.path[:0] = [{tests!r}]
from mucodec.codec import MuCodec
from test_decode_library import cheap_wave
MuCodec.latents_to_wave = cheap_wave
from mucodec import serve
sys.exit(serve.main(sys.argv[1:]))
"""


@pytest.mark.slow  # a server process of its own: ~30 s of imports and loading on a small CPU
def test_sigterm_lets_the_requests_in_flight_finish(tiny_ckpt_dir, codec, tmp_path):
    port = free_port()
    script = SERVER_SCRIPT.format(tests=str(REPO / "tests"))
    proc = subprocess.Popen([sys.executable, "-c", script, "--ckpt", str(tiny_ckpt_dir), "--port", str(port),
                             "--steps", "1", "--device", "cpu"], cwd=REPO, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline and proc.poll() is None, "the server did not start"
                time.sleep(0.2)
        data = token_file(codec, random_codes(2500, 7))
        with httpx.stream("POST", url + "/v1/decode?seed=3", content=data, timeout=60) as r:
            stream = r.iter_raw()
            chunks = [next(stream)]
            proc.send_signal(signal.SIGTERM)
            chunks += list(stream)
        assert b"".join(chunks) == solo(codec, tmp_path, data, 3)  # the request in flight was finished
        # uvicorn re-raises the signal once drained, so the status says that SIGTERM ended it
        assert proc.wait(30) in (0, -signal.SIGTERM)
        assert b"Finished server process" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---- the page in a headless Chromium -----------------------------------------------------------

class Chromium:
    """Headless Chromium driven over its DevTools pipe (fds 3 and 4: JSON messages ended by NUL)."""

    def __init__(self, exe: str, profile: Path):
        import fcntl

        to_browser_r, to_browser_w = os.pipe()
        from_browser_r, from_browser_w = os.pipe()
        # moved above 4 first, so that placing one at 3 or 4 in the child cannot overwrite the other
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_browser_r, from_browser_w)]

        def fds():
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        argv = [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
                "--autoplay-policy=no-user-gesture-required", f"--user-data-dir={profile}", "about:blank"]
        self.proc = subprocess.Popen(argv, pass_fds=(3, 4), preexec_fn=fds, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        for fd in (to_browser_r, from_browser_w, *high):
            os.close(fd)
        self.out, self.inp = to_browser_w, from_browser_r
        self.buf, self.ids, self.session = b"", itertools.count(1), None

    def call(self, method: str, **params):
        n = next(self.ids)
        msg = {"id": n, "method": method, "params": params}
        if self.session:
            msg["sessionId"] = self.session
        os.write(self.out, json.dumps(msg).encode() + b"\0")
        while True:
            while b"\0" not in self.buf:
                data = os.read(self.inp, 1 << 16)
                assert data, "Chromium closed its pipe"
                self.buf += data
            raw, self.buf = self.buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == n:
                assert "error" not in reply, reply
                return reply["result"]

    def evaluate(self, expression: str, gesture: bool = False):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                         userGesture=gesture)["result"].get("value")

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        os.close(self.out)
        os.close(self.inp)


def test_the_page_plays_a_token_file_in_chromium(server, codec, tmp_path):
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        pytest.skip("no Chromium on this machine")
    song = tmp_path / "song.mct"
    song.write_bytes(token_file(codec, random_codes(900, 8)))  # 2 windows
    browser = Chromium(exe, tmp_path / "profile")
    try:
        target = browser.call("Target.createTarget", url=server.url + "/")["targetId"]
        browser.session = browser.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        deadline = time.monotonic() + 30
        while browser.evaluate("document.readyState + !!document.getElementById('file')") != "completetrue":
            assert time.monotonic() < deadline, "the page did not load"
            time.sleep(0.1)
        root = browser.call("DOM.getDocument")["root"]["nodeId"]
        node = browser.call("DOM.querySelector", nodeId=root, selector="#file")["nodeId"]
        browser.call("DOM.setFileInputFiles", files=[str(song)], nodeId=node)
        browser.evaluate("document.getElementById('steps').value = 1; document.querySelector('button').click()",
                         gesture=True)
        deadline = time.monotonic() + 60
        while "real-time factor" not in (text := browser.evaluate("document.getElementById('out').textContent")):
            assert time.monotonic() < deadline and "Error" not in text, text
            time.sleep(0.2)
        playback = browser.evaluate("window.playback")
        assert playback == {"state": "running", "frames": 900 * SPC}  # every sample was scheduled to play
        assert re.search(r"time to first audio \d+\.\d\d s\nreal-time factor \d+\.\d{3} ", text), text
    finally:
        browser.close()
