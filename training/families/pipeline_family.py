"""What every diffusers-pipeline family shares: schedule from the scheduler config, prompt cache,
latent shapes, VAE decode. A subclass only says how prompts become network keyword arguments
(:meth:`_encode_batch`) and how the network is called (:meth:`_network_output`).
"""
from __future__ import annotations

import torch
from torch import Tensor

from tdm_core.lora_targets import TRANSFORMER_BLOCK_TARGETS
from tdm_core.schedules import FlowSchedule, VPSchedule

from .base import Cond, cat_conditions, select_condition
from .prompt_cache import PromptCache


def schedule_from_scheduler_config(config) -> VPSchedule | FlowSchedule:
    """The tdm_core schedule a diffusers scheduler config describes (betas, zero-SNR rescale, flow shift)."""
    num_timesteps = int(config.get("num_train_timesteps", 1000))
    if "shift" in config and "beta_schedule" not in config:  # FlowMatchEulerDiscreteScheduler
        return FlowSchedule(shift=float(config.get("shift", 1.0)), num_timesteps=num_timesteps)
    trained_betas = config.get("trained_betas")
    if trained_betas is not None:
        return VPSchedule.from_betas(torch.tensor(trained_betas, dtype=torch.float64))
    return VPSchedule.from_config(
        beta_schedule=config.get("beta_schedule", "scaled_linear"),
        beta_start=float(config.get("beta_start", 0.00085)),
        beta_end=float(config.get("beta_end", 0.012)),
        num_timesteps=num_timesteps,
        zero_terminal_snr=bool(config.get("rescale_betas_zero_snr", False)),
    )


class PipelineFamily:
    """A model family backed by a loaded diffusers pipeline; the pipeline's denoiser is ``network``."""

    name = "base"
    kohya_prefix = "lora_unet"
    lora_layout = "kohya"  # or "peft" (training.lora_io): how the exported file names its tensors
    network_attribute = "unet"
    # attention and feed-forward projections of every transformer block: the usual LoRA targets
    lora_target_modules = list(TRANSFORMER_BLOCK_TARGETS)

    def __init__(self, pipeline, device="cpu", dtype=torch.float32, source_path: str = ""):
        self.pipeline = pipeline.to(device=device, dtype=dtype)
        self.device, self.dtype = torch.device(device), dtype
        self.text_device = self.device  # where the text encoders run (see offload_text_encoders)
        self.source_path = source_path
        self.network = getattr(pipeline, self.network_attribute)
        for module in pipeline.components.values():
            if isinstance(module, torch.nn.Module):
                module.requires_grad_(False)
                module.eval()
        scheduler_config = dict(pipeline.scheduler.config)
        self.schedule = schedule_from_scheduler_config(scheduler_config)
        self.num_timesteps = int(scheduler_config.get("num_train_timesteps", 1000))
        self.prediction_type = self._prediction_type(scheduler_config)
        self.vae_scale_factor = self._vae_scale_factor()
        self.latent_channels = self._latent_channels()
        self.resolution = self._native_resolution()  # native training size
        self.prompt_cache = PromptCache()  # in host memory: conditions reach the device one batch at a time

    def _prediction_type(self, scheduler_config: dict) -> str:
        return scheduler_config.get("prediction_type", "epsilon")

    def _vae_scale_factor(self) -> int:
        # an AutoencoderKL halves the size per level but the last; video VAEs (Qwen-Image) say it otherwise
        return 2 ** (len(self.pipeline.vae.config.block_out_channels) - 1)

    def _latent_channels(self) -> int:
        return int(self.network.config.in_channels)

    def _native_resolution(self) -> int:
        return int(self.network.config.sample_size) * self.vae_scale_factor

    # --- what a run sets once ------------------------------------------------------------------
    def set_resolution(self, resolution: int | None) -> None:
        """The run's image size; families whose schedule depends on it (Flux's shift) rebuild it here."""

    def apply_guidance(self, scale: float) -> float:
        """Takes the teacher guidance ``scale`` of the run; returns the CFG scale the method must still apply
        with an unconditional pass (``scale`` itself here; 1 for guidance-distilled models such as Flux.1-dev,
        whose teacher takes the guidance as an input)."""
        return scale

    # --- prompts -----------------------------------------------------------------------------
    def _encode_batch(self, prompts: list[str]) -> Cond:
        raise NotImplementedError

    def _cache_entries(self, prompts: list[str]) -> list[Cond]:
        """What the cache keeps of each prompt: its row of the encoded batch (families that trim padding override)."""
        encoded = self._encode_batch(prompts)
        return [select_condition(encoded, slice(row, row + 1)) for row in range(len(prompts))]

    def _batch_conditions(self, entries: list[Cond]) -> Cond:
        """One batch of network conditions from cached entries already on the family's device."""
        return cat_conditions(entries)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Cond:
        """Network conditions for ``prompts`` on the family's device; each distinct prompt runs the text encoders
        once, ever, and its conditions wait in host memory (training.families.prompt_cache) between batches."""
        if isinstance(prompts, str) or not prompts:
            raise ValueError(f"encode_prompts takes a non-empty list of prompts, got {prompts!r}: wrap a single prompt in a list")
        missing = [p for p in dict.fromkeys(prompts) if p not in self.prompt_cache]
        if missing:
            for prompt, entry in zip(missing, self._cache_entries(missing)):
                self.prompt_cache.put(prompt, entry)
        return self._batch_conditions([self.prompt_cache.on(p, self.device) for p in prompts])

    def precompute_prompts(self, prompts: list[str], batch_size: int = 32) -> None:
        """Fill the prompt cache up front (then the text encoders may be moved off the GPU)."""
        for start in range(0, len(prompts), batch_size):
            self.encode_prompts(prompts[start : start + batch_size])

    def offload_text_encoders(self, device="cpu") -> None:
        """Move the text encoders off the accelerator (e.g. after :meth:`precompute_prompts`); prompts not yet
        cached are still encoded, on ``device``, and their conditions cached in host memory like the others."""
        for name, module in self.pipeline.components.items():
            if name.startswith("text_encoder") and isinstance(module, torch.nn.Module):
                module.to(device)
        self.text_device = torch.device(device)

    def null_condition(self, batch_size: int) -> Cond:
        """The unconditional (empty-prompt) condition CFG needs, repeated ``batch_size`` times."""
        empty = self.encode_prompts([""])
        return {k: v.expand(batch_size, *v.shape[1:]) for k, v in empty.items()}

    # --- network -----------------------------------------------------------------------------
    def _network_output(self, x_t: Tensor, timestep: Tensor, cond: Cond) -> Tensor:
        raise NotImplementedError

    def denoise(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        """Model output (of ``prediction_type``) at schedule timesteps ``t`` (B,); adapters as currently set."""
        t = torch.as_tensor(t, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        timestep = self.schedule.model_timestep(t).to(device=x_t.device, dtype=torch.float32)
        # float conditions follow the latents' dtype (mixed precision); masks and ids keep theirs
        cond = {k: v.to(x_t.device, x_t.dtype) if v.is_floating_point() else v.to(x_t.device) for k, v in cond.items()}
        return self._network_output(x_t, timestep, cond)

    # --- latents and images ------------------------------------------------------------------
    def latent_shape(self, batch_size: int, resolution: int | None = None) -> tuple[int, ...]:
        resolution = self.resolution if resolution is None else int(resolution)
        step = self.vae_scale_factor * getattr(self.network.config, "patch_size", 1)
        if resolution <= 0 or resolution % step:
            raise ValueError(f"resolution {resolution} is not a positive multiple of {step} for the {self.name} family: pick e.g. {self.resolution}")
        side = resolution // self.vae_scale_factor
        return (batch_size, self.latent_channels, side, side)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        vae = self.pipeline.vae
        if vae.dtype == torch.float16 and vae.config.get("force_upcast", False):
            vae.to(torch.float32)  # the SD/SDXL VAE overflows in fp16 (diffusers' own pipelines upcast it too)
        scaling = vae.config.scaling_factor
        shift = vae.config.get("shift_factor", None) or 0.0
        images = vae.decode((latents / scaling + shift).to(vae.dtype)).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)
