"""Z-Image (Turbo and base): diffusers ``ZImagePipeline`` / ``ZImageTransformer2DModel``, the Flux VAE, a Qwen3
text encoder; a single-stream DiT (ComfyUI: ``model_base.Lumina2`` with the ``supported_models.ZImage`` config).

What this family matches of ``ZImagePipeline`` (and tests/test_z_image_family.py checks against it):

- Prompts: the Qwen3 chat template of one user message, the second-to-last hidden state, only the tokens the
  attention mask keeps, so every prompt has its own length. The trainer's condition is a dict of batched
  tensors, so the embeddings are padded to ``max_sequence_length`` with a mask beside them, and the network
  call hands the transformer the unpadded list the pipeline hands it.
- Time: the transformer takes ``1 - sigma`` (the pipeline's ``(1000 - t) / 1000``) and returns the negative
  velocity (the pipeline negates it before the scheduler step); :meth:`denoise` returns the velocity
  ``eps - x0`` tdm_core's "flow" prediction means.
- Shift: the scheduler config's (Z-Image-Turbo: static 3.0; a dynamic-shift config is followed per size as
  the pipeline's ``calculate_shift`` does, through ``patched_flow.flux_shift``).

Guidance: ``--cfg`` is ordinary CFG scale ``w`` (``uncond + w (cond - uncond)``, ComfyUI's cfg). diffusers'
``guidance_scale`` ``g`` for Z-Image means ``cond + g (cond - uncond)``, i.e. ``w = g + 1``. Z-Image-Turbo is
distilled to sample without CFG (diffusers ``guidance_scale=0``, ComfyUI cfg 1): its run must use ``--cfg 1``.
Base Z-Image uses CFG with the empty prompt (``--cfg`` > 1: the method adds the empty-prompt pass).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .base import Cond
from .patched_flow import PatchedFlowFamily

DEFAULT_RESOLUTION = 1024  # ZImagePipeline's default height and width
MAX_SEQUENCE_LENGTH = 512  # ZImagePipeline.encode_prompt's default truncation
# The TDM-R1 release put peft LoraConfig(r=32, lora_alpha=64, target_modules=["to_q", "to_k", "to_v", "to_out.0",
# "add_k_proj", "add_v_proj"]) on Z-Image-Turbo. ZImageTransformer2DModel is single-stream: its attention has
# to_q, to_k, to_v, to_out.0 and no add_k_proj / add_v_proj (peft skips names that match nothing). We take the four
# attention projections of every block (main layers, noise and context refiners) and the SwiGLU feed-forward
# w1/w2/w3, all of which ComfyUI's z_image_to_diffusers key map places (to_q/k/v as slices of its fused qkv).
LORA_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]
TURBO_MARKER = "turbo"  # in the model's folder or file name (Tongyi-MAI/Z-Image-Turbo, z_image_turbo_bf16.safetensors)


class ZImageFamily(PatchedFlowFamily):
    name = "z_image"
    pipeline_class = "ZImagePipeline"
    network_attribute = "transformer"
    # stock ComfyUI maps "diffusion_model.<diffusers path>" onto its Lumina2 (comfy.lora.model_lora_keys_unet)
    kohya_prefix = "diffusion_model."
    lora_layout = "peft"
    lora_target_modules = LORA_TARGET_MODULES

    def __init__(self, pipeline, device="cpu", dtype=torch.float32, source_path: str = ""):
        super().__init__(pipeline, device=device, dtype=dtype, source_path=source_path)
        self.max_sequence_length = MAX_SEQUENCE_LENGTH
        self.set_resolution(None)

    def _prediction_type(self, scheduler_config: dict) -> str:
        return "flow"

    def _native_resolution(self) -> int:
        return DEFAULT_RESOLUTION

    @property
    def is_turbo(self) -> bool:
        return TURBO_MARKER in str(self.source_path).lower()

    def apply_guidance(self, scale: float) -> float:
        """True CFG with the empty prompt (base Z-Image); Z-Image-Turbo samples without CFG, so only ``--cfg 1``."""
        if scale < 1:
            raise ValueError(f"--cfg {scale:g} is below 1: --cfg is the ordinary CFG scale (ComfyUI's cfg; diffusers' Z-Image "
                             "guidance_scale + 1), 1 meaning no CFG. Use --cfg 1 for Z-Image-Turbo, e.g. --cfg 4 for base Z-Image")
        if self.is_turbo and scale != 1:
            raise ValueError(f"--cfg {scale:g} on Z-Image-Turbo: the turbo model is distilled to sample without CFG (diffusers "
                             "guidance_scale 0, ComfyUI cfg 1), so a CFG term would push it off its own distribution; use --cfg 1")
        return float(scale)

    # --- prompts: per-prompt lengths in the cache, padded + masked per batch ----------------------
    def _encode_batch(self, prompts: list[str]) -> list[Tensor]:
        embeds, _ = self.pipeline.encode_prompt(list(prompts), device=self.text_device, do_classifier_free_guidance=False,
                                                max_sequence_length=self.max_sequence_length)
        return embeds

    def pad_embeddings(self, embeds: list[Tensor]) -> Cond:
        """The pipeline's list of (L_i, D) embeddings as (B, max_sequence_length, D) zeros-padded + a bool mask."""
        width = embeds[0].shape[-1]
        padded = embeds[0].new_zeros(len(embeds), self.max_sequence_length, width)
        mask = torch.zeros(len(embeds), self.max_sequence_length, dtype=torch.bool, device=embeds[0].device)
        for row, e in enumerate(embeds):
            padded[row, : e.shape[0]] = e
            mask[row, : e.shape[0]] = True
        return {"prompt_embeds": padded, "prompt_mask": mask}

    def _cache_entries(self, prompts: list[str]) -> list[Cond]:
        """The cache keeps each prompt's own length (a 512-token pad per cached prompt would cost 2.6 MB of bf16
        each); :meth:`_batch_conditions` pads the batch to ``max_sequence_length``, so a condition batch and the
        empty-prompt one always concatenate."""
        return [{"prompt_embeds": embeds} for embeds in self._encode_batch(prompts)]

    def _batch_conditions(self, entries: list[Cond]) -> Cond:
        return self.pad_embeddings([entry["prompt_embeds"] for entry in entries])

    # --- network ------------------------------------------------------------------------------
    def _network_output(self, x_t: Tensor, timestep: Tensor, cond: Cond) -> Tensor:
        captions = [e[m] for e, m in zip(cond["prompt_embeds"], cond["prompt_mask"])]
        images = list(x_t.unsqueeze(2).unbind(dim=0))  # (C, 1 frame, H, W) each, as the pipeline passes them
        out = self.network(images, 1.0 - timestep / self.num_timesteps, captions, return_dict=False)[0]
        return -torch.stack(out, dim=0).squeeze(2)  # the transformer returns x0 - eps
