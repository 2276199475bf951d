"""TDM grid -> ComfyUI SIGMAS through the model's own ``model_sampling`` (never a hard-coded table)."""
from __future__ import annotations

import logging
import math
from typing import Optional

import torch

import comfy.model_sampling

from .core_import import TDMInfo, grids
from .grid_choice import select_grid

TDM_INFO_ATTACHMENT = "tdm_info"  # ModelPatcher attachment set by the TDM LoRA Loader (cloned with the model)


FLUX_NUM_TIMESTEPS = 1000  # the trainer's discrete grid for Flux (ComfyUI's ModelSamplingFlux keeps a 10,000-entry table)


def is_flow_sampling(model_sampling) -> bool:
    return isinstance(model_sampling, comfy.model_sampling.CONST)


def is_flux_sampling(model_sampling) -> bool:
    """Flux's sampling: sigma(t) = exp(mu) / (exp(mu) + 1/t - 1) on t in [0, 1], mu from ModelSamplingFlux."""
    return isinstance(model_sampling, comfy.model_sampling.ModelSamplingFlux)


def check_supported_sampling(model_sampling) -> None:
    """TDM needs a discrete VP schedule (eps / v models) or a rectified flow (SD3's discrete one, Flux's)."""
    if is_flow_sampling(model_sampling):
        if not isinstance(model_sampling, (comfy.model_sampling.ModelSamplingDiscreteFlow, comfy.model_sampling.ModelSamplingFlux)):
            raise ValueError(f"TDM supports the flow models SD3, SD3.5, Flux.1, Z-Image, Qwen-Image and Wan, not {type(model_sampling).__mro__[1].__name__}: use a stock sampler for this model")
        return
    vp_output = isinstance(model_sampling, comfy.model_sampling.EPS) and not isinstance(model_sampling, comfy.model_sampling.EDM)
    if not (vp_output and isinstance(model_sampling, comfy.model_sampling.ModelSamplingDiscrete)):
        names = ", ".join(c.__name__ for c in type(model_sampling).__mro__[1:3])
        raise ValueError(f"TDM supports discrete VP models (SD1.5, SD2, SDXL: eps or v prediction) and flow models (SD3); this model samples with {names}")


def num_timesteps_of(model_sampling) -> int:
    if is_flux_sampling(model_sampling):
        return FLUX_NUM_TIMESTEPS
    return int(model_sampling.sigmas.shape[0])


def sigmas_for_timesteps(model_sampling, timesteps: list[int]) -> torch.Tensor:
    """ComfyUI sigmas of the grid points plus the final 0: VP models map a timestep to
    ``sqrt((1 - abar) / abar)``, flow models to their shifted sigma, both through ``model_sampling.sigma``."""
    check_supported_sampling(model_sampling)
    t = torch.tensor([float(x) for x in timesteps], dtype=torch.float32)
    if is_flux_sampling(model_sampling):  # Flux reads sigma(t / T) on [0, 1]
        t = t / num_timesteps_of(model_sampling)
    elif is_flow_sampling(model_sampling):  # flow models read sigma(t * multiplier / T); SD3's multiplier is T = 1000, Z-Image's 1
        t = t * (float(model_sampling.multiplier) / num_timesteps_of(model_sampling))
    sigmas = model_sampling.sigma(t).float().cpu()
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def tdm_info_of(model) -> Optional[TDMInfo]:
    """The TDM metadata the TDM LoRA Loader attached to a ModelPatcher, if any."""
    getter = getattr(model, "get_attachment", None)
    return getter(TDM_INFO_ATTACHMENT) if getter is not None else None


# families whose shift is set with a plain-shift node (sigma(t) at multiplier 1), whatever their default sampling
SHIFT_NODE_OF_FAMILY = {"qwen_image": "ModelSamplingAuraFlow"}
SHIFT_TOLERANCE = 0.01  # relative; a different shift moves every grid point off the trained one


def model_flow_shift(model_sampling) -> Optional[float]:
    """The flow shift a ComfyUI model samples with (ModelSamplingFlux keeps mu = log(shift)); None for VP models."""
    if is_flux_sampling(model_sampling):
        return math.exp(float(model_sampling.shift))
    if is_flow_sampling(model_sampling):
        return float(model_sampling.shift)
    return None


def flow_shift_node(model_sampling) -> str:
    """The ComfyUI node that sets a discrete flow model's shift: ModelSamplingSD3 writes multiplier 1000 (SD3),
    ModelSamplingAuraFlow multiplier 1 (Z-Image, AuraFlow, Lumina 2)."""
    return "ModelSamplingAuraFlow" if float(model_sampling.multiplier) == 1.0 else "ModelSamplingSD3"


def warn_on_shift_mismatch(model_sampling, info: Optional[TDMInfo]) -> None:
    """A flow LoRA records the shift it was trained at; sampling at another one still runs, so say it."""
    trained, used = (info.flow_shift if info is not None else None), model_flow_shift(model_sampling)
    if trained is None or used is None or abs(used - trained) <= SHIFT_TOLERANCE * trained:
        return
    fix = ("set ModelSamplingFlux's width and height to the training resolution" if is_flux_sampling(model_sampling)
           else f"set {flow_shift_node(model_sampling)}'s shift to {trained:.3g}")
    if info.base_family in SHIFT_NODE_OF_FAMILY:  # e.g. Qwen-Image: ModelSamplingFlux's defaults are Flux's, not its own
        fix = f"set {SHIFT_NODE_OF_FAMILY[info.base_family]}'s shift to {trained:.3g}"
    logging.warning(f"TDM Scheduler: the model samples with flow shift {used:.3g} but its TDM LoRA was trained at "
                    f"{trained:.3g}; {fix}.")


def tdm_sigmas(model, steps: int, grid: str, custom_timesteps: str, denoise: float) -> torch.Tensor:
    """SIGMAS of the TDM Scheduler for a ComfyUI MODEL; ``denoise < 1`` keeps the tail of the grid
    (img2img starts from a timestep the student was trained on), ``denoise == 0`` gives no steps."""
    model_sampling = model.get_model_object("model_sampling")
    check_supported_sampling(model_sampling)
    if denoise <= 0.0:
        return torch.FloatTensor([])
    info = tdm_info_of(model)
    warn_on_shift_mismatch(model_sampling, info)
    timesteps = select_grid(grid, steps, info, custom_timesteps, num_timesteps_of(model_sampling), is_flow_sampling(model_sampling))
    if denoise < 1.0:
        timesteps = grids.tail_for_denoise(timesteps, denoise)
    return sigmas_for_timesteps(model_sampling, timesteps)
