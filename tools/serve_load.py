#!/usr/bin/env python3
"""A bounded load test of the HTTP server on this machine: N concurrent clients, songs of mixed length.

    python3 tools/serve_load.py --ckpt DIR --steps 1 --lengths 2000 --clients 1
    python3 tools/serve_load.py --ckpt DIR --steps 1 --lengths 2000,2000,2000,2000 --clients 4 --check

Starts the server in this process on a free loopback port, sends one decode request per entry of
``--lengths`` (codes; 25 per second of audio) from ``--clients`` threads, and reports time to first audio
and total latency (p50, p99), throughput in hours of audio per hour, batch fill and windows per second.
``--check`` decodes each song again alone (``compress.decode_file`` with the seed the server used) and says
whether every response equals it. It stops by itself after the last request (or ``--timeout`` seconds each).
A benchmark, not a test: it measures; tests/test_serve.py checks.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch
import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mucodec import compress, serve  # noqa: E402
from mucodec.codec import MuCodec  # noqa: E402
from mucodec.files import write_atomic  # noqa: E402
from mucodec.serve_worker import ServeConfig  # noqa: E402
from mucodec.settings import DecodingOptions  # noqa: E402
from mucodec.tokens import encode_tokens  # noqa: E402


def percentile(values, q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lengths", default="2000,500,1200,2000", help="codes per song, comma-separated")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--timeout", type=float, default=3600.0)
    p.add_argument("--check", action="store_true", help="compare every response with its solo decode")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args()
    codec = MuCodec.from_pretrained(args.ckpt, device=args.device)
    app = serve.create_app(codec, ServeConfig(decoding=DecodingOptions(num_steps=args.steps, batch_size=args.batch)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    spec = {k: v for k, v in codec.token_spec.items() if k != "num_codebooks"}
    lengths = [int(n) for n in args.lengths.split(",")]
    bodies = [encode_tokens(torch.from_numpy(np.random.default_rng(k).integers(0, 16384, n)), **spec)
              for k, n in enumerate(lengths)]

    def ask(k: int):
        t0, first, parts = time.monotonic(), None, []
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/decode?seed={k}", content=bodies[k],
                          timeout=args.timeout) as r:
            r.raise_for_status()
            for chunk in r.iter_raw():
                first = first or time.monotonic() - t0
                parts.append(chunk)
        return first, time.monotonic() - t0, b"".join(parts)

    start = time.monotonic()
    with cf.ThreadPoolExecutor(args.clients) as pool:
        answers = list(pool.map(ask, range(len(lengths))))
    wall = time.monotonic() - start
    audio_s = sum(lengths) / codec.config.frame_rate
    c = [d.counters() for d in app.state.service.worker.decoders.values()]
    fill = sum(x["slots_filled"] for x in c) / max(1, sum(x["slots"] for x in c))
    print(f"device {args.device}, {args.steps} steps, batch {args.batch}, {args.clients} clients, songs of "
          f"{args.lengths} codes ({audio_s:.0f} s of audio)")
    print("| time to first audio p50 / p99 | total latency p50 / p99 | throughput | batch fill | windows/s |")
    print("| --- | --- | --- | --- | --- |")
    firsts, totals = [a[0] for a in answers], [a[1] for a in answers]
    figures = dict(device=args.device, steps=args.steps, batch=args.batch, clients=args.clients, lengths=lengths,
                   first_audio_p50=percentile(firsts, 50), first_audio_p99=percentile(firsts, 99),
                   total_p50=percentile(totals, 50), total_p99=percentile(totals, 99),
                   hours_per_hour=audio_s / wall, batch_fill=fill, windows_per_second=sum(x["windows"] for x in c) / wall)
    print(f"| {figures['first_audio_p50']:.1f} / {figures['first_audio_p99']:.1f} s | {figures['total_p50']:.1f} / "
          f"{figures['total_p99']:.1f} s | {figures['hours_per_hour']:.2f} h of audio per hour | {fill:.2f} | "
          f"{figures['windows_per_second']:.3f} |")
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            same = []
            for k, (_, _, body) in enumerate(answers):
                src, dst = Path(tmp) / f"{k}.mct", Path(tmp) / f"{k}.wav"
                src.write_bytes(bodies[k])
                compress.decode_file(codec, src, dst, DecodingOptions(seed=k, num_steps=args.steps))
                same.append(dst.read_bytes() == body)
        print(f"responses equal to their solo decode: {sum(same)} of {len(same)}")
        figures["equal_to_solo"] = sum(same)
    if args.json:
        write_atomic(Path(args.json), (json.dumps(figures, indent=2) + "\n").encode())
    server.should_exit = True


if __name__ == "__main__":
    main()
