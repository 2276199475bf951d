"""Sampling a text-conditioned teacher (the shapes teacher, or any family with ``encode_prompts``) with
tdm_core samplers, prompts as text.

The same conventions as :mod:`benchmarks.sampling` (the digits version): ``tdm_core.sample_tdm`` (DDIM,
eta = 0) on diffusers' "trailing" grid, CFG as ``uncond + w (cond - uncond)`` in one batched forward,
sampling starts from pure noise. Images come back decoded, in [-1, 1].
"""
from __future__ import annotations

import torch
from torch import Tensor

from benchmarks.sampling import teacher_grid
from benchmarks.shapes_data import all_captions, full_captions, parse_caption
from tdm_core import sample_tdm
from tdm_core.training import teacher_cfg_x0
from training.families.base import cat_conditions


def balanced_prompts(num_samples: int, full_only: bool = False) -> tuple[list[str], Tensor]:
    """``num_samples`` captions cycling through every caption (or only those naming all three attributes),
    and the attributes each asks for (N, 3), -1 where it says nothing. Over all 120 captions each attribute
    is either named uniformly or left open, so the samples should match the real images' marginal."""
    captions = full_captions() if full_only else all_captions()
    prompts = [captions[i % len(captions)] for i in range(num_samples)]
    return prompts, torch.tensor([parse_caption(p) for p in prompts])


def noise_for(family, num_samples: int, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(family.latent_shape(num_samples), generator=generator)


def prompt_denoiser(family, prompts: list[str], cfg: float):
    """``(x, t) -> model output`` for ``prompts`` at guidance ``cfg`` (adapters as the caller set them)."""
    cond = family.encode_prompts(prompts)
    if cfg == 1.0:
        return lambda x, t: family.denoise(x, t, cond).float()
    both = cat_conditions([cond, family.null_condition(len(prompts))])

    def denoise(x, t):
        out = family.denoise(torch.cat([x, x]), torch.cat([t, t]), both).float()
        cond_out, uncond_out = out.chunk(2)
        return teacher_cfg_x0(cond_out, uncond_out, cfg)  # linear in the output: valid for eps too

    return denoise


@torch.no_grad()
def sample_prompts(family, grid: list[int], prompts: list[str], noise: Tensor, cfg: float, batch_size: int = 250) -> Tensor:
    """Decoded images (N, 3, H, W) in [-1, 1] for ``prompts`` on ``grid``."""
    if len(prompts) != noise.shape[0]:
        raise ValueError(f"{len(prompts)} prompts for {noise.shape[0]} noise samples: pass one prompt per sample")
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        denoise = prompt_denoiser(family, chunk, cfg)
        latents = sample_tdm(denoise, noise[start : start + len(chunk)], grid, family.schedule, family.prediction_type)
        out.append(family.decode(latents.to(family.dtype)).float() * 2 - 1)
    return torch.cat(out)


def sample_text_teacher(family, num_steps: int, prompts: list[str], noise: Tensor, cfg: float) -> Tensor:
    """The teacher (adapters off, if the family carries any) with ``num_steps`` DDIM steps."""
    from training.models import use_adapter

    grid = teacher_grid(num_steps, family.num_timesteps)
    if hasattr(family.network, "peft_config"):
        with use_adapter(family.network, None):
            return sample_prompts(family, grid, prompts, noise, cfg)
    return sample_prompts(family, grid, prompts, noise, cfg)


def sample_text_student(family, grid: list[int], prompts: list[str], noise: Tensor) -> Tensor:
    """A distilled student (its ``student`` adapter) at CFG 1: guidance is distilled in."""
    from training.models import STUDENT, use_adapter

    with use_adapter(family.network, STUDENT):
        return sample_prompts(family, grid, prompts, noise, 1.0)
