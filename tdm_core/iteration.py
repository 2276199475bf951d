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
resumable) in a fixed order: roll-out noise, then each fake-score update's ``(i, u, t, n)`` (with fresh
roll-outs, each later update's roll-out noise before it), then the student update's, each drawn for the whole batch. The network calls may then run in chunks of
rows (the host's gradient accumulation): every loss is a mean of per-sample terms, so the chunks'
gradients, each scaled by its share of the rows, sum to the whole batch's, and the fake score steps
once, after all its chunks, before any student chunk runs (``tdm_iteration``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from .parameterization import x0_eps_from_output
from .samplers import predict_x0_eps, tdm_steps
from .training import (
    DEFAULT_DISTANCE,
    DEFAULT_FAKE_SCORE_ROLLOUTS,
    DEFAULT_FAKE_SCORE_UPDATES,
    FAKE_SCORE_ROLLOUTS,
    DEFAULT_FAKE_SCORE_WEIGHTING,
    diffuse_u_to_t,
    draw_training_times,
    effective_noise_m,
    fake_score_loss,
    generator_loss,
    generator_normaliser,
    generator_target_x_tilde,
    importance_weight,
    fake_score_weight,
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
    distance: str = DEFAULT_DISTANCE
    huber_c: Optional[float] = None
    interval_mode: str = "separate"
    randmid: bool = False
    fake_score_weighting: str = DEFAULT_FAKE_SCORE_WEIGHTING  # tdm_core.training.fake_score_weight
    fake_score_updates: int = DEFAULT_FAKE_SCORE_UPDATES  # per student update, each with new draws of (i, u, t, n)
    fake_score_rollouts: str = DEFAULT_FAKE_SCORE_ROLLOUTS  # tdm_core.training.FAKE_SCORE_ROLLOUTS


@dataclass(frozen=True)
class Rollout:
    """The student's trajectory from pure noise, and its prediction at every point."""

    points: list  # x_{t_0}, ..., x_{t_{K-1}} (then the sample x0_hat)
    x0: list  # x0_hat at each t_i
    eps: list  # eps_hat at each t_i


@dataclass(frozen=True)
class TDMLosses:
    fake_score: Tensor  # the batch's fake-score loss, detached (back-propagated and stepped by the host)
    student: Tensor  # the batch's student loss, detached (likewise)


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


def draw_prompt_rows(num_prompts: int, batch_size: int, generator: torch.Generator) -> list[int]:
    """Which prompt each row of a batch trains on, drawn before the batch's noise (both hosts' order)."""
    return torch.randint(num_prompts, (batch_size,), generator=generator).tolist()


def at_step(per_step: list, i: Tensor) -> Tensor:
    # row b of per_step[i_b]: each sample's entry at its own drawn step index
    return torch.stack(per_step)[i, torch.arange(i.shape[0], device=i.device)]


def draw_times(settings: TDMSettings, batch_size: int, generator: torch.Generator, device) -> tuple[Tensor, ...]:
    # METHOD.md steps 2-4: i, t_i, u, t per sample
    times = draw_training_times(settings.grid, batch_size, settings.interval_mode, settings.randmid, settings.total_steps, generator)
    return tuple(x.to(device) for x in times)


def noised_at_t(x0_hat: Tensor, eps_hat: Tensor, u: Tensor, t: Tensor, n: Tensor, schedule,
                weighting: str = "min_snr") -> tuple[Tensor, Tensor]:
    """METHOD.md steps 3-4: the ODE point ``x_u`` diffused forward to ``x_t`` with the drawn noise ``n``;
    returns ``(x_t, weight)`` with ``weight`` = the fake-score weighting (min-SNR by default) times the
    importance weight of step 5 (from the effective noise m)."""
    (a_u, s_u), (a_t, s_t) = schedule.alpha_sigma(u), schedule.alpha_sigma(t)
    x_t = diffuse_u_to_t(ode_point(x0_hat, eps_hat, a_u, s_u), n, a_u, s_u, a_t, s_t)
    weight = importance_weight(effective_noise_m(eps_hat, n, a_u, s_u, a_t, s_t), n) * fake_score_weight(a_t, s_t, weighting)
    return x_t, weight


@dataclass(frozen=True)
class FakeScoreDraws:
    """METHOD.md step 5's inputs for the whole batch: the fake score is asked for x0 at ``(x_t, t)``."""

    x_t: Tensor
    t: Tensor
    target: Tensor  # sg(x0_hat): the student's prediction at its drawn trajectory point
    weight: Tensor


@dataclass(frozen=True)
class StudentDraws:
    """METHOD.md steps 2-4's draws for the whole batch: the student steps from ``x_ti`` at ``t_i``, its
    ODE point ``u`` is diffused to ``t`` with noise ``n``."""

    x_ti: Tensor
    t_i: Tensor
    u: Tensor
    t: Tensor
    n: Tensor


def fake_score_draws(rollout: Rollout, settings: TDMSettings, schedule, generator) -> FakeScoreDraws:
    # METHOD.md steps 3-5 without the network: the student's prediction at x_{t_i} is the roll-out's
    # own (same weights), so no network call re-makes it
    x = rollout.points[0]
    i, _t_i, u, t = draw_times(settings, x.shape[0], generator, x.device)
    with torch.no_grad():
        x0_hat, eps_hat = at_step(rollout.x0, i), at_step(rollout.eps, i)
        n = randn_on(x0_hat.shape, generator, x0_hat.device)
        x_t, weight = noised_at_t(x0_hat, eps_hat, u, t, n, schedule, settings.fake_score_weighting)
    return FakeScoreDraws(x_t, t, x0_hat, weight)


def student_draws(rollout: Rollout, settings: TDMSettings, generator) -> StudentDraws:
    # METHOD.md steps 2-4's new draws of (i, u, t, n); the noise n is drawn before the student's step,
    # as only its shape (the latent's) is needed
    x = rollout.points[0]
    i, t_i, u, t = draw_times(settings, x.shape[0], generator, x.device)
    x_ti = at_step(rollout.points[:-1], i).detach()
    return StudentDraws(x_ti, t_i, u, t, randn_on(x.shape, generator, x.device))


def fake_score_chunk_loss(fake_score: Denoiser, draws: FakeScoreDraws, rows: slice, settings: TDMSettings, schedule) -> Tensor:
    # METHOD.md step 5: denoising score matching of the fake score on the student's samples, rows ``rows``
    x0_fake, _ = predict_x0_eps(fake_score, draws.x_t[rows], draws.t[rows], schedule, settings.prediction_type)
    return fake_score_loss(x0_fake, draws.target[rows], draws.weight[rows])


def student_chunk_loss(denoisers: TDMDenoisers, draws: StudentDraws, rows: slice, settings: TDMSettings, schedule) -> Tensor:
    # METHOD.md steps 2 and 6 on rows ``rows``: one student step with gradient from the detached x_{t_i},
    # then distribution matching at its noised ODE point against teacher and fake score
    t, t_i = draws.t[rows], draws.t_i[rows]
    x0_hat, eps_hat = predict_x0_eps(denoisers.student, draws.x_ti[rows], t_i, schedule, settings.prediction_type)
    with torch.no_grad():
        x_t, _ = noised_at_t(x0_hat.detach(), eps_hat.detach(), draws.u[rows], t, draws.n[rows], schedule)
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


def whole(batch: Tensor) -> slice:
    return slice(0, batch.shape[0])


def fake_score_objective(denoisers: TDMDenoisers, rollout: Rollout, settings: TDMSettings, schedule, generator) -> Tensor:
    """METHOD.md step 5 on the whole batch (its draws, then the loss)."""
    draws = fake_score_draws(rollout, settings, schedule, generator)
    return fake_score_chunk_loss(denoisers.fake_score, draws, whole(draws.t), settings, schedule)


def student_objective(denoisers: TDMDenoisers, rollout: Rollout, settings: TDMSettings, schedule, generator) -> Tensor:
    """METHOD.md steps 2 and 6 on the whole batch (its draws, then the loss)."""
    draws = student_draws(rollout, settings, generator)
    return student_chunk_loss(denoisers, draws, whole(draws.t), settings, schedule)


# --- the iteration, its network calls in chunks of rows ------------------------------------------------
FAKE_SCORE, STUDENT = "fake_score", "student"  # the roles TDMUpdates is called with
ROLES = (STUDENT, FAKE_SCORE)  # the two LoRA adapters a host trains, named after the roles


@dataclass(frozen=True)
class TDMUpdates:
    """The host's optimiser side. ``backward(role, loss)`` back-propagates one chunk's loss (already
    scaled by the chunk's share of the batch, so the chunks' gradients sum to the whole batch's);
    ``step(role)`` then updates that model once. ``role`` is ``FAKE_SCORE`` or ``STUDENT``."""

    backward: Callable[[str, Tensor], None]
    step: Callable[[str], None]


DenoisersForRows = Callable[[slice], TDMDenoisers]


def row_chunks(batch_size: int, chunk_size: Optional[int]) -> list[slice]:
    """The batch's rows in consecutive slices of ``chunk_size`` (None: one slice of the whole batch)."""
    size = batch_size if chunk_size is None else int(chunk_size)
    if size < 1:
        raise ValueError(f"chunk size {chunk_size} must be at least 1")
    return [slice(start, min(start + size, batch_size)) for start in range(0, batch_size, size)]


def roll_out_in_chunks(denoisers_for: DenoisersForRows, noise: Tensor, chunks: list[slice], settings: TDMSettings, schedule) -> Rollout:
    # METHOD.md step 1 chunk by chunk; each sample's trajectory depends on its own row only
    parts = [roll_out(denoisers_for(rows).student, noise[rows], settings, schedule) for rows in chunks]
    if len(parts) == 1:
        return parts[0]
    joined = {name: [torch.cat(per_step) for per_step in zip(*(getattr(p, name) for p in parts))] for name in ("points", "x0", "eps")}
    return Rollout(**joined)


def accumulate(role: str, chunk_loss: Callable[[slice], Tensor], chunks: list[slice], batch_size: int, updates: TDMUpdates) -> Tensor:
    """Every loss of METHOD.md is a mean over the batch of per-sample terms, so the batch's loss is the sum
    of each chunk's mean times its share of the rows: each is back-propagated on its own (one chunk's
    graph alive at a time), then the model steps once. Returns the batch's loss, detached."""
    total = None
    for rows in chunks:
        loss = chunk_loss(rows) * ((rows.stop - rows.start) / batch_size)
        updates.backward(role, loss)
        total = loss.detach() if total is None else total + loss.detach()
    updates.step(role)
    return total


def tdm_iteration(denoisers: "TDMDenoisers | DenoisersForRows", schedule, settings: TDMSettings, noise: Tensor,
                  generator: torch.Generator, updates: TDMUpdates, chunk_size: Optional[int] = None) -> TDMLosses:
    """METHOD.md steps 1-8 for the batch of ``noise``: roll-out, the fake-score update(s), then the student
    update (whose target sees the updated fake score, as in the reference). Every random draw is made for
    the whole batch in a fixed order, then the network calls run in chunks of ``chunk_size`` rows: the
    update equals the whole batch's within float rounding whatever the chunk size (gradient accumulation).
    ``denoisers``: one ``TDMDenoisers`` (conditions the same for every row, or bound to the whole batch
    with ``chunk_size`` None) or a function giving the denoisers of a row slice (conditions bound to those
    rows). ``settings.fake_score_updates`` > 1 steps the fake score that many times, each on new draws of
    (i, u, t, n), before the student's update: on the same roll-out (``fake_score_rollouts`` "shared"), or each
    update after the first on a roll-out of new noise drawn just before it ("fresh"; the student's update keeps
    the first roll-out, so one update is the same iteration either way). Returns both losses of the batch (the
    fake score's of its last update), detached (the host has stepped both models)."""
    if settings.fake_score_updates < 1:
        raise ValueError(f"fake_score_updates={settings.fake_score_updates}: at least 1 fake-score update per student update")
    if settings.fake_score_rollouts not in FAKE_SCORE_ROLLOUTS:
        raise ValueError(f"unknown fake_score_rollouts {settings.fake_score_rollouts!r}: use one of {', '.join(FAKE_SCORE_ROLLOUTS)}")
    denoisers_for = (lambda rows: denoisers) if isinstance(denoisers, TDMDenoisers) else denoisers
    batch_size = noise.shape[0]
    chunks = row_chunks(batch_size, chunk_size)
    rollout = roll_out_in_chunks(denoisers_for, noise, chunks, settings, schedule)
    for update in range(settings.fake_score_updates):  # 1 in METHOD.md; the default 5: DMD2's two time-scale rule (issue 22)
        samples = rollout
        if update > 0 and settings.fake_score_rollouts == "fresh":  # the student is unchanged: only the noise is new
            samples = roll_out_in_chunks(denoisers_for, randn_on(noise.shape, generator, noise.device).to(noise.dtype),
                                         chunks, settings, schedule)
        fake_draws = fake_score_draws(samples, settings, schedule, generator)
        fake = accumulate(FAKE_SCORE, lambda rows: fake_score_chunk_loss(denoisers_for(rows).fake_score, fake_draws, rows, settings, schedule),
                          chunks, batch_size, updates)
    draws = student_draws(rollout, settings, generator)
    student = accumulate(STUDENT, lambda rows: student_chunk_loss(denoisers_for(rows), draws, rows, settings, schedule),
                         chunks, batch_size, updates)
    return TDMLosses(fake, student)
