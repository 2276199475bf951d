"""A Z-Image TDM LoRA from the trainer's export, loaded by the TDM LoRA Loader onto ComfyUI's own Lumina2 (ZImage
config) holding the diffusers teacher's weights, sampled by TDM Scheduler + TDM Sampler (and the TDM KSampler)
through ComfyUI's sampling path at the model's own model_sampling (ModelSamplingDiscreteFlow, multiplier 1,
shift 3), equals the trainer-side student sampled by tdm_core on the diffusers model; another shift set with
ModelSamplingAuraFlow gets a warning that names that node."""
from __future__ import annotations

import pytest
import torch

import tdm_core
from tests.helpers import comfy_inprocess
from tests.helpers.tiny_zimage import comfy_zimage_model, save_tiny_zimage

torch.set_num_threads(1)
RESOLUTION = 32
PROMPTS = ["a red cat", "a big dog"]  # 28 caption tokens each, padded to 32 by both models (see test_z_image_lora)
CAPTION = 28


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    from tdm_core.metadata import TDMInfo
    from training.lora_io import export_student_lora
    from training.models import STUDENT, adapter_parameters, add_tdm_adapters, load_family

    root = tmp_path_factory.mktemp("z_image_nodes")
    family = load_family(str(save_tiny_zimage(root / "z_image", comfy_twin=True)))
    family.set_resolution(RESOLUTION)
    assert family.apply_guidance(1.0) == 1.0
    add_tdm_adapters(family, rank=4, alpha=4.0)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in adapter_parameters(family.network, STUDENT):
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    grid = tdm_core.reference_grid(4, 900)
    info = TDMInfo(num_steps=4, grid=grid, total_steps=900, prediction_type="flow", base_family="z_image", teacher_cfg=1.0,
                   flow_shift=family.schedule.shift)
    lora = export_student_lora(family, root / "loras" / "z_image_tdm.safetensors", info)
    return family, lora, grid


def comfy_zimage_with_lora(family, lora):
    import comfy.model_management
    import comfy.model_patcher
    from diffusers import ZImageTransformer2DModel

    from comfyui_tdm_pack.nodes.node_defs import TDMLoraLoader

    base = comfy_zimage_model(ZImageTransformer2DModel.from_pretrained(str(family.source_path) + "/transformer"))
    model = comfy.model_patcher.ModelPatcher(base, load_device=comfy.model_management.get_torch_device(),
                                             offload_device=comfy.model_management.unet_offload_device())
    comfy_inprocess.set_lora_folder(lora.parent)
    return TDMLoraLoader.execute(model, lora.name, 1.0, True, 1.0).result[0]


@pytest.fixture(scope="module")
def comfy_model(pack, student):
    family, lora, _ = student
    return comfy_zimage_with_lora(family, lora)


def test_tdm_nodes_on_z_image_sample_what_the_trainer_sampled(comfy_model, student):
    import comfy.model_sampling
    import comfy.sample

    from comfyui_tdm_pack.nodes.node_defs import TDMKSampler, TDMSampler, TDMScheduler
    from training.models import STUDENT, use_adapter

    family, _, grid = student
    sampling = comfy_model.get_model_object("model_sampling")
    assert isinstance(sampling, comfy.model_sampling.ModelSamplingDiscreteFlow)
    assert sampling.multiplier == 1.0 and sampling.shift == family.schedule.shift == 3.0  # ZImage's sampling_settings

    cond = family.encode_prompts(PROMPTS)
    assert cond["prompt_mask"].sum(1).tolist() == [CAPTION, CAPTION]
    conditioning = [[cond["prompt_embeds"][:, :CAPTION], {}]]
    noise = torch.randn(family.latent_shape(2, RESOLUTION), generator=torch.Generator().manual_seed(9))
    sigmas = TDMScheduler.execute(comfy_model, 4, "auto", "", 1.0).result[0]
    torch.testing.assert_close(sigmas[:-1], family.schedule.flow_sigma(torch.tensor(grid, dtype=torch.float64)).float())
    sampler = TDMSampler.execute("tdm", 0.0, "reference").result[0]
    got = comfy.sample.sample_custom(comfy_model, noise, 1.0, sampler, sigmas, conditioning, conditioning, torch.zeros_like(noise),
                                     disable_pbar=True, seed=0)

    with torch.no_grad(), use_adapter(family.network, STUDENT):
        expected = tdm_core.sample_tdm(lambda x, t: family.denoise(x, t, cond), noise, grid, family.schedule, "flow")
        with use_adapter(family.network, None):
            teacher_four = tdm_core.sample_tdm(lambda x, t: family.denoise(x, t, cond), noise, grid, family.schedule, "flow")
    latent_out = comfy_model.model.process_latent_out  # ComfyUI returns latents in the Flux VAE's outward scale
    expected = latent_out(expected)
    assert (expected - latent_out(teacher_four)).abs().max() > 1e-2  # the LoRA changes the samples
    torch.testing.assert_close(got, expected, rtol=5e-4, atol=5e-4)

    # the one-node TDM KSampler draws its own noise from the seed: it equals the three nodes with that noise
    latent = {"samples": torch.zeros_like(noise)}
    one_node = TDMKSampler.execute(comfy_model, 42, 4, "auto", 1.0, conditioning, latent, 1.0).result[0]["samples"]
    seeded = comfy.sample.prepare_noise(latent["samples"], 42)
    three = comfy.sample.sample_custom(comfy_model, seeded, 1.0, sampler, sigmas, conditioning, conditioning, latent["samples"],
                                       disable_pbar=True, seed=42)
    torch.testing.assert_close(one_node, three, rtol=0, atol=0)


def test_tdm_scheduler_names_model_sampling_aura_flow_when_the_shift_differs(comfy_model, caplog):
    from comfy_extras.nodes_model_advanced import ModelSamplingAuraFlow

    from comfyui_tdm_pack.nodes.node_defs import TDMScheduler

    with caplog.at_level("WARNING"):
        TDMScheduler.execute(comfy_model, 4, "auto", "", 1.0)
        TDMScheduler.execute(ModelSamplingAuraFlow().patch_aura(comfy_model, 3.0)[0], 4, "auto", "", 1.0)
    assert "flow shift" not in caplog.text  # the model's own shift 3 and AuraFlow at 3: the trained one
    with caplog.at_level("WARNING"):
        TDMScheduler.execute(ModelSamplingAuraFlow().patch_aura(comfy_model, 6.0)[0], 4, "auto", "", 1.0)
    assert "samples with flow shift 6 but its TDM LoRA was trained at 3; set ModelSamplingAuraFlow's shift to 3" in caplog.text


def test_tdm_lora_loader_knows_the_z_image_family(comfy_model, student, tiny_model):
    from safetensors.torch import load_file

    from comfyui_tdm_pack.nodes.lora_apply import FAMILY_OF_CONFIG, check_family
    from comfyui_tdm_pack.nodes.lora_keys import guess_lora_architecture
    from comfyui_tdm_pack.nodes.node_defs import TDMLoraLoader
    from tdm_core.metadata import TDMInfo

    _, lora, _ = student
    assert FAMILY_OF_CONFIG[type(comfy_model.model.model_config).__name__] == "z_image"
    with pytest.raises(ValueError, match="distilled from a flux model but this model is ZImage"):
        check_family(comfy_model, TDMInfo(num_steps=4, grid=[899, 674, 449, 224], base_family="flux"), "x.safetensors")
    # the Z-Image LoRA on a Flux model: refused by name, not loaded in part
    comfy_inprocess.set_lora_folder(lora.parent)
    with pytest.raises(ValueError, match="distilled from a z_image model but this model is Flux"):
        TDMLoraLoader.execute(tiny_model("flux"), lora.name, 1.0, True, 1.0)
    assert guess_lora_architecture(load_file(str(lora))).startswith("Z-Image")
