"""The three denoisers of ``tdm_core.iteration`` on a ComfyUI MODEL: the model called the way ComfyUI's
samplers call it (``comfy.samplers.calc_cond_batch`` over the loaded ModelPatcher, its patches and
``model_options`` applied), with the student's, the fake score's or no LoRA switched on."""
from __future__ import annotations

from typing import Optional

import torch

import comfy.samplers

from .core_import import iteration
from .distill_adapters import FAKE_SCORE, STUDENT, TDMAdapters
from .distill_schedule import ComfySchedule


def model_x0(patcher, schedule: ComfySchedule, conds: list, x_t: torch.Tensor, t: torch.Tensor) -> list:
    """ComfyUI's denoised x0 of ``x_t`` at timesteps ``t`` for each processed cond of ``conds`` (one forward
    when they batch), in float32."""
    sigma = schedule.comfy_sigma(t).to(x_t.device)
    outputs = comfy.samplers.calc_cond_batch(patcher.model, conds, schedule.comfy_input(x_t, t), sigma, patcher.model_options)
    return [out.float() for out in outputs]


def comfy_denoisers(patcher, adapters: TDMAdapters, schedule: ComfySchedule, positive: list, negative: Optional[list],
                    cfg_scale: float) -> iteration.TDMDenoisers:
    """Student, fake score and teacher on processed conds for the whole batch; the teacher's unconditional
    pass (``negative``) runs beside the conditional one only at CFG != 1."""

    def under(role: Optional[str], conds: list, x_t, t) -> list:
        with adapters.switch.use(role):
            return model_x0(patcher, schedule, conds, x_t, t)

    def teacher(x_t, t):
        if cfg_scale == 1.0:
            return under(None, [positive], x_t, t)[0], None
        cond, uncond = under(None, [positive, negative], x_t, t)
        return cond, uncond

    return iteration.TDMDenoisers(
        student=lambda x_t, t: under(STUDENT, [positive], x_t, t)[0],
        fake_score=lambda x_t, t: under(FAKE_SCORE, [positive], x_t, t)[0],
        teacher=teacher,
    )
