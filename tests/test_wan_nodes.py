"""A Wan TDM LoRA from the trainer's export, loaded by the TDM LoRA Loader onto ComfyUI's own WAN21 (holding the
diffusers teacher's weights) and sampled by TDM Scheduler + TDM Sampler (and the TDM KSampler) through ComfyUI's
sampling path on 5-D video latents, equals the trainer-side student sampled by tdm_core on the diffusers model,
when ComfyUI's ModelSamplingSD3 is set to the LoRA's flow shift. ComfyUI's WAN21_T2V samples at shift 8 by
default; the TDM Scheduler says so and names ModelSamplingSD3 (Wan's multiplier is 1000, SD3's)."""
from __future__ import annotations

import pytest
import torch

import tdm_core
from tests.helpers import comfy_inprocess
from tests.helpers.tiny_wan import comfy_wan_from_diffusers_transformer, save_tiny_wan_pipeline

torch.set_num_threads(1)
RESOLUTION, FRAMES = 64, 5  # 8x8 latents x 2 latent frames
CFG = 5.0


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """The trainer's Wan family with a non-zero student adapter, and its exported LoRA."""
    from tdm_core.metadata import TDMInfo
    from training.lora_io import export_student_lora
    from training.models import STUDENT, adapter_parameters, add_tdm_adapters, load_family

    root = tmp_path_factory.mktemp("wan_nodes")
    family = load_family(str(save_tiny_wan_pipeline(root / "wan")))
    family.set_num_frames(FRAMES)
    family.set_resolution(RESOLUTION)
    add_tdm_adapters(family, rank=4, alpha=4.0)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in adapter_parameters(family.network, STUDENT):
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    grid = tdm_core.reference_grid(4, 1000)
    info = TDMInfo(num_steps=4, grid=grid, total_steps=1000, prediction_type="flow", base_family="wan", teacher_cfg=CFG,
                   flow_shift=family.schedule.shift)
    lora = export_student_lora(family, root / "loras" / "wan_tdm.safetensors", info)
    return family, lora, grid


def comfy_wan_with_lora(family, lora):
    """ComfyUI's WAN21 holding the diffusers teacher's weights, with ``lora`` put on by the TDM LoRA Loader."""
    import comfy.model_management
    import comfy.model_patcher
    from diffusers import WanTransformer3DModel

    from comfyui_tdm_pack.nodes.node_defs import TDMLoraLoader

    base = comfy_wan_from_diffusers_transformer(WanTransformer3DModel.from_pretrained(f"{family.source_path}/transformer"))
    model = comfy.model_patcher.ModelPatcher(base, load_device=comfy.model_management.get_torch_device(),
                                             offload_device=comfy.model_management.unet_offload_device())
    comfy_inprocess.set_lora_folder(lora.parent)
    return TDMLoraLoader.execute(model, lora.name, 1.0, True, 1.0).result[0]


def test_tdm_nodes_on_wan_sample_what_the_trainer_sampled(pack, student):
    import comfy.sample
    from comfy_extras.nodes_hunyuan import EmptyHunyuanLatentVideo
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3

    from comfyui_tdm_pack.nodes.node_defs import TDMKSampler, TDMSampler, TDMScheduler
    from training.models import STUDENT, use_adapter

    family, lora, grid = student
    model = ModelSamplingSD3().patch(comfy_wan_with_lora(family, lora), family.schedule.shift)[0]
    base = model.model
    assert type(base.model_config).__name__ == "WAN21_T2V"

    prompts = ["a photo of a cat", "a drawing of a dog"]
    cond = family.encode_prompts(prompts)
    conditioning = [[cond["encoder_hidden_states"], {}]]
    latent = EmptyHunyuanLatentVideo.execute(RESOLUTION, RESOLUTION, FRAMES, 2).result[0]["samples"]  # the Wan template's latent node
    assert latent.shape == family.latent_shape(2, RESOLUTION)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(9))
    sigmas = TDMScheduler.execute(model, 4, "auto", "", 1.0).result[0]
    sampler = TDMSampler.execute("tdm", 0.0, "reference").result[0]
    got = comfy.sample.sample_custom(model, noise, 1.0, sampler, sigmas, conditioning, conditioning, latent, disable_pbar=True, seed=0)

    with torch.no_grad(), use_adapter(family.network, STUDENT):
        expected = tdm_core.sample_tdm(lambda x, t: family.denoise(x, t, cond), noise, grid, family.schedule, "flow")
        with use_adapter(family.network, None):
            teacher_four = tdm_core.sample_tdm(lambda x, t: family.denoise(x, t, cond), noise, grid, family.schedule, "flow")
    # ComfyUI returns latents in the VAE's own scale (Wan 2.1 latents_mean / std)
    expected, teacher_four = base.process_latent_out(expected), base.process_latent_out(teacher_four)
    assert got.shape == (2, 16, 2, 8, 8)
    assert (expected - teacher_four).abs().max() > 1e-2  # the LoRA changes the samples
    torch.testing.assert_close(got, expected, rtol=5e-4, atol=5e-4)

    # the one-node TDM KSampler: ComfyUI's own seeded noise, the same sampling path
    seeded = comfy.sample.prepare_noise(latent, 11)
    one_node = TDMKSampler.execute(model, 11, 4, "auto", 1.0, conditioning, {"samples": latent}, 1.0).result[0]["samples"]
    with torch.no_grad(), use_adapter(family.network, STUDENT):
        expected = tdm_core.sample_tdm(lambda x, t: family.denoise(x, t, cond), seeded, grid, family.schedule, "flow")
    torch.testing.assert_close(one_node, base.process_latent_out(expected), rtol=5e-4, atol=5e-4)


def test_tdm_scheduler_names_model_sampling_sd3_when_the_shift_differs(pack, student, caplog):
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3

    from comfyui_tdm_pack.nodes.node_defs import TDMScheduler

    family, lora, _ = student
    model = comfy_wan_with_lora(family, lora)
    sampling = model.get_model_object("model_sampling")
    assert float(sampling.shift) == model.model.model_config.sampling_settings["shift"] == 8.0  # WAN21_T2V's default
    assert float(sampling.multiplier) == 1000.0
    with caplog.at_level("WARNING"):
        TDMScheduler.execute(model, 4, "auto", "", 1.0)
    assert f"samples with flow shift 8 but its TDM LoRA was trained at {family.schedule.shift:.3g}" in caplog.text
    assert f"set ModelSamplingSD3's shift to {family.schedule.shift:.3g}" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        TDMScheduler.execute(ModelSamplingSD3().patch(model, family.schedule.shift)[0], 4, "auto", "", 1.0)
    assert "flow shift" not in caplog.text


def test_tdm_lora_loader_refuses_a_wan_lora_on_another_family(pack, student):
    from comfyui_tdm_pack.nodes.lora_apply import check_family
    from tdm_core.metadata import TDMInfo

    family, lora, _ = student
    model = comfy_wan_with_lora(family, lora)
    with pytest.raises(ValueError, match="distilled from a flux model but this model is WAN21_T2V"):
        check_family(model, TDMInfo(num_steps=4, grid=[999, 749, 499, 249], base_family="flux"), "flux_tdm.safetensors")
