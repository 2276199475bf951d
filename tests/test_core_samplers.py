"""tdm_core samplers with the exact denoiser of Gaussian / mixture data: they converge to the exact
probability-flow ODE solution at the order their method promises."""
from __future__ import annotations

import math

import pytest
import torch

from tdm_core import FlowSchedule, SigmaKSchedule, VPSchedule, rollout_tdm, sample_dpmpp_2m, sample_tdm
from tdm_core.parameterization import x0_eps_from_output
from tests.helpers.gaussian import GaussianMixture, gaussian_ode_map, rk4_ode_solution

torch.set_num_threads(1)

T = 1000
KS = (2, 4, 8, 16, 32)

# var != 1 and != 0 in every dimension, so that DDIM (exact for a point mass) makes a non-zero error
GAUSSIAN = GaussianMixture.single(mean=[0.5, -1.0, 2.0], variance=[0.3, 2.5, 0.6])
MIXTURE = GaussianMixture(
    weights=torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64),
    means=torch.tensor([[-1.5, 0.5], [1.0, 1.0], [0.5, -2.0]], dtype=torch.float64),
    variances=torch.tensor([[0.3, 0.5], [0.4, 0.2], [0.6, 0.3]], dtype=torch.float64),
)


def noise_for(data: GaussianMixture, n: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, data.dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def flow_denoiser(data: GaussianMixture, prediction_type: str = "flow"):
    """Exact network for the unshifted rectified flow a = 1 - t/T, s = t/T (schedule written out here)."""

    def denoise(x, t):
        sigma = torch.as_tensor(t, dtype=torch.float64) / T
        return data.denoiser_output(x, 1.0 - sigma, sigma, prediction_type)

    return denoise


def schedule_denoiser(data: GaussianMixture, schedule, prediction_type: str):
    def denoise(x, t):
        a, s = schedule.alpha_sigma(t)
        return data.denoiser_output(x, a, s, prediction_type)

    return denoise


def uniform_flow_grid(k: int) -> list[float]:
    # t_0 = T is pure noise (a = 0); the last step goes from T / K to the clean sample
    return [T * (1 - i / k) for i in range(k)]


def exact_flow_solution(data: GaussianMixture, noise: torch.Tensor) -> torch.Tensor:
    if data.weights.numel() == 1:
        return gaussian_ode_map(noise, data, 0.0, 1.0, 1.0, 0.0)
    return rk4_ode_solution(noise, data, 0.0, 1.0, 1.0, 0.0, num_steps=400)


def rms(x: torch.Tensor) -> float:
    return x.pow(2).mean().sqrt().item()


def observed_orders(errors: list[float]) -> list[float]:
    """log2(e_K / e_2K) for the doubling sequence KS."""
    return [math.log2(e1 / e2) for e1, e2 in zip(errors, errors[1:])]


def test_rk4_reference_matches_the_closed_form_gaussian_ode():
    """The mixture reference used below is itself right: on one Gaussian it equals the exact map."""
    noise = noise_for(GAUSSIAN)
    torch.testing.assert_close(
        rk4_ode_solution(noise, GAUSSIAN, 0.0, 1.0, 1.0, 0.0, num_steps=200), exact_flow_solution(GAUSSIAN, noise), rtol=0, atol=1e-9
    )
    # and the map is the ODE flow: going via an intermediate point changes nothing
    noise = noise_for(MIXTURE)
    a_mid, s_mid = torch.tensor(0.7, dtype=torch.float64), torch.tensor(0.45, dtype=torch.float64)
    via = rk4_ode_solution(rk4_ode_solution(noise, MIXTURE, 0.0, 1.0, a_mid, s_mid), MIXTURE, a_mid, s_mid, 1.0, 0.0)
    torch.testing.assert_close(via, exact_flow_solution(MIXTURE, noise), rtol=0, atol=1e-7)


@pytest.mark.parametrize("data_name", ["gaussian", "mixture"])
def test_tdm_sampler_converges_to_the_exact_ode_solution_at_first_order(data_name):
    data = {"gaussian": GAUSSIAN, "mixture": MIXTURE}[data_name]
    noise = noise_for(data)
    exact = exact_flow_solution(data, noise)
    errors = [rms(sample_tdm(flow_denoiser(data), noise, uniform_flow_grid(k), FlowSchedule(), "flow") - exact) for k in KS]
    orders = observed_orders(errors)
    assert errors[0] > 1e-2, f"the error must be visible at K=2, got {errors}"
    assert all(e1 > e2 for e1, e2 in zip(errors, errors[1:])), f"errors must fall with K: {errors}"
    # DDIM (eta = 0) is the Euler method: order 1 once asymptotic
    assert all(0.8 < p < 1.25 for p in orders[-2:]), f"observed orders {orders} (errors {errors})"


@pytest.mark.parametrize("data_name", ["gaussian", "mixture"])
def test_dpmpp_2m_beats_ddim_by_far_on_the_uniform_flow_grid(data_name):
    """Same grid as above. Its steps in log-SNR stay O(1) at both ends (a -> 0, s -> 0), so the
    second order shows only slowly here; the clean order test is the log-SNR grid below."""
    data = {"gaussian": GAUSSIAN, "mixture": MIXTURE}[data_name]
    noise = noise_for(data)
    exact = exact_flow_solution(data, noise)
    errors = [rms(sample_dpmpp_2m(flow_denoiser(data), noise, uniform_flow_grid(k), FlowSchedule(), "flow") - exact) for k in KS]
    assert all(e1 > e2 for e1, e2 in zip(errors, errors[1:])), f"errors must fall with K: {errors}"
    assert math.log2(errors[0] / errors[-1]) / (len(KS) - 1) > 1.5, f"mean observed order too low: {errors}"
    ddim_32 = rms(sample_tdm(flow_denoiser(data), noise, uniform_flow_grid(32), FlowSchedule(), "flow") - exact)
    assert errors[-1] < ddim_32 / 5, "at 32 steps the second-order solver must beat DDIM by far"


LOG_SNR_KS = (8, 16, 32, 64)
SIGMA_K_RANGE = (10.0, 0.1)  # inside the SD1.5 table (0.029 .. 14.6)


@pytest.fixture(scope="module")
def log_snr_references():
    """Grids uniform in lambda = -log sigma_k and the exact end point of each: the x0 posterior mean
    at the last grid point of the RK4 ODE solution (every sampler ends with that denoising step)."""
    noise = noise_for(MIXTURE, seed=1)
    a0, s0 = 1.0 / math.sqrt(1 + SIGMA_K_RANGE[0] ** 2), SIGMA_K_RANGE[0] / math.sqrt(1 + SIGMA_K_RANGE[0] ** 2)
    refs = {}
    for k in LOG_SNR_KS:
        sigmas = torch.exp(torch.linspace(math.log(SIGMA_K_RANGE[0]), math.log(SIGMA_K_RANGE[1]), k, dtype=torch.float64))
        a_end, s_end = 1.0 / (1 + sigmas[-1] ** 2).sqrt(), sigmas[-1] / (1 + sigmas[-1] ** 2).sqrt()
        x_end = rk4_ode_solution(noise, MIXTURE, a0, s0, a_end, s_end, num_steps=600)
        refs[k] = (sigmas, MIXTURE.posterior_x0_eps(x_end, a_end, s_end)[0])
    return noise, refs


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("sampler,order", [(sample_tdm, 1.0), (sample_dpmpp_2m, 2.0)])
def test_vp_samplers_converge_at_their_order_on_a_grid_uniform_in_log_snr(log_snr_references, prediction_type, sampler, order):
    """SD1.5 VP table with eps / v networks at fractional timesteps (timestep_from_sigma_k):
    DDIM (Euler in sigma_k) has order 1, DPM-Solver++(2M) order 2 in the log-SNR step."""
    schedule = VPSchedule.from_config()
    noise, refs = log_snr_references
    errors = []
    for k in LOG_SNR_KS:
        sigmas, reference = refs[k]
        grid = schedule.timestep_from_sigma_k(sigmas).tolist()
        out = sampler(schedule_denoiser(MIXTURE, schedule, prediction_type), noise, grid, schedule, prediction_type)
        errors.append(rms(out - reference))
    orders = observed_orders(errors)
    assert all(abs(p - order) < 0.25 for p in orders[-2:]), f"observed orders {orders} (errors {errors})"


def test_sigma_k_coordinates_give_the_same_samples_as_vp_coordinates():
    """A VP model seen the ComfyUI way (x = x0 + sigma eps) samples the same x0 after rescaling x_T."""
    schedule = VPSchedule.from_config()
    grid = [999.0, 749.0, 499.0, 249.0]
    noise = noise_for(MIXTURE, seed=2)
    vp = sample_tdm(schedule_denoiser(MIXTURE, schedule, "epsilon"), noise, grid, schedule, "epsilon")
    sigmas = [schedule.sigma_k(torch.tensor(t)).item() for t in grid]
    a0, _ = schedule.alpha_sigma(torch.tensor(grid[0]))
    k_diff = sample_tdm(schedule_denoiser(MIXTURE, SigmaKSchedule(), "epsilon"), noise / a0, sigmas, SigmaKSchedule(), "epsilon")
    torch.testing.assert_close(k_diff, vp, rtol=0, atol=1e-10)


def test_rollout_keeps_every_point_and_each_is_one_ddim_step_of_the_previous():
    schedule = FlowSchedule(shift=3.0)
    grid = [1000.0, 750.0, 500.0, 250.0]
    noise = noise_for(MIXTURE, seed=3)
    denoise = schedule_denoiser(MIXTURE, schedule, "flow")
    seen = []
    points = rollout_tdm(denoise, noise, grid, schedule, "flow", callback=lambda i, x, x0: seen.append((i, x.clone(), x0.clone())))
    assert len(points) == len(grid) + 1 and torch.equal(points[0], noise)
    assert [i for i, _, _ in seen] == [0, 1, 2, 3]
    for i, t in enumerate(grid):
        x0, eps = MIXTURE.posterior_x0_eps(points[i], *schedule.alpha_sigma(torch.tensor(t)))
        torch.testing.assert_close(seen[i][2], x0, rtol=0, atol=1e-12)
        if i + 1 < len(grid):
            a_next, s_next = schedule.alpha_sigma(torch.tensor(grid[i + 1]))
            torch.testing.assert_close(points[i + 1], a_next * x0 + s_next * eps, rtol=0, atol=1e-12)
    torch.testing.assert_close(points[-1], seen[-1][2], rtol=0, atol=0)
    torch.testing.assert_close(sample_tdm(denoise, noise, grid, schedule, "flow"), points[-1], rtol=0, atol=0)


def test_a_trajectory_split_at_a_grid_point_and_continued_is_the_whole_trajectory():
    """``end``: the first part stops at the split's timestep (one DDIM step there, no call at it); the second
    part goes on from that point (how TDM Sampler serves SplitSigmas for two-expert models)."""
    schedule = FlowSchedule(shift=3.0)
    grid = [1000.0, 750.0, 500.0, 250.0]
    noise = noise_for(MIXTURE, seed=5)
    denoise = schedule_denoiser(MIXTURE, schedule, "flow")
    calls = []
    counted = lambda x, t: (calls.append(float(t[0])), denoise(x, t))[1]  # noqa: E731
    whole = rollout_tdm(denoise, noise, grid, schedule, "flow")
    first = sample_tdm(counted, noise, grid[:2], schedule, "flow", end=grid[2])
    assert calls == grid[:2]
    torch.testing.assert_close(first, whole[2], rtol=0, atol=0)
    torch.testing.assert_close(sample_tdm(denoise, first, grid[2:], schedule, "flow"), whole[-1], rtol=0, atol=0)


def test_stochastic_variant_replaces_a_gamma_share_of_the_noise():
    """gamma re-noises: x_{t_{i+1}} = a' x0_hat + s' (sqrt(1 - gamma) eps_hat + sqrt(gamma) z)."""
    schedule = VPSchedule.from_config()
    grid = [999.0, 500.0]
    noise = noise_for(GAUSSIAN, seed=4).float()
    denoise = schedule_denoiser(GAUSSIAN, schedule, "epsilon")
    gamma = 0.3
    points = rollout_tdm(lambda x, t: denoise(x, t).float(), noise, grid, schedule, "epsilon", gamma=gamma, generator=torch.Generator().manual_seed(7))
    z = torch.randn(noise.shape, generator=torch.Generator().manual_seed(7), dtype=noise.dtype)
    a0, s0 = schedule.alpha_sigma(torch.tensor(999.0))
    x0, eps = x0_eps_from_output(denoise(noise, torch.tensor(999.0)).float(), noise, a0, s0, "epsilon")
    a1, s1 = schedule.alpha_sigma(torch.tensor(500.0))
    expected = a1 * x0 + s1 * ((1 - gamma) ** 0.5 * eps + gamma**0.5 * z)
    torch.testing.assert_close(points[1], expected.float(), rtol=1e-5, atol=1e-5)
    deterministic = rollout_tdm(lambda x, t: denoise(x, t).float(), noise, grid, schedule, "epsilon", gamma=0.0)
    assert (points[1] - deterministic[1]).abs().max() > 0.1
