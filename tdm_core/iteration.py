"""One TDM training iteration over three denoisers (METHOD.md "One training iteration", steps 1-8).

Host-neutral: a denoiser is any callable ``(x_t, t) -> model output`` (of ``prediction_type``) with its
condition already bound, so the trainer's PEFT adapters on one frozen base, three full model copies,
a ComfyUI-side distiller or closed-form Gaussians in the tests all run the same iteration:

- ``student(x_t, t)``: called without gradient for the roll-out, with gradient for the one step of
  METHOD.md step 2 (the host's autograd state decides, nothing here turns it on);
- ``fake_score(x_t, t)``: with gradient in its own update, without in the student's;
- ``teacher(x_t, t) -> (conditional output, unconditional output or None)``: always without gradient;
  the unconditional output is only asked for at CFG ``w != 1`` (the host may batch the pair in one call).

Randomness comes from one ``torch.Generator`` (CPU, so a run is the same on every device and
resumable) in a fixed order: roll-out noise, then the fake-score update's ``(i, u, t, n)``, then
the student update's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from .parameterization import x0_eps_from_output
from .samplers import predict_x0_eps, tdm_steps
from .training import (
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

Denoiser = Callable[[Tensor, Tensor], Tensor]
TeacherPair = Callable[[Tensor, Tensor], "tuple[Tensor, Optional[Tensor]]"]


@dataclass(frozen=True)
class TDMDenoisers:
    student: Denoiser
    fake_score: Denoiser
    teacher: TeacherPair


@dataclass(frozen=True)
class TDMSettings:
    """The method's choices for one run (METHOD.md steps 3-7)."""

    grid: Sequence[int]  # t_0 > ... > t_{K-1}
    prediction_type: str
    total_steps: int = 900
    cfg_scale: float = 2.0
    distance: str = "huber"
    huber_c: Optional[float] = None
    interval_mode: str = "separate"
    randmid: bool = False


@dataclass(frozen=True)
class Rollout:
    """The student's trajectory from pure noise, and its prediction at every point."""

    points: list  # x_{t_0}, ..., x_{t_{K-1}} (then the sample x0_hat)
    x0: list  # x0_hat at each t_i
    eps: list  # eps_hat at each t_i


@dataclass(frozen=True)
class TDMLosses:
    fake_score: Tensor  # already handed to the host's fake-score update
    student: Tensor  # for the host's student update


def randn_on(shape, generator: torch.Generator, device) -> Tensor:
    # every draw on the generator's (CPU) device, then moved: the same run on every device
    return torch.randn(shape, generator=generator).to(device)


def roll_out(student: Denoiser, noise: Tensor, settings: TDMSettings, schedule) -> Rollout:
    # METHOD.md step 1: the student's K deterministic steps from pure noise, without gradient
    points, x0s, epss = [noise], [], []
    with torch.no_grad():
        for _x, x0_hat, eps_hat, x_next in tdm_steps(student, noise, settings.grid, schedule, settings.prediction_type):
            points.append(x_next)
            x0s.append(x0_hat)
            epss.append(eps_hat)
    return Rollout(points, x0s, epss)


def at_step(per_step: list, i: Tensor) -> Tensor:
    # row b of per_step[i_b]: each sample's entry at its own drawn step index
    return torch.stack(per_step)[i, torch.arange(i.shape[0], device=i.device)]


def draw_times(settings: TDMSettings, batch_size: int, generator: torch.Generator, device) -> tuple[Tensor, ...]:
    # METHOD.md steps 2-4: i, t_i, u, t per sample
    times = draw_training_times(settings.grid, batch_size, settings.interval_mode, settings.randmid, settings.total_steps, generator)
    return tuple(x.to(device) for x in times)


def noised_at_t(x0_hat: Tensor, eps_hat: Tensor, u: Tensor, t: Tensor, schedule, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """METHOD.md steps 3-4: the ODE point ``x_u`` diffused forward to ``x_t``; returns ``(x_t, weight)``
    with ``weight`` = min-SNR times the importance weight of step 5 (from the effective noise m)."""
    (a_u, s_u), (a_t, s_t) = schedule.alpha_sigma(u), schedule.alpha_sigma(t)
    n = randn_on(x0_hat.shape, generator, x0_hat.device)
    x_t = diffuse_u_to_t(ode_point(x0_hat, eps_hat, a_u, s_u), n, a_u, s_u, a_t, s_t)
    weight = importance_weight(effective_noise_m(eps_hat, n, a_u, s_u, a_t, s_t), n) * min_snr_weight(a_t, s_t)
    return x_t, weight


def fake_score_objective(denoisers: TDMDenoisers, rollout: Rollout, settings: TDMSettings, schedule, generator) -> Tensor:
    # METHOD.md step 5: denoising score matching of the fake score on the student's samples; the
    # student's prediction at x_{t_i} is the roll-out's own (same weights), so no network call re-makes it
    x = rollout.points[0]
    i, _t_i, u, t = draw_times(settings, x.shape[0], generator, x.device)
    with torch.no_grad():
        x0_hat, eps_hat = at_step(rollout.x0, i), at_step(rollout.eps, i)
        x_t, weight = noised_at_t(x0_hat, eps_hat, u, t, schedule, generator)
    x0_fake, _ = predict_x0_eps(denoisers.fake_score, x_t, t, schedule, settings.prediction_type)
    return fake_score_loss(x0_fake, x0_hat, weight)


def student_objective(denoisers: TDMDenoisers, rollout: Rollout, settings: TDMSettings, schedule, generator) -> Tensor:
    # METHOD.md steps 2 and 6: one student step with gradient from the detached x_{t_i}, then
    # distribution matching at its noised ODE point against teacher and fake score (new draws)
    x = rollout.points[0]
    i, t_i, u, t = draw_times(settings, x.shape[0], generator, x.device)
    x_ti = at_step(rollout.points[:-1], i).detach()
    x0_hat, eps_hat = predict_x0_eps(denoisers.student, x_ti, t_i, schedule, settings.prediction_type)
    with torch.no_grad():
        x_t, _ = noised_at_t(x0_hat.detach(), eps_hat.detach(), u, t, schedule, generator)
        a_t, s_t = schedule.alpha_sigma(t)
        out_cond, out_uncond = denoisers.teacher(x_t, t)
        x0_teacher, _ = x0_eps_from_output(out_cond.float(), x_t, a_t, s_t, settings.prediction_type)
        if settings.cfg_scale == 1.0:  # w = 1: no guidance term, no unconditional pass
            x0_uncond = x0_teacher
        elif out_uncond is None:
            raise ValueError(f"CFG w={settings.cfg_scale} needs the teacher's unconditional output: the teacher returned None")
        else:
            x0_uncond, _ = x0_eps_from_output(out_uncond.float(), x_t, a_t, s_t, settings.prediction_type)
        x0_fake, _ = predict_x0_eps(denoisers.fake_score, x_t, t, schedule, settings.prediction_type)
    x_tilde = generator_target_x_tilde(x0_hat, x0_teacher, x0_uncond, x0_fake, settings.cfg_scale)
    nrm = generator_normaliser(x0_hat, teacher_cfg_x0(x0_teacher, x0_uncond, settings.cfg_scale))
    return generator_loss(x0_hat, x_tilde, nrm, settings.distance, settings.huber_c)


def tdm_iteration(denoisers: TDMDenoisers, schedule, settings: TDMSettings, noise: Tensor, generator: torch.Generator,
                  update_fake_score: Callable[[Tensor], None]) -> TDMLosses:
    """METHOD.md steps 1-8: roll-out, the fake-score loss (handed to ``update_fake_score``, which
    back-propagates and steps it, so the student's target sees the updated fake score as in the
    reference), then the student loss, returned for the host to step."""
    rollout = roll_out(denoisers.student, noise, settings, schedule)
    fake = fake_score_objective(denoisers, rollout, settings, schedule, generator)
    update_fake_score(fake)
    student = student_objective(denoisers, rollout, settings, schedule, generator)
    return TDMLosses(fake, student)
