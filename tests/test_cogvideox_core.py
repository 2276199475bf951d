"""What the video families rely on in tdm_core: 5-D latents (batch, channels, frames, height, width) go through the
student sampler and the whole TDM iteration (roll-out, fake-score and student losses, CFG, pseudo-Huber, min-SNR
weights) exactly as the same numbers laid out 4-D, on CogVideoX's own zero-terminal-SNR v-prediction schedule."""
from __future__ import annotations

import json

import pytest
import torch

from tdm_core import sample_tdm
from tdm_core.iteration import FAKE_SCORE, STUDENT, TDMDenoisers, TDMSettings, tdm_iteration
from tests.helpers.core_updates import recording_updates
from tdm_core.schedules import VPSchedule
from tests.helpers.tiny_cogvideox import SHIPPED

GRID = (999, 856, 665, 399)
VIDEO = (2, 4, 3, 4, 6)  # (B, C, F', H, W)


def cogvideox_schedule() -> VPSchedule:
    from diffusers import CogVideoXDDIMScheduler

    config = json.loads((SHIPPED / "scheduler" / "scheduler_config.json").read_text())
    return VPSchedule(CogVideoXDDIMScheduler.from_config(config).alphas_cumprod.double())


def elementwise(weight: torch.Tensor, bias: float):
    """A denoiser acting element by element (so any layout of the same numbers gives the same numbers), t-dependent."""
    return lambda x, t: torch.tanh(weight * x + bias * (t.reshape(-1, *[1] * (x.ndim - 1)) / 1000))


def run(shape, distance: str):
    schedule = cogvideox_schedule()
    student_w = torch.nn.Parameter(torch.tensor(0.7))
    fake_w = torch.nn.Parameter(torch.tensor(0.9))
    teacher = lambda x, t: (elementwise(torch.tensor(1.1), 0.3)(x, t), elementwise(torch.tensor(0.8), -0.2)(x, t))
    denoisers = TDMDenoisers(student=elementwise(student_w, 0.5), fake_score=elementwise(fake_w, 0.1), teacher=teacher)
    settings = TDMSettings(grid=GRID, prediction_type="v_prediction", cfg_scale=3.0, distance=distance)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(VIDEO, generator=gen).reshape(shape)
    updates, handed = recording_updates()
    losses = tdm_iteration(denoisers, schedule, settings, noise, gen, updates)
    (fake_grad,) = torch.autograd.grad(handed[FAKE_SCORE][0], fake_w)
    (student_grad,) = torch.autograd.grad(handed[STUDENT][0], student_w)
    sample = sample_tdm(elementwise(torch.tensor(0.7), 0.5), noise, list(GRID), schedule, "v_prediction")
    return [losses.fake_score, losses.student, fake_grad, student_grad], sample.reshape(VIDEO)


@pytest.mark.parametrize("distance", ["huber", "huber_norm", "l2"])
def test_video_latents_run_the_iteration_as_the_same_numbers_in_4d(distance):
    video, video_sample = run(VIDEO, distance)
    flat, flat_sample = run((VIDEO[0], VIDEO[1] * VIDEO[2], VIDEO[3], VIDEO[4]), distance)
    for a, b in zip(video, flat):
        assert torch.isfinite(a) and a.abs() > 0
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(video_sample, flat_sample)
