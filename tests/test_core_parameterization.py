"""tdm_core.schedules and tdm_core.parameterization against exact algebra and diffusers' tables."""
from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from tdm_core import PREDICTION_TYPES, FlowSchedule, VPSchedule, output_from_x0_eps, x0_eps_from_output
from tdm_core.schedules import alpha_sigma_from_sigma_k, flow_shift, flow_unshift

torch.set_num_threads(1)

VP_CONFIGS = {
    "sd15_scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "pixart_linear": dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
    "zero_snr_scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, zero_terminal_snr=True),
}


def diffusers_alphas_cumprod(beta_schedule, beta_start, beta_end, zero_terminal_snr=False) -> torch.Tensor:
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule=beta_schedule,
        beta_start=beta_start,
        beta_end=beta_end,
        rescale_betas_zero_snr=zero_terminal_snr,
    )
    return scheduler.alphas_cumprod.double()


def schedules_for_round_trips():
    """(name, schedule, t) on the VP and flow schedules, from near-clean to near-pure noise.

    The ends themselves are excluded: at s = 0 an x0-model says nothing about eps, and at a = 0 an
    eps-model says nothing about x0 (0/0), so no conversion can be exact there."""
    t = torch.tensor([1.0, 17.0, 250.5, 499.0, 811.25, 998.0], dtype=torch.float64)
    yield "vp", VPSchedule.from_config(), torch.cat([torch.zeros(1, dtype=torch.float64), t])
    yield "flow_shift3", FlowSchedule(shift=3.0), t


@pytest.mark.parametrize("name", list(VP_CONFIGS))
def test_vp_alphas_cumprod_match_diffusers_table(name):
    config = VP_CONFIGS[name]
    ours = VPSchedule.from_config(**config).alphas_cumprod
    theirs = diffusers_alphas_cumprod(**config)
    assert ours.shape == theirs.shape == (1000,)
    # diffusers computes in float32, so agreement is to float32 precision
    torch.testing.assert_close(ours, theirs, rtol=2e-6, atol=1e-7)
    if config.get("zero_terminal_snr"):
        assert ours[-1] == 0.0  # zero terminal SNR exactly
        a, s = VPSchedule.from_config(**config).alpha_sigma(torch.tensor(999.0))
        assert a == 0.0 and s == 1.0


@pytest.mark.parametrize("name", list(VP_CONFIGS))
def test_vp_alpha_sigma_at_integer_timesteps_is_the_table(name):
    schedule = VPSchedule.from_config(**VP_CONFIGS[name])
    t = torch.arange(1000, dtype=torch.float64)
    a, s = schedule.alpha_sigma(t)
    abar = schedule.alphas_cumprod
    torch.testing.assert_close(a, abar.sqrt(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s, (1 - abar).sqrt(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a**2 + s**2, torch.ones_like(a), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", list(VP_CONFIGS))
def test_vp_sigma_k_timestep_round_trip(name):
    schedule = VPSchedule.from_config(**VP_CONFIGS[name])
    abar = schedule.alphas_cumprod  # equal to diffusers' table (test above)
    # integer timesteps: sigma_k is the discrete table ((1 - abar) / abar)^0.5 and maps back exactly,
    # including the zero-SNR end where sigma_k is infinite
    t = torch.arange(1000, dtype=torch.float64)
    sigma_k = schedule.sigma_k(t)
    torch.testing.assert_close(sigma_k, ((1 - abar) / abar).sqrt(), rtol=1e-12, atol=0)
    torch.testing.assert_close(schedule.timestep_from_sigma_k(sigma_k), t, rtol=0, atol=1e-9)
    # fractional timesteps: log sigma_k is linear between table entries, and the inverse agrees
    t_frac = torch.tensor([0.25, 3.5, 100.125, 500.75, 997.5], dtype=torch.float64)
    log_mix = (1 - t_frac.frac()) * schedule.sigma_k(t_frac.floor()).log() + t_frac.frac() * schedule.sigma_k(t_frac.ceil()).log()
    torch.testing.assert_close(schedule.sigma_k(t_frac).log(), log_mix, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(schedule.timestep_from_sigma_k(schedule.sigma_k(t_frac)), t_frac, rtol=0, atol=1e-9)


def test_alpha_sigma_from_sigma_k_ends_are_finite():
    a, s = alpha_sigma_from_sigma_k(torch.tensor([0.0, 1.0, float("inf")], dtype=torch.float64))
    torch.testing.assert_close(a, torch.tensor([1.0, 0.5**0.5, 0.0], dtype=torch.float64))
    torch.testing.assert_close(s, torch.tensor([0.0, 0.5**0.5, 1.0], dtype=torch.float64))


def test_flow_schedule_shift_matches_sd3_rule_and_inverts():
    schedule = FlowSchedule(shift=3.0)
    t = torch.linspace(0, 1000, 11, dtype=torch.float64)
    sigma = schedule.flow_sigma(t)
    plain = t / 1000
    torch.testing.assert_close(sigma, 3.0 * plain / (1 + 2.0 * plain), rtol=1e-14, atol=1e-14)
    a, s = schedule.alpha_sigma(t)
    torch.testing.assert_close(a + s, torch.ones_like(a), rtol=0, atol=1e-15)
    torch.testing.assert_close(schedule.timestep_from_flow_sigma(sigma), t, rtol=0, atol=1e-9)
    torch.testing.assert_close(schedule.model_timestep(t), sigma * 1000, rtol=1e-14, atol=1e-12)
    torch.testing.assert_close(flow_unshift(flow_shift(plain, 6.0), 6.0), plain, rtol=0, atol=1e-14)


@pytest.mark.parametrize("schedule_name,schedule,t", list(schedules_for_round_trips()))
def test_parameterization_round_trips_are_exact(schedule_name, schedule, t):
    """x0, eps -> every output type -> x0, eps, and conversions between output types, in float64."""
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(t.shape[0], 6, generator=gen, dtype=torch.float64)
    eps = torch.randn(t.shape[0], 6, generator=gen, dtype=torch.float64)
    a, s = schedule.alpha_sigma(t)
    x_t = a[:, None] * x0 + s[:, None] * eps
    usable = [p for p in PREDICTION_TYPES if p not in ("v_prediction", "flow")]
    usable += ["v_prediction"] if schedule_name == "vp" else ["flow"]
    for p in usable:
        out = output_from_x0_eps(x0, eps, a, s, p)
        x0_back, eps_back = x0_eps_from_output(out, x_t, a, s, p)
        torch.testing.assert_close(x0_back, x0, rtol=0, atol=1e-12, msg=f"{p}: x0")
        torch.testing.assert_close(eps_back, eps, rtol=0, atol=1e-11, msg=f"{p}: eps")
        for q in usable:  # p -> q -> p is the identity
            there = output_from_x0_eps(*x0_eps_from_output(out, x_t, a, s, p), a, s, q)
            back = output_from_x0_eps(*x0_eps_from_output(there, x_t, a, s, q), a, s, p)
            torch.testing.assert_close(back, out, rtol=0, atol=1e-11, msg=f"{p} -> {q} -> {p}")


def test_output_types_have_their_textbook_form():
    """v = a eps - s x0 (diffusers), flow u = eps - x0: checked on explicit numbers."""
    x0, eps = torch.tensor([[2.0]], dtype=torch.float64), torch.tensor([[-1.0]], dtype=torch.float64)
    a, s = torch.tensor(0.6, dtype=torch.float64), torch.tensor(0.8, dtype=torch.float64)
    assert output_from_x0_eps(x0, eps, a, s, "v_prediction").item() == pytest.approx(0.6 * -1.0 - 0.8 * 2.0)
    assert output_from_x0_eps(x0, eps, 1 - s, s, "flow").item() == pytest.approx(-3.0)
    assert output_from_x0_eps(x0, eps, a, s, "epsilon").item() == -1.0
    assert output_from_x0_eps(x0, eps, a, s, "sample").item() == 2.0


def test_unknown_prediction_type_is_a_clear_error():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="unknown prediction type 'eps'.*epsilon"):
        x0_eps_from_output(x, x, 1.0, 0.0, "eps")
    with pytest.raises(ValueError, match="beta_schedule"):
        VPSchedule.from_config(beta_schedule="cosine")
