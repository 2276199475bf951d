"""The Flux.1 trainer family on a tiny diffusers FluxPipeline folder: the schedule's shift follows the image
size as FluxPipeline's does, the network call equals FluxPipeline's own packing and call, the guidance is an
input (no unconditional pass), and ``training.distill`` distils it into a LoRA in diffusers' Flux layout.
(Stock ComfyUI loading that LoRA, and diffusers' ``load_lora_weights``: tests/test_lora_export.py.)"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers.tiny_models import save_tiny_pipeline, tiny_flux_transformer

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_pipeline("flux", tmp_path_factory.mktemp("flux") / "flux")


@pytest.fixture()
def family(folder):
    from training.models import load_family

    return load_family(str(folder))


@pytest.mark.parametrize("resolution", [16, 64])
def test_shift_follows_the_image_size_as_in_flux_pipeline(family, resolution):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    family.set_resolution(resolution)
    tokens = (resolution // family.vae_scale_factor // 2) ** 2
    scheduler = family.pipeline.scheduler
    mu = calculate_shift(tokens, scheduler.config.base_image_seq_len, scheduler.config.max_image_seq_len,
                         scheduler.config.base_shift, scheduler.config.max_shift)
    unshifted = np.linspace(1.0, 1 / 4, 4)
    scheduler.set_timesteps(sigmas=unshifted, mu=mu)
    ours = family.schedule.flow_sigma(torch.tensor(unshifted * family.num_timesteps))
    assert torch.allclose(ours.float(), scheduler.sigmas[:-1].float(), atol=1e-6)
    assert family.schedule.shift == pytest.approx(np.exp(mu))


def test_denoise_is_flux_pipelines_packing_and_transformer_call(family):
    from diffusers import FluxPipeline

    with pytest.raises(ValueError, match="multiple of 4 for the flux family"):  # 2x2 patches of the 2x VAE's latents
        family.latent_shape(1, 30)
    family.set_resolution(32)
    family.apply_guidance(3.5)
    prompts = ["a red cat", "a blue dog"]
    cond = family.encode_prompts(prompts)
    x = torch.randn(family.latent_shape(2, 32), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500.0, 900.0])
    ours = family.denoise(x, t, cond)

    pipe = family.pipeline
    b, c, h, w = x.shape
    embeds, pooled, text_ids = pipe.encode_prompt(prompts, None, max_sequence_length=family.max_sequence_length)
    reference = pipe.transformer(
        hidden_states=FluxPipeline._pack_latents(x, b, c, h, w), timestep=family.schedule.flow_sigma(t).float(),
        guidance=torch.full((2,), 3.5), pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=text_ids,
        img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype)).sample
    reference = FluxPipeline._unpack_latents(reference, 32, 32, family.vae_scale_factor)
    assert ours.shape == x.shape == (2, 16, 16, 16)
    assert torch.allclose(ours, reference, atol=1e-5)


def test_guidance_is_an_input_not_a_second_pass(family, folder, tmp_path):
    from training.models import load_family

    family.set_resolution(32)
    cond = family.encode_prompts(["a red cat"])
    x = torch.randn(family.latent_shape(1, 32), generator=torch.Generator().manual_seed(1))
    t = torch.tensor([700.0])
    assert family.apply_guidance(1.0) == 1.0
    plain = family.denoise(x, t, cond)
    assert family.apply_guidance(4.0) == 1.0  # the method adds no CFG term: the teacher's guidance is its input
    guided = family.denoise(x, t, cond)
    assert (guided - plain).abs().max() > 1e-3

    # a Flux without a guidance embedding (schnell, de-distilled, the toy flow teacher) gets true CFG from the method
    pipe = family.pipeline
    pipe.transformer = tiny_flux_transformer(guidance_embeds=False)
    pipe.save_pretrained(str(tmp_path / "schnell"))
    schnell = load_family(str(tmp_path / "schnell"))
    assert schnell.apply_guidance(1.0) == 1.0 and schnell.apply_guidance(3.5) == 3.5
    schnell.set_resolution(32)
    null = schnell.null_condition(1)
    assert null["encoder_hidden_states"].shape == cond["encoder_hidden_states"].shape
    assert not torch.allclose(schnell.denoise(x, t, null), schnell.denoise(x, t, cond))


def test_training_distill_distils_flux_into_a_diffusers_layout_lora(folder, tmp_path, capsys):
    from training.distill import EXIT_OK, main
    from training.lora_io import read_lora

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na blue dog\n")
    output = tmp_path / "flux_tdm.safetensors"
    common = ["--model", str(folder), "--prompts", str(prompts), "--lora-rank", "4", "--batch-size", "2", "--resolution", "32"]
    assert main([*common, "--output", str(tmp_path / "bad.safetensors"), "--resolution", "30"]) == 2
    assert "--resolution 30 must be a positive multiple of 8" in capsys.readouterr().err
    assert not (tmp_path / "bad.safetensors").exists()

    assert main([*common, "--output", str(output), "--cfg", "3.5", "--max-train-steps", "3", "--validate-every", "3",
                 "--checkpoint-every", "0"]) == EXIT_OK
    tensors, info = read_lora(output)
    assert info.base_family == "flux" and info.prediction_type == "flow" and info.teacher_cfg == 3.5
    # the shift of the training size (32 px: 64 tokens), which ComfyUI's ModelSamplingFlux must be set to
    assert info.flow_shift == pytest.approx(math.exp(0.5 + (1.15 - 0.5) / (4096 - 256) * (64 - 256)))
    assert tensors and all(k.startswith("transformer.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in tensors)
    # every adapted layer kind of both stream types is in the file, and training moved the student
    for part in ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_k_proj", "transformer_blocks.0.ff_context.net.2",
                 "single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.0.proj_out"):
        assert f"transformer.{part}.lora_B.weight" in tensors, part
    assert any(v.abs().max() > 0 for k, v in tensors.items() if k.endswith(".lora_B.weight"))
    assert list((tmp_path / "flux_tdm_run" / "validation").glob("step-*.png"))


# --- ComfyUI's split files: models/diffusion_models + text_encoders + vae ------------------------------
def write_comfy_flux_files(pipe, models: Path, layout_prefix: str = "") -> Path:
    """The tiny pipeline's weights as ComfyUI's Flux files: BFL-layout diffusion model (ComfyUI's own key map),
    CLIP-L and T5 in transformers' layout, the VAE in the LDM layout. Returns the diffusion-model file."""
    from safetensors.torch import save_file

    from tests.helpers.tiny_models import TINY_FLUX, _assemble_ldm, import_comfy, ldm_vae_state

    comfy = import_comfy()

    for folder in ("diffusion_models", "text_encoders", "vae"):
        (models / folder).mkdir(parents=True, exist_ok=True)
    bfl = _assemble_ldm(pipe.transformer.state_dict(), comfy.utils.flux_to_diffusers(TINY_FLUX))
    save_file({layout_prefix + k: v.contiguous() for k, v in bfl.items()}, str(models / "diffusion_models" / "flux1-dev.safetensors"))
    save_file({k: v.contiguous() for k, v in pipe.text_encoder.state_dict().items()}, str(models / "text_encoders" / "clip_l.safetensors"))
    t5 = {k: v.detach().clone().contiguous() for k, v in pipe.text_encoder_2.state_dict().items()}  # unshare tied tensors
    save_file(t5, str(models / "text_encoders" / "t5xxl_fp16.safetensors"))
    save_file(ldm_vae_state(pipe.vae), str(models / "vae" / "ae.safetensors"))
    return models / "diffusion_models" / "flux1-dev.safetensors"


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_comfyui_flux_files_load_as_the_same_model(folder, family, tmp_path, prefix):
    from training.errors import TrainingInputError
    from training.models import load_family

    path = write_comfy_flux_files(family.pipeline, tmp_path / "ComfyUI" / "models", prefix)
    # the tiny architecture is not Flux.1's 3072 width: its diffusers config folder says what it is
    loaded = load_family(str(path), config_path=str(folder))
    assert loaded.name == "flux" and loaded.network.config.guidance_embeds
    for f in (family, loaded):
        f.set_resolution(32)
        f.apply_guidance(3.5)
    cond = family.encode_prompts(["a red cat", "a blue dog"])
    assert torch.allclose(loaded.encode_prompts(["a red cat", "a blue dog"])["encoder_hidden_states"], cond["encoder_hidden_states"], atol=1e-6)
    x = torch.randn(family.latent_shape(2, 32), generator=torch.Generator().manual_seed(2))
    t = torch.tensor([850.0, 300.0])
    assert torch.allclose(loaded.denoise(x, t, cond), family.denoise(x, t, cond), atol=1e-5)
    assert torch.allclose(loaded.decode(x[:, :, :8, :8]), family.decode(x[:, :, :8, :8]), atol=1e-5)

    # Flux.1's own configs (shipped) refuse a file of another width, naming the fix
    with pytest.raises(TrainingInputError, match="--model-config"):
        load_family(str(path))
    # a missing companion file is named with the folder it belongs in
    (tmp_path / "ComfyUI" / "models" / "vae" / "ae.safetensors").unlink()
    with pytest.raises(TrainingInputError, match=r"models/vae/ae.safetensors is missing"):
        load_family(str(path), config_path=str(folder))


def test_shipped_flux_configs_are_flux1_dev():
    """training/configs/flux builds Flux.1-dev's published sizes (on the meta device: no memory)."""
    import json

    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from training.families.flux_files import CONFIGS

    with torch.device("meta"):
        parts = {
            "transformer": FluxTransformer2DModel.from_config(json.loads((CONFIGS / "transformer" / "config.json").read_text())),
            "vae": AutoencoderKL.from_config(json.loads((CONFIGS / "vae" / "config.json").read_text())),
            "text_encoder_2": T5EncoderModel(T5Config.from_pretrained(str(CONFIGS / "text_encoder_2"))),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(str(CONFIGS / "text_encoder"))),
        }
    counts = {name: sum(p.numel() for p in module.parameters()) for name, module in parts.items()}
    assert counts == {"transformer": 11_901_408_320, "vae": 83_819_683, "text_encoder_2": 4_762_310_656, "text_encoder": 123_060_480}
    assert parts["transformer"].config.guidance_embeds
