"""``mucodec-serve --engine ray``: the server's application on Ray Serve (a local Ray on the CPU, one replica)
answers the same bytes as the plain server for the same codes and seed, over real HTTP through Serve's proxy."""
from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

from mucodec import serve, serve_ray  # noqa: E402
from mucodec.codec import MuCodec  # noqa: E402
from mucodec.serve_worker import ServeConfig  # noqa: E402
from mucodec.settings import DecodingOptions  # noqa: E402
from test_decode_library import cheap_wave, random_codes  # noqa: E402
from test_serve import Running, codec, free_port, token_file  # noqa: E402,F401  (codec: the fixture)

REPO = Path(__file__).resolve().parent.parent


def cheap_codec(ckpt: str) -> MuCodec:
    """The replica's model: the tiny checkpoints with the cheap VAE and vocoder of the plain server's tests."""
    MuCodec.latents_to_wave = cheap_wave
    return MuCodec.from_pretrained(ckpt, device="cpu")


@pytest.mark.slow  # Ray and Serve start in ~30 s on a small CPU
def test_ray_serve_answers_the_bytes_of_the_plain_server(tiny_ckpt_dir, codec):
    # the replica imports this worktree's package and these test modules (for cheap_codec)
    path = os.pathsep.join([str(REPO), str(REPO / "tests")])
    # the replica computes with as many threads as this process: the products' rounding depends on it, and
    # the bytes are compared with this process's own decode
    threads = str(torch.get_num_threads())
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path, "OMP_NUM_THREADS": threads}})
    config = ServeConfig(decoding=DecodingOptions(num_steps=1, batch_size=2))
    plain = Running(codec, batch_size=2)
    try:
        port = free_port()
        serve_ray.start(functools.partial(cheap_codec, str(tiny_ckpt_dir)), serve.create_app, config, None,
                        "127.0.0.1", port, serve_ray.RayServeConfig(max_replicas=1))
        data = token_file(codec, random_codes(900, 30))  # 2 windows
        chunks = []
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/decode?seed=12", content=data, timeout=120) as r:
            assert r.status_code == 200 and r.headers["x-seed"] == "12"
            chunks = list(r.iter_raw())
        expected = plain.client.post("/v1/decode?seed=12", content=data)
        assert expected.status_code == 200 and b"".join(chunks) == expected.content
        bad = httpx.post(f"http://127.0.0.1:{port}/v1/decode", content=b"garbage", timeout=60)
        assert bad.status_code == 400 and bad.text == plain.client.post("/v1/decode", content=b"garbage").text
    finally:
        plain.close()
        serve_ray.stop()
        ray.shutdown()
