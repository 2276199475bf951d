"""SD1.5-style UNet (one CLIP text encoder), eps or v prediction (SD2.x uses the same layout)."""
from __future__ import annotations

from torch import Tensor

from .base import Cond
from .pipeline_family import PipelineFamily


class SD15Family(PipelineFamily):
    name = "sd15"
    pipeline_class = "StableDiffusionPipeline"

    def _encode_batch(self, prompts: list[str]) -> Cond:
        embeds, _ = self.pipeline.encode_prompt(prompts, self.text_device, 1, do_classifier_free_guidance=False)
        return {"encoder_hidden_states": embeds}

    def _network_output(self, x_t: Tensor, timestep: Tensor, cond: Cond) -> Tensor:
        return self.network(x_t, timestep, encoder_hidden_states=cond["encoder_hidden_states"]).sample
