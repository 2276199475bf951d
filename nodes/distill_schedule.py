"""The TDM Distill node's noise schedule, read from the MODEL's own ``model_sampling`` (its prediction
type, VP table or flow shift as the graph set them, e.g. with ``ModelSamplingDiscrete`` / ``ModelSamplingSD3``),
and the map between tdm_core's coordinates and ComfyUI's.

tdm_core works on ``x_t = a(t) x0 + s(t) eps`` at integer timesteps ``t``; ComfyUI's ``apply_model`` takes
``(x, sigma)`` in its own coordinates (VP: ``x = x_t / a``, ``sigma = s / a``; flow: ``x = x_t``,
``sigma = s``) and returns the denoised ``x0`` for every prediction type (it converts eps / v / flow
itself), so the node's denoisers speak ``x0`` ("sample") and never re-implement a parameterisation.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .comfy_sigmas import check_supported_sampling, is_flow_sampling, model_flow_shift, num_timesteps_of
from .core_import import schedules

PREDICTION_TYPE = "sample"  # what ComfyUI's apply_model returns: the denoised x0


@dataclass(frozen=True)
class ComfySchedule:
    """A tdm_core schedule of the model and the map of its ``(x_t, t)`` to ComfyUI's ``(x, sigma)``."""

    schedule: object  # tdm_core.schedules.VPSchedule or FlowSchedule
    flow: bool

    @property
    def num_timesteps(self) -> int:
        return int(self.schedule.num_timesteps)

    def comfy_sigma(self, t: Tensor) -> Tensor:
        a, s = self.schedule.alpha_sigma(t)
        return (s if self.flow else s / a).float()

    def comfy_input(self, x_t: Tensor, t: Tensor) -> Tensor:
        if self.flow:
            return x_t
        a, _ = self.schedule.alpha_sigma(t)
        return x_t / schedules.expand_like(a, x_t)


def schedule_of(model) -> ComfySchedule:
    """The schedule a ComfyUI MODEL samples with: a VP table from its sigmas (eps and v models alike: the
    prediction type is apply_model's business), or a rectified flow with its shift."""
    model_sampling = model.get_model_object("model_sampling")
    check_supported_sampling(model_sampling)
    if is_flow_sampling(model_sampling):
        # ModelSamplingFlux (Flux, Qwen-Image) keeps mu: its sigma(t) = exp(mu) / (exp(mu) + 1/t - 1) is the linear
        # shift with shift = exp(mu) (model_flow_shift); a discrete flow keeps the shift itself
        shift = model_flow_shift(model_sampling)
        return ComfySchedule(schedules.FlowSchedule(shift=shift, num_timesteps=num_timesteps_of(model_sampling)), flow=True)
    sigmas = model_sampling.sigmas.detach().double().cpu()
    return ComfySchedule(schedules.VPSchedule(1.0 / (1.0 + sigmas**2)), flow=False)


def prediction_type_of(model) -> str:
    """The MODEL's prediction type in the TDM metadata's words (informational: samplers read model_sampling)."""
    import comfy.model_sampling

    model_sampling = model.get_model_object("model_sampling")
    if isinstance(model_sampling, comfy.model_sampling.V_PREDICTION):
        return "v_prediction"
    if isinstance(model_sampling, comfy.model_sampling.CONST):
        return "flow"
    return "epsilon"
