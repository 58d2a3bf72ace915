"""The flow decoder's ODE solvers (mucodec.samplers) and guidance limited to a time interval.

* Orders: on dx/dt = -2 t x (x = x0 exp(-t^2), derived by hand) in float64, Euler's error halves when the
  steps double and Heun's and AB2's fall 4x (asymptotic ratios 2 and 4, asserted within 10 %).
* On a tiny window of the flow decoder, Heun and AB2 beat Euler at equal DiT evaluations against a fine
  reference; every evaluation of every solver sees the prefix frames on their straight path.
* DiT passes and batch rows per window are counted for guidance 1, full guidance and an interval.
* Batching: a song decoded in a batch equals the same song decoded alone (bit for bit), for every solver.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import helpers
from mucodec import decoding, samplers
from mucodec.codec import MuCodec
from mucodec.errors import ArgumentError, OutputError, SettingError
from mucodec.settings import DecodingOptions, build


@pytest.fixture(autouse=True)
def one_thread():
    """At these tiny widths a DiT pass is a few microseconds of arithmetic per thread: on a loaded machine a
    second thread only waits for the first (10-20x slower here), so these tests run on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- order of convergence on a smooth ODE with a known solution -------------------------------------

X0 = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)


def gaussian_error(sampler: str, steps: int, schedule: str = "uniform") -> float:
    """|x(1) - x0 exp(-1)| for dx/dt = -2 t x solved from x0 at t = 0.

    (On dx/dt = x cos t, AB2's second-order error term and that of its Euler start nearly cancel, so its
    error there falls faster than 4x for a while: an ODE where they do not is the cleaner measure.)"""
    grid = samplers.time_grid(steps, dtype=torch.float64, schedule=schedule)
    x = samplers.solve(sampler, lambda x, t: (x, -2 * t * x), X0.clone(), grid)
    return float((x - X0 * math.exp(-1.0)).norm())


@pytest.mark.parametrize("sampler,order", [("euler", 1), ("heun", 2), ("ab2", 2)])
def test_convergence_order(sampler, order):
    errors = [gaussian_error(sampler, n) for n in (16, 32, 64)]
    ratios = [errors[i] / errors[i + 1] for i in range(2)]
    assert all(0.9 * 2 ** order <= r <= 1.1 * 2 ** order for r in ratios), (errors, ratios)


@pytest.mark.parametrize("sampler,order", [("euler", 1), ("heun", 2), ("ab2", 2)])
def test_convergence_order_on_the_cosine_schedule(sampler, order):
    errors = [gaussian_error(sampler, n, "cosine") for n in (16, 32, 64)]
    ratios = [errors[i] / errors[i + 1] for i in range(2)]
    assert all(0.9 * 2 ** order <= r <= 1.1 * 2 ** order for r in ratios), (errors, ratios)


def test_cosine_schedule_is_denser_near_noise():
    n = 4
    grid = samplers.time_grid(n, schedule="cosine")
    ts, dts = [float(t) for t, _ in grid], [float(dt) for _, dt in grid]
    # t_k = 1 - cos(pi/2 k/n), by hand: 0, 1 - cos(pi/8), 1 - cos(pi/4), 1 - cos(3 pi/8)
    assert ts == pytest.approx([1 - math.cos(math.pi / 8 * k) for k in range(n)], abs=1e-7)
    assert all(a < b for a, b in zip(dts, dts[1:])) and dts[0] < 1 / n < dts[-1]
    assert float(grid[-1][0] + grid[-1][1]) == 1.0
    # uniform stays the official grid, and the default
    assert [float(t) for t, _ in samplers.time_grid(3, schedule="uniform")] == \
        [float(t) for t, _ in samplers.time_grid(3)]
    assert DecodingOptions().schedule == "uniform"
    with pytest.raises(SettingError, match="schedule must be one of uniform, cosine"):
        DecodingOptions(schedule="karras")


def test_time_grid_is_the_official_accumulation():
    ts = [float(t) for t, _ in samplers.time_grid(3)]
    assert ts == [0.0, np.float32(1 / 3), np.float32(0.6666666)]  # 0.6666666, not 0.6666667
    assert ts[2] != np.linspace(0, 1, 4, dtype=np.float32)[2]
    t_end, dt_end = samplers.time_grid(3)[-1]
    assert abs(float(t_end + dt_end) - 1) < 1e-6
    assert samplers.evaluations("heun", 10) == 20 and samplers.evaluations("ab2", 10) == 10
    # 20 steps meet t = k / 20; k = 4..16 lie in [0.2, 0.8], though t = 0.8 is float32 0.800000012 > 0.8
    assert samplers.dit_rows("euler", 20, 1.5, (0.2, 0.8)) == [1] * 4 + [2] * 13 + [1] * 3
    assert samplers.dit_rows("heun", 2, 1.5, (0.5, 0.5)) == [1, 2, 2, 1]


# ---- a tiny window ------------------------------------------------------------------------------------

FRAMES, PREFIX = 32, 8


def window(codec, items: int = 1, seed: int = 0):
    """Inputs of one FRAMES-frame window with a PREFIX-frame in-context prefix: (z_q, true_latents, noise)."""
    g = torch.Generator().manual_seed(seed)
    cfg = codec.flow.cfg
    codes = torch.randint(0, codec.codebook_size, (items, 1, cfg.codes_per_frame * FRAMES), generator=g)
    z_q, _ = codec.quantizer.from_codes(codes)
    shape = (items, cfg.latent_channels, FRAMES, cfg.freq_bins)
    return z_q, torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def solve_window(flow, inputs, steps, sampler="euler", guidance=1.5, interval=None, schedule="uniform"):
    z_q, true_latents, noise = inputs
    return flow.sample(z_q, true_latents, FRAMES, PREFIX, noise, steps, guidance, sampler=sampler,
                       guidance_interval=interval, schedule=schedule)


def test_second_order_solvers_beat_euler_at_equal_evaluations(tiny_codec):
    flow, inputs = helpers.smooth_in_time(tiny_codec.flow), window(tiny_codec)
    reference = solve_window(flow, inputs, 32, "heun")

    def error(sampler, evaluations):
        x = solve_window(flow, inputs, evaluations // samplers.EVALUATIONS_PER_STEP[sampler], sampler)
        return float((x - reference).norm() / reference.norm())

    for evaluations in (4, 8):
        euler = error("euler", evaluations)
        for sampler in ("heun", "ab2"):
            assert error(sampler, evaluations) < 0.5 * euler, (sampler, evaluations)


def counted(codec, **kw):
    """Solve a 2-item window; returns (latents, [(batch rows, timesteps)] of every DiT pass)."""
    calls = []
    hook = codec.flow.estimator.register_forward_pre_hook(
        lambda m, args: calls.append((args[0].shape[0], [float(v) for v in args[1]])))
    try:
        return solve_window(codec.flow, window(codec, items=2), **kw), calls
    finally:
        hook.remove()


@pytest.mark.parametrize("sampler,steps,interval,rows", [
    ("euler", 4, None, [4, 4, 4, 4]),
    ("euler", 4, (0.3, 0.8), [2, 2, 4, 4]),          # t = 0, 0.25 outside; 0.5, 0.75 inside
    ("heun", 2, (0.3, 0.8), [2, 4, 4, 2]),           # t = 0 | 0.5 ; 0.5 | 1
    ("ab2", 4, (0.0, 0.0), [4, 2, 2, 2]),
])
def test_dit_rows_per_evaluation(tiny_codec, sampler, steps, interval, rows):
    _, calls = counted(tiny_codec, steps=steps, sampler=sampler, interval=interval)
    assert [n for n, _ in calls] == rows
    assert [2 * r for r in samplers.dit_rows(sampler, steps, 1.5, interval)] == rows  # 2 songs
    assert all(len(t) == n and len(set(t)) == 1 for n, t in calls)


def test_the_schedule_reaches_the_dit(tiny_codec):
    cosine = [float(t) for t, _ in samplers.time_grid(4, schedule="cosine")]
    _, calls = counted(tiny_codec, steps=4, sampler="ab2", schedule="cosine")
    assert [t[0] for _, t in calls] == cosine
    # from the options of a decode, through the codec
    cfg, seen = tiny_codec.config, []
    hook = tiny_codec.flow.estimator.register_forward_pre_hook(lambda m, args: seen.append(float(args[1][0])))
    try:
        codes = torch.zeros(1, 1, cfg.window_latents * tiny_codec.flow.cfg.codes_per_frame, dtype=torch.long)
        shape = (1, tiny_codec.flow.cfg.latent_channels, cfg.window_latents, tiny_codec.flow.cfg.freq_bins)
        tiny_codec.decode_window(codes, torch.zeros(shape), 0, torch.randn(shape),
                                 DecodingOptions(num_steps=4, guidance_scale=1.0, schedule="cosine"))
    finally:
        hook.remove()
    assert seen == cosine


def test_the_schedule_is_a_keyword_of_code2sound(tiny_codec):
    codes = torch.arange(40).reshape(1, 1, -1) * 7
    cosine = tiny_codec.code2sound(codes, num_steps=3, seed=1, schedule="cosine")
    options = DecodingOptions(num_steps=3, seed=1, schedule="cosine")
    assert torch.equal(cosine, torch.cat(list(decoding.stream(tiny_codec, codes, options)), -1))
    assert not torch.equal(cosine, tiny_codec.code2sound(codes, num_steps=3, seed=1))
    with pytest.raises(SettingError, match="schedule must be one of uniform, cosine"):
        tiny_codec.code2sound(codes, num_steps=3, schedule="karras")


def test_guidance_one_runs_only_the_conditional_half(tiny_codec):
    _, calls = counted(tiny_codec, steps=3, guidance=1.0)
    assert [n for n, _ in calls] == [2, 2, 2] and samplers.dit_rows("euler", 3, 1.0) == [1, 1, 1]
    _, calls = counted(tiny_codec, steps=3, guidance=1.0, sampler="heun", interval=(0.0, 1.0))
    assert [n for n, _ in calls] == [2] * 6


def test_interval_limits_are_exact(tiny_codec):
    """An interval holding every evaluation is full guidance, one holding none is guidance 1, bit for bit."""
    inputs = window(tiny_codec, items=2)
    full = solve_window(tiny_codec.flow, inputs, 3, "heun")
    assert torch.equal(solve_window(tiny_codec.flow, inputs, 3, "heun", interval=(0.0, 1.0)), full)
    unguided = solve_window(tiny_codec.flow, inputs, 3, "heun", guidance=1.0)
    assert torch.equal(solve_window(tiny_codec.flow, inputs, 3, "heun", interval=(0.9, 0.95)), unguided)
    assert not torch.equal(full, unguided)


@pytest.mark.parametrize("sampler", samplers.SAMPLERS)
def test_every_evaluation_sees_the_prefix_on_its_path(tiny_codec, sampler):
    """The official rule at each DiT pass: prefix frames = (1 - (1 - sigma_min) t) noise + t * prefix."""
    flow = tiny_codec.flow
    z_q, true_latents, noise = window(tiny_codec, items=1)
    seen = []
    hook = flow.estimator.register_forward_hook(lambda m, args, out: seen.append((args[0].clone(), args[1][0])))
    try:
        out = solve_window(flow, (z_q, true_latents, noise), 3, sampler)
    finally:
        hook.remove()
    assert len(seen) == samplers.evaluations(sampler, 3)
    prefix = flow.normfeat.project(true_latents)[:, :, :PREFIX]
    c = noise.shape[1]
    for x, t in seen:  # both halves of the guided batch
        path = (1 - (1 - flow.cfg.sigma_min) * t) * noise[:, :, :PREFIX] + t * prefix
        torch.testing.assert_close(x[:, :c, :PREFIX], path.expand(x.shape[0], -1, -1, -1), atol=1e-6, rtol=0)
    torch.testing.assert_close(out[:, :, :PREFIX], true_latents[:, :, :PREFIX], atol=1e-4, rtol=1e-5)


# ---- the decode: batching, seeds and arguments --------------------------------------------------------

def cheap_wave(self, latents, fast_vocoder=True, num_samples=None):
    """Stand-in for the VAE and vocoder (their cost is not what is tested): a function of every latent."""
    b, ch, t, f = latents.shape
    per_frame = self.config.codes_per_latent * self.config.samples_per_code
    x = latents.reshape(2, ch // 2, t, f).mean(1)
    return x.repeat_interleave(per_frame // f, dim=2).reshape(2, t * per_frame).float()


@pytest.mark.parametrize("sampler,steps,interval,rows", [("heun", 1, None, [4, 4]), ("ab2", 2, (0.2, 0.6), [2, 4])])
def test_a_song_in_a_batch_equals_it_alone(tiny_codec, monkeypatch, sampler, steps, interval, rows):
    """Two songs of one window each, stepped as one batch, against each decoded alone with its own seed."""
    monkeypatch.setattr(MuCodec, "latents_to_wave", cheap_wave)
    songs = [torch.randint(0, 16384, (n,), generator=torch.Generator().manual_seed(n)) for n in (60, 40)]
    opts = DecodingOptions(num_steps=steps, sampler=sampler, guidance_interval=interval)
    batch = [decoding.start_decode(tiny_codec, codes, seed=k) for k, codes in enumerate(songs)]
    calls = []
    hook = tiny_codec.flow.estimator.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    try:
        pieces = decoding.decode_step(tiny_codec, batch, opts)
    finally:
        hook.remove()
    assert calls == rows and all(s.done for s in batch)  # the sampler and interval reached the flow decoder
    for k, codes in enumerate(songs):
        alone = tiny_codec.code2sound(codes, num_steps=steps, seed=k, sampler=sampler, guidance_interval=interval)
        assert torch.equal(torch.cat(pieces[k], -1), alone)


def test_a_song_in_a_batch_equals_it_alone_on_the_cosine_schedule(tiny_codec, monkeypatch):
    monkeypatch.setattr(MuCodec, "latents_to_wave", cheap_wave)
    songs = [torch.randint(0, 16384, (n,), generator=torch.Generator().manual_seed(n)) for n in (60, 40)]
    opts = DecodingOptions(num_steps=2, sampler="ab2", schedule="cosine")
    batch = [decoding.start_decode(tiny_codec, codes, seed=k) for k, codes in enumerate(songs)]
    pieces = decoding.decode_step(tiny_codec, batch, opts)
    for k, codes in enumerate(songs):
        alone = decoding.decode_step(tiny_codec, [decoding.start_decode(tiny_codec, codes, seed=k)], opts)
        assert torch.equal(torch.cat(pieces[k], -1), torch.cat(alone[0], -1))
    uniform = decoding.decode_step(tiny_codec, [decoding.start_decode(tiny_codec, songs[0], seed=0)],
                                   DecodingOptions(num_steps=2, sampler="ab2"))
    assert not torch.equal(torch.cat(uniform[0], -1), torch.cat(pieces[0], -1))  # the schedule made a difference


@pytest.mark.parametrize("kw,words", [
    (dict(sampler="dpm"), "sampler must be one of euler, heun, ab2"),
    (dict(sampler=None, guidance_interval=(0.5, 0.2)), "0 <= a <= b <= 1"),
    (dict(guidance_interval=(-0.1, 0.5)), "0 <= a <= b <= 1"),
    (dict(guidance_interval=(0.1, 1.5)), "0 <= a <= b <= 1"),
    (dict(guidance_interval=(0.1,)), "two numbers"),
    (dict(guidance_interval="01"), "two numbers"),
    (dict(guidance_interval=(0.1, float("nan"))), "0 <= a <= b <= 1"),
])
def test_bad_sampler_arguments(tiny_codec, kw, words):
    with pytest.raises(ArgumentError, match=words):
        build(DecodingOptions, **kw)
    with pytest.raises(ArgumentError, match=words):
        tiny_codec.code2sound(torch.zeros(10, dtype=torch.long), **kw)


# ---- the decode job and the command line --------------------------------------------------------------

def test_the_decode_job_runs_and_records_non_default_sampling(tmp_path, monkeypatch, tiny_codec, tiny_ckpt_dir):
    from test_decode_library import decode, npy_songs

    monkeypatch.setattr(MuCodec, "latents_to_wave", cheap_wave)
    songs = npy_songs(tmp_path / "in", 2)
    plain = decode([songs], tmp_path / "a", tiny_ckpt_dir, seed=3, codec=tiny_codec).report["fingerprint"]
    # the defaults are written too (folders decoded before these options existed resume: test_decode_library)
    assert plain["sampler"] == "euler" and plain["guidance_interval"] is None
    rows = []
    hook = tiny_codec.flow.estimator.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    try:
        fp = decode([songs], tmp_path / "b", tiny_ckpt_dir, seed=3, num_steps=2, sampler="ab2",
                    guidance_interval=(0.2, 0.8), codec=tiny_codec).report["fingerprint"]
    finally:
        hook.remove()
    assert rows == [2, 4]  # both songs in one batch: t = 0 unguided, t = 0.5 guided
    assert fp["sampler"] == "ab2" and fp["guidance_interval"] == [0.2, 0.8]
    assert {k: v for k, v in fp.items() if k not in ("sampler", "guidance_interval", "num_steps")} == \
        {k: v for k, v in plain.items() if k not in ("sampler", "guidance_interval", "num_steps")}
    with pytest.raises(OutputError, match="made differently"):
        decode([songs], tmp_path / "b", tiny_ckpt_dir, seed=3, num_steps=2, codec=tiny_codec)  # euler now
    with pytest.raises(ArgumentError, match="sampler must be one of"):
        decode([songs], tmp_path / "c", tiny_ckpt_dir, sampler="rk45")


def parse(argv) -> DecodingOptions:
    from mucodec.options import build_parser, check_args

    parser = build_parser()
    return check_args(parser, parser.parse_args(argv)).decoding


def test_command_line_options():
    opts = parse(["x.mct", "--sampler", "heun", "--guidance-interval", "0.2,0.8"])
    assert (opts.sampler, opts.guidance_interval) == ("heun", (0.2, 0.8))
    opts = parse(["x.mct"])
    assert (opts.sampler, opts.guidance_interval) == ("euler", None)


@pytest.mark.parametrize("argv,words", [
    (["--guidance-interval", "0.8,0.2"], "--guidance-interval must be A,B with 0 <= A <= B <= 1"),
    (["--guidance-interval", "0.5"], "--guidance-interval must be A,B"),
    (["--guidance-interval", "0,2"], "--guidance-interval must be A,B"),
    (["--sampler", "rk4"], "invalid choice: 'rk4'"),
    (["--encode", "--sampler", "heun"], "--sampler is an option of decoding"),
])
def test_bad_command_lines_exit_2(capsys, argv, words):
    with pytest.raises(SystemExit) as e:
        parse(["x.wav", *argv])
    assert e.value.code == 2 and words in capsys.readouterr().err
