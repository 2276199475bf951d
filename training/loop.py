"""One TDM iteration (METHOD.md "One training iteration", steps 1-8) composed from tdm_core kernels.

The student and the fake score are two LoRA adapters on one frozen base; the teacher is the base
with adapters off. Every optimiser owns exactly one adapter; the forwards that must not train an
adapter run under ``torch.no_grad`` so no gradient can leak into the other one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from tdm_core import rollout_tdm, x0_eps_from_output
from tdm_core.training import (
    diffuse_u_to_t,
    draw_training_times,
    effective_noise_m,
    fake_score_loss,
    generator_loss,
    generator_normaliser,
    generator_target_x_tilde,
    importance_weight,
    min_snr_weight,
    ode_point,
    teacher_cfg_x0,
)

from .models import FAKE_SCORE, STUDENT, use_adapter

ADAPTERS = (FAKE_SCORE, STUDENT)


class NonFiniteLoss(RuntimeError):
    """A NaN/inf loss: the run stops and keeps its last good checkpoint."""


@dataclass
class LoopParts:
    """What one iteration needs; built once by ``training.distill``."""

    family: object  # a training.families.base.ModelFamily
    accelerator: object  # accelerate.Accelerator
    grid: list[int]
    total_steps: int
    cfg_scale: float
    distance: str
    huber_c: Optional[float]
    interval_mode: str
    randmid: bool
    max_grad_norm: float
    generator: torch.Generator  # every random draw of the run; its state is checkpointed
    params: dict = field(default_factory=dict)  # adapter name -> list of its trainable parameters
    optimizers: dict = field(default_factory=dict)  # adapter name -> (accelerate-wrapped) optimiser
    schedulers: dict = field(default_factory=dict)  # adapter name -> LR scheduler


def predict_x0_eps(parts: LoopParts, adapter: Optional[str], x_t: Tensor, t: Tensor, *conds: dict) -> list[tuple[Tensor, Tensor]]:
    """``(x0_hat, eps_hat)`` for each condition, of the base with one adapter on (``None``: adapters
    off, the teacher)."""
    family = parts.family
    a, s = family.schedule.alpha_sigma(t)
    with use_adapter(family.network, adapter), parts.accelerator.autocast():
        outputs = [family.denoise(x_t, t, cond) for cond in conds]
    return [x0_eps_from_output(output.float(), x_t, a, s, family.prediction_type) for output in outputs]


def roll_out_student(parts: LoopParts, noise: Tensor, cond: dict) -> list[Tensor]:
    # METHOD.md step 1: the student's whole trajectory from pure noise, without gradient
    def student(x: Tensor, t: Tensor) -> Tensor:
        with parts.accelerator.autocast():
            return parts.family.denoise(x, t, cond).float()

    # one adapter switch for all K steps: switching walks every layer of the network
    with torch.no_grad(), use_adapter(parts.family.network, STUDENT):
        return rollout_tdm(student, noise, parts.grid, parts.family.schedule, parts.family.prediction_type)


def draw_noise(parts: LoopParts, shape) -> Tensor:
    # drawn on CPU from the run's generator so a run is the same on every device and resumable
    return torch.randn(shape, generator=parts.generator).to(parts.accelerator.device)


def draw_times(parts: LoopParts, batch_size: int) -> tuple[Tensor, ...]:
    times = draw_training_times(parts.grid, batch_size, parts.interval_mode, parts.randmid, parts.total_steps, parts.generator)
    return tuple(x.to(parts.accelerator.device) for x in times)


def noised_at_t(parts: LoopParts, x0_hat: Tensor, eps_hat: Tensor, u: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """METHOD.md steps 3-4: the ODE point ``x_u`` diffused forward to ``x_t``; returns ``(x_t, weight)``
    with ``weight`` = min-SNR times the importance weight of step 5 (from the effective noise m)."""
    schedule = parts.family.schedule
    (a_u, s_u), (a_t, s_t) = schedule.alpha_sigma(u), schedule.alpha_sigma(t)
    n = draw_noise(parts, x0_hat.shape)
    x_t = diffuse_u_to_t(ode_point(x0_hat, eps_hat, a_u, s_u), n, a_u, s_u, a_t, s_t)
    weight = importance_weight(effective_noise_m(eps_hat, n, a_u, s_u, a_t, s_t), n) * min_snr_weight(a_t, s_t)
    return x_t, weight


def student_step_from_trajectory(parts: LoopParts, trajectory: list[Tensor], i: Tensor, t_i: Tensor, cond: dict) -> tuple[Tensor, Tensor]:
    # METHOD.md step 2: one student step from the detached trajectory point x_{t_i} of each sample
    x_ti = torch.stack(trajectory[:-1])[i, torch.arange(i.shape[0], device=i.device)].detach()
    return predict_x0_eps(parts, STUDENT, x_ti, t_i, cond)[0]


def fake_score_update(parts: LoopParts, trajectory: list[Tensor], cond: dict) -> Tensor:
    # METHOD.md step 5: denoising score matching of the fake score on the student's samples
    i, t_i, u, t = draw_times(parts, cond_batch_size(trajectory))
    with torch.no_grad():
        x0_hat, eps_hat = student_step_from_trajectory(parts, trajectory, i, t_i, cond)
        x_t, weight = noised_at_t(parts, x0_hat, eps_hat, u, t)
    x0_fake, _ = predict_x0_eps(parts, FAKE_SCORE, x_t, t, cond)[0]
    return fake_score_loss(x0_fake, x0_hat, weight)


def student_update(parts: LoopParts, trajectory: list[Tensor], cond: dict, null_cond: dict) -> Tensor:
    # METHOD.md step 6: distribution matching at the student's own trajectory points, new draws
    i, t_i, u, t = draw_times(parts, cond_batch_size(trajectory))
    x0_hat, eps_hat = student_step_from_trajectory(parts, trajectory, i, t_i, cond)
    with torch.no_grad():
        x_t, _ = noised_at_t(parts, x0_hat.detach(), eps_hat.detach(), u, t)
        conds = [cond] if parts.cfg_scale == 1.0 else [cond, null_cond]  # w = 1: no guidance term, no uncond pass
        teacher = predict_x0_eps(parts, None, x_t, t, *conds)
        x0_teacher, x0_uncond = teacher[0][0], teacher[-1][0]
        x0_fake, _ = predict_x0_eps(parts, FAKE_SCORE, x_t, t, cond)[0]
    x_tilde = generator_target_x_tilde(x0_hat, x0_teacher, x0_uncond, x0_fake, parts.cfg_scale)
    nrm = generator_normaliser(x0_hat, teacher_cfg_x0(x0_teacher, x0_uncond, parts.cfg_scale))
    return generator_loss(x0_hat, x_tilde, nrm, parts.distance, parts.huber_c)


def cond_batch_size(trajectory: list[Tensor]) -> int:
    return trajectory[0].shape[0]


def optimiser_step(parts: LoopParts, adapter: str, loss: Tensor) -> Optional[float]:
    """Backward, average over processes, clip, step the adapter's own optimiser and schedule.
    Returns the gradient norm before clipping on the steps that update (None while accumulating)."""
    accelerator = parts.accelerator
    accelerator.backward(loss)
    grad_norm = None
    if accelerator.sync_gradients:
        average_gradients(accelerator, parts.params[adapter])
        grad_norm = float(accelerator.clip_grad_norm_(parts.params[adapter], parts.max_grad_norm))
    parts.optimizers[adapter].step()
    parts.optimizers[adapter].zero_grad(set_to_none=True)
    if accelerator.sync_gradients:
        parts.schedulers[adapter].step()
    return grad_norm


def average_gradients(accelerator, params: list[Tensor]) -> None:
    # data parallel without DDP: the base is shared by two adapters that train in turns, so a DDP
    # wrapper would see half its parameters unused every backward; one all-reduce per step instead
    if accelerator.num_processes == 1:
        return
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        return
    flat = accelerator.reduce(torch.cat([p.grad.reshape(-1) for p in with_grad]), reduction="mean")
    for p, g in zip(with_grad, flat.split([p.numel() for p in with_grad])):
        p.grad.copy_(g.view_as(p.grad))


def checked_loss(accelerator, name: str, loss: Tensor) -> float:
    """The loss averaged over processes; every process stops together on a NaN/inf."""
    value = float(accelerator.reduce(loss.detach().float().clone(), reduction="mean"))
    if not torch.isfinite(torch.tensor(value)):
        raise NonFiniteLoss(f"{name} loss became {value}: lower --learning-rate / --student-learning-rate (or use --mixed-precision no) "
                            "and --resume from the last good checkpoint, which is kept")
    return value


def tdm_iteration(parts: LoopParts, cond: dict, null_cond: dict, latent_shape) -> dict:
    """METHOD.md steps 1-8: roll-out, one fake-score update, one student update. Returns metrics."""
    accelerator = parts.accelerator
    with accelerator.accumulate():
        trajectory = roll_out_student(parts, draw_noise(parts, latent_shape), cond)
        fake_loss = fake_score_update(parts, trajectory, cond)
        fake_value = checked_loss(accelerator, "fake-score", fake_loss)
        fake_norm = optimiser_step(parts, FAKE_SCORE, fake_loss)
        student_loss = student_update(parts, trajectory, cond, null_cond)
        student_value = checked_loss(accelerator, "student", student_loss)
        student_norm = optimiser_step(parts, STUDENT, student_loss)
    return {
        "loss_fake": fake_value,
        "loss_student": student_value,
        "grad_norm_fake": fake_norm,
        "grad_norm_student": student_norm,
        "lr_fake": parts.schedulers[FAKE_SCORE].get_last_lr()[0],
        "lr_student": parts.schedulers[STUDENT].get_last_lr()[0],
    }
