"""What the 2x2-patch flow transformers share (Flux.1, Z-Image, Qwen-Image).

The trainer keeps their latents unpacked, (B, C, H/8, W/8), as tdm_core and ComfyUI do; each family packs them
into its token sequence around the network call. Image sizes are multiples of the patch, and the flow shift is
the one the model's scheduler config gives the image's token count (set per run by :meth:`set_resolution`).
"""
from __future__ import annotations

import math

from tdm_core.schedules import FlowSchedule

from .pipeline_family import PipelineFamily

PATCH = 2  # 2x2 latent patches per token


def flux_shift(image_seq_len: int, scheduler_config: dict) -> float:
    """The flow shift FluxPipeline uses for ``image_seq_len`` tokens: ``exp(mu)`` with ``mu`` linear in the
    token count between (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift), as its
    ``calculate_shift``; time shift ``exp(mu) / (exp(mu) + 1/sigma - 1)`` is tdm_core's flow shift by ``exp(mu)``.
    Without dynamic shifting: the config's fixed ``shift``."""
    if not scheduler_config.get("use_dynamic_shifting", False):
        return float(scheduler_config.get("shift", 1.0))
    base_len, max_len = scheduler_config.get("base_image_seq_len", 256), scheduler_config.get("max_image_seq_len", 4096)
    base_shift, max_shift = scheduler_config.get("base_shift", 0.5), scheduler_config.get("max_shift", 1.15)
    slope = (max_shift - base_shift) / (max_len - base_len)
    mu = base_shift + slope * (image_seq_len - base_len)
    return math.exp(mu)


class PatchedFlowFamily(PipelineFamily):
    """A diffusers flow-transformer pipeline whose network reads 2x2 latent patches."""

    def _prediction_type(self, scheduler_config: dict) -> str:
        return "flow"

    def image_shift(self, image_seq_len: int) -> float:
        return flux_shift(image_seq_len, dict(self.pipeline.scheduler.config))

    def latent_shape(self, batch_size: int, resolution: int | None = None) -> tuple[int, ...]:
        resolution = self.resolution if resolution is None else int(resolution)
        step = self.vae_scale_factor * PATCH
        if resolution <= 0 or resolution % step:
            raise ValueError(f"resolution {resolution} is not a positive multiple of {step} for the {self.name} family: pick e.g. {self.resolution}")
        side = resolution // self.vae_scale_factor
        return (batch_size, self.latent_channels, side, side)

    def set_resolution(self, resolution: int | None) -> None:
        side = self.latent_shape(1, resolution)[-1]
        self.schedule = FlowSchedule(shift=self.image_shift((side // PATCH) ** 2), num_timesteps=self.num_timesteps)
