"""Issue 22, item 1: tdm_core.fidelity's per-step measures against closed forms on Gaussian data.

The teacher is the exact denoiser of a Gaussian (tests/helpers/gaussian.py), whose probability-flow ODE
map is known in closed form, so the teacher's DDIM ODE points can be checked at every student time; the
students are that teacher's own K-step sampler (no drift but discretisation) and the same with one step
perturbed (drift that starts at that step)."""
from __future__ import annotations

import pytest
import torch

from tdm_core import fidelity
from tdm_core.iteration import TDMDenoisers, TDMSettings
from tdm_core.schedules import FlowSchedule, VPSchedule, betas_scaled_linear
from tests.helpers.gaussian import GaussianMixture, gaussian_ode_map

GRID = (899, 674, 449, 224)
DATA = GaussianMixture.single(torch.tensor([0.5, -1.0, 2.0, 0.0]), torch.tensor([0.3, 1.5, 0.2, 1.0]))


def vp_schedule():
    return VPSchedule(torch.cumprod(1.0 - betas_scaled_linear(), 0))


def exact(schedule, prediction_type: str, offset_at=None, offset: float = 0.0):
    """The Gaussian's exact denoiser in ``prediction_type``; ``offset`` added to its x0 at timestep ``offset_at``."""

    def denoise(x_t, t):
        a, s = schedule.alpha_sigma(t)
        out = DATA.denoiser_output(x_t, a, s, "sample")
        if offset_at is not None:
            out = out + offset * (t.view(-1, 1) == offset_at).double()
        if prediction_type == "sample":
            return out
        x0 = out
        eps = (x_t.double() - a.view(-1, 1) * x0) / s.view(-1, 1)
        return eps if prediction_type == "epsilon" else eps - x0  # flow: v = eps - x0

    return denoise


def denoisers(student, teacher, fake=None):
    return TDMDenoisers(student=student, fake_score=fake or teacher, teacher=lambda x, t: (teacher(x, t), teacher(x, t)))


@pytest.mark.parametrize("kind", ["vp", "flow"])
def test_teacher_ode_points_converge_to_the_closed_form_ode(kind):
    schedule, prediction = (vp_schedule(), "epsilon") if kind == "vp" else (FlowSchedule(shift=3.0, num_timesteps=1000), "flow")
    settings = TDMSettings(grid=GRID, prediction_type=prediction, cfg_scale=1.0)
    noise = torch.randn(64, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    teacher = lambda x, t: (exact(schedule, prediction)(x, t), None)  # noqa: E731
    errors = {}
    for substeps in (4, 32):
        points = fidelity.teacher_ode_points(teacher, noise, settings, schedule, substeps)
        assert len(points) == len(GRID)
        a0, s0 = schedule.alpha_sigma(torch.tensor(float(GRID[0]), dtype=torch.float64))
        for i, t in enumerate(GRID[1:]):
            a, s = schedule.alpha_sigma(torch.tensor(float(t), dtype=torch.float64))
            expected = gaussian_ode_map(noise, DATA, a0, s0, a, s)
            errors[(substeps, i)] = float((points[i] - expected).abs().max())
    # DDIM on a Gaussian converges to the ODE map: finer sub-steps, smaller error, and small at 32
    for i in range(len(GRID) - 1):
        assert errors[(32, i)] < errors[(4, i)] and errors[(32, i)] < 0.05, errors


def test_substep_one_is_the_teachers_own_k_step_sampler():
    from tdm_core import sample_tdm
    from tdm_core.samplers import rollout_tdm

    schedule = vp_schedule()
    settings = TDMSettings(grid=GRID, prediction_type="epsilon", cfg_scale=1.0)
    noise = torch.randn(8, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    teacher = exact(schedule, "epsilon")
    points = fidelity.teacher_ode_points(lambda x, t: (teacher(x, t), None), noise, settings, schedule, substeps=1)
    rollout = rollout_tdm(teacher, noise, GRID, schedule, "epsilon")
    for got, want in zip(points, rollout[1:]):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)  # the guided output is float32, as hosts give it
    torch.testing.assert_close(points[-1], sample_tdm(teacher, noise, GRID, schedule, "epsilon"), rtol=1e-6, atol=1e-6)


def test_a_step_that_drifts_is_named_and_the_steps_before_it_are_untouched():
    schedule = vp_schedule()
    settings = TDMSettings(grid=GRID, prediction_type="epsilon", cfg_scale=1.0)
    noise = torch.randn(256, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    teacher = exact(schedule, "epsilon")
    points = fidelity.teacher_ode_points(lambda x, t: (teacher(x, t), None), noise, settings, schedule)
    clean = fidelity.step_fidelity(denoisers(teacher, teacher), noise, settings, schedule, points)
    drifting = fidelity.step_fidelity(denoisers(exact(schedule, "epsilon", offset_at=GRID[2], offset=2.0), teacher), noise, settings, schedule, points)
    for i in (0, 1):  # before the perturbed step: the same numbers
        assert drifting[i]["paired_gap"] == pytest.approx(clean[i]["paired_gap"], abs=1e-12)
        assert drifting[i]["moment_gap"] == pytest.approx(clean[i]["moment_gap"], abs=1e-12)
    assert drifting[2]["paired_gap"] > 5 * clean[2]["paired_gap"] and drifting[2]["moment_gap"] > 5 * clean[2]["moment_gap"]  # measured 13x / 9x
    assert fidelity.drifting_step(drifting) == 3
    # the teacher's own 4-step sampler drifts from its ODE too (discretisation), most in its last step
    assert fidelity.drifting_step(clean) == 4


def test_score_terms_compare_the_fake_score_with_the_teacher_and_the_guidance():
    schedule = vp_schedule()
    noise = torch.randn(64, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    teacher = exact(schedule, "epsilon")
    uncond = exact(schedule, "epsilon", offset_at=None)
    shifted_uncond = lambda x, t: uncond(x, t) + 0.3  # noqa: E731  (a different unconditional output)
    guided = TDMDenoisers(student=teacher, fake_score=teacher, teacher=lambda x, t: (teacher(x, t), shifted_uncond(x, t)))
    settings = TDMSettings(grid=GRID, prediction_type="epsilon", cfg_scale=3.0)
    points = fidelity.teacher_ode_points(guided.teacher, noise, settings, schedule)
    same = fidelity.step_fidelity(guided, noise, settings, schedule, points)
    for e in same:  # fake score = teacher: equal errors, no distribution-matching term
        assert e["fake_score_error"] == pytest.approx(e["teacher_error"]) and e["dm_to_cfg"] == pytest.approx(0.0, abs=1e-12)
    worse = TDMDenoisers(student=teacher, fake_score=lambda x, t: teacher(x, t) + 0.5, teacher=guided.teacher)
    off = fidelity.step_fidelity(worse, noise, settings, schedule, points)
    for e, base in zip(off, same):
        assert e["fake_score_error"] > e["teacher_error"] and e["dm_to_cfg"] > 0.1
        assert e["teacher_error"] == pytest.approx(base["teacher_error"])
    unguided = fidelity.step_fidelity(guided, noise, TDMSettings(grid=GRID, prediction_type="epsilon", cfg_scale=1.0), schedule, points)
    assert all(e["dm_to_cfg"] is None for e in unguided)
    assert "DM/CFG" in fidelity.fidelity_table(off) and len(fidelity.fidelity_table(off).splitlines()) == len(GRID) + 1


def test_moment_gap_is_the_channel_mean_shift_over_the_spread():
    x = torch.randn(4096, 3, 2, 2, generator=torch.Generator().manual_seed(4))
    assert fidelity.moment_gap(x, x) == 0.0
    shifted = x.clone()
    shifted[:, 1] += 0.6
    std = fidelity.channel_moments(x)[1]
    assert fidelity.moment_gap(shifted, x) == pytest.approx(0.6 / float(std.pow(2).sum().sqrt()), rel=1e-5)
    video = torch.randn(8, 4, 3, 2, 2)  # (B, C, F, H, W): channels still on axis 1
    assert fidelity.channel_moments(video)[0].shape == (4,)


def test_fake_score_weightings_are_min_snr_velocity_and_flat():
    """Issue 22's ablation of the fake-score weighting: on a flow schedule "velocity" is 1/sigma^2, so the x0 loss
    it weights is exactly the velocity MSE (x0 = x_t - sigma v); min(SNR, 5) is the reference."""
    from tdm_core.training import fake_score_weight

    schedule = FlowSchedule(shift=3.0, num_timesteps=1000)
    t = torch.tensor([100.0, 450.0, 899.0], dtype=torch.float64)
    a, s = schedule.alpha_sigma(t)
    torch.testing.assert_close(fake_score_weight(a, s), ((a / s) ** 2).clamp(max=5.0))
    torch.testing.assert_close(fake_score_weight(a, s, "x0"), torch.ones_like(s))
    v_true, v_fake = torch.randn(3, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64).chunk(1)[0], torch.zeros(3, 4, dtype=torch.float64)
    x_t = torch.randn(3, 4, dtype=torch.float64)
    x0_true, x0_fake = x_t - s[:, None] * v_true, x_t - s[:, None] * v_fake
    x0_mse = ((x0_fake - x0_true) ** 2).mean(1)
    torch.testing.assert_close(x0_mse * fake_score_weight(a, s, "velocity"), ((v_fake - v_true) ** 2).mean(1))
    with pytest.raises(ValueError, match="unknown fake-score weighting"):
        fake_score_weight(a, s, "snr")
