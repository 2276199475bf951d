"""Which trajectory timesteps the TDM Scheduler uses: pure functions, no ComfyUI imports."""
from __future__ import annotations

import logging
from typing import Optional

from .core_import import TDMInfo, grids

GRID_CHOICES = (
    "auto",
    "reference",
    "diffusers_leading",
    "diffusers_trailing",
    "dpmsolver_leading_sd15",
    "cogvideox",
    "custom",
)
DEFAULT_CUSTOM_TIMESTEPS = "999, 856, 665, 399"
DEFAULT_TOTAL_STEPS = 900  # T of the reference rule when no TDM metadata says otherwise (METHOD.md)


def grid_for_auto(steps: int, info: Optional[TDMInfo], num_timesteps: int, flow: bool = False) -> list[int]:
    """The grid the LoRA was trained on when its metadata has one for this K, else the reference
    rule with the LoRA's own T (steps-aware LoRAs store K choices, not one grid)."""
    if info is None:
        return grids.reference_grid(steps, min(DEFAULT_TOTAL_STEPS, num_timesteps))
    if info.k_choices and steps not in info.k_choices:
        logging.warning("TDM: this LoRA was trained for K in %s, sampling with %d steps", info.k_choices, steps)
    elif not info.k_choices and info.num_steps and steps != info.num_steps:
        logging.warning("TDM: this LoRA was trained for %d steps, sampling with %d", info.num_steps, steps)
    if info.grid and len(info.grid) == steps:
        return grids.check_grid(list(info.grid), num_timesteps, flow)
    return grids.reference_grid(steps, min(info.total_steps or DEFAULT_TOTAL_STEPS, num_timesteps))


def select_grid(choice: str, steps: int, info: Optional[TDMInfo] = None, custom_timesteps: str = DEFAULT_CUSTOM_TIMESTEPS, num_timesteps: int = 1000,
                flow: bool = False) -> list[int]:
    """Timesteps ``t_0 > ... > t_{K-1}`` (integers of the model's discrete schedule) for a grid choice.

    ``custom`` and ``cogvideox`` fix their own number of steps; the others follow ``steps``."""
    if choice not in GRID_CHOICES:
        raise ValueError(f"unknown TDM grid {choice!r}: pick one of {', '.join(GRID_CHOICES)}")
    if choice == "auto":
        return grid_for_auto(steps, info, num_timesteps, flow)
    if choice == "reference":
        return grids.reference_grid(steps, min(DEFAULT_TOTAL_STEPS, num_timesteps))
    if choice == "diffusers_leading":  # DDIMScheduler with the SD1.5 config (leading, steps_offset 1)
        return grids.diffusers_grid(steps, "leading", num_timesteps, steps_offset=1)
    if choice == "diffusers_trailing":
        return grids.diffusers_grid(steps, "trailing", num_timesteps)
    if choice == "dpmsolver_leading_sd15":  # the released SD1.5 TDM LoRA's DPMSolverMultistep preset
        return grids.diffusers_grid(steps, "leading", num_timesteps, steps_offset=1, solver="dpmsolver")
    if choice == "cogvideox":
        return list(grids.RELEASED_GRIDS["cogvideox_2b"])
    return grids.parse_grid(custom_timesteps, num_timesteps)
