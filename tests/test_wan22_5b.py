"""Wan 2.2 TI2V-5B's shape on a tiny WanPipeline: 48 latent channels and Wan 2.2's 16x residual VAE (both read from
the configs), the trainer's one timestep per sample equal to WanPipeline's per-token timesteps (expand_timesteps),
decoding as the pipeline; the exported LoRA loads on ComfyUI's own WAN22 (WAN22_T2V) with zero skipped keys and
TDM Scheduler + TDM Sampler on it sample what the trainer's student samples."""
from __future__ import annotations

import pytest
import torch

import tdm_core
from tests.helpers import comfy_inprocess
from tests.helpers.tiny_wan import build_tiny_wan22_pipeline, comfy_wan22_from_diffusers_transformer
from tests.test_lora_export import comfy_apply_lora, student_and_teacher

torch.set_num_threads(1)
RESOLUTION, FRAMES = 64, 5  # 4x4 latents of the 16x VAE, 2 latent frames


@pytest.fixture(scope="module")
def family():
    from training.families.wan import WanFamily

    family = WanFamily(build_tiny_wan22_pipeline())
    family.set_num_frames(FRAMES)
    family.set_resolution(RESOLUTION)
    return family


@pytest.fixture(scope="module")
def student(family, tmp_path_factory):
    from tdm_core.metadata import TDMInfo
    from training.lora_io import export_student_lora
    from training.models import STUDENT, adapter_parameters, add_tdm_adapters

    add_tdm_adapters(family, rank=4, alpha=4.0)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in adapter_parameters(family.network, STUDENT):
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    grid = tdm_core.reference_grid(4, 1000)
    info = TDMInfo(num_steps=4, grid=grid, total_steps=1000, base_family="wan", teacher_cfg=5.0, flow_shift=family.schedule.shift)
    path = export_student_lora(family, tmp_path_factory.mktemp("wan22") / "loras" / "wan22_tdm.safetensors", info, base_hash="0" * 64)
    return path, grid


def test_latents_are_48_channels_at_a_16x_vae(family):
    assert family.vae_scale_factor == 16 and family.latent_shape(1, RESOLUTION) == (1, 48, 2, 4, 4)
    with pytest.raises(ValueError, match="multiple of 32 for the wan family"):
        family.latent_shape(1, 48)


def test_one_timestep_per_sample_is_the_pipelines_per_token_timesteps_and_decode_matches(family):
    pipe = family.pipeline
    cond = family.encode_prompts(["a red cat", "a dog"])
    x = torch.randn(family.latent_shape(2, RESOLUTION), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500.0, 900.0])
    with torch.no_grad():
        ours = family.denoise(x, t, cond)
        sigma1000 = family.schedule.flow_sigma(t).float() * 1000
        tokens = x.shape[2] * (x.shape[3] // 2) * (x.shape[4] // 2)
        per_token = sigma1000[:, None].expand(2, tokens)  # what WanPipeline passes with expand_timesteps (T2V: no mask)
        reference = pipe.transformer(hidden_states=x, timestep=per_token, encoder_hidden_states=cond["encoder_hidden_states"]).sample
    assert torch.allclose(ours, reference, atol=1e-5)
    run = dict(prompt="a red cat", height=RESOLUTION, width=RESOLUTION, num_frames=FRAMES, num_inference_steps=2, guidance_scale=1.0)
    latents = pipe(**run, generator=torch.Generator().manual_seed(2), output_type="latent").frames
    video = pipe(**run, generator=torch.Generator().manual_seed(2), output_type="pt").frames
    assert latents.shape == (1, 48, 2, 4, 4)
    assert torch.allclose(family.decode(latents).permute(0, 2, 1, 3, 4), video, atol=1e-5)


def test_comfyui_wan22_loads_the_lora_and_the_tdm_nodes_sample_the_student(pack, family, student):
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sample
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3

    from comfyui_tdm_pack.nodes.node_defs import TDMLoraLoader, TDMSampler, TDMScheduler
    from training.models import STUDENT, use_adapter

    path, grid = student
    with use_adapter(family.network, None):
        base_state = {k.replace(".base_layer", ""): v for k, v in family.network.state_dict().items() if "lora_" not in k}
    from diffusers import WanTransformer3DModel

    plain = WanTransformer3DModel.from_config(family.network.config)
    plain.load_state_dict(base_state)
    comfy_model = comfy_wan22_from_diffusers_transformer(plain)
    assert type(comfy_model.model_config).__name__ == "WAN22_T2V"
    cond = family.encode_prompts(["a photo of a cat", "a drawing of a dog"])
    x_t = torch.randn(family.latent_shape(2, RESOLUTION), generator=torch.Generator().manual_seed(5))
    t = torch.tensor([900.0, 250.0])
    patched, skipped, _, _ = comfy_apply_lora(comfy_model, path)
    assert skipped == []
    with torch.no_grad():
        comfy_student = comfy_model.diffusion_model(x_t, family.schedule.flow_sigma(t).float() * 1000, context=cond["encoder_hidden_states"])
    student_out, teacher_out = student_and_teacher(family, x_t, t, cond)
    assert (student_out - teacher_out).abs().max() > 1e-2
    assert torch.allclose(comfy_student, student_out, atol=1e-4)

    fresh = comfy_wan22_from_diffusers_transformer(plain)
    model = comfy.model_patcher.ModelPatcher(fresh, load_device=comfy.model_management.get_torch_device(),
                                             offload_device=comfy.model_management.unet_offload_device())
    comfy_inprocess.set_lora_folder(path.parent)
    model = ModelSamplingSD3().patch(TDMLoraLoader.execute(model, path.name, 1.0, True, 1.0).result[0], family.schedule.shift)[0]
    latent = torch.zeros(x_t.shape)
    sigmas = TDMScheduler.execute(model, 4, "auto", "", 1.0).result[0]
    got = comfy.sample.sample_custom(model, x_t, 1.0, TDMSampler.execute("tdm", 0.0, "reference").result[0], sigmas,
                                     [[cond["encoder_hidden_states"], {}]], [[cond["encoder_hidden_states"], {}]], latent,
                                     disable_pbar=True, seed=0)
    with torch.no_grad(), use_adapter(family.network, STUDENT):
        expected = tdm_core.sample_tdm(lambda x, s: family.denoise(x, s, cond), x_t, grid, family.schedule, "flow")
    torch.testing.assert_close(got, fresh.process_latent_out(expected), rtol=5e-4, atol=5e-4)
