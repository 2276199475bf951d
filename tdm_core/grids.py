"""Trajectory grids: the K timesteps ``t_0 > t_1 > ... > t_{K-1}`` a K-step student visits.

The final point after ``t_{K-1}`` is always the clean sample (timestep 0, ``x0_hat``).
"""
from __future__ import annotations

import math

SPACINGS = ("leading", "trailing", "linspace")

# Grids of the released TDM LoRAs, for the nodes' presets (METHOD.md "Released inference settings").
RELEASED_GRIDS = {
    "cogvideox_2b": (999, 856, 665, 399),
}


def reference_grid(num_steps: int, total_steps: int = 900) -> list[int]:
    # METHOD.md "The student": t_i = T - 1 - i * (T // K)
    check_num_steps(num_steps, total_steps)
    return [total_steps - 1 - i * (total_steps // num_steps) for i in range(num_steps)]


def diffusers_grid(
    num_steps: int,
    spacing: str = "leading",
    num_train_timesteps: int = 1000,
    steps_offset: int = 0,
    solver: str = "ddim",
) -> list[int]:
    """Timesteps diffusers' DDIMScheduler (``solver="ddim"``) or DPMSolverMultistepScheduler
    (``solver="dpmsolver"``) would pick, to reproduce LoRAs released with those samplers
    (METHOD.md "Released inference settings": SD1.5 uses leading spacing with ``steps_offset=1``).

    diffusers' DDIM steps from ``t`` to ``t - T // K``: that is the next grid point for leading
    spacing, and for trailing spacing only when K divides T (trailing K=3 is 999, 666, 332 but
    diffusers steps 666 -> 333), so only then does ``sample_tdm`` on this grid equal DDIMScheduler."""
    check_num_steps(num_steps, num_train_timesteps)
    if spacing not in SPACINGS:
        raise ValueError(f"unknown timestep spacing {spacing!r}: use one of {', '.join(SPACINGS)}")
    if solver not in ("ddim", "dpmsolver"):
        raise ValueError(f"unknown solver {solver!r}: use 'ddim' or 'dpmsolver'")
    T, K = num_train_timesteps, num_steps
    # DPM-Solver lays out K + 1 points and drops the last; DDIM lays out K
    n = K + 1 if solver == "dpmsolver" else K
    if spacing == "linspace":
        points = [round(i * (T - 1) / (n - 1)) if n > 1 else 0 for i in range(n)][::-1]
    elif spacing == "leading":
        ratio = T // n
        points = [i * ratio + steps_offset for i in range(n)][::-1]
    else:
        ratio = T / K
        points = [int(round(T - i * ratio)) - 1 for i in range(K)]
    return points[:K]


def dpmsolver_flow_grid(num_steps: int, num_train_timesteps: int = 1000) -> list[float]:
    """Timesteps of diffusers' DPMSolverMultistepScheduler with ``use_flow_sigmas`` (the released SD3 TDM
    LoRA's sampler, METHOD.md "Released inference settings"): unshifted sigmas ``(1 - 1/T)(1 - i/K)``, i < K,
    as timesteps ``T * sigma`` (fractional: 999, 749.25, 499.5, 249.75 for K = 4); the model's shift then
    maps them, as diffusers' ``flow_shift`` does."""
    check_num_steps(num_steps, num_train_timesteps)
    T, K = num_train_timesteps, num_steps
    return [(T - 1) * (1 - i / K) for i in range(K)]


def parse_grid(text: str, num_timesteps: int = 1000) -> list[int]:
    """``"999, 856, 665, 399"`` -> ``[999, 856, 665, 399]``, checked."""
    try:
        grid = [int(float(p)) for p in text.replace(";", ",").replace(" ", ",").split(",") if p.strip()]
    except ValueError as err:
        raise ValueError(f"custom timesteps {text!r} are not numbers: write e.g. '999, 856, 665, 399'") from err
    return check_grid(grid, num_timesteps)


def check_num_steps(num_steps: int, total_steps: int) -> None:
    if not 1 <= num_steps <= total_steps:
        raise ValueError(f"number of steps K={num_steps} is outside 1..{total_steps}: pick K between 1 and 8")


def check_grid(grid: list[int], num_timesteps: int = 1000, flow: bool = False) -> list[int]:
    """``flow``: a rectified flow also takes t = T (sigma 1, pure noise), where the Z-Image TDM-R1 release starts;
    a discrete VP schedule ends at T - 1."""
    if not grid:
        raise ValueError("the trajectory grid is empty: give at least one timestep")
    last = num_timesteps if flow else num_timesteps - 1
    if any(not 0 <= t <= last for t in grid):
        raise ValueError(f"grid {grid} has timesteps outside 0..{last}")
    if any(b >= a for a, b in zip(grid, grid[1:])):
        raise ValueError(f"grid {grid} must be strictly decreasing, e.g. 999, 856, 665, 399")
    return list(grid)


def grid_with_end(grid: list[int]) -> list[int]:
    """``t_0 .. t_{K-1}`` followed by the clean end point 0: ``t_{i+1}`` for every step ``i``."""
    return list(grid) + [0]


def tail_for_denoise(grid: list[int], denoise: float) -> list[int]:
    """img2img: the last ``round(K * denoise)`` grid points (at least one), so the student only ever
    runs from timesteps it was trained on."""
    if not 0.0 < denoise <= 1.0:
        raise ValueError(f"denoise={denoise} must be in (0, 1]")
    keep = max(1, math.floor(len(grid) * denoise + 0.5))
    return list(grid[-keep:])
