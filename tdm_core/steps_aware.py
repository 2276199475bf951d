"""Steps-aware TDM (TDM-unify): the number of sampling steps K as a condition of student and fake score.

The condition is a learned table ``E`` of shape ``(K_max, width)``; row ``K - 1`` is added to the
network's timestep embedding whenever the network runs as a K-step student (or as the fake score of a
K-step student). Hosts (the diffusers trainer, the ComfyUI nodes) decide where their timestep
embedding lives and call these functions; nothing here imports them.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .grids import reference_grid

# the student's table in a unify LoRA file, beside the LoRA weights; rows are K = 1 .. K_max
K_EMBEDDING_KEY = "tdm_k_embedding.weight"
MAX_K = 8  # the nodes sample 1..8 steps


def parse_k_choices(value: Union[str, Sequence[int]]) -> list[int]:
    """``"1,2,4"`` or ``[4, 1, 2]`` -> ``[1, 2, 4]`` (sorted, unique, each in 1..MAX_K)."""
    if isinstance(value, str):
        try:
            value = [int(p) for p in value.replace(";", ",").replace(" ", ",").split(",") if p.strip()]
        except ValueError as err:
            raise ValueError(f"K choices {value!r} are not integers: write e.g. '1,2,4'") from err
    choices = sorted(set(int(k) for k in value))
    if not choices:
        raise ValueError("K choices are empty: give the step counts to train, e.g. '1,2,4'")
    if any(not 1 <= k <= MAX_K for k in choices):
        raise ValueError(f"K choices {choices} must each be between 1 and {MAX_K}: e.g. '1,2,4'")
    return choices


def new_k_table(max_k: int, width: int, dtype=torch.float32, device=None) -> Tensor:
    # METHOD.md "Steps-aware objective": E starts at zero, so a conditioned network starts exactly as the unconditioned one
    return torch.zeros(max_k, width, dtype=dtype, device=device)


def check_k(k: Union[int, Tensor], table: Tensor) -> None:
    ks = torch.as_tensor(k).reshape(-1)
    if ks.numel() == 0 or bool(((ks < 1) | (ks > table.shape[0])).any()):
        raise ValueError(
            f"K={ks.tolist()} has no row in the K-embedding (rows for K = 1..{table.shape[0]}): "
            f"sample with 1 to {table.shape[0]} steps"
        )


def k_embedding(k: Union[int, Tensor], table: Tensor) -> Tensor:
    # METHOD.md "Steps-aware objective": E[K], row K - 1 of the learned table; k an int or a (B,) tensor
    check_k(k, table)
    if isinstance(k, int):
        return table[k - 1]
    return table[torch.as_tensor(k, device=table.device).long() - 1]


def add_k_embedding(temb: Tensor, k: Union[int, Tensor], table: Tensor) -> Tensor:
    # METHOD.md "Steps-aware objective": the K condition is added to the timestep embedding, temb + E[K]
    if temb.shape[-1] != table.shape[-1]:
        raise ValueError(
            f"the K-embedding has width {table.shape[-1]} but this network's timestep embedding has width "
            f"{temb.shape[-1]}: the steps-aware LoRA was trained on another architecture"
        )
    e = k_embedding(k, table).to(device=temb.device, dtype=temb.dtype)
    if e.ndim == 2 and temb.ndim > 2:  # per-sample K on an embedding with extra middle dims
        e = e.reshape(e.shape[0], *([1] * (temb.ndim - 2)), e.shape[-1])
    return temb + e


def draw_num_steps(k_choices: Sequence[int], generator: Optional[torch.Generator] = None) -> int:
    # METHOD.md "Steps-aware objective": K drawn uniformly from the choices, once per batch
    return int(k_choices[int(torch.randint(len(k_choices), (1,), generator=generator))])


def grid_for_num_steps(k: int, total_steps: int) -> list[int]:
    # METHOD.md "Steps-aware objective": the trajectory grid depends on K (reference rule t_i = T-1-i*(T//K))
    return reference_grid(k, total_steps)


def infer_num_steps(timesteps: Sequence[int], k_choices: Sequence[int], total_steps: int) -> int:
    """The K a list of sampled timesteps belongs to: ``len(timesteps)`` for a whole grid, else the K whose
    reference grid ends with exactly these points (img2img samples only the tail of the K-step grid)."""
    timesteps = [int(round(float(t))) for t in timesteps]
    n = len(timesteps)
    if n == 0:
        raise ValueError("no sampling timesteps: the step count K cannot be inferred")
    # a whole K-step grid first, then the K-step grids whose tail these points are
    for k in [n] + [c for c in sorted(k_choices) if c > n]:
        if k <= total_steps and grid_for_num_steps(k, total_steps)[-n:] == timesteps:
            return k
    return n  # a custom grid: its own length
