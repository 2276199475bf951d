"""Flux.1 (FluxTransformer2DModel, rectified flow with a resolution-dependent shift; CLIP-L and T5).

The trainer keeps latents unpacked, (B, 16, H/8, W/8), as tdm_core and ComfyUI do; this family packs
them into Flux's 2x2-patch token sequence around each network call.

Guidance: Flux.1-dev is guidance-distilled. Its guidance scale is an input of the network (the
guidance embedding), and there is no unconditional pass. The run's ``--cfg`` is that input for all three
roles (teacher, fake score and student), so the student is conditioned on the prompt and on guidance
``--cfg``, which is what it expects at inference (ComfyUI's FluxGuidance, recorded as ``teacher_cfg``).
The method then adds no CFG term of its own (:meth:`apply_guidance` returns 1). A Flux-architecture model
without a guidance embedding (Flux.1-schnell, de-distilled or freshly trained ones such as the benchmark's
toy flow teacher) gets true classifier-free guidance instead: ``--cfg`` is applied by the method with an
empty-prompt pass, as for SD3 (schnell is meant for ``--cfg 1``).
"""
from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor

from .base import Cond
from .patched_flow import PATCH, PatchedFlowFamily

DEFAULT_SAMPLE_SIZE = 128  # FluxPipeline.default_sample_size: 128 latents = 1024 px


class FluxFamily(PatchedFlowFamily):
    name = "flux"
    pipeline_class = "FluxPipeline"
    network_attribute = "transformer"
    # diffusers' Flux layout: ComfyUI maps "transformer.<diffusers path>" onto its Flux (comfy.lora, flux_to_diffusers)
    kohya_prefix = "transformer."
    lora_layout = "peft"
    # every linear layer of the double- and single-stream blocks ("proj_out" also adapts the final layer)
    lora_target_modules = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                           "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out"]
    max_sequence_length = 512  # Flux.1-dev's T5 length (shorter when the T5 tokenizer's own limit is)

    def __init__(self, pipeline, device="cpu", dtype=torch.float32, source_path: str = ""):
        super().__init__(pipeline, device=device, dtype=dtype, source_path=source_path)
        self.max_sequence_length = min(self.max_sequence_length, int(pipeline.tokenizer_2.model_max_length))
        self.guidance = 1.0
        self.set_resolution(None)

    def _latent_channels(self) -> int:
        return int(self.network.config.in_channels) // (PATCH * PATCH)

    def _native_resolution(self) -> int:
        # FluxPipeline's default is 128 latents (1024 px), which is what Flux.1's VAE config says too
        return int(self.pipeline.vae.config.get("sample_size") or DEFAULT_SAMPLE_SIZE * self.vae_scale_factor)

    def apply_guidance(self, scale: float) -> float:
        if not self.network.config.guidance_embeds:
            return scale  # true CFG: the method adds the empty-prompt pass
        self.guidance = float(scale)
        return 1.0

    def _encode_batch(self, prompts: list[str]) -> Cond:
        embeds, pooled, _ = self.pipeline.encode_prompt(prompts, prompts, device=self.text_device,
                                                        max_sequence_length=self.max_sequence_length)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def _network_output(self, x_t: Tensor, timestep: Tensor, cond: Cond) -> Tensor:
        b, _, h, w = x_t.shape
        tokens = rearrange(x_t, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=PATCH, pw=PATCH)
        # position ids as FluxPipeline._prepare_latent_image_ids: (0, row, column) per token; text ids are zeros
        rows, cols = torch.meshgrid(torch.arange(h // PATCH), torch.arange(w // PATCH), indexing="ij")
        img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).to(x_t.device, x_t.dtype)
        txt_ids = torch.zeros(cond["encoder_hidden_states"].shape[1], 3, device=x_t.device, dtype=x_t.dtype)
        guidance = torch.full((b,), self.guidance, device=x_t.device, dtype=torch.float32) if self.network.config.guidance_embeds else None
        out = self.network(hidden_states=tokens, timestep=timestep / self.num_timesteps, guidance=guidance,
                           pooled_projections=cond["pooled_projections"], encoder_hidden_states=cond["encoder_hidden_states"],
                           txt_ids=txt_ids, img_ids=img_ids).sample
        return rearrange(out, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=h // PATCH, w=w // PATCH, ph=PATCH, pw=PATCH)
