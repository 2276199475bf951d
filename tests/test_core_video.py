"""tdm_core on video latents, (batch, channels, frames, height, width): every kernel works per element with per-sample
coefficients, so a 5-D batch must give exactly what the same numbers laid out flat as (batch, dim) give. Checked on
the closed-form Gaussian denoisers of tests/test_iteration_analytic.py (the whole TDM iteration: roll-out, fake-score
and student losses, and the student's gradient) and on the samplers, VP and flow."""
from __future__ import annotations

import pytest
import torch

from tdm_core import FlowSchedule, sample_dpmpp_2m, sample_tdm
from tdm_core.iteration import STUDENT, TDMDenoisers, TDMSettings, tdm_iteration
from tests.helpers.core_updates import recording_updates
from tests.test_iteration_analytic import GRID, SCHEDULE, posterior_x0

VIDEO = (3, 4, 5, 6, 6)  # B, C, F, H, W: 4 channels, 5 latent frames
FLAT = (VIDEO[0], 4 * 5 * 6 * 6)


def gaussian_denoisers(mean: torch.Tensor, shape):
    """Student, fake score and teacher as exact posterior denoisers of N(mean, VAR I), evaluated on flat views so the
    reference itself never sees the layout (the mean has the flat layout's dim)."""
    def x0_of(m):
        return lambda x, t: posterior_x0(m, x.reshape(FLAT).double(), t.long()).reshape(x.shape).to(x.dtype)

    teacher_mean = torch.zeros_like(mean)
    return TDMDenoisers(student=x0_of(mean), fake_score=x0_of(mean.detach() * 0.5),
                        teacher=lambda x, t: (x0_of(teacher_mean)(x, t), x0_of(teacher_mean + 0.3)(x, t)))


def run_iteration(shape, seed=0):
    mean = torch.linspace(-1, 1, FLAT[1], dtype=torch.float64).requires_grad_(True)
    denoisers = gaussian_denoisers(mean, shape)
    settings = TDMSettings(grid=GRID, prediction_type="sample", cfg_scale=2.0, distance="huber")
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(FLAT, generator=torch.Generator().manual_seed(1), dtype=torch.float64).reshape(shape)
    updates, handed = recording_updates()
    losses = tdm_iteration(denoisers, SCHEDULE, settings, noise, generator, updates)
    handed[STUDENT][0].backward()
    return float(losses.fake_score), float(losses.student), mean.grad.clone()


def test_one_tdm_iteration_on_video_latents_equals_the_flat_layout():
    video, flat = run_iteration(VIDEO), run_iteration(FLAT)
    assert video[0] == pytest.approx(flat[0], rel=1e-6) and video[1] == pytest.approx(flat[1], rel=1e-6)
    assert video[2].abs().max() > 0  # the student is really trained by it
    torch.testing.assert_close(video[2], flat[2], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("schedule, prediction", [(SCHEDULE, "epsilon"), (FlowSchedule(shift=3.0), "flow")])
def test_samplers_on_video_latents_equal_the_flat_layout(schedule, prediction):
    generator = torch.Generator().manual_seed(2)
    noise = torch.randn(FLAT, generator=generator, dtype=torch.float64)
    weights = torch.randn(FLAT[1], generator=generator, dtype=torch.float64) * 0.1

    def denoise(x, t):  # an elementwise model whose output depends on t per sample
        flat = x.reshape(FLAT)
        return (torch.tanh(flat * (1 + weights)) * (t.reshape(-1, 1) / 1000)).reshape(x.shape)

    for sampler in (sample_tdm, sample_dpmpp_2m):
        grid = [999, 749, 499, 249]
        video = sampler(denoise, noise.reshape(VIDEO), grid, schedule, prediction)
        assert video.shape == VIDEO
        torch.testing.assert_close(video.reshape(FLAT), sampler(denoise, noise, grid, schedule, prediction), rtol=0, atol=1e-12)
