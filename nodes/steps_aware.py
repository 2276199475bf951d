"""Steps-aware (TDM-unify) LoRAs in ComfyUI: the K-embedding as a model wrapper on the cloned MODEL.

A unify LoRA file carries the student's table ``tdm_k_embedding.weight`` (rows K = 1..K_max) beside its
LoRA weights. :func:`apply_tdm_lora` loads the LoRA weights with ``lora_apply.apply_lora`` and puts an
``APPLY_MODEL`` wrapper on the clone it returns: for each model call the wrapper hooks the diffusion
model's timestep embedding and adds ``E[K]`` (``tdm_core.steps_aware``), then removes the hook. The
wrapper lives only in the clone's ``wrappers``, so the input MODEL and every other model never see it,
and dropping the LoRA loader drops the condition.

K for a call: ``transformer_options["tdm_num_steps"]`` when a host sets it, else inferred from the
sigmas being sampled (``sample_sigmas``, set by ComfyUI for every sampler): their count for a whole
grid, or the K whose reference grid they are the tail of (img2img, denoise < 1). So the TDM KSampler,
SamplerCustom + TDM Scheduler/Sampler and stock samplers all condition on the steps they run.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

import comfy.patcher_extension

from .lora_apply import apply_lora

try:
    from ..tdm_core import steps_aware
except ImportError:  # nodes imported as a top-level package (no parent package)
    from tdm_core import steps_aware

WRAPPER_KEY = "tdm_steps_aware"
NUM_STEPS_OPTION = "tdm_num_steps"  # transformer_options key a host may set to force K
K_EMBEDDING_ATTACHMENT = "tdm_k_embedding"
# attribute of the diffusion model that computes the timestep embedding: ldm UNet (SD1.5/SDXL), MMDiT (SD3)
TIME_EMBEDDING_ATTRIBUTES = ("time_embed", "t_embedder")
DEFAULT_TOTAL_STEPS = 900


def split_k_embedding(lora_sd: dict) -> tuple[dict, Optional[torch.Tensor]]:
    """``(LoRA weights, K table or None)``: the table is no LoRA weight and must not reach ComfyUI's key map."""
    if steps_aware.K_EMBEDDING_KEY not in lora_sd:
        return lora_sd, None
    rest = {k: v for k, v in lora_sd.items() if k != steps_aware.K_EMBEDDING_KEY}
    return rest, lora_sd[steps_aware.K_EMBEDDING_KEY]


def time_embedding_of(diffusion_model) -> torch.nn.Module:
    for name in TIME_EMBEDDING_ATTRIBUTES:
        module = getattr(diffusion_model, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    raise ValueError(
        f"steps-aware TDM LoRA: {type(diffusion_model).__name__} has no timestep embedding this pack knows "
        f"({', '.join(TIME_EMBEDDING_ATTRIBUTES)}): use it on an SD1.5, SDXL or SD3 model"
    )


def embedding_width(module: torch.nn.Module) -> int:
    linears = [m for m in module.modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise ValueError(f"steps-aware TDM LoRA: the timestep embedding {type(module).__name__} has no linear layer to size E by")
    return linears[-1].out_features


def sampled_timesteps(model_sampling, sigmas: torch.Tensor) -> list[int]:
    """The model's (rounded) timesteps of the non-zero sigmas being sampled."""
    positive = sigmas[sigmas > 0].float().cpu()
    return [int(round(float(t))) for t in model_sampling.timestep(positive)]


class KConditionWrapper:
    """``APPLY_MODEL`` wrapper: ``temb + strength * E[K]`` inside one model call."""

    def __init__(self, table: torch.Tensor, k_choices: list[int], total_steps: int, strength: float = 1.0):
        self.table = table.detach().float() * float(strength)
        self.k_choices, self.total_steps = list(k_choices), int(total_steps)

    def num_steps(self, base_model, transformer_options: dict) -> int:
        if transformer_options.get(NUM_STEPS_OPTION) is not None:
            return int(transformer_options[NUM_STEPS_OPTION])
        sigmas = transformer_options.get("sample_sigmas")
        if sigmas is None:
            raise ValueError(
                "steps-aware TDM LoRA: this model call carries neither the step count nor the sampled sigmas: "
                f"sample with a ComfyUI sampler, or set transformer_options['{NUM_STEPS_OPTION}']"
            )
        total = min(self.total_steps, int(base_model.model_sampling.sigmas.shape[0]))
        return steps_aware.infer_num_steps(sampled_timesteps(base_model.model_sampling, sigmas), self.k_choices, total)

    def __call__(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        base_model = executor.class_obj
        k = self.num_steps(base_model, transformer_options)
        steps_aware.check_k(k, self.table)
        hook = time_embedding_of(base_model.diffusion_model).register_forward_hook(
            lambda _module, _inputs, temb: steps_aware.add_k_embedding(temb, k, self.table)
        )
        try:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        finally:
            hook.remove()


def k_embedding_wrapper(model) -> Optional[KConditionWrapper]:
    """The K-embedding a MODEL carries (None for a model without a unify LoRA)."""
    found = model.get_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY)
    return found[-1] if found else None


def install_k_embedding(model, table: torch.Tensor, info, strength: float, lora_name: str) -> None:
    """Put the K condition on ``model`` (a clone the caller owns); a later unify LoRA replaces it."""
    if table.ndim != 2 or table.shape[0] < 1:
        raise ValueError(f"LoRA '{lora_name}': {steps_aware.K_EMBEDDING_KEY} has shape {tuple(table.shape)}, expected (K_max, width): re-export it with training.distill")
    width = embedding_width(time_embedding_of(model.model.diffusion_model))
    if table.shape[1] != width:
        raise ValueError(
            f"LoRA '{lora_name}': its K-embedding has width {table.shape[1]} but this model's timestep embedding has width "
            f"{width}: the steps-aware LoRA was trained on another architecture; load the matching base checkpoint"
        )
    k_choices = list(getattr(info, "k_choices", None) or range(1, table.shape[0] + 1))
    if max(k_choices) > table.shape[0]:
        raise ValueError(f"LoRA '{lora_name}': metadata says K in {k_choices} but the K-embedding has only {table.shape[0]} rows: re-export it with training.distill")
    total_steps = getattr(info, "total_steps", None) or DEFAULT_TOTAL_STEPS
    model.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY)
    wrapper = KConditionWrapper(table, k_choices, total_steps, strength)
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, wrapper)
    model.set_attachments(K_EMBEDDING_ATTACHMENT, wrapper)
    logging.info("TDM LoRA '%s': steps-aware, K-embedding for K in %s installed", lora_name, k_choices)


def apply_tdm_lora(model, clip, lora_sd: dict, metadata: dict, strength_model: float, strength_clip: float,
                   use_recommended_strength: bool, lora_name: str):
    """``lora_apply.apply_lora`` that also understands unify LoRAs: ``(model, clip, info, summary)``."""
    weights, table = split_k_embedding(lora_sd)
    new_model, new_clip, info, summary = apply_lora(model, clip, weights, metadata, strength_model, strength_clip, use_recommended_strength, lora_name)
    if table is not None:
        strength = info.recommended_strength if (info is not None and use_recommended_strength) else strength_model
        install_k_embedding(new_model, table, info, strength, lora_name)
    return new_model, new_clip, info, summary
