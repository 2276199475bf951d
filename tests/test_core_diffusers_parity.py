"""tdm_core samplers and grids against diffusers, the implementation the released TDM LoRAs were
sampled with: same denoiser, same starting noise, compared step for step."""
from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from tdm_core import FlowSchedule, VPSchedule, diffusers_grid, rollout_tdm, sample_dpmpp_2m
from tdm_core.grids import dpmsolver_flow_grid
from tests.helpers.gaussian import GaussianMixture

torch.set_num_threads(1)
# diffusers' own numpy-2 deprecation notice inside DPMSolverMultistepScheduler.set_timesteps
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SD15 = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
MIXTURE = GaussianMixture(
    weights=torch.tensor([0.6, 0.4], dtype=torch.float64),
    means=torch.tensor([[-1.0, 0.5, 2.0, 0.0], [1.5, -0.5, 0.0, 1.0]], dtype=torch.float64),
    variances=torch.tensor([[0.3, 0.5, 0.2, 0.6], [0.4, 0.2, 0.5, 0.3]], dtype=torch.float64),
)
ALPHAS_CUMPROD = DDIMScheduler(**SD15).alphas_cumprod.double()  # diffusers' own table
BATCH = 8


class TinyNet(torch.nn.Module):
    """A small random network of (x, t): an arbitrary model output, not a consistent denoiser."""

    def __init__(self, dim: int = 4):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(dim + 2, 32), torch.nn.SiLU(), torch.nn.Linear(32, dim)).double()

    @torch.no_grad()
    def forward(self, x, t_feature):
        t_feature = torch.as_tensor(t_feature, dtype=torch.float64).reshape(-1, 1).expand(x.shape[0], 1)
        return self.net(torch.cat([x.double(), torch.sin(3 * t_feature), torch.cos(3 * t_feature)], dim=1))


def vp_denoiser(kind: str, prediction_type: str):
    """``denoise(x, t)`` at integer timesteps t, with (a, s) from diffusers' table, called identically
    by the diffusers loop (scalar t) and by tdm_core (per-sample t)."""
    net = TinyNet()

    def denoise(x, t):
        t_int = int(round(float(torch.as_tensor(t).reshape(-1)[0])))
        abar = ALPHAS_CUMPROD[t_int]
        if kind == "analytic":
            return MIXTURE.denoiser_output(x.double(), abar.sqrt(), (1 - abar).sqrt(), prediction_type)
        return net(x, t_int / 1000)

    return denoise


def start_noise(seed: int = 0) -> torch.Tensor:
    return torch.randn(BATCH, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def ddim_scheduler(spacing: str, prediction_type: str) -> DDIMScheduler:
    return DDIMScheduler(
        **SD15,
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=1 if spacing == "leading" else 0,
        timestep_spacing=spacing,
        prediction_type=prediction_type,
    )


def dpm_scheduler(prediction_type: str, **overrides) -> DPMSolverMultistepScheduler:
    config = dict(
        SD15,
        algorithm_type="dpmsolver++",
        solver_order=2,
        lower_order_final=True,
        final_sigmas_type="zero",
        timestep_spacing="leading",
        steps_offset=1,
        prediction_type=prediction_type,
    )
    config.update(overrides)
    return DPMSolverMultistepScheduler(**config)


# DDIM in diffusers steps from t to t - T // K: on the grid for leading spacing and for trailing
# spacing when K divides T (trailing K=3 gives 999, 666, 332 but steps 666 -> 333).
@pytest.mark.parametrize("denoiser_kind", ["analytic", "tiny_net"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing,num_steps", [("leading", 1), ("leading", 3), ("leading", 4), ("leading", 7), ("trailing", 2), ("trailing", 4), ("trailing", 8)])
def test_tdm_sampler_equals_diffusers_ddim_step_for_step(denoiser_kind, prediction_type, spacing, num_steps):
    scheduler = ddim_scheduler(spacing, prediction_type)
    scheduler.set_timesteps(num_steps)
    denoise = vp_denoiser(denoiser_kind, prediction_type)
    x = start_noise()
    theirs = [x]
    for t in scheduler.timesteps:
        x = scheduler.step(denoise(x, t), t, x, eta=0.0).prev_sample
        theirs.append(x)
    grid = diffusers_grid(num_steps, spacing, steps_offset=1 if spacing == "leading" else 0, solver="ddim")
    assert grid == scheduler.timesteps.tolist()
    ours = rollout_tdm(denoise, start_noise(), grid, VPSchedule.from_config(), prediction_type)
    assert len(ours) == len(theirs) == num_steps + 1
    for i, (mine, reference) in enumerate(zip(ours, theirs)):
        # diffusers holds alphas_cumprod in float32: agreement to float32 precision
        torch.testing.assert_close(mine, reference.double(), rtol=1e-5, atol=1e-5, msg=f"after step {i}")


@pytest.mark.parametrize("denoiser_kind", ["analytic", "tiny_net"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("num_steps", [1, 2, 4, 6])
def test_dpmpp_2m_equals_diffusers_sd15_config_step_for_step(denoiser_kind, prediction_type, num_steps):
    """The released SD1.5 TDM LoRA's sampler: DPM-Solver++(2M), leading spacing, steps offset 1."""
    scheduler = dpm_scheduler(prediction_type)
    scheduler.set_timesteps(num_steps)
    denoise = vp_denoiser(denoiser_kind, prediction_type)
    x = start_noise(1)
    theirs = []
    for t in scheduler.timesteps:
        theirs.append(x)
        x = scheduler.step(denoise(x, t), t, x).prev_sample
    theirs.append(x)
    grid = diffusers_grid(num_steps, "leading", steps_offset=1, solver="dpmsolver")
    assert grid == scheduler.timesteps.tolist()
    ours = []
    final = sample_dpmpp_2m(denoise, start_noise(1), grid, VPSchedule.from_config(), prediction_type, callback=lambda i, x, x0: ours.append(x))
    ours.append(final)
    assert len(ours) == len(theirs)
    for i, (mine, reference) in enumerate(zip(ours, theirs)):
        # diffusers steps in float32
        torch.testing.assert_close(mine, reference.double(), rtol=2e-5, atol=2e-5, msg=f"point {i}")


@pytest.mark.parametrize("denoiser_kind", ["analytic", "tiny_net"])
@pytest.mark.parametrize("num_steps", [1, 2, 4, 5])
def test_dpmpp_2m_equals_diffusers_flow_config_with_shift_6(denoiser_kind, num_steps):
    """The released SD3 TDM LoRA's sampler: flow sigmas shifted by 6, flow prediction.

    diffusers lays out unshifted sigmas (1 - 1/T) (1 - i/K), i < K, shifts them and hands the
    network int(sigma * T). tdm_core's timesteps are the unshifted t = T * sigma_unshifted."""
    T = 1000
    scheduler = dpm_scheduler("flow_prediction", use_flow_sigmas=True, flow_shift=6.0)
    scheduler.set_timesteps(num_steps)
    schedule = FlowSchedule(shift=6.0)
    grid = dpmsolver_flow_grid(num_steps, T)
    t = torch.tensor(grid, dtype=torch.float64)
    torch.testing.assert_close(schedule.flow_sigma(t), scheduler.sigmas[:-1].double(), rtol=1e-6, atol=1e-7)
    offset = schedule.model_timestep(t) - scheduler.timesteps.double()
    assert bool(((offset >= 0) & (offset < 1)).all()), f"network timesteps differ: {offset}"

    net = TinyNet()

    def velocity(x, sigma):
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1)[0]
        if denoiser_kind == "analytic":
            return MIXTURE.denoiser_output(x.double(), 1 - sigma, sigma, "flow")
        return net(x, sigma)

    x = start_noise(2)
    theirs = []
    for i, timestep in enumerate(scheduler.timesteps):
        theirs.append(x)
        x = scheduler.step(velocity(x, scheduler.sigmas[i].double()), timestep, x).prev_sample
    theirs.append(x)
    ours = []
    final = sample_dpmpp_2m(
        lambda x, t: velocity(x, schedule.flow_sigma(t)), start_noise(2), grid, schedule, "flow", callback=lambda i, x, x0: ours.append(x)
    )
    ours.append(final)
    for i, (mine, reference) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(mine, reference.double(), rtol=2e-5, atol=2e-5, msg=f"point {i}")


@pytest.mark.parametrize("solver", ["ddim", "dpmsolver"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps_offset", [0, 1])
def test_diffusers_grid_equals_set_timesteps(solver, spacing, steps_offset):
    make = DDIMScheduler if solver == "ddim" else DPMSolverMultistepScheduler
    scheduler = make(**SD15, timestep_spacing=spacing, steps_offset=steps_offset)
    for num_steps in range(1, 9):
        scheduler.set_timesteps(num_steps)
        assert diffusers_grid(num_steps, spacing, steps_offset=steps_offset, solver=solver) == scheduler.timesteps.tolist(), (
            f"K={num_steps}"
        )


def test_diffusers_grid_rejects_bad_arguments_clearly():
    with pytest.raises(ValueError, match="spacing 'uniform'"):
        diffusers_grid(4, "uniform")
    with pytest.raises(ValueError, match="solver 'euler'"):
        diffusers_grid(4, solver="euler")
    with pytest.raises(ValueError, match="K=0"):
        diffusers_grid(0)
