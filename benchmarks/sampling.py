"""Sampling the digits teacher (DDIM with CFG) and a distilled TDM student, with tdm_core samplers.

Both samplers are ``tdm_core.sample_tdm`` (DDIM eta = 0 is the TDM step): the teacher on an
N-step "trailing" grid (starts at t = 999, so 1 step is meaningful), the student on the grid its
LoRA metadata names. CFG combines outputs as ``uncond + w (cond - uncond)`` in one batched forward.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from tdm_core import output_from_x0_eps, sample_tdm, x0_eps_from_output
from tdm_core.grids import diffusers_grid
from tdm_core.training import teacher_cfg_x0
from training.families.base import cat_conditions


def balanced_classes(num_samples: int) -> Tensor:
    return torch.arange(num_samples) % 10


def noise_for(family, num_samples: int, seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(family.latent_shape(num_samples), generator=gen)


def guided_denoiser(family, classes: Tensor, cfg: float):
    """``(x, t) -> model output`` of ``family.network`` as it is now (adapters as set by the caller)."""
    cond = family.condition_for_classes(classes)
    if cfg == 1.0:
        return lambda x, t: family.denoise(x, t, cond).float()
    both = cat_conditions([cond, family.null_condition(classes.shape[0])])

    def denoise(x, t):
        out = family.denoise(torch.cat([x, x]), torch.cat([t, t]), both).float()
        cond_out, uncond_out = out.chunk(2)
        # guidance is linear in the output, so the x0-space CFG kernel applies to eps as well
        return teacher_cfg_x0(cond_out, uncond_out, cfg)

    return denoise


def x0_clipped(denoise, schedule, prediction_type: str):
    """The same denoiser with its x0 prediction clipped to the data range [-1, 1] (diffusers' DDIM
    ``clip_sample``, its default for pixel-space models); eps is re-derived from the clipped x0."""

    def clipped(x, t):
        a, s = schedule.alpha_sigma(t)
        x0, _ = x0_eps_from_output(denoise(x, t), x, a, s, prediction_type)
        x0 = x0.clamp(-1, 1)
        _, eps = x0_eps_from_output(x0, x, a, s, "sample")
        return output_from_x0_eps(x0, eps, a, s, prediction_type)

    return clipped


def teacher_grid(num_steps: int, num_timesteps: int = 1000) -> list[int]:
    return diffusers_grid(num_steps, "trailing", num_timesteps)


@torch.no_grad()
def sample_in_batches(family, grid: list[int], classes: Tensor, noise: Tensor, cfg: float, batch_size: int = 250,
                      clip_x0: bool = False) -> Tensor:
    out = []
    for start in range(0, classes.shape[0], batch_size):
        sl = slice(start, start + batch_size)
        denoise = guided_denoiser(family, classes[sl], cfg)
        if clip_x0:
            denoise = x0_clipped(denoise, family.schedule, family.prediction_type)
        out.append(sample_tdm(denoise, noise[sl], grid, family.schedule, family.prediction_type).float())
    return torch.cat(out).clamp(-1, 1)


def sample_teacher(family, num_steps: int, classes: Tensor, noise: Tensor, cfg: float, clip_x0: bool = False) -> Tensor:
    from training.models import use_adapter

    network = family.network
    grid = teacher_grid(num_steps, family.num_timesteps)
    if hasattr(network, "peft_config"):  # a family carrying adapters: run it as the teacher
        with use_adapter(network, None):
            return sample_in_batches(family, grid, classes, noise, cfg, clip_x0=clip_x0)
    return sample_in_batches(family, grid, classes, noise, cfg, clip_x0=clip_x0)


def sample_student(family, grid: list[int], classes: Tensor, noise: Tensor) -> Tensor:
    # the student runs at CFG 1: guidance is distilled in (METHOD.md "The student")
    from training.models import STUDENT, use_adapter

    with use_adapter(family.network, STUDENT):
        return sample_in_batches(family, grid, classes, noise, 1.0)


def load_student_lora(family, lora_path: Path):
    """Puts the distilled LoRA on ``family`` as its ``student`` adapter; returns its TDM metadata."""
    from training.lora_io import kohya_to_adapter, read_lora
    from training.models import STUDENT, add_tdm_adapters, load_adapter_state_dict

    tensors, info = read_lora(lora_path)
    if info is None:
        raise ValueError(f"{lora_path} carries no TDM metadata: pass a LoRA written by training.distill")
    if not hasattr(family.network, "peft_config"):
        add_tdm_adapters(family, info.lora_rank, info.lora_alpha)
    load_adapter_state_dict(family.network, STUDENT, kohya_to_adapter(tensors, family.network, family.kohya_prefix, info.lora_rank))
    return info


def load_student_state(family, adapter_state: dict, rank: int, alpha: float) -> None:
    """Puts a checkpoint's student adapter weights (PEFT keys) on ``family``."""
    from training.models import STUDENT, add_tdm_adapters, load_adapter_state_dict

    if not hasattr(family.network, "peft_config"):
        add_tdm_adapters(family, rank, alpha)
    load_adapter_state_dict(family.network, STUDENT, adapter_state)
