"""ODE solvers for the flow decoder: dx/dt = v(x, t) from t = 0 (noise) to t = 1 (latents).

Every solver sees the model only through ``field(x, t) -> (x', v)``: the field returns the state it
evaluated (the flow decoder resets the in-context prefix frames of ``x`` to their straight path at
``t`` before every DiT call, as the official sampler does) and the velocity there. Steps start from
``x'``, so a solver never carries stale prefix frames into an evaluation.

* ``euler``: the official solver, 1 evaluation per step; its floating-point operations are the
  official ones in the official order.
* ``heun``: Heun's method (explicit trapezoid), 2 evaluations per step, second order. The last step
  is a Heun step too: a flow-matching velocity is defined at t = 1 (unlike a diffusion model's at
  sigma = 0), so there is no reason to fall back to Euler there.
* ``ab2``: two-step Adams-Bashforth on the velocity with variable step sizes, 1 evaluation per step,
  second order; it reuses the previous step's velocity and starts with one Euler step. For
  the straight-path flows of flow matching this is the velocity form of a second-order multistep
  solver such as DPM-Solver++(2M), without its log-SNR change of variable (undefined at t = 0).

All three step over a time grid accumulated as the official one is: t in float32 as ``t += dt`` with
``dt = t_span[k + 1] - t``. The schedule picks ``t_span``: ``uniform``, the official
``linspace(0, 1, num_steps + 1)``, or ``cosine``, ``1 - cos(pi/2 * k / num_steps)``: small steps near t = 0,
where the flow leaves the noise, large ones near t = 1.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from .errors import SettingError

SAMPLERS = ("euler", "heun", "ab2")
DEFAULT_SAMPLER = "euler"
# DiT evaluations per step of each solver (with guidance active, each evaluation is a batch of 2B)
EVALUATIONS_PER_STEP = {"euler": 1, "heun": 2, "ab2": 1}

SCHEDULES = ("uniform", "cosine")
DEFAULT_SCHEDULE = "uniform"

# far above float32 rounding of the accumulated t (~1e-7), far below any step (at most 1000 per window)
TIME_SLACK = 1e-5
INTERVAL_RULE = "must be two numbers (a, b) with 0 <= a <= b <= 1"

Field = Callable[[torch.Tensor, torch.Tensor], tuple]


def _one_of(field: str, name, choices, default) -> str:
    if name is None:
        return default
    if name not in choices:
        raise SettingError(field, f"must be one of {', '.join(choices)}", name)
    return name


def check_sampler(name) -> str:
    """A sampler name, ``DEFAULT_SAMPLER`` for None; else SettingError."""
    return _one_of("sampler", name, SAMPLERS, DEFAULT_SAMPLER)


def check_schedule(name) -> str:
    """A schedule name, ``DEFAULT_SCHEDULE`` for None; else SettingError."""
    return _one_of("schedule", name, SCHEDULES, DEFAULT_SCHEDULE)


def check_guidance_interval(value) -> Optional[tuple]:
    """None (guidance at every step), or (a, b) with 0 <= a <= b <= 1 as a tuple of floats; else ArgumentError."""
    if value is None:
        return None
    try:
        if isinstance(value, (str, bytes)):  # "01" would read as (0, 1)
            raise TypeError
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise SettingError("guidance_interval", INTERVAL_RULE, value) from None
    if any(isinstance(v, bool) for v in value) or not (math.isfinite(a) and math.isfinite(b)) \
            or not 0 <= a <= b <= 1:
        raise SettingError("guidance_interval", INTERVAL_RULE, value)
    return a, b


def guided_at(t: torch.Tensor, interval: Optional[tuple]) -> bool:
    """Whether guidance applies at time ``t``: everywhere without an interval, else inside [a, b].

    The grid's t is a float32 (20 steps reach 0.8 as 0.800000012, float32's nearest), so the ends are widened by
    ``TIME_SLACK``: a grid point meant to lie on an end counts as inside."""
    if interval is None:
        return True
    return interval[0] - TIME_SLACK <= float(t) <= interval[1] + TIME_SLACK


def evaluations(sampler: str, num_steps: int) -> int:
    """DiT evaluations of one window (each one a batch of B, or 2B where guidance is active)."""
    return EVALUATIONS_PER_STEP[sampler] * num_steps


def dit_rows(sampler: str, num_steps: int, guidance_scale: float, guidance_interval: Optional[tuple] = None,
             schedule: str = DEFAULT_SCHEDULE) -> list:
    """Batch rows per song of each DiT evaluation of one window: 2 where guidance runs, else 1."""
    times = []
    for t, dt in time_grid(num_steps, schedule=schedule):
        times += [t, t + dt] if sampler == "heun" else [t]
    return [2 if guidance_scale > 1 and guided_at(t, guidance_interval) else 1 for t in times]


def time_grid(num_steps: int, device=None, dtype=torch.float32, schedule: str = DEFAULT_SCHEDULE) -> list:
    """[(t, dt)] per step as 0-d tensors, accumulated exactly as the official solver accumulates them
    (so 3 uniform steps evaluate at 0, 0.33333334, 0.6666666 in float32)."""
    if num_steps < 1:
        raise ValueError("num_steps must be >= 1")
    if check_schedule(schedule) == "uniform":
        t_span = torch.linspace(0, 1, num_steps + 1, device=device, dtype=dtype)
    else:  # computed in float64, then rounded once: the ends are exactly 0 and 1
        k = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
        t_span = (1 - torch.cos(0.5 * math.pi * k)).to(device=device, dtype=dtype)
        t_span[-1] = 1
    t, dt = t_span[0], t_span[1] - t_span[0]
    grid = []
    for step in range(1, num_steps + 1):
        grid.append((t, dt))
        t = t + dt
        if step < num_steps:
            dt = t_span[step + 1] - t
    return grid


def solve(sampler: str, field: Field, x: torch.Tensor, grid: list,
          callback: Optional[Callable[[int, int], None]] = None) -> torch.Tensor:
    """Integrate from ``x`` at grid[0]'s t over the steps of ``grid``; ``callback(step, num_steps)`` after each."""
    step_fn = {"euler": _euler, "heun": _heun, "ab2": _ab2}[check_sampler(sampler)]
    state = {}
    for k, (t, dt) in enumerate(grid):
        x = step_fn(field, x, t, dt, state)
        if callback is not None:
            callback(k + 1, len(grid))
    return x


def _euler(field: Field, x, t, dt, state):
    x, v = field(x, t)
    return x + dt * v


def _heun(field: Field, x, t, dt, state):
    x, v = field(x, t)
    _, v_end = field(x + dt * v, t + dt)  # evaluated with the prefix frames reset to their path at t + dt
    return x + dt * 0.5 * (v + v_end)


def _ab2(field: Field, x, t, dt, state):
    x, v = field(x, t)
    if "v" not in state:  # first step: nothing to reuse yet
        new = x + dt * v
    else:
        # variable-step AB2: the line through (t - dt_prev, v_prev) and (t, v), integrated over [t, t + dt]
        half_ratio = 0.5 * dt / state["dt"]
        new = x + dt * ((1 + half_ratio) * v - half_ratio * state["v"])
    state.update(v=v, dt=dt)
    return new
