"""A Qwen-Image TDM LoRA from the trainer's export, loaded by the TDM LoRA Loader onto ComfyUI's own QwenImage
(holding the diffusers teacher's weights) and sampled by TDM Scheduler + TDM Sampler (and the TDM KSampler)
through ComfyUI's sampling path, equals the trainer-side student sampled by tdm_core on the diffusers model,
when ComfyUI's ModelSamplingAuraFlow is set to the LoRA's flow shift. ComfyUI's QwenImage samples with
ModelSamplingFlux at mu 1.15 (shift 3.16) by default; the TDM Scheduler says so and names the node to set."""
from __future__ import annotations

import math

import pytest
import torch

import tdm_core
from tests.helpers import comfy_inprocess
from tests.helpers.tiny_qwen import comfy_qwen_from_diffusers_transformer, save_tiny_qwen_pipeline

torch.set_num_threads(1)
RESOLUTION = 128  # 16x16 latents of the 8x VAE, 8x8 = 64 tokens
CFG = 2.5


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """The trainer's Qwen-Image family with a non-zero student adapter, and its exported LoRA."""
    from tdm_core.metadata import TDMInfo
    from training.lora_io import export_student_lora
    from training.models import STUDENT, adapter_parameters, add_tdm_adapters, load_family

    root = tmp_path_factory.mktemp("qwen_nodes")
    family = load_family(str(save_tiny_qwen_pipeline(root / "qwen_image")))
    family.set_resolution(RESOLUTION)
    assert family.apply_guidance(CFG) == CFG
    add_tdm_adapters(family, rank=4, alpha=4.0)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in adapter_parameters(family.network, STUDENT):
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    grid = tdm_core.reference_grid(4, 900)
    info = TDMInfo(num_steps=4, grid=grid, total_steps=900, prediction_type="flow", base_family="qwen_image", teacher_cfg=CFG,
                   flow_shift=family.schedule.shift)
    lora = export_student_lora(family, root / "loras" / "qwen_tdm.safetensors", info)
    return family, lora, grid


def comfy_qwen_with_lora(family, lora):
    """ComfyUI's QwenImage holding the diffusers teacher's weights, with ``lora`` put on by the TDM LoRA Loader."""
    import comfy.model_management
    import comfy.model_patcher
    from diffusers import QwenImageTransformer2DModel

    from comfyui_tdm_pack.nodes.node_defs import TDMLoraLoader

    base = comfy_qwen_from_diffusers_transformer(QwenImageTransformer2DModel.from_pretrained(f"{family.source_path}/transformer"))
    model = comfy.model_patcher.ModelPatcher(base, load_device=comfy.model_management.get_torch_device(),
                                             offload_device=comfy.model_management.unet_offload_device())
    comfy_inprocess.set_lora_folder(lora.parent)
    return TDMLoraLoader.execute(model, lora.name, 1.0, True, 1.0).result[0]


def test_tdm_nodes_on_qwen_image_sample_what_the_trainer_sampled(pack, student):
    import comfy.sample
    from comfy_extras.nodes_model_advanced import ModelSamplingAuraFlow

    from comfyui_tdm_pack.nodes.node_defs import TDMKSampler, TDMSampler, TDMScheduler
    from training.models import STUDENT, use_adapter

    family, lora, grid = student
    model = ModelSamplingAuraFlow().patch_aura(comfy_qwen_with_lora(family, lora), family.schedule.shift)[0]
    base = model.model
    assert type(base.model_config).__name__ == "QwenImage"

    prompts = ["a photo of a cat", "a drawing of a dog"]  # one token length: ComfyUI gives Qwen-Image no text mask
    cond = family.encode_prompts(prompts)
    used = int(cond["encoder_hidden_states_mask"].sum(dim=1).max())
    assert cond["encoder_hidden_states_mask"][:, :used].all()
    conditioning = [[cond["encoder_hidden_states"][:, :used], {}]]
    noise = torch.randn(family.latent_shape(2, RESOLUTION), generator=torch.Generator().manual_seed(9))
    latent = torch.zeros_like(noise)  # ComfyUI's EmptySD3LatentImage; comfy.sample adds Qwen-Image's frame axis
    sigmas = TDMScheduler.execute(model, 4, "auto", "", 1.0).result[0]
    sampler = TDMSampler.execute("tdm", 0.0, "reference").result[0]
    got = comfy.sample.sample_custom(model, noise.unsqueeze(2), 1.0, sampler, sigmas, conditioning, conditioning,
                                     comfy.sample.fix_empty_latent_channels(model, latent), disable_pbar=True, seed=0)

    with torch.no_grad(), use_adapter(family.network, STUDENT):
        expected = tdm_core.sample_tdm(lambda x, t: family.denoise(x, t, cond), noise, grid, family.schedule, "flow")
        with use_adapter(family.network, None):
            teacher_four = tdm_core.sample_tdm(lambda x, t: family.denoise(x, t, cond), noise, grid, family.schedule, "flow")
    # ComfyUI returns latents with the frame axis, in the VAE's own scale (Wan 2.1 latents_mean / std)
    expected, teacher_four = (base.process_latent_out(x.unsqueeze(2)) for x in (expected, teacher_four))
    assert got.shape == (2, 16, 1, 16, 16)
    assert (expected - teacher_four).abs().max() > 1e-2  # the LoRA changes the samples
    torch.testing.assert_close(got, expected, rtol=5e-4, atol=5e-4)

    # the one-node TDM KSampler: ComfyUI's own seeded noise, the same sampling path
    seeded = comfy.sample.prepare_noise(comfy.sample.fix_empty_latent_channels(model, latent), 11)
    one_node = TDMKSampler.execute(model, 11, 4, "auto", 1.0, conditioning, {"samples": latent}, 1.0).result[0]["samples"]
    with torch.no_grad(), use_adapter(family.network, STUDENT):
        expected = tdm_core.sample_tdm(lambda x, t: family.denoise(x, t, cond), seeded[:, :, 0], grid, family.schedule, "flow")
    torch.testing.assert_close(one_node, base.process_latent_out(expected.unsqueeze(2)), rtol=5e-4, atol=5e-4)


def test_tdm_scheduler_names_model_sampling_aura_flow_when_the_shift_differs(pack, student, caplog):
    from comfy_extras.nodes_model_advanced import ModelSamplingAuraFlow

    from comfyui_tdm_pack.nodes.node_defs import TDMScheduler

    family, lora, _ = student
    model = comfy_qwen_with_lora(family, lora)
    # ComfyUI's QwenImage default: ModelSamplingFlux with mu = 1.15, a shift of exp(1.15) = 3.16
    assert math.exp(model.get_model_object("model_sampling").shift) == pytest.approx(math.exp(1.15))
    with caplog.at_level("WARNING"):
        TDMScheduler.execute(model, 4, "auto", "", 1.0)
    assert f"samples with flow shift 3.16 but its TDM LoRA was trained at {family.schedule.shift:.3g}" in caplog.text
    assert f"set ModelSamplingAuraFlow's shift to {family.schedule.shift:.3g}" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        TDMScheduler.execute(ModelSamplingAuraFlow().patch_aura(model, family.schedule.shift)[0], 4, "auto", "", 1.0)
    assert "flow shift" not in caplog.text  # the trained shift: no word
