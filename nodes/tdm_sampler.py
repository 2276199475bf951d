"""The TDM SAMPLER: ComfyUI's sampler interface over ``tdm_core.sample_tdm`` / ``sample_dpmpp_2m``."""
from __future__ import annotations

from typing import Callable, Optional

import torch

import comfy.model_management
import comfy.samplers

from .comfy_sigmas import check_supported_sampling, is_flow_sampling
from .core_import import tdm_core

SOLVERS = ("tdm", "dpmpp_2m")
NOISE_STARTS = ("reference", "comfy")


def is_empty_latent(latent_image: Optional[torch.Tensor]) -> bool:
    return latent_image is None or torch.count_nonzero(latent_image) == 0


def starting_point(model_sampling, sigma0: torch.Tensor, noise: torch.Tensor, latent_image: torch.Tensor, noise_start: str, max_denoise: bool) -> torch.Tensor:
    # METHOD.md: the TDM reference feeds pure N(0, I) noise as x_{t0}; ComfyUI's coordinates are
    # x = x0 + sigma*eps (VP, network input x*a) and x = (1-s) x0 + s*noise (flow), where it would scale
    # noise by sigma. So for txt2img ("reference", empty latent) VP starts at noise / a(t0) = noise *
    # sqrt(1 + sigma0^2) (the network then sees exactly the noise) and flow at the noise itself;
    # img2img (non-empty latent) and noise_start="comfy" use ComfyUI's own noise_scaling.
    if noise_start == "reference" and is_empty_latent(latent_image):
        if is_flow_sampling(model_sampling):
            return noise.clone()
        return noise * torch.sqrt(1.0 + sigma0.to(noise) ** 2)
    return model_sampling.noise_scaling(sigma0, noise, latent_image, max_denoise)


def check_sigmas(sigmas: torch.Tensor, solver: str, gamma: float = 0.0) -> None:
    if sigmas.ndim != 1 or sigmas.shape[0] < 2:
        raise ValueError(f"TDM Sampler needs at least one step (2 sigmas), got {tuple(sigmas.shape)}: connect a TDM Scheduler with steps >= 1 and denoise > 0")
    if float(sigmas[-1]) != 0.0 and solver != "tdm":
        raise ValueError(f"the {solver} solver needs sigmas that end at 0 (its multistep history would be lost at a split): "
                         "use the tdm solver for a TDM Scheduler's sigmas split across two models (SplitSigmas)")
    if float(sigmas[-1]) != 0.0 and gamma > 0.0:
        raise ValueError(f"gamma={gamma} with sigmas that end above 0 (a SplitSigmas part): each sampler re-seeds its "
                         "noise from the seed, so the next part would draw the same noise again: set gamma to 0 for split sampling")
    if any(float(b) >= float(a) for a, b in zip(sigmas[:-1], sigmas[1:])):
        raise ValueError(f"TDM Sampler needs strictly decreasing sigmas, got {[round(float(s), 4) for s in sigmas]}")


class TDMSamplerObject(comfy.samplers.Sampler):
    """What TDMSampler outputs: ComfyUI calls :meth:`sample` with the raw noise and latent."""

    def __init__(self, solver: str = "tdm", gamma: float = 0.0, noise_start: str = "reference"):
        if solver not in SOLVERS:
            raise ValueError(f"unknown TDM solver {solver!r}: use one of {', '.join(SOLVERS)}")
        if noise_start not in NOISE_STARTS:
            raise ValueError(f"unknown noise_start {noise_start!r}: use one of {', '.join(NOISE_STARTS)}")
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma={gamma} must be in [0, 1] (0: deterministic TDM)")
        if gamma > 0.0 and solver != "tdm":
            raise ValueError(f"gamma={gamma} re-noises TDM steps and has no meaning for {solver}: set gamma to 0 or pick the tdm solver")
        self.solver, self.gamma, self.noise_start = solver, float(gamma), noise_start

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None, disable_pbar=False):
        check_sigmas(sigmas, self.solver, self.gamma)
        model_sampling = model_wrap.inner_model.model_sampling
        check_supported_sampling(model_sampling)
        if latent_image is None:
            latent_image = torch.zeros_like(noise)
        extra_args["denoise_mask"] = denoise_mask
        model_k = comfy.samplers.KSamplerX0Inpaint(model_wrap, sigmas)  # ComfyUI's inpainting-mask wrapper
        model_k.latent_image, model_k.noise = latent_image, noise
        x = starting_point(model_sampling, sigmas[0], noise, latent_image, self.noise_start, self.max_denoise(model_wrap, sigmas))
        denoise = interruptible_denoiser(model_k, extra_args)
        step_callback = progress_callback(callback, len(sigmas) - 1, disable_pbar)
        schedule = tdm_core.FlowSigmaSchedule() if is_flow_sampling(model_sampling) else tdm_core.SigmaKSchedule()
        timesteps = [float(s) for s in sigmas[:-1]]
        end = float(sigmas[-1]) or None  # a split (SplitSigmas): the last step goes to the split's sigma, the next sampler goes on from there
        if self.solver == "dpmpp_2m":
            samples = tdm_core.sample_dpmpp_2m(denoise, x, timesteps, schedule, "sample", callback=step_callback)
        else:
            generator = torch.Generator(device=x.device).manual_seed(int(extra_args.get("seed") or 0)) if self.gamma > 0 else None
            samples = tdm_core.sample_tdm(denoise, x, timesteps, schedule, "sample", self.gamma, generator, step_callback, end)
        return model_sampling.inverse_noise_scaling(sigmas[-1], samples)


def interruptible_denoiser(model_k, extra_args: dict) -> Callable:
    """ComfyUI's denoiser (returns x0 in ComfyUI coordinates, prediction type "sample"); Cancel is
    honoured before every model call."""

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        comfy.model_management.throw_exception_if_processing_interrupted()
        return model_k(x, sigma.to(device=x.device, dtype=torch.float32), **extra_args)

    return denoise


def progress_callback(callback, total_steps: int, disable_pbar: bool):
    """tdm_core's ``(i, x, x0_hat)`` callback -> ComfyUI's ``(step, x0, x, total_steps)`` previewer
    (which also drives the UI progress bar) and a console bar unless ``disable_pbar``."""
    bar = None
    if not disable_pbar:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, desc="TDM")

    def on_step(i: int, x: torch.Tensor, x0_hat: torch.Tensor) -> None:
        if callback is not None:
            callback(i, x0_hat, x, total_steps)
        if bar is not None:
            bar.update(1)
            if i == total_steps - 1:
                bar.close()

    return on_step
