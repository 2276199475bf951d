"""The Flux.1 trainer family on a tiny diffusers FluxPipeline folder: the schedule's shift follows the image
size as FluxPipeline's does, the network call equals FluxPipeline's own packing and call, the guidance is an
input (no unconditional pass), and ``training.distill`` distils it into a LoRA in diffusers' Flux layout.
(Stock ComfyUI loading that LoRA, and diffusers' ``load_lora_weights``: tests/test_lora_export.py.)"""
from __future__ import annotations

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
    assert tensors and all(k.startswith("transformer.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in tensors)
    # every adapted layer kind of both stream types is in the file, and training moved the student
    for part in ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_k_proj", "transformer_blocks.0.ff_context.net.2",
                 "single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.0.proj_out"):
        assert f"transformer.{part}.lora_B.weight" in tensors, part
    assert any(v.abs().max() > 0 for k, v in tensors.items() if k.endswith(".lora_B.weight"))
    assert list((tmp_path / "flux_tdm_run" / "validation").glob("step-*.png"))
