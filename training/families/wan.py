"""Wan 2.1 T2V (1.3B / 14B) and Wan 2.2 TI2V-5B (diffusers WanPipeline: WanTransformer3DModel, UMT5 text encoder,
AutoencoderKLWan), a rectified-flow video model.

Latents: the trainer keeps them as WanPipeline (and ComfyUI's Wan21 / Wan22 latent) does, 5-D,
(B, C, 1 + (F - 1) / 4, H / s, W / s) in the normalised space the transformer works in: C = 16 and s = 8 for Wan
2.1's VAE, C = 48 and s = 16 for Wan 2.2's (both read from the VAE config: ``z_dim``, ``scale_factor_spatial``,
``scale_factor_temporal``). The frame count ``F`` must be 4k + 1 (the causal VAE encodes the first frame alone,
then 4 frames per latent frame); :meth:`set_num_frames` refuses others. Sizes are multiples of s x the patch (2).

Schedule: Wan's diffusers scheduler is UniPCMultistepScheduler with ``use_flow_sigmas`` and ``flow_shift``; its
sigma of a timestep is ``shift * s / (1 + (shift - 1) * s)``, tdm_core's FlowSchedule at that shift. The shift is
read from the model's own scheduler config, never hard-coded (diffusers' Wan2.1-T2V configs ship 3.0 for 1.3B /
480p and 5.0 for 14B / 720p, Wan2.2-TI2V-5B 5.0). The transformer takes ``sigma * 1000`` as its timestep, as
WanPipeline passes the scheduler's timesteps. ComfyUI's WAN21_T2V samples at shift 8 by default: set
ModelSamplingSD3 (multiplier 1000, Wan's) to the shift the LoRA records.

Guidance: Wan is not guidance-distilled; it uses true CFG with a negative prompt (WanPipeline: ``uncond + w
(cond - uncond)``, guidance 5). The method's CFG pass uses the empty prompt (:meth:`null_condition`), what an
empty negative CLIPTextEncode gives in ComfyUI. (Wan's long default Chinese negative prompt is a sampling-time
choice; the student is distilled against the empty one.)

Prompts: WanPipeline's ``encode_prompt`` (UMT5 last hidden state, each prompt trimmed to its valid tokens and
zero-padded to ``max_sequence_length`` = 512, WanPipeline's default); the transformer gets no mask, as in the
pipeline, so every condition batches with any other.

Wan 2.2 A14B (two experts, ``transformer`` for t >= boundary_ratio * 1000 and ``transformer_2`` below) is refused
at load (:func:`check_single_expert`). Design for it: the K-step grid splits at the boundary timestep; each
expert gets its own student and fake-score LoRA pair and trains only on the grid steps (and fake-score
timesteps) on its side of the boundary, with the teacher for a timestep being the expert the pipeline would use
there; the export writes two LoRA files (high-noise / low-noise), loaded in ComfyUI onto the two UNETLoader
models of the stock two-KSampler A14B workflow, each TDM sampler running the part of the grid on its side.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from tdm_core.schedules import FlowSchedule

from training.errors import TrainingInputError

from .base import Cond
from .pipeline_family import PipelineFamily

MAX_SEQUENCE_LENGTH = 512  # WanPipeline.__call__'s default: UMT5 embeddings zero-padded to 512 tokens
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "wan"


def wan_flow_shift(scheduler_config: dict) -> float:
    """The flow shift of a Wan scheduler config: UniPC's ``flow_shift`` (use_flow_sigmas), or a flow-match
    Euler scheduler's ``shift``."""
    if scheduler_config.get("use_dynamic_shifting", False):
        raise TrainingInputError("the Wan scheduler config uses dynamic shifting, which no Wan release does: use the model's own scheduler config")
    if "flow_shift" in scheduler_config:
        if not scheduler_config.get("use_flow_sigmas", True):
            raise TrainingInputError("the Wan scheduler config has use_flow_sigmas false: Wan is a flow model; use its own scheduler config")
        return float(scheduler_config["flow_shift"])
    if "shift" in scheduler_config:
        return float(scheduler_config["shift"])
    raise TrainingInputError("the Wan scheduler config has neither flow_shift nor shift: use the model's own scheduler/scheduler_config.json")


A14B_REFUSAL = ("TDM for it is designed (one LoRA pair per expert, the K-step grid split at the boundary timestep; "
                "training/families/wan.py) but not implemented. Distil Wan 2.1 T2V (1.3B / 14B) or Wan 2.2 TI2V-5B instead.")


def check_single_expert(pipeline) -> None:
    if getattr(pipeline, "transformer_2", None) is not None or pipeline.config.get("boundary_ratio") is not None:
        raise TrainingInputError(f"this is a two-expert Wan 2.2 A14B model (transformer + transformer_2 split at boundary_ratio): {A14B_REFUSAL}")


def latent_frames(num_frames: int, temporal: int) -> int:
    """Latent frames of ``num_frames`` video frames; only ``temporal * k + 1`` frames encode."""
    if num_frames < 1 or (num_frames - 1) % temporal:
        near = max(1, round((num_frames - 1) / temporal)) * temporal + 1
        raise TrainingInputError(f"--num-frames {num_frames}: Wan's VAE encodes {temporal}k + 1 frames (1, 5, ..., 81); use e.g. {near}")
    return (num_frames - 1) // temporal + 1


class WanFamily(PipelineFamily):
    name = "wan"
    pipeline_class = "WanPipeline"
    network_attribute = "transformer"
    # ComfyUI has no diffusers-name map for Wan: comfy.lora maps its own (Wan's original) names, "diffusion_model.<path>";
    # :meth:`lora_module_path` renames diffusers' paths to those (checked against diffusers' own converter)
    kohya_prefix = "diffusion_model."
    lora_layout = "peft"
    # self- and cross-attention projections and the MLP of every block, the usual Wan LoRA targets
    lora_target_modules = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                           "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2"]
    max_sequence_length = MAX_SEQUENCE_LENGTH
    default_num_frames = 81  # WanPipeline's default (5 s at 16 fps)

    def __init__(self, pipeline, device="cpu", dtype=torch.float32, source_path: str = ""):
        check_single_expert(pipeline)
        self.num_frames = self.default_num_frames
        super().__init__(pipeline, device=device, dtype=dtype, source_path=source_path)
        self.set_resolution(None)  # the base read the UniPC config as a VP schedule: Wan's is the flow one

    def _prediction_type(self, scheduler_config: dict) -> str:
        return "flow"

    def _vae_scale_factor(self) -> int:
        return int(self.pipeline.vae.config.scale_factor_spatial)  # 8 (Wan 2.1 VAE) or 16 (Wan 2.2 VAE)

    def _latent_channels(self) -> int:
        return int(self.network.config.in_channels)

    def _native_resolution(self) -> int:
        return 480  # WanPipeline's default height (480 x 832); the trainer's square side at the same scale

    def set_resolution(self, resolution: int | None) -> None:
        self.latent_shape(1, resolution)  # the size check
        self.schedule = FlowSchedule(shift=wan_flow_shift(dict(self.pipeline.scheduler.config)), num_timesteps=self.num_timesteps)

    def set_num_frames(self, num_frames: int | None) -> None:
        """The run's frame count (None: the family's default, 81)."""
        num_frames = self.default_num_frames if num_frames is None else int(num_frames)
        latent_frames(num_frames, int(self.pipeline.vae.config.scale_factor_temporal))
        self.num_frames = num_frames

    def apply_guidance(self, scale: float) -> float:
        return scale  # true CFG: the method adds the empty-prompt pass

    # --- prompts -----------------------------------------------------------------------------------
    def _encode_batch(self, prompts: list[str]) -> Cond:
        embeds, _ = self.pipeline.encode_prompt(prompts, do_classifier_free_guidance=False, device=self.text_device,
                                                max_sequence_length=self.max_sequence_length)
        return {"encoder_hidden_states": embeds}

    # --- network -------------------------------------------------------------------------------------
    def _network_output(self, x_t: Tensor, timestep: Tensor, cond: Cond) -> Tensor:
        return self.network(hidden_states=x_t, timestep=timestep, encoder_hidden_states=cond["encoder_hidden_states"]).sample

    @staticmethod
    def lora_module_path(diffusers_path: str) -> str:
        """Wan's original (ComfyUI's) name of a diffusers module; diffusers' own converter must map it back."""
        from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

        original = diffusers_path
        for diffusers_name, wan_name in ((".attn1.", ".self_attn."), (".attn2.", ".cross_attn."), (".to_out.0", ".o"),
                                         (".to_q", ".q"), (".to_k", ".k"), (".to_v", ".v"), (".ffn.net.0.proj", ".ffn.0"),
                                         (".ffn.net.2", ".ffn.2")):
            original = original.replace(diffusers_name, wan_name)
        back = next(iter(convert_wan_transformer_to_diffusers({original + ".weight": torch.empty(0)})))
        if back != diffusers_path + ".weight":
            raise ValueError(f"no Wan name for the diffusers module {diffusers_path} (got {original}, which diffusers reads as {back})")
        return original

    # --- latents and videos ----------------------------------------------------------------------------
    def latent_shape(self, batch_size: int, resolution: int | None = None) -> tuple[int, ...]:
        resolution = self.resolution if resolution is None else int(resolution)
        step = self.vae_scale_factor * int(self.network.config.patch_size[-1])
        if resolution <= 0 or resolution % step:
            raise ValueError(f"resolution {resolution} is not a positive multiple of {step} for the {self.name} family: pick e.g. {self.resolution}")
        side = resolution // self.vae_scale_factor
        frames = latent_frames(self.num_frames, int(self.pipeline.vae.config.scale_factor_temporal))
        return (batch_size, self.latent_channels, frames, side, side)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Videos in [0, 1], (B, 3, F, H, W), as WanPipeline decodes: ``latents * latents_std + latents_mean``."""
        vae = self.pipeline.vae
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, vae.dtype)
        std = torch.tensor(vae.config.latents_std).view(shape).to(latents.device, vae.dtype)
        video = vae.decode(latents.to(vae.dtype) * std + mean).sample
        return (video.float() / 2 + 0.5).clamp(0, 1)
