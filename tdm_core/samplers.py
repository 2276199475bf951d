"""Samplers over a generic ``denoise(x_t, t) -> model output`` callable.

Every sampler walks a list of timesteps of a schedule (anything with ``alpha_sigma``) and ends on
the clean sample. ``noise`` is fed as ``x_{t_0}`` unchanged: the TDM reference and diffusers start
from pure Gaussian noise, not from the marginal at ``t_0``.
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch
from torch import Tensor

from .parameterization import x0_eps_from_output
from .schedules import expand_like, log_snr

Denoiser = Callable[[Tensor, Tensor], Tensor]
StepCallback = Callable[[int, Tensor, Tensor], None]  # (step index, x_t, x0_hat)


def tdm_step(x0_hat: Tensor, eps_hat: Tensor, a_next: Tensor, s_next: Tensor, gamma: float = 0.0, z: Optional[Tensor] = None) -> Tensor:
    # METHOD.md "The student": x_{t_{i+1}} = a(t_{i+1}) x0_hat + s(t_{i+1}) eps_hat (DDIM, eta = 0);
    # gamma > 0 swaps that share of the noise variance for fresh noise z (gamma = 1: fully stochastic)
    eps_next = eps_hat if gamma == 0.0 else (1.0 - gamma) ** 0.5 * eps_hat + gamma**0.5 * z
    return expand_like(a_next, x0_hat) * x0_hat + expand_like(s_next, x0_hat) * eps_next


def predict_x0_eps(denoise: Denoiser, x: Tensor, t: Tensor, schedule, prediction_type: str) -> tuple[Tensor, Tensor]:
    # METHOD.md "The student": one network call at t -> (x0_hat, eps_hat)
    a, s = schedule.alpha_sigma(t)
    return x0_eps_from_output(denoise(x, t), x, a, s, prediction_type)


@torch.no_grad()
def sample_tdm(
    denoise: Denoiser,
    noise: Tensor,
    timesteps,
    schedule,
    prediction_type: str,
    gamma: float = 0.0,
    generator: Optional[torch.Generator] = None,
    callback: Optional[StepCallback] = None,
    end: Optional[float] = None,
) -> Tensor:
    """The TDM K-step student sampler: one network call per timestep, returns ``x0_hat`` (given ``end``:
    the point at timestep ``end``, see ``tdm_steps``)."""
    return rollout_tdm(denoise, noise, timesteps, schedule, prediction_type, gamma, generator, callback, end)[-1]


def tdm_steps(
    denoise: Denoiser,
    noise: Tensor,
    timesteps,
    schedule,
    prediction_type: str,
    gamma: float = 0.0,
    generator: Optional[torch.Generator] = None,
    end: Optional[float] = None,
) -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor]]:
    """The K student steps one by one: ``(x_{t_i}, x0_hat, eps_hat, next point)``; the last step's
    next point is ``x0_hat`` (METHOD.md "The student"), or, given ``end``, the point at timestep ``end``
    (the same DDIM step as between grid points: the first part of a trajectory split across two models)."""
    x = noise
    timesteps = [float(t) for t in timesteps]
    for i, t in enumerate(timesteps):
        t_tensor = torch.full((x.shape[0],), t, dtype=torch.float64, device=x.device)
        x0_hat, eps_hat = predict_x0_eps(denoise, x, t_tensor, schedule, prediction_type)
        t_next = timesteps[i + 1] if i < len(timesteps) - 1 else end
        if t_next is None:
            x_next = x0_hat
        else:
            a_next, s_next = schedule.alpha_sigma(torch.tensor(float(t_next), dtype=torch.float64))
            z = None
            if gamma > 0.0:
                z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) if generator else torch.randn_like(x)
            x_next = tdm_step(x0_hat, eps_hat, a_next, s_next, gamma, z)
        yield x, x0_hat, eps_hat, x_next
        x = x_next


def rollout_tdm(
    denoise: Denoiser,
    noise: Tensor,
    timesteps,
    schedule,
    prediction_type: str,
    gamma: float = 0.0,
    generator: Optional[torch.Generator] = None,
    callback: Optional[StepCallback] = None,
    end: Optional[float] = None,
) -> list[Tensor]:
    """The whole trajectory ``[x_{t_0}, ..., x_{t_{K-1}}, x0_hat]`` (METHOD.md training step 1); given
    ``end``, its last point is at timestep ``end`` instead of ``x0_hat``."""
    points = [noise]
    steps = tdm_steps(denoise, noise, timesteps, schedule, prediction_type, gamma, generator, end)
    for i, (x, x0_hat, _eps_hat, x_next) in enumerate(steps):
        if callback is not None:
            callback(i, x, x0_hat)
        points.append(x_next)
    return points


def dpmpp_2m_step(
    x: Tensor,
    x0_hat: Tensor,
    x0_prev: Optional[Tensor],
    a_cur: Tensor,
    s_cur: Tensor,
    a_next: Tensor,
    s_next: Tensor,
    h_prev: Optional[Tensor],
) -> tuple[Tensor, Tensor]:
    # DPM-Solver++(2M), Lu et al. 2022, Algorithm 2 (data prediction, midpoint correction); returns (x_next, h)
    if float(s_next) == 0.0:  # final step to the clean sample: first order gives x0 exactly
        return x0_hat, torch.tensor(float("inf"), dtype=torch.float64)
    h = log_snr(a_next, s_next) - log_snr(a_cur, s_cur)
    phi = torch.expm1(-h)  # e^{-h} - 1
    d = x0_hat
    if x0_prev is not None and h_prev is not None:
        r = h_prev / h
        d = (1 + 1 / (2 * r)) * x0_hat - (1 / (2 * r)) * x0_prev
    x_next = expand_like(s_next / s_cur, x) * x - expand_like(a_next * phi, x) * d
    return x_next, h


@torch.no_grad()
def sample_dpmpp_2m(
    denoise: Denoiser,
    noise: Tensor,
    timesteps,
    schedule,
    prediction_type: str,
    callback: Optional[StepCallback] = None,
) -> Tensor:
    """DPM-Solver++(2M) from ``timesteps[0]`` to the clean sample, the sampler the released SD1.5 and
    SD3 TDM LoRAs were shown with (METHOD.md "Released inference settings"; equals diffusers'
    DPMSolverMultistepScheduler, dpmsolver++, order 2, final sigma zero, lower order at the end).
    For SD1.5 pass ``diffusers_grid(K, "leading", steps_offset=1, solver="dpmsolver")`` on a
    VPSchedule; for SD3 (``use_flow_sigmas``, flow shift 6) pass ``(T - 1) * (1 - i / K)``, i < K,
    on ``FlowSchedule(shift=6)`` with prediction type "flow"."""
    x = noise
    timesteps = [float(t) for t in timesteps]
    x0_prev, h_prev = None, None
    for i, t in enumerate(timesteps):
        a_cur, s_cur = schedule.alpha_sigma(torch.tensor(t, dtype=torch.float64))
        x0_hat, _ = predict_x0_eps(denoise, x, torch.full((x.shape[0],), t, dtype=torch.float64, device=x.device), schedule, prediction_type)
        if callback is not None:
            callback(i, x, x0_hat)
        if i == len(timesteps) - 1:
            a_next, s_next = torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)
        else:
            a_next, s_next = schedule.alpha_sigma(torch.tensor(timesteps[i + 1], dtype=torch.float64))
        x, h_prev = dpmpp_2m_step(x, x0_hat, x0_prev, a_cur, s_cur, a_next, s_next, h_prev)
        x0_prev = x0_hat
    return x
