"""Kernels of one TDM training iteration (METHOD.md, "One training iteration", steps 2-6).

All functions are pure: randomness comes in as tensors or a ``torch.Generator``; coefficients
``a_*``, ``s_*`` are per-sample ``(B,)`` tensors or scalars.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .schedules import expand_like, snr

INTERVAL_MODES = ("separate", "shared")


def sample_step_index(batch_size: int, num_steps: int, generator: Optional[torch.Generator] = None, device=None) -> Tensor:
    # METHOD.md step 2: per sample, the trajectory point i the student is trained from
    return torch.randint(0, num_steps, (batch_size,), generator=generator, device=device)


def _randint_between(low: Tensor, high: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    """Per-sample integer uniform in ``[low, high)``; ``high <= low`` collapses to ``low``."""
    span = (high - low).clamp(min=1)
    u = torch.rand(low.shape, generator=generator, dtype=torch.float64, device=low.device)
    return low + (u * span).floor().long().clamp(max=span - 1)


def sample_ode_point(t_i: Tensor, t_next: Tensor, randmid: bool, generator: Optional[torch.Generator] = None) -> Tensor:
    # METHOD.md step 3: u = t_{i+1}, or with randmid uniform in [t_{i+1}, t_i - 20)
    if not randmid:
        return t_next.clone()
    return _randint_between(t_next, t_i - 20, generator)


def sample_diffusion_time(
    u: Tensor, t_i: Tensor, mode: str, total_steps: int, generator: Optional[torch.Generator] = None
) -> Tensor:
    # METHOD.md step 4: t in [max(20, u), t_i - 10) ("separate") or [max(20, u), T - 10) ("shared")
    if mode not in INTERVAL_MODES:
        raise ValueError(f"unknown interval mode {mode!r}: use 'separate' or 'shared'")
    low = u.clamp(min=20)
    high = t_i - 10 if mode == "separate" else torch.full_like(t_i, total_steps - 10)
    return _randint_between(low, high, generator)


def diffusion_coefficient_b(a_u: Tensor, s_u: Tensor, a_t: Tensor, s_t: Tensor) -> Tensor:
    # METHOD.md step 4: b = sqrt(s_t^2 - (a_t s_u / a_u)^2), the noise added going from u to t
    return (s_t**2 - (a_t * s_u / a_u) ** 2).clamp(min=0).sqrt()


def diffuse_u_to_t(x_u: Tensor, n: Tensor, a_u: Tensor, s_u: Tensor, a_t: Tensor, s_t: Tensor) -> Tensor:
    # METHOD.md step 4: x_t = (a_t / a_u) x_u + b n
    b = diffusion_coefficient_b(a_u, s_u, a_t, s_t)
    return expand_like(a_t / a_u, x_u) * x_u + expand_like(b, x_u) * n


def ode_point(x0_hat: Tensor, eps_hat: Tensor, a_u: Tensor, s_u: Tensor) -> Tensor:
    # METHOD.md step 3: x_u = a(u) x0_hat + s(u) eps_hat
    return expand_like(a_u, x0_hat) * x0_hat + expand_like(s_u, x0_hat) * eps_hat


def effective_noise_m(eps_hat: Tensor, n: Tensor, a_u: Tensor, s_u: Tensor, a_t: Tensor, s_t: Tensor) -> Tensor:
    # METHOD.md step 5: m = ((a_t s_u / a_u) eps_hat + b n) / s_t, the noise of x_t around x0_hat
    b = diffusion_coefficient_b(a_u, s_u, a_t, s_t)
    return (expand_like(a_t * s_u / a_u, eps_hat) * eps_hat + expand_like(b, n) * n) / expand_like(s_t, n)


def importance_weight(m: Tensor, n: Tensor) -> Tensor:
    # METHOD.md step 5: exp(-mean(m^2)/2) / exp(-mean(n^2)/2), per sample
    dims = tuple(range(1, m.ndim))
    return torch.exp(-0.5 * (m.float() ** 2).mean(dims) + 0.5 * (n.float() ** 2).mean(dims))


def min_snr_weight(a_t: Tensor, s_t: Tensor, gamma: float = 5.0) -> Tensor:
    # METHOD.md step 5: min(SNR(t), 5)
    return snr(a_t, s_t).clamp(max=gamma)


FAKE_SCORE_WEIGHTINGS = ("min_snr", "velocity", "x0")
DEFAULT_FAKE_SCORE_WEIGHTING = "min_snr"  # the reference min(SNR, 5); issue 22 measures the others
DEFAULT_FAKE_SCORE_UPDATES = 5  # fake-score updates per student update: 1 in METHOD.md; 5 (DMD2's two time-scale rule) copies
# the teacher closer on the flow, shapes and digits teachers (issue 22, benchmarks/RESULTS_fidelity.md)
FAKE_SCORE_ROLLOUTS = ("shared", "fresh")  # what the fake-score updates after the first train on: the iteration's one
# roll-out (new noise levels each) or each a roll-out of new noise (as DMD2 trains its fake score on newly generated samples)
DEFAULT_FAKE_SCORE_ROLLOUTS = "shared"


def fake_score_weight(a_t: Tensor, s_t: Tensor, weighting: str = DEFAULT_FAKE_SCORE_WEIGHTING) -> Tensor:
    # METHOD.md step 5's weight of the x0-space loss: min(SNR, 5) (the reference); "velocity": 1 / s^2, the
    # x0-space form of a plain velocity MSE on a flow model (x0 = x_t - s v), as TDM-R1 trains its fake score;
    # "x0": 1, an unweighted x0 MSE. Issue 22's ablation: min(SNR, 5) learns the first window 1/50 to 1/500 as fast
    if weighting == "min_snr":
        return min_snr_weight(a_t, s_t)
    if weighting == "velocity":
        return 1.0 / s_t**2
    if weighting == "x0":
        return torch.ones_like(s_t)
    raise ValueError(f"unknown fake-score weighting {weighting!r}: use one of {', '.join(FAKE_SCORE_WEIGHTINGS)}")


def fake_score_loss(x0_fake: Tensor, x0_hat: Tensor, weight: Tensor) -> Tensor:
    # METHOD.md step 5: weighted denoising score matching towards sg(x0_hat), in x0 space
    dims = tuple(range(1, x0_fake.ndim))
    per_sample = ((x0_fake.float() - x0_hat.detach().float()) ** 2).mean(dims)
    return (per_sample * weight.to(per_sample)).mean()


def teacher_cfg_x0(x0_cond: Tensor, x0_uncond: Tensor, cfg: float) -> Tensor:
    # METHOD.md step 6: the teacher's CFG in x0 space, x0_uncond + w (x0_cond - x0_uncond)
    return x0_cond + (cfg - 1.0) * (x0_cond - x0_uncond)


def generator_target_x_tilde(x0_hat: Tensor, x0_teacher_cond: Tensor, x0_teacher_uncond: Tensor, x0_fake: Tensor, cfg: float) -> Tensor:
    # METHOD.md step 6: x_tilde = x0_hat + (x0_teacher - x0_fake) + (w - 1)(x0_teacher_cond - x0_teacher_uncond)
    with torch.no_grad():
        return x0_hat.detach() + (x0_teacher_cond - x0_fake) + (cfg - 1.0) * (x0_teacher_cond - x0_teacher_uncond)


def generator_normaliser(x0_hat: Tensor, x0_teacher_cfg: Tensor) -> Tensor:
    # METHOD.md step 6: nrm = mean |x0_hat - x0_teacher_cfg| per sample, detached
    dims = tuple(range(1, x0_hat.ndim))
    return (x0_hat.detach().double() - x0_teacher_cfg.double()).abs().mean(dims).float()


def squared_l2(x: Tensor, y: Tensor) -> Tensor:
    # METHOD.md step 7: d = (x - y)^2, per sample mean over elements
    dims = tuple(range(1, x.ndim))
    return ((x.float() - y.float()) ** 2).mean(dims)


def pseudo_huber_elementwise(x: Tensor, y: Tensor, c: float = 1e-3) -> Tensor:
    # METHOD.md step 7 (reference script): sqrt(diff^2 + c^2) - c per element, per sample mean
    dims = tuple(range(1, x.ndim))
    sq = (x.float() - y.float()) ** 2
    return pseudo_huber_from_squared(sq, c).mean(dims)


def pseudo_huber_from_squared(sq: Tensor, c: float) -> Tensor:
    # METHOD.md step 7: sqrt(sq + c^2) - c, written as sq / (sqrt(sq + c^2) + c) so float32 keeps
    # its digits when sq << c^2 (the plain difference cancels to 0 there)
    return sq / (torch.sqrt(sq + c**2) + c)


def pseudo_huber_c_for(x: Tensor) -> float:
    # METHOD.md step 7 (paper, iCT): c = 0.00054 * sqrt(dim) for the per-sample vector norm
    return 0.00054 * x[0].numel() ** 0.5


def pseudo_huber_norm(x: Tensor, y: Tensor, c: Optional[float] = None) -> Tensor:
    # METHOD.md step 7 (paper): sqrt(||x - y||^2 + c^2) - c per sample
    c = pseudo_huber_c_for(x) if c is None else c
    dims = tuple(range(1, x.ndim))
    sq = ((x.float() - y.float()) ** 2).sum(dims)
    return pseudo_huber_from_squared(sq, c)


DISTANCES = {"l2": squared_l2, "huber": pseudo_huber_elementwise, "huber_norm": pseudo_huber_norm}
# squared L2 (as TDM-R1 trains SD3.5): the student is pushed in proportion to the score difference; the reference
# script's element-wise pseudo-Huber with c = 1e-3 pushes nearly by its sign (issue 22, benchmarks/RESULTS_fidelity.md)
DEFAULT_DISTANCE = "l2"


def distance_d(name: str, x: Tensor, y: Tensor, c: Optional[float] = None) -> Tensor:
    # METHOD.md step 7: d by name; default c is 1e-3 for "huber" (reference script), 0.00054 sqrt(dim) for "huber_norm" (paper)
    if name not in DISTANCES:
        raise ValueError(f"unknown distance {name!r}: use one of {', '.join(DISTANCES)}")
    if name != "l2" and c is not None and not c > 0:
        raise ValueError(f"pseudo-Huber c={c} must be positive: leave it unset for the default")
    if name == "l2":
        return squared_l2(x, y)
    if name == "huber":
        return pseudo_huber_elementwise(x, y, 1e-3 if c is None else c)
    return pseudo_huber_norm(x, y, c)


def generator_loss(x0_hat: Tensor, x_tilde: Tensor, nrm: Tensor, distance: str = DEFAULT_DISTANCE, c: Optional[float] = None) -> Tensor:
    # METHOD.md step 6: mean(d(x0_hat, sg(x_tilde)) / nrm); its gradient is the score difference
    per_sample = distance_d(distance, x0_hat, x_tilde.detach(), c)
    return (per_sample / nrm.clamp(min=1e-8).to(per_sample)).mean()


def draw_training_times(
    grid: list[int], batch_size: int, mode: str, randmid: bool, total_steps: int, generator: Optional[torch.Generator] = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """METHOD.md steps 2-4 for a batch: step index ``i``, its timestep ``t_i``, ODE point ``u`` and
    diffusion time ``t`` (integer tensors of shape ``(B,)``)."""
    ends = torch.tensor(list(grid) + [0], dtype=torch.long)
    i = sample_step_index(batch_size, len(grid), generator)
    t_i, t_next = ends[i], ends[i + 1]
    u = sample_ode_point(t_i, t_next, randmid, generator)
    t = sample_diffusion_time(u, t_i, mode, total_steps, generator)
    return i, t_i, u, t
