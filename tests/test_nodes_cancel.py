"""Cancel (ComfyUI's interrupt flag, what POST /interrupt sets) stops the TDM Sampler between model calls."""
from __future__ import annotations

import pytest
import torch

from tests.helpers import comfy_inprocess as h


def counting(model):
    """A clone of ``model`` whose network calls are counted (ComfyUI's unet function wrapper)."""
    calls = []

    def wrapper(apply_model, args):
        calls.append(float(args["timestep"][0]))
        return apply_model(args["input"], args["timestep"], **args["c"])

    clone = model.clone()
    clone.set_model_unet_function_wrapper(wrapper)
    return clone, calls


@pytest.mark.parametrize("solver", ["tdm", "dpmpp_2m"])
def test_interrupt_during_sampling_stops_before_the_next_model_call(pack, tiny_model, solver):
    import comfy.model_management
    import comfy.sample

    from comfyui_tdm_pack.nodes.node_defs import TDMSampler, TDMScheduler

    model, calls = counting(tiny_model("sd15_eps"))
    cond = h.conditioning("sd15_eps")
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sigmas = TDMScheduler.execute(model, 4, "reference", "", 1.0).result[0]
    sampler = TDMSampler.execute(solver, 0.0, "reference").result[0]
    previews = []

    def press_cancel_after_second_step(step, x0, x, total_steps):
        previews.append((step, total_steps, x0.shape))
        if step == 1:
            comfy.model_management.interrupt_current_processing(True)

    with pytest.raises(comfy.model_management.InterruptProcessingException):
        comfy.sample.sample_custom(model, noise, 1.0, sampler, sigmas, cond, cond, torch.zeros_like(noise), callback=press_cancel_after_second_step, disable_pbar=True, seed=0)
    assert len(calls) == 2
    assert [p[:2] for p in previews] == [(0, 4), (1, 4)] and previews[0][2] == noise.shape
    assert not comfy.model_management.processing_interrupted()  # ComfyUI clears the flag when it raises

    calls.clear()
    comfy.sample.sample_custom(model, noise, 1.0, sampler, sigmas, cond, cond, torch.zeros_like(noise), disable_pbar=True, seed=0)
    assert len(calls) == 4  # the next prompt runs normally
