"""Per-step fidelity of a K-step student to its teacher: which of the K steps drifts, and why (issue 22).

On a fixed probe (noise and prompts chosen once per run), for each student step ``i`` (0 .. K-1):

- ``paired_gap``: the student's point after step ``i`` (``x_{t_{i+1}}``, the sample after the last step)
  against the teacher's probability-flow ODE from the same noise at the same time, as
  ``mean |student - teacher| / mean |teacher|``. TDM matches distributions, not paths, so this need not
  reach 0; a gap that grows step after step is the drift.
- ``moment_gap``: the same two batches compared as distributions through their per-channel means and
  standard deviations (over batch, frames and pixels), relative to the teacher's per-channel spread: 0 when
  the student's marginal at that time has the teacher's first two moments.
- ``fake_score_error`` and ``teacher_error``: the fake score's and the teacher's denoising error on the
  student's own prediction at ``t_i``, noised to the middle of step ``i``'s window (relative mean absolute
  error). The fake score should track the student's distribution, so it should denoise the student's
  samples at least as well as the teacher does; a fake score far worse than the teacher gives the student
  noise, not a direction.
- ``dm_to_cfg``: at that noised point, the size of the distribution-matching term
  ``teacher_cond - fake`` against the guidance term ``(w - 1)(teacher_cond - teacher_uncond)`` of the
  student's target (METHOD.md "One training iteration", step 6); ``None`` at ``w = 1``.

The teacher's ODE is DDIM (eta 0) on its guided output, ``substeps`` steps per student interval
(:func:`teacher_ode_points`); it does not change during a run, so hosts compute it once per probe.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .iteration import TDMDenoisers, TDMSettings, roll_out
from .parameterization import x0_eps_from_output
from .samplers import tdm_steps
from .training import teacher_cfg_x0

TEACHER_SUBSTEPS = 8  # DDIM steps of the teacher per student interval: 32 guided steps for K = 4
FIDELITY_SEED = 8642  # the noise that re-noises the student's predictions: its own generator
FIDELITY_MEASURES = ("paired_gap", "moment_gap", "fake_score_error", "teacher_error", "dm_to_cfg")  # each step's entries besides t


def fine_grid(grid, substeps: int) -> list[float]:
    """The student's grid with ``substeps`` evenly spaced timesteps per interval, the last interval down to
    ``t_{K-1} / substeps``; the student's ``t_i`` sits at index ``i * substeps``."""
    ends = [float(t) for t in grid] + [0.0]
    return [start + (end - start) * j / substeps for start, end in zip(ends[:-1], ends[1:]) for j in range(substeps)]


def guided(teacher, cfg_scale: float):
    """The teacher's guided output as one denoiser (guidance is linear in the output, whatever it predicts)."""

    def denoise(x_t: Tensor, t: Tensor) -> Tensor:
        cond, uncond = teacher(x_t, t)
        return cond.float() if cfg_scale == 1.0 else teacher_cfg_x0(cond.float(), uncond.float(), cfg_scale)

    return denoise


@torch.no_grad()
def teacher_ode_points(teacher, noise: Tensor, settings: TDMSettings, schedule, substeps: int = TEACHER_SUBSTEPS) -> list[Tensor]:
    """The teacher's ODE from ``noise`` at the student's times: ``[x at t_1, ..., x at t_{K-1}, sample]``, the
    points the student reaches after each of its K steps (METHOD.md "The student")."""
    points = []
    steps = tdm_steps(guided(teacher, settings.cfg_scale), noise, fine_grid(settings.grid, substeps), schedule, settings.prediction_type)
    for j, (x, _x0, _eps, x_next) in enumerate(steps):
        if j > 0 and j % substeps == 0:
            points.append(x)
        last = x_next
    return points + [last]


def channel_moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and standard deviation over every other axis (channels on axis 1, images or videos)."""
    flat = x.float().transpose(0, 1).reshape(x.shape[1], -1)
    return flat.mean(dim=1), flat.std(dim=1)


def moment_gap(student: Tensor, teacher: Tensor) -> float:
    mean_s, std_s = channel_moments(student)
    mean_t, std_t = channel_moments(teacher)
    gap = ((mean_s - mean_t).pow(2).sum() + (std_s - std_t).pow(2).sum()).sqrt()
    return float(gap / std_t.pow(2).sum().sqrt().clamp(min=1e-8))


def relative_error(x: Tensor, reference: Tensor) -> float:
    return float((x - reference).abs().mean() / reference.abs().mean().clamp(min=1e-8))


def window_middle(grid, i: int) -> float:
    """The middle of step ``i``'s window ``[t_{i+1}, t_i)`` (the last step's ends at 0)."""
    end = float(grid[i + 1]) if i + 1 < len(grid) else 0.0
    return (float(grid[i]) + end) / 2


@torch.no_grad()
def score_terms(denoisers: TDMDenoisers, x0_hat: Tensor, t_mid: float, noise: Tensor, settings: TDMSettings, schedule) -> dict:
    """Fake score vs teacher on the student's prediction ``x0_hat`` noised to ``t_mid``."""
    t = torch.full((x0_hat.shape[0],), t_mid, dtype=torch.float64, device=x0_hat.device)
    a, s = schedule.alpha_sigma(t)
    shape = (-1,) + (1,) * (x0_hat.ndim - 1)
    x_t = (a.view(shape) * x0_hat + s.view(shape) * noise).to(x0_hat.dtype)

    def x0_of(output: Tensor) -> Tensor:
        return x0_eps_from_output(output.float(), x_t, a, s, settings.prediction_type)[0]

    cond, uncond = denoisers.teacher(x_t, t)
    x0_teacher, x0_fake = x0_of(cond), x0_of(denoisers.fake_score(x_t, t))
    terms = {"fake_score_error": relative_error(x0_fake, x0_hat), "teacher_error": relative_error(x0_teacher, x0_hat), "dm_to_cfg": None}
    if settings.cfg_scale != 1.0 and uncond is not None:
        cfg_term = (settings.cfg_scale - 1.0) * (x0_teacher - x0_of(uncond))
        terms["dm_to_cfg"] = float((x0_teacher - x0_fake).norm() / cfg_term.norm().clamp(min=1e-12))
    return terms


@torch.no_grad()
def step_fidelity(denoisers: TDMDenoisers, noise: Tensor, settings: TDMSettings, schedule, teacher_points: list[Tensor]) -> list[dict]:
    """One dict per student step (module docstring): ``t``, ``paired_gap``, ``moment_gap``,
    ``fake_score_error``, ``teacher_error``, ``dm_to_cfg``. ``teacher_points`` from :func:`teacher_ode_points`
    on the same noise."""
    rollout = roll_out(denoisers.student, noise, settings, schedule)
    renoise = torch.randn(noise.shape, generator=torch.Generator().manual_seed(FIDELITY_SEED)).to(noise.device, noise.dtype)
    steps = []
    for i, t_i in enumerate(settings.grid):
        student_point, teacher_point = rollout.points[i + 1], teacher_points[i]
        entry = {"t": int(t_i), "paired_gap": relative_error(student_point, teacher_point), "moment_gap": moment_gap(student_point, teacher_point)}
        entry.update(score_terms(denoisers, rollout.x0[i], window_middle(settings.grid, i), renoise, settings, schedule))
        steps.append(entry)
    return steps


def fidelity_table(steps: list[dict]) -> str:
    """The per-step numbers as a few aligned text lines (logs, reports, the text beside each validation grid)."""
    lines = ["step  t    paired  moments  fake err  teacher err  DM/CFG"]
    for i, e in enumerate(steps):
        ratio = "-" if e.get("dm_to_cfg") is None else f"{e['dm_to_cfg']:.2f}"
        lines.append(f"{i + 1:>4}  {e['t']:<4} {e['paired_gap']:>6.3f}  {e['moment_gap']:>7.3f}  {e['fake_score_error']:>8.3f}  "
                     f"{e['teacher_error']:>11.3f}  {ratio:>6}")
    return "\n".join(lines)


def drifting_step(steps: list[dict]) -> Optional[int]:
    """The 1-based step where the paired gap grows most over the step before (``None`` for fewer than 2 steps)."""
    if len(steps) < 2:
        return None
    growth = [steps[i]["paired_gap"] - (steps[i - 1]["paired_gap"] if i else 0.0) for i in range(len(steps))]
    return max(range(len(steps)), key=lambda i: growth[i]) + 1
