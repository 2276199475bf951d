"""TDM Sampler through ComfyUI's real sampling path == tdm_core's samplers on the bare network in the
model's native coordinates (VP eps, VP v, rectified flow), which checks the noise convention too."""
from __future__ import annotations

import math

import pytest
import torch

import tdm_core
from tests.helpers import comfy_inprocess

KINDS = ["sd15_eps", "sd15_v", "sd3_flow", "flux"]
PREDICTION = {"sd15_eps": "epsilon", "sd15_v": "v_prediction", "sd3_flow": "flow", "flux": "flow"}


def native_schedule(kind: str):
    if kind == "sd3_flow":
        return tdm_core.FlowSchedule(shift=3.0)  # SD3's default shift in ComfyUI's supported_models
    if kind == "flux":  # ComfyUI's ModelSamplingFlux default mu = 1.15: the trainer's shift at 1024 px
        return tdm_core.FlowSchedule(shift=math.exp(1.15))
    return tdm_core.VPSchedule.from_config("scaled_linear", 0.00085, 0.012)


def comfy_sample(model, sampler, sigmas, noise, cond, latent=None):
    import comfy.sample

    latent = torch.zeros_like(noise) if latent is None else latent
    return comfy.sample.sample_custom(model, noise, 1.0, sampler, sigmas, cond, cond, latent, disable_pbar=True, seed=0)


def start_noise(kind: str, seed: int = 3, batch: int = 2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, comfy_inprocess.latent_channels(kind), 8, 8, generator=g)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("solver", ["tdm", "dpmpp_2m"])
def test_tdm_sampler_matches_tdm_core_on_native_coordinates(pack, tiny_model, kind, solver):
    from comfyui_tdm_pack.nodes.node_defs import TDMSampler, TDMScheduler

    model = tiny_model(kind)
    cond = comfy_inprocess.conditioning(kind, batch=2)
    noise = start_noise(kind)
    sigmas = TDMScheduler.execute(model, 4, "reference", "", 1.0).result[0]
    sampler = TDMSampler.execute(solver, 0.0, "reference").result[0]
    got = comfy_sample(model, sampler, sigmas, noise, cond)

    schedule = native_schedule(kind)
    denoise = comfy_inprocess.raw_denoiser(model, kind, cond, schedule)
    grid = tdm_core.reference_grid(4, 900)
    run = tdm_core.sample_tdm if solver == "tdm" else tdm_core.sample_dpmpp_2m
    with torch.no_grad():
        expected = run(denoise, noise, grid, schedule, PREDICTION[kind])
    expected = model.model.process_latent_out(expected)  # ComfyUI returns latents in its outward scale

    assert got.shape == expected.shape
    assert expected.abs().mean() > 0.05  # a real, non-trivial sample
    torch.testing.assert_close(got, expected, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("kind", ["sd15_eps", "sd3_flow"])
def test_noise_start_comfy_differs_and_follows_comfy_scaling(pack, tiny_model, kind):
    """noise_start=comfy starts from ComfyUI's own noise_scaling (sigma * noise), not the reference."""
    from comfyui_tdm_pack.nodes.node_defs import TDMSampler, TDMScheduler

    model = tiny_model(kind)
    cond = comfy_inprocess.conditioning(kind)
    noise = start_noise(kind, batch=1)
    sigmas = TDMScheduler.execute(model, 2, "reference", "", 1.0).result[0]
    reference = comfy_sample(model, TDMSampler.execute("tdm", 0.0, "reference").result[0], sigmas, noise, cond)
    comfy_start = comfy_sample(model, TDMSampler.execute("tdm", 0.0, "comfy").result[0], sigmas, noise, cond)

    schedule = tdm_core.FlowSigmaSchedule() if kind == "sd3_flow" else tdm_core.SigmaKSchedule()
    model_sampling = model.get_model_object("model_sampling")

    def comfy_denoiser(x, sigma):  # ComfyUI's x0 prediction, as the sampler sees it
        return model.model.apply_model(x, sigma.float(), c_crossattn=cond[0][0], y=cond[0][1].get("pooled_output"))

    x_start = model_sampling.noise_scaling(sigmas[0], noise, torch.zeros_like(noise), False)
    with torch.no_grad():
        expected = tdm_core.sample_tdm(comfy_denoiser, x_start, [float(s) for s in sigmas[:-1]], schedule, "sample")
    torch.testing.assert_close(comfy_start, model.model.process_latent_out(expected), rtol=2e-4, atol=2e-4)
    assert (comfy_start - reference).abs().max() > 1e-3


def test_gamma_renoises_reproducibly(pack, tiny_model):
    """gamma > 0 is stochastic per seed: same seed, same latents; gamma 0 differs from gamma 0.5."""
    import comfy.sample

    from comfyui_tdm_pack.nodes.node_defs import TDMSampler, TDMScheduler

    model = tiny_model("sd15_eps")
    cond = comfy_inprocess.conditioning("sd15_eps")
    noise = start_noise("sd15_eps", batch=1)
    sigmas = TDMScheduler.execute(model, 4, "reference", "", 1.0).result[0]
    stochastic = TDMSampler.execute("tdm", 0.5, "reference").result[0]

    def run(sampler, seed):
        return comfy.sample.sample_custom(model, noise, 1.0, sampler, sigmas, cond, cond, torch.zeros_like(noise), disable_pbar=True, seed=seed)

    a, b, c = run(stochastic, 5), run(stochastic, 5), run(stochastic, 6)
    deterministic = run(TDMSampler.execute("tdm", 0.0, "reference").result[0], 5)
    torch.testing.assert_close(a, b)
    assert (a - c).abs().max() > 1e-3
    assert (a - deterministic).abs().max() > 1e-3
    with pytest.raises(ValueError, match="set gamma to 0"):
        TDMSampler.execute("dpmpp_2m", 0.5, "reference")
