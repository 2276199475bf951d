"""PixArt-alpha (PixArtTransformer2DModel, T5 text encoder with attention mask), as in the paper."""
from __future__ import annotations

import torch
from torch import Tensor

from .base import Cond
from .pipeline_family import PipelineFamily


class PixArtFamily(PipelineFamily):
    name = "pixart"
    pipeline_class = "PixArtAlphaPipeline"
    network_attribute = "transformer"
    kohya_prefix = "transformer."  # ComfyUI maps only "transformer.<diffusers path>" keys for PixArt
    max_sequence_length = 120

    def _encode_batch(self, prompts: list[str]) -> Cond:
        embeds, mask, _, _ = self.pipeline.encode_prompt(
            prompts, do_classifier_free_guidance=False, device=self.text_device, clean_caption=False,
            max_sequence_length=self.max_sequence_length,
        )
        cond = {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}
        if self.network.config.use_additional_conditions:  # PixArt-alpha 1024: resolution + aspect ratio
            batch = len(prompts)
            cond["resolution"] = torch.tensor([[self.resolution, self.resolution]], dtype=self.dtype, device=self.device).expand(batch, -1)
            cond["aspect_ratio"] = torch.ones(batch, 1, dtype=self.dtype, device=self.device)
        return cond

    def _network_output(self, x_t: Tensor, timestep: Tensor, cond: Cond) -> Tensor:
        added = {"resolution": cond.get("resolution"), "aspect_ratio": cond.get("aspect_ratio")}
        if added["resolution"] is not None:  # micro-conditions follow the latents' actual size
            height, width = x_t.shape[-2] * self.vae_scale_factor, x_t.shape[-1] * self.vae_scale_factor
            added["resolution"] = torch.tensor([[height, width]], dtype=x_t.dtype, device=x_t.device).expand(x_t.shape[0], -1)
            added["aspect_ratio"] = torch.full((x_t.shape[0], 1), height / width, dtype=x_t.dtype, device=x_t.device)
        out = self.network(x_t, encoder_hidden_states=cond["encoder_hidden_states"], timestep=timestep,
                           encoder_attention_mask=cond["encoder_attention_mask"], added_cond_kwargs=added).sample
        if out.shape[1] == 2 * x_t.shape[1]:  # learned variance channels: keep the mean prediction
            out = out[:, : x_t.shape[1]]
        return out
