"""The Wan trainer family on a tiny diffusers WanPipeline folder: the flow shift is the scheduler config's own
(UniPC flow_shift), the 5-D latent shape follows the frame count and the VAE's scale factors, the network call
equals WanPipeline's prompt encoding and transformer call, decoding equals the pipeline's own, true CFG with the
empty prompt, bad frame counts and --num-frames on an image family are refused before anything is written, and
``training.distill`` distils the video model into a LoRA (validation grids of three frames per sample).
(Stock ComfyUI and diffusers loading that LoRA: tests/test_wan_lora.py.)"""
from __future__ import annotations

import json

import pytest
import torch

from tests.helpers.tiny_wan import save_tiny_wan_pipeline

torch.set_num_threads(1)
RESOLUTION, FRAMES = 64, 5  # 8x8 latents x 2 latent frames: 32 tokens


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_wan_pipeline(tmp_path_factory.mktemp("wan") / "wan")


@pytest.fixture(scope="module")
def family(folder):
    from training.models import load_family

    family = load_family(str(folder))
    family.set_num_frames(FRAMES)
    family.set_resolution(RESOLUTION)
    return family


def test_shift_is_the_scheduler_configs_and_latents_are_5d(family):
    from diffusers import UniPCMultistepScheduler

    assert family.name == "wan" and family.prediction_type == "flow" and family.vae_scale_factor == 8
    scheduler = family.pipeline.scheduler
    assert isinstance(scheduler, UniPCMultistepScheduler) and scheduler.config.flow_shift == 3.0
    assert family.schedule.shift == 3.0
    # UniPC's own flow sigmas and timesteps at 4 steps (its unshifted linspace, then flow_shift) are tdm_core's
    # sigma and model timestep at the same unshifted points
    scheduler.set_timesteps(4)
    unshifted = torch.linspace(1, 1 / 1000, 5, dtype=torch.float64)[:-1] * 1000
    assert torch.allclose(family.schedule.flow_sigma(unshifted).float(), scheduler.sigmas[:-1].float(), atol=2e-6)
    assert torch.allclose(family.schedule.model_timestep(unshifted).float(), scheduler.timesteps.float(), atol=1.0)  # integer timesteps
    assert family.latent_shape(2, RESOLUTION) == (2, 16, 2, 8, 8)
    with pytest.raises(ValueError, match="multiple of 16 for the wan family"):
        family.latent_shape(1, 40)


def test_another_flow_shift_in_the_config_is_read_not_assumed(folder, tmp_path):
    import shutil

    from training.models import load_family

    copy = tmp_path / "wan14"
    shutil.copytree(folder, copy)
    config_file = copy / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps(dict(json.loads(config_file.read_text()), flow_shift=5.0)))
    assert load_family(str(copy)).schedule.shift == 5.0


def test_frame_counts_the_vae_cannot_encode_are_refused(family):
    from training.errors import TrainingInputError

    with pytest.raises(TrainingInputError, match=r"--num-frames 6: Wan's VAE encodes 4k \+ 1 frames .* use e.g. 5"):
        family.set_num_frames(6)
    assert family.num_frames == FRAMES  # unchanged
    family.set_num_frames(9)
    assert family.latent_shape(1, RESOLUTION) == (1, 16, 3, 8, 8)
    family.set_num_frames(FRAMES)


def test_denoise_is_the_pipelines_prompt_encoding_and_transformer_call(family):
    pipe = family.pipeline
    prompts = ["a red cat", "a blue dog wearing a small green hat"]
    cond = family.encode_prompts(prompts)
    embeds, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device="cpu", max_sequence_length=512)
    assert torch.equal(cond["encoder_hidden_states"], embeds) and embeds.shape == (2, 512, 32)
    x = torch.randn(family.latent_shape(2, RESOLUTION), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500.0, 900.0])
    ours = family.denoise(x, t, cond)
    # WanPipeline passes the scheduler's timesteps, sigma * 1000, as they are
    reference = pipe.transformer(hidden_states=x, timestep=family.schedule.flow_sigma(t).float() * 1000, encoder_hidden_states=embeds).sample
    assert ours.shape == x.shape
    assert torch.allclose(ours, reference, atol=1e-5)
    alone = family.denoise(x[:1], t[:1], family.encode_prompts(prompts[:1]))
    assert torch.allclose(alone, ours[:1], atol=1e-5)


def test_true_cfg_uses_the_empty_prompt(family):
    from training.families.base import cat_conditions

    assert family.apply_guidance(5.0) == 5.0
    cond, null = family.encode_prompts(["a cat"]), family.null_condition(1)
    embeds, _ = family.pipeline.encode_prompt([""], do_classifier_free_guidance=False, device="cpu", max_sequence_length=512)
    assert torch.equal(null["encoder_hidden_states"], embeds)
    x = torch.randn(family.latent_shape(1, RESOLUTION), generator=torch.Generator().manual_seed(1))
    t = torch.tensor([700.0])
    both = family.denoise(torch.cat([x, x]), torch.cat([t, t]), cat_conditions([cond, null]))
    assert torch.allclose(both[1:], family.denoise(x, t, null), atol=1e-5)
    assert (both[0] - both[1]).abs().max() > 1e-3


def test_decode_undoes_what_the_pipeline_does(family):
    pipe = family.pipeline
    run = dict(prompt="a red cat", height=RESOLUTION, width=RESOLUTION, num_frames=FRAMES, num_inference_steps=2, guidance_scale=1.0)
    latents = pipe(**run, generator=torch.Generator().manual_seed(2), output_type="latent").frames
    video = pipe(**run, generator=torch.Generator().manual_seed(2), output_type="pt").frames  # (B, F, 3, H, W)
    assert latents.shape == (1, 16, 2, 8, 8)
    ours = family.decode(latents)
    assert ours.shape == (1, 3, FRAMES, RESOLUTION, RESOLUTION)
    assert torch.allclose(ours.permute(0, 2, 1, 3, 4), video, atol=1e-5)
    assert not torch.allclose(family.decode(latents * 1.5).permute(0, 2, 1, 3, 4), video, atol=1e-3)


def test_validation_grid_shows_three_frames_per_video():
    from training.validation import frames_as_image

    video = torch.arange(7.0).view(1, 1, 7, 1, 1).expand(2, 3, 7, 4, 5)
    image = frames_as_image(video)
    assert image.shape == (2, 3, 4, 15)
    assert [float(image[0, 0, 0, 5 * i]) for i in range(3)] == [0.0, 3.0, 6.0]  # first, middle, last frame
    still = torch.rand(2, 3, 4, 5)
    assert frames_as_image(still) is still


def test_training_distill_distils_wan_into_a_lora(folder, tmp_path):
    from training.distill import EXIT_OK, main
    from training.lora_io import read_lora

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na blue dog wearing a hat\n")
    output = tmp_path / "wan_tdm.safetensors"
    assert main(["--model", str(folder), "--prompts", str(prompts), "--lora-rank", "4", "--batch-size", "2",
                 "--resolution", str(RESOLUTION), "--num-frames", str(FRAMES), "--output", str(output), "--cfg", "5",
                 "--max-train-steps", "2", "--validate-every", "2", "--checkpoint-every", "0"]) == EXIT_OK
    tensors, info = read_lora(output)
    assert info.base_family == "wan" and info.prediction_type == "flow" and info.teacher_cfg == 5.0 and info.flow_shift == 3.0
    # Wan's original (ComfyUI's) names
    assert tensors and all(k.startswith("diffusion_model.blocks.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in tensors)
    for part in ("self_attn.q", "self_attn.o", "cross_attn.k", "cross_attn.v", "ffn.0", "ffn.2"):
        assert f"diffusion_model.blocks.1.{part}.lora_B.weight" in tensors, part
    assert any(v.abs().max() > 0 for k, v in tensors.items() if k.endswith(".lora_B.weight"))
    from PIL import Image

    grids = list((tmp_path / "wan_tdm_run" / "validation").glob("step-*.png"))
    assert grids and Image.open(grids[0]).size == (4 * 3 * RESOLUTION, 2 * RESOLUTION)  # 4 samplers x 3 frames, 2 prompts


def test_bad_frame_count_and_frames_on_an_image_family_write_nothing(folder, tmp_path, capsys):
    from tests.helpers.tiny_models import save_tiny_pipeline
    from training.distill import EXIT_OK, main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\n")
    output = tmp_path / "out" / "wan_tdm.safetensors"
    common = ["--prompts", str(prompts), "--output", str(output), "--max-train-steps", "1", "--lora-rank", "2"]
    assert main(["--model", str(folder), "--num-frames", "8", "--resolution", str(RESOLUTION)] + common) != EXIT_OK
    assert "--num-frames 8: Wan's VAE encodes 4k + 1 frames" in capsys.readouterr().err
    sd15 = save_tiny_pipeline("sd15", tmp_path / "sd15")
    assert main(["--model", str(sd15), "--num-frames", "5"] + common) != EXIT_OK
    assert "--num-frames 5 is for video models; sd15 makes images: drop --num-frames" in capsys.readouterr().err
    assert not output.exists() and not (tmp_path / "out" / "wan_tdm_run").exists()


def test_two_expert_wan22_a14b_is_refused_naming_the_design(family):
    from diffusers import WanPipeline

    from training.families.wan import WanFamily
    from training.errors import TrainingInputError

    pipe = family.pipeline
    two_experts = WanPipeline(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae, scheduler=pipe.scheduler,
                              transformer=pipe.transformer, transformer_2=pipe.transformer, boundary_ratio=0.875)
    with pytest.raises(TrainingInputError, match="two-expert Wan 2.2 A14B.*one LoRA pair per expert"):
        WanFamily(two_experts)


def test_shipped_wan_configs_are_the_real_models():
    """training/configs/wan builds Wan 2.1 T2V-1.3B (and its variants Wan 2.1 14B, Wan 2.2 TI2V-5B) at their
    published sizes, on the meta device."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from training.families.wan import CONFIGS

    def count(module):
        return sum(p.numel() for p in module.parameters())

    def config(path):
        return json.loads((CONFIGS / path).read_text())

    with torch.device("meta"):
        counts = {
            "transformer_1.3b": count(WanTransformer3DModel.from_config(config("transformer/config.json"))),
            "transformer_14b": count(WanTransformer3DModel.from_config(config("variants/wan2.1_t2v_14b_transformer.json"))),
            "transformer_5b": count(WanTransformer3DModel.from_config(config("variants/wan2.2_ti2v_5b_transformer.json"))),
            "vae": count(AutoencoderKLWan.from_config(config("vae/config.json"))),
            "text_encoder": count(UMT5EncoderModel(UMT5Config.from_pretrained(str(CONFIGS / "text_encoder")))),
        }
    # Wan's published sizes: 1.3B, 14B, 5B transformers; UMT5-XXL's encoder 5.7B
    assert counts == {"transformer_1.3b": 1_418_996_800, "transformer_14b": 14_288_491_584, "transformer_5b": 4_999_787_712,
                      "vae": 126_892_531, "text_encoder": 5_680_910_336}
