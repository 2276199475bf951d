"""CogVideoX-2B / 5B text-to-video (CogVideoXTransformer3DModel, AutoencoderKLCogVideoX, T5-XXL).

Schedule: v-prediction on a VP schedule that is neither SD's nor a plain zero-SNR one. The pipeline's
scheduler (CogVideoXDDIMScheduler or CogVideoXDPMScheduler, same table) takes scaled-linear betas, shifts the
SNR of ``alphas_cumprod`` by ``snr_shift_scale`` (3 for 2B, 1 for 5B) and only then rescales ``alphas_cumprod``
to zero terminal SNR. So the schedule is taken from the loaded scheduler's own ``alphas_cumprod`` (exactly the
pipeline's table), never rebuilt from betas; t = 999 is pure noise (x0 = -v there).

Latents: the trainer keeps ``(B, 16, 1 + (F - 1) / 4, H / 8, W / 8)`` (channels first, as tdm_core, the Wan
family and ComfyUI's video latents); diffusers' CogVideoX keeps ``(B, F', C, H, W)``, so the family permutes
around the network call and the VAE decode. Frame count ``F`` must be ``4k + 1`` (the VAE's temporal
compression); the default is the model's own ``sample_frames`` (49). Size: ``--resolution`` gives a square
frame; None the model's native 480 x 720.

Positions: CogVideoX-2B adds sin-cos position embeddings inside the network (recomputed by the patch embedding
for other sizes); 5B (``use_rotary_positional_embeddings``) takes 3-D rotary embeddings, computed here by the
pipeline's own ``_prepare_rotary_positional_embeddings`` for the run's size and latent frames.

Guidance: true CFG with an empty negative prompt (the pipeline's default ``negative_prompt=""``, 226 T5 tokens),
so :meth:`apply_guidance` leaves the scale to the method. CogVideoX 1.5 (``patch_size_t``) is accepted only
where the latent frames divide by it (the pipeline pads them otherwise).

CogVideoX has no native ComfyUI model: its LoRA is in diffusers' layout (``transformer.<path>.lora_A/B``,
``CogVideoXPipeline.load_lora_weights``) and ``python -m training.sample`` renders it.
"""
from __future__ import annotations

import torch
from torch import Tensor

from tdm_core.schedules import VPSchedule

from .base import Cond
from .pipeline_family import PipelineFamily

MAX_SEQUENCE_LENGTH = 226  # CogVideoXPipeline's T5 length (the transformer's max_text_seq_length)


def latent_frames(num_frames: int, temporal_compression: int) -> int:
    """Latent frames of a ``num_frames`` video (the pipeline's ``(F - 1) // 4 + 1``); refuses counts the VAE
    cannot encode."""
    if num_frames < 1 or (num_frames - 1) % temporal_compression:
        good = [k * temporal_compression + 1 for k in range(max(0, (num_frames - 1) // temporal_compression), (num_frames - 1) // temporal_compression + 2)]
        raise ValueError(f"--num-frames {num_frames} cannot be encoded by the CogVideoX VAE: it needs "
                         f"{temporal_compression}k + 1 frames, e.g. {' or '.join(map(str, good))}")
    return (num_frames - 1) // temporal_compression + 1


class CogVideoXFamily(PipelineFamily):
    name = "cogvideox"
    pipeline_class = "CogVideoXPipeline"
    network_attribute = "transformer"
    kohya_prefix = "transformer."  # diffusers' CogVideoX LoRA layout (CogVideoXLoraLoaderMixin)
    lora_layout = "peft"
    is_video = True

    def __init__(self, pipeline, device="cpu", dtype=torch.float32, source_path: str = ""):
        super().__init__(pipeline, device=device, dtype=dtype, source_path=source_path)
        # the pipeline's own table (SNR shift, then zero-SNR rescale of alphas_cumprod): see the module docstring
        self.schedule = VPSchedule(pipeline.scheduler.alphas_cumprod.double().clone())
        config = self.network.config
        self.temporal_compression = int(pipeline.vae_scale_factor_temporal)
        self.num_frames = int(config.sample_frames)
        self.height = int(config.sample_height) * self.vae_scale_factor
        self.width = int(config.sample_width) * self.vae_scale_factor
        self.max_sequence_length = MAX_SEQUENCE_LENGTH

    def _prediction_type(self, scheduler_config: dict) -> str:
        return scheduler_config.get("prediction_type", "v_prediction")

    def _native_resolution(self) -> int:
        return int(self.network.config.sample_height) * self.vae_scale_factor

    # --- what a run sets once ------------------------------------------------------------------
    def set_num_frames(self, num_frames: int | None) -> None:
        """The run's frame count (None: the model's ``sample_frames``); 4k + 1 frames only."""
        frames = int(self.network.config.sample_frames) if num_frames is None else int(num_frames)
        latents = latent_frames(frames, self.temporal_compression)
        patch_t = self.network.config.patch_size_t
        if patch_t and latents % patch_t:
            raise ValueError(f"--num-frames {frames} gives {latents} latent frames, which CogVideoX 1.5 cannot patch in "
                             f"groups of {patch_t}: pick a frame count whose latent frames divide by {patch_t}")
        self.num_frames = frames

    def frame_size(self, resolution: int | None) -> tuple[int, int]:
        """(height, width) in pixels: square ``resolution``, or the model's native 480 x 720."""
        if resolution is None:
            return self.height, self.width
        return int(resolution), int(resolution)

    def latent_shape(self, batch_size: int, resolution: int | None = None) -> tuple[int, ...]:
        height, width = self.frame_size(resolution)
        step = self.vae_scale_factor * int(self.network.config.patch_size)
        if height <= 0 or height % step or width % step:
            raise ValueError(f"resolution {resolution} is not a positive multiple of {step} for the {self.name} family: "
                             f"pick e.g. {8 * step} or leave --resolution out for the native {self.height}x{self.width}")
        frames = latent_frames(self.num_frames, self.temporal_compression)
        return (batch_size, self.latent_channels, frames, height // self.vae_scale_factor, width // self.vae_scale_factor)

    # --- prompts and network -------------------------------------------------------------------
    def _encode_batch(self, prompts: list[str]) -> Cond:
        embeds, _ = self.pipeline.encode_prompt(prompts, do_classifier_free_guidance=False, device=self.text_device,
                                                max_sequence_length=self.max_sequence_length)
        return {"encoder_hidden_states": embeds}

    def rotary_embeddings(self, latent_shape) -> tuple[Tensor, Tensor] | None:
        """CogVideoXPipeline's rotary embeddings for these latents (5B), None where the model has none (2B)."""
        if not self.network.config.use_rotary_positional_embeddings:
            return None
        _, _, frames, h, w = latent_shape
        return self.pipeline._prepare_rotary_positional_embeddings(h * self.vae_scale_factor, w * self.vae_scale_factor,
                                                                   frames, self.device)

    def _network_output(self, x_t: Tensor, timestep: Tensor, cond: Cond) -> Tensor:
        rotary = self.rotary_embeddings(x_t.shape)
        if rotary is not None:
            rotary = tuple(r.to(x_t.device) for r in rotary)
        out = self.network(hidden_states=x_t.permute(0, 2, 1, 3, 4), encoder_hidden_states=cond["encoder_hidden_states"],
                           timestep=timestep, image_rotary_emb=rotary, return_dict=False)[0]
        return out.permute(0, 2, 1, 3, 4)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Videos in [0, 1], ``(B, 3, F, H, W)``, by the pipeline's own ``decode_latents``."""
        vae = self.pipeline.vae
        frames = self.pipeline.decode_latents(latents.permute(0, 2, 1, 3, 4).to(vae.dtype))
        return (frames.float() / 2 + 0.5).clamp(0, 1)
