"""Sampling glue shared by TDMKSampler and the SamplerCustom path (one code path, same results)."""
from __future__ import annotations

from typing import Optional

import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview

from .comfy_sigmas import tdm_info_of, tdm_sigmas
from .tdm_sampler import TDMSamplerObject


def tdm_ksample(model, seed: int, steps: int, grid: str, cfg: float, positive, negative: Optional[list], latent: dict, denoise: float, custom_timesteps: str = "") -> dict:
    """What SamplerCustom(add_noise, seed, cfg, TDMSampler(solver, 0, reference), TDMScheduler(...)) does, with the
    solver the LoRA's TDM metadata names (tdm unless it is a release sampled with DPM-Solver++) and the negative
    prompt optional at cfg 1 (guidance is distilled into TDM students)."""
    if negative is None and abs(cfg - 1.0) > 1e-9:
        raise ValueError(f"TDM KSampler with cfg={cfg} needs a negative prompt: connect 'negative' or set cfg to 1 (TDM students are distilled for cfg 1)")
    sigmas = tdm_sigmas(model, steps, grid, custom_timesteps, denoise)
    latent_image = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    callback = latent_preview.prepare_callback(model, sigmas.shape[-1] - 1)
    disable_pbar = not comfy.utils.PROGRESS_BAR_ENABLED
    info = tdm_info_of(model)
    sampler = TDMSamplerObject(info.solver if info is not None else "tdm")  # the released SD1.5/SD3 LoRAs: DPM-Solver++
    guider = comfy.samplers.CFGGuider(model)
    # at cfg 1 ComfyUI never evaluates the negative, so a guider without one samples identically
    guider.inner_set_conds({"positive": positive} if negative is None else {"positive": positive, "negative": negative})
    guider.set_cfg(cfg)
    samples = guider.sample(noise, latent_image, sampler, sigmas, denoise_mask=latent.get("noise_mask"), callback=callback, disable_pbar=disable_pbar, seed=seed)
    out = latent.copy()
    out["samples"] = samples.to(comfy.model_management.intermediate_device())
    return out
