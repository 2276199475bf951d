"""A tiny diffusers UNet + random PEFT LoRA, converted to ComfyUI (base weights through ComfyUI's key
map, the LoRA through the TDM LoRA Loader): ComfyUI sampling == the diffusers reference, for the LoRA
saved in PEFT (diffusers writer), kohya (the trainer's export) and ComfyUI layouts."""
from __future__ import annotations

import pytest
import torch

from tdm_core.metadata import TDMInfo
from tests.helpers import comfy_inprocess as h

SEED = 7


@pytest.fixture(scope="module")
def setup(comfy, pack, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    h.set_lora_folder(folder)
    unet = h.tiny_diffusers_unet(seed=3)
    base = h.build_model("sd15_eps", diffusion_state_dict=h.comfy_unet_from_diffusers(unet))
    peft_state = h.add_random_peft_lora(unet, seed=4)
    info = TDMInfo(num_steps=4, grid=[999, 749, 499, 249], base_family="sd15", lora_rank=h.LORA_RANK, lora_alpha=h.LORA_ALPHA)
    files = {
        "peft": h.write_peft_lora(folder, "tiny_peft.safetensors", unet, peft_state),
        "kohya": h.write_safetensors(folder, "tiny_kohya.safetensors", h.kohya_state(peft_state), info.to_safetensors_metadata()),
        "comfy": h.write_safetensors(folder, "tiny_comfy.safetensors", h.comfy_layout_state(peft_state)),
    }
    return {"unet": unet, "base": base, "files": files, "folder": folder}


def load(model, name):
    from comfyui_tdm_pack.nodes.node_defs import TDMLoraLoader

    return TDMLoraLoader.execute(model, name, 1.0, True, 1.0).result[0]


def empty_latent(batch=2):
    return {"samples": torch.zeros(batch, 4, 8, 8)}


def comfy_noise(latent):
    import comfy.sample

    return comfy.sample.prepare_noise(latent["samples"], SEED)


SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading")


def ddim(spacing):
    from diffusers import DDIMScheduler

    s = DDIMScheduler(**{**SD15_SCHEDULER, "timestep_spacing": spacing}, set_alpha_to_one=True, clip_sample=False)
    s.set_timesteps(4)
    return s


def dpmsolver():
    from diffusers import DPMSolverMultistepScheduler

    s = DPMSolverMultistepScheduler(**SD15_SCHEDULER)
    s.set_timesteps(4)
    return s


@pytest.mark.parametrize("layout, grid", [("peft", "diffusers_trailing"), ("kohya", "diffusers_trailing"), ("comfy", "diffusers_trailing"), ("kohya", "diffusers_leading")])
def test_tdm_ksampler_with_lora_matches_diffusers_ddim(setup, layout, grid):
    from comfyui_tdm_pack.nodes.node_defs import TDMKSampler

    model = load(setup["base"], setup["files"][layout])
    cond = h.conditioning("sd15_eps", batch=2)
    latent = empty_latent()
    got = TDMKSampler.execute(model, SEED, 4, grid, 1.0, cond, latent, 1.0).result[0]["samples"]

    scheduler = ddim(grid.split("_")[1])
    expected = h.diffusers_unet_sample(setup["unet"], scheduler, comfy_noise(latent), cond[0][0])
    expected = setup["base"].model.process_latent_out(expected)
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)


def test_lora_changes_the_sample_and_layouts_agree_exactly(setup):
    from comfyui_tdm_pack.nodes.node_defs import TDMKSampler

    cond = h.conditioning("sd15_eps", batch=2)
    outs = {}
    for layout, name in setup["files"].items():
        outs[layout] = TDMKSampler.execute(load(setup["base"], name), SEED, 4, "reference", 1.0, cond, empty_latent(), 1.0).result[0]["samples"]
    without = TDMKSampler.execute(setup["base"], SEED, 4, "reference", 1.0, cond, empty_latent(), 1.0).result[0]["samples"]
    torch.testing.assert_close(outs["peft"], outs["kohya"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs["comfy"], outs["kohya"], rtol=1e-5, atol=1e-5)
    assert (outs["kohya"] - without).abs().max() > 1e-2


def test_dpmsolver_preset_matches_diffusers_dpmsolver_multistep(setup):
    """The released SD1.5 preset: TDM Scheduler(dpmsolver_leading_sd15) + TDM Sampler(dpmpp_2m)."""
    import comfy.sample

    from comfyui_tdm_pack.nodes.node_defs import TDMSampler, TDMScheduler

    model = load(setup["base"], setup["files"]["kohya"])
    cond = h.conditioning("sd15_eps", batch=2)
    latent = empty_latent()
    sigmas = TDMScheduler.execute(model, 4, "dpmsolver_leading_sd15", "", 1.0).result[0]
    sampler = TDMSampler.execute("dpmpp_2m", 0.0, "reference").result[0]
    noise = comfy_noise(latent)
    got = comfy.sample.sample_custom(model, noise, 1.0, sampler, sigmas, cond, cond, latent["samples"], disable_pbar=True, seed=SEED)

    scheduler = dpmsolver()
    ms = model.get_model_object("model_sampling")
    torch.testing.assert_close(sigmas[:-1], ms.sigma(scheduler.timesteps.float()))  # same grid as diffusers picks
    expected = setup["base"].model.process_latent_out(h.diffusers_unet_sample(setup["unet"], scheduler, noise, cond[0][0]))
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)


def test_stock_comfyui_skips_plain_peft_attention_keys_but_tdm_loader_does_not(setup):
    """Why the loader renames PEFT keys: ComfyUI's own loader patches fewer layers from the same file."""
    import comfy.sd
    import comfy.utils

    path = setup["folder"] / setup["files"]["peft"]
    stock, _ = comfy.sd.load_lora_for_models(setup["base"], None, comfy.utils.load_torch_file(str(path)), 1.0, 0.0)
    ours = load(setup["base"], setup["files"]["peft"])
    assert len(ours.patches) > len(stock.patches)
    assert not any(".attn1." in k or ".attn2." in k for k in stock.patches)
    assert any(".attn1.to_q." in k for k in ours.patches)
