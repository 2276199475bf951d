"""SDXL-style UNet: two CLIP encoders, pooled text embeds and size/crop "time ids" (text_time)."""
from __future__ import annotations

import torch
from torch import Tensor

from .base import Cond
from .pipeline_family import PipelineFamily


class SDXLFamily(PipelineFamily):
    name = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"

    def _time_ids(self, batch_size: int, size: tuple[int, int] | None = None) -> Tensor:
        # SDXL micro-conditioning: original size, crop top-left (0, 0), target size (pixels); a host tensor, as
        # every cached condition is (training.families.prompt_cache), moved to the latents' device per call
        size = size or (self.resolution, self.resolution)
        projection_dim = self.pipeline.text_encoder_2.config.projection_dim
        ids = self.pipeline._get_add_time_ids(size, (0, 0), size, dtype=self.dtype, text_encoder_projection_dim=projection_dim)
        return ids.expand(batch_size, -1)

    def _encode_batch(self, prompts: list[str]) -> Cond:
        embeds, _, pooled, _ = self.pipeline.encode_prompt(prompts, device=self.text_device, do_classifier_free_guidance=False)
        return {"encoder_hidden_states": embeds, "text_embeds": pooled, "time_ids": self._time_ids(len(prompts))}

    def null_condition(self, batch_size: int) -> Cond:
        if not self.pipeline.config.get("force_zeros_for_empty_prompt", True):
            return super().null_condition(batch_size)
        # SDXL's own pipelines use all-zero embeddings (not the encoded "") as the unconditional input
        empty = self.encode_prompts([""])
        zeros = {k: torch.zeros_like(v) for k, v in empty.items() if k != "time_ids"}
        zeros["time_ids"] = empty["time_ids"]
        return {k: v.expand(batch_size, *v.shape[1:]) for k, v in zeros.items()}

    def _network_output(self, x_t: Tensor, timestep: Tensor, cond: Cond) -> Tensor:
        # conditions carry the native-resolution sizes; training at another resolution must say that size
        size = (x_t.shape[-2] * self.vae_scale_factor, x_t.shape[-1] * self.vae_scale_factor)
        time_ids = cond["time_ids"]
        if size != (self.resolution, self.resolution):
            time_ids = self._time_ids(x_t.shape[0], size).to(device=x_t.device, dtype=time_ids.dtype)
        added = {"text_embeds": cond["text_embeds"], "time_ids": time_ids}
        return self.network(x_t, timestep, encoder_hidden_states=cond["encoder_hidden_states"], added_cond_kwargs=added).sample
