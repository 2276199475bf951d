"""What the trainer needs from a model family (SD1.5, SDXL, PixArt, SD3/SD3.5, Flux.1, Z-Image, Qwen-Image, the digits
demo teacher).

A family wraps one frozen base network; the trainer puts the student and fake-score LoRA adapters
on ``family.network`` and calls :meth:`denoise` with adapters on or off.
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

Cond = dict  # keyword arguments of the network beyond (x, t), batched along dim 0


class ModelFamily(Protocol):
    name: str  # "sd15", "sdxl", "pixart", "sd3", "flux", "z_image", "qwen_image", "digits"
    network: torch.nn.Module  # the frozen base denoiser the LoRA adapters go on
    schedule: object  # a tdm_core schedule (VPSchedule or FlowSchedule)
    prediction_type: str  # a tdm_core.PREDICTION_TYPES value
    num_timesteps: int  # T of the discrete schedule (1000 for every supported family)
    lora_target_modules: list[str]  # module names PEFT targets
    kohya_prefix: str  # exported key prefix: "lora_unet" (UNets), "transformer." (PixArt, SD3); see training.lora_io
    # optional: lora_layout = "kohya" (default) or "peft" (diffusers' lora_A/lora_B names, used for SD3)

    def set_resolution(self, resolution: int | None) -> None:
        """The run's image size (None: native); called once before training."""

    def apply_guidance(self, scale: float) -> float:
        """Takes the run's teacher guidance; returns the CFG scale left for the method (1: none, e.g. Flux.1-dev)."""

    def encode_prompts(self, prompts: list[str]) -> Cond: ...

    def null_condition(self, batch_size: int) -> Cond: ...

    def denoise(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        """Model output (of ``prediction_type``) at integer/float timesteps ``t`` of shape (B,)."""

    def latent_shape(self, batch_size: int, resolution: int) -> tuple[int, ...]: ...

    def decode(self, latents: Tensor) -> Tensor:
        """Images in [0, 1], shape (B, 3, H, W), for validation grids."""


def cat_conditions(conds: list[Cond]) -> Cond:
    """Concatenate conditions along the batch (e.g. cond + uncond for one CFG forward)."""
    return {key: torch.cat([c[key] for c in conds], dim=0) for key in conds[0]}


def select_condition(cond: Cond, index) -> Cond:
    """Rows ``index`` (int list, slice or bool mask) of every tensor of a condition."""
    return {key: value[index] for key, value in cond.items()}
