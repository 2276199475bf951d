"""SD3 / SD3.5 (SD3Transformer2DModel, rectified flow with shift; CLIP-L, CLIP-G and T5)."""
from __future__ import annotations

from torch import Tensor

from .base import Cond
from .pipeline_family import PipelineFamily


class SD3Family(PipelineFamily):
    name = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    network_attribute = "transformer"
    # diffusers' own SD3 layout: ComfyUI maps "transformer.<path>" for SD3 and diffusers has no kohya SD3 converter
    kohya_prefix = "transformer."
    lora_layout = "peft"
    lora_target_modules = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                           "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]
    max_sequence_length = 256

    def _prediction_type(self, scheduler_config: dict) -> str:
        return "flow"

    def _encode_batch(self, prompts: list[str]) -> Cond:
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompts, prompts, prompts, device=self.text_device, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def _network_output(self, x_t: Tensor, timestep: Tensor, cond: Cond) -> Tensor:
        return self.network(hidden_states=x_t, timestep=timestep, encoder_hidden_states=cond["encoder_hidden_states"],
                            pooled_projections=cond["pooled_projections"]).sample
