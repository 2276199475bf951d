"""A Flux.1 TDM LoRA from the trainer's export, loaded by the TDM LoRA Loader onto a Flux built by ComfyUI's
own classes and sampled by the TDM Scheduler + TDM Sampler through ComfyUI's sampling path, equals the
trainer-side student sampled by tdm_core on the diffusers model, when ComfyUI's ModelSamplingFlux node is
set to the training resolution (the shift then agrees) and the guidance to the distilled one."""
from __future__ import annotations

import math

import pytest
import torch

import tdm_core
from tests.helpers import comfy_inprocess
from tests.helpers.tiny_models import comfy_model_from_diffusers_transformer, save_tiny_pipeline

torch.set_num_threads(1)
RESOLUTION = 32  # pixels of the tiny VAE (2x): 16x16 latents, 8x8 = 64 Flux tokens
GUIDANCE = 3.5


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """The trainer's Flux family with a non-zero student adapter, and its exported LoRA."""
    from tdm_core.metadata import TDMInfo
    from training.lora_io import export_student_lora
    from training.models import STUDENT, adapter_parameters, add_tdm_adapters, load_family

    root = tmp_path_factory.mktemp("flux_nodes")
    family = load_family(str(save_tiny_pipeline("flux", root / "flux")))
    family.set_resolution(RESOLUTION)
    assert family.apply_guidance(GUIDANCE) == 1.0
    add_tdm_adapters(family, rank=4, alpha=4.0)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in adapter_parameters(family.network, STUDENT):
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    grid = tdm_core.reference_grid(4, 900)
    info = TDMInfo(num_steps=4, grid=grid, total_steps=900, prediction_type="flow", base_family="flux", teacher_cfg=GUIDANCE,
                   flow_shift=family.schedule.shift)
    lora = export_student_lora(family, root / "loras" / "flux_tdm.safetensors", info)
    return family, lora, grid


def comfy_flux_with_lora(family, lora):
    """ComfyUI's Flux holding the diffusers teacher's weights, with ``lora`` put on by the TDM LoRA Loader."""
    import comfy.model_management
    import comfy.model_patcher
    from diffusers import FluxTransformer2DModel

    from comfyui_tdm_pack.nodes.node_defs import TDMLoraLoader

    base, _ = comfy_model_from_diffusers_transformer(
        FluxTransformer2DModel.from_pretrained(str(family.source_path) + "/transformer"), "flux")
    model = comfy.model_patcher.ModelPatcher(base, load_device=comfy.model_management.get_torch_device(),
                                             offload_device=comfy.model_management.unet_offload_device())
    comfy_inprocess.set_lora_folder(lora.parent)
    return TDMLoraLoader.execute(model, lora.name, 1.0, True, 1.0).result[0]


def test_tdm_nodes_on_flux_sample_what_the_trainer_sampled(pack, student):
    import comfy.sample
    from comfy_extras.nodes_model_advanced import ModelSamplingFlux

    from comfyui_tdm_pack.nodes.node_defs import TDMSampler, TDMScheduler
    from training.models import STUDENT, use_adapter

    family, lora, grid = student
    model = comfy_flux_with_lora(family, lora)
    base = model.model
    # ComfyUI counts tokens as width * height / 256 (an 8x VAE); 128 x 128 gives the tiny model's 64 tokens
    model = ModelSamplingFlux().patch(model, 1.15, 0.5, 128, 128)[0]
    assert math.exp(model.get_model_object("model_sampling").shift) == pytest.approx(family.schedule.shift)

    prompts = ["a red cat", "a blue dog"]
    cond = family.encode_prompts(prompts)
    conditioning = [[cond["encoder_hidden_states"], {"pooled_output": cond["pooled_projections"], "guidance": GUIDANCE}]]
    noise = torch.randn(family.latent_shape(2, RESOLUTION), generator=torch.Generator().manual_seed(9))
    sigmas = TDMScheduler.execute(model, 4, "auto", "", 1.0).result[0]
    sampler = TDMSampler.execute("tdm", 0.0, "reference").result[0]
    got = comfy.sample.sample_custom(model, noise, 1.0, sampler, sigmas, conditioning, conditioning, torch.zeros_like(noise),
                                     disable_pbar=True, seed=0)

    with torch.no_grad(), use_adapter(family.network, STUDENT):
        expected = tdm_core.sample_tdm(lambda x, t: family.denoise(x, t, cond), noise, grid, family.schedule, "flow")
        with use_adapter(family.network, None):
            teacher_four = tdm_core.sample_tdm(lambda x, t: family.denoise(x, t, cond), noise, grid, family.schedule, "flow")
    expected = base.process_latent_out(expected)  # ComfyUI returns latents in its outward (Flux VAE) scale
    assert (expected - base.process_latent_out(teacher_four)).abs().max() > 1e-2  # the LoRA changes the samples
    torch.testing.assert_close(got, expected, rtol=5e-4, atol=5e-4)


def test_tdm_scheduler_says_when_the_model_samples_at_another_shift_than_the_lora_learnt(pack, student, caplog):
    from comfy_extras.nodes_model_advanced import ModelSamplingFlux

    from comfyui_tdm_pack.nodes.node_defs import TDMScheduler

    family, lora, _ = student
    model = comfy_flux_with_lora(family, lora)
    with caplog.at_level("WARNING"):
        TDMScheduler.execute(ModelSamplingFlux().patch(model, 1.15, 0.5, 128, 128)[0], 4, "auto", "", 1.0)
    assert "flow shift" not in caplog.text  # the training size: no word
    with caplog.at_level("WARNING"):
        TDMScheduler.execute(ModelSamplingFlux().patch(model, 1.15, 0.5, 1024, 1024)[0], 4, "auto", "", 1.0)
    assert "samples with flow shift 3.16 but its TDM LoRA was trained at 1.6" in caplog.text
    assert "ModelSamplingFlux's width and height" in caplog.text
