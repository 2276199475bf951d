"""Qwen-Image (QwenImageTransformer2DModel, rectified flow with a resolution-dependent shift; Qwen2.5-VL text
encoder; AutoencoderKLQwenImage, a Wan 2.1-style video VAE).

Latents: the trainer keeps them as ComfyUI's QwenImage latent, (B, 16, H/8, W/8), in the normalised space the
transformer works in; this family packs them into 2x2-patch tokens around each network call, as
QwenImagePipeline does. :meth:`decode` undoes exactly what the pipeline does before its VAE: one frame axis
added, ``latents * latents_std + latents_mean``, the frame taken back out of the decoded video.

Schedule: the flow shift comes from the model's own scheduler config. Qwen-Image's uses dynamic shifting,
``mu`` linear in the image's token count between (base_image_seq_len, base_shift) and (max_image_seq_len,
max_shift), as QwenImagePipeline's ``calculate_shift`` (the shared :func:`flux_shift`), set per run by
:meth:`set_resolution`. ``time_shift_type`` "exponential" (Qwen-Image's) makes that tdm_core's flow shift by
``exp(mu)``; "linear" makes it a shift by ``mu``. ``shift_terminal`` (0.02 in Qwen-Image's config) is not
used: diffusers applies it only to the list of inference sigmas (it stretches a sampler's schedule so its last
sigma is 0.02), not to the noise of a timestep, and the TDM student samples on its own grid; ComfyUI ignores
it as well.

Guidance: Qwen-Image is not guidance-distilled; it uses true classifier-free guidance with a negative prompt.
The method's CFG term uses the empty prompt (:meth:`null_condition`; in ComfyUI an empty negative
CLIPTextEncode gives the same embeddings) as the unconditional branch, ``x0_uncond + w (x0_cond - x0_uncond)`` (METHOD.md).
diffusers' ``true_cfg_scale`` does two things differently: it applies CFG only when a negative prompt is given,
and it rescales the combined velocity per token to the norm of the conditional one
(``comb * |cond| / |comb|``). The trainer does not rescale: the method's target is the plain CFG difference in
x0 space, which is also what ComfyUI's stock CFG computes for Qwen-Image (its workflows use CFG ~2.5 with no
rescale), so the student learns the guided distribution ComfyUI users sample.

Prompts: encoded as QwenImagePipeline.encode_prompt does (its template, the first ``drop_idx`` = 34 template
tokens dropped, the last hidden state, a 0/1 mask of the valid tokens). Conditions are padded to a fixed
``max_sequence_length`` (zeros, mask 0), so any two conditions (prompt and empty prompt) batch together; each
network call trims the columns no row of the batch uses, so the transformer sees what the pipeline gives it.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from einops import rearrange
from torch import Tensor

from .base import Cond, cat_conditions
from .patched_flow import PATCH, PatchedFlowFamily, flux_shift

MAX_SEQUENCE_LENGTH = 1024  # QwenImagePipeline's tokenizer_max_length (prompt tokens after the template)
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "qwen_image"


def qwen_shift(image_seq_len: int, scheduler_config: dict) -> float:
    """tdm_core's flow shift for ``image_seq_len`` tokens under a Qwen-Image scheduler config (see the module docstring)."""
    shift = flux_shift(image_seq_len, scheduler_config)
    dynamic = scheduler_config.get("use_dynamic_shifting", False)
    if dynamic and scheduler_config.get("time_shift_type", "exponential") == "linear":
        return math.log(shift)  # linear time shift: mu / (mu + 1/t - 1), a shift by mu itself
    return shift


class QwenImageFamily(PatchedFlowFamily):
    name = "qwen_image"
    pipeline_class = "QwenImagePipeline"
    network_attribute = "transformer"
    # diffusers' names are ComfyUI's names for Qwen-Image: comfy.lora maps "transformer.<path>" onto its QwenImage
    kohya_prefix = "transformer."
    lora_layout = "peft"
    # attention (image and text streams) and both MLPs of every block, the usual Qwen-Image LoRA targets
    lora_target_modules = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                           "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2"]
    max_sequence_length = MAX_SEQUENCE_LENGTH

    def __init__(self, pipeline, device="cpu", dtype=torch.float32, source_path: str = ""):
        super().__init__(pipeline, device=device, dtype=dtype, source_path=source_path)
        self.set_resolution(None)

    def _vae_scale_factor(self) -> int:
        return 2 ** len(self.pipeline.vae.temperal_downsample)  # as QwenImagePipeline: 8 for Qwen-Image's VAE

    def _latent_channels(self) -> int:
        return int(self.network.config.in_channels) // (PATCH * PATCH)

    def _native_resolution(self) -> int:
        return int(self.pipeline.default_sample_size) * self.vae_scale_factor  # 1024 px for Qwen-Image

    def image_shift(self, image_seq_len: int) -> float:
        return qwen_shift(image_seq_len, dict(self.pipeline.scheduler.config))

    def apply_guidance(self, scale: float) -> float:
        return scale  # true CFG: the method adds the empty-prompt pass

    # --- prompts -----------------------------------------------------------------------------------
    def _encode_batch(self, prompts: list[str]) -> Cond:
        embeds, mask = self.pipeline.encode_prompt(prompts, device=self.text_device, max_sequence_length=self.max_sequence_length)
        if mask is None:  # the pipeline drops an all-ones mask
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return {"encoder_hidden_states": embeds, "encoder_hidden_states_mask": mask.long()}

    def _cache_entries(self, prompts: list[str]) -> list[Cond]:
        """The cache keeps each prompt's valid tokens only; :meth:`_batch_conditions` pads to ``max_sequence_length``."""
        encoded = self._encode_batch(prompts)
        valid = encoded["encoder_hidden_states_mask"].sum(dim=1).tolist()
        return [{k: v[row : row + 1, :n] for k, v in encoded.items()} for row, n in enumerate(valid)]

    def _batch_conditions(self, entries: list[Cond]) -> Cond:
        return cat_conditions([self._padded(entry) for entry in entries])

    def _padded(self, cond: Cond) -> Cond:
        pad = self.max_sequence_length - cond["encoder_hidden_states"].shape[1]
        embeds, mask = cond["encoder_hidden_states"], cond["encoder_hidden_states_mask"]
        return {"encoder_hidden_states": torch.cat([embeds, embeds.new_zeros(1, pad, embeds.shape[2])], dim=1),
                "encoder_hidden_states_mask": torch.cat([mask, mask.new_zeros(1, pad)], dim=1)}

    # --- network -------------------------------------------------------------------------------------
    def _network_output(self, x_t: Tensor, timestep: Tensor, cond: Cond) -> Tensor:
        b, _, h, w = x_t.shape
        mask = cond["encoder_hidden_states_mask"]
        used = max(int(mask.sum(dim=1).max()), 1)  # the padding no row uses never reaches the network
        embeds, mask = cond["encoder_hidden_states"][:, :used], mask[:, :used]
        tokens = rearrange(x_t, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=PATCH, pw=PATCH)
        out = self.network(hidden_states=tokens, timestep=timestep / self.num_timesteps, encoder_hidden_states=embeds,
                           encoder_hidden_states_mask=None if bool(mask.all()) else mask,
                           img_shapes=[[(1, h // PATCH, w // PATCH)]] * b).sample
        return rearrange(out, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=h // PATCH, w=w // PATCH, ph=PATCH, pw=PATCH)

    # --- latents and images --------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        vae = self.pipeline.vae
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, vae.dtype)
        std = torch.tensor(vae.config.latents_std).view(shape).to(latents.device, vae.dtype)
        video = latents.unsqueeze(2).to(vae.dtype) * std + mean  # (B, 16, 1 frame, h, w) in the VAE's own scale
        images = vae.decode(video).sample[:, :, 0]
        return (images.float() / 2 + 0.5).clamp(0, 1)
