"""The Qwen-Image trainer family on a tiny diffusers QwenImagePipeline folder: the schedule's shift follows the
image size as QwenImagePipeline's does (its own scheduler config), the network call equals the pipeline's prompt
encoding, packing and transformer call (masks included), decoding equals the pipeline's own, true CFG with the
empty prompt, and ``training.distill`` distils it into a LoRA in diffusers' (= ComfyUI's) Qwen-Image names.
(Stock ComfyUI and diffusers loading that LoRA: tests/test_qwen_lora.py.)"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.helpers.tiny_qwen import save_tiny_qwen_pipeline

torch.set_num_threads(1)
RESOLUTION = 128  # 16x16 latents of the 8x VAE, 8x8 = 64 tokens


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_qwen_pipeline(tmp_path_factory.mktemp("qwen") / "qwen_image")


@pytest.fixture(scope="module")
def family(folder):
    from training.models import load_family

    family = load_family(str(folder))
    family.set_resolution(RESOLUTION)
    return family


def test_shipped_scheduler_config_is_qwen_images_and_the_shift_follows_the_image_size(folder):
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    from training.models import load_family

    family = load_family(str(folder))
    scheduler = family.pipeline.scheduler
    config = scheduler.config
    assert (config.use_dynamic_shifting, config.time_shift_type, config.shift_terminal) == (True, "exponential", 0.02)
    assert (config.base_shift, config.max_shift, config.base_image_seq_len, config.max_image_seq_len) == (0.5, 0.9, 256, 8192)
    assert family.name == "qwen_image" and family.prediction_type == "flow" and family.vae_scale_factor == 8
    for resolution in (128, 512):
        family.set_resolution(resolution)
        tokens = (resolution // family.vae_scale_factor // 2) ** 2
        mu = calculate_shift(tokens, config.base_image_seq_len, config.max_image_seq_len, config.base_shift, config.max_shift)
        unshifted = torch.tensor(np.linspace(1.0, 1 / 4, 4))
        # diffusers' own time shift of a timestep's noise level (set_timesteps adds the shift_terminal stretch on top)
        ours = family.schedule.flow_sigma(unshifted * family.num_timesteps)
        assert torch.allclose(ours.double(), scheduler.time_shift(mu, 1.0, unshifted).double(), atol=1e-6)
        assert family.schedule.shift == pytest.approx(math.exp(mu))
    # at 1024 px (4096 tokens) Qwen-Image's config gives shift exp(0.694) = 2.0
    family.set_resolution(1024)
    assert family.schedule.shift == pytest.approx(math.exp(0.5 + 0.4 * (4096 - 256) / (8192 - 256)))


def test_linear_time_shift_is_a_shift_by_mu():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from training.families.qwen_image import qwen_shift

    config = dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, base_image_seq_len=256, max_image_seq_len=8192,
                  time_shift_type="linear")
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    mu = 0.5 + 0.4 * (1024 - 256) / (8192 - 256)
    shift = qwen_shift(1024, dict(scheduler.config))
    sigma = torch.tensor([0.9, 0.5, 0.1], dtype=torch.float64)
    assert torch.allclose(shift * sigma / (1 + (shift - 1) * sigma), scheduler.time_shift(mu, 1.0, sigma))


def test_denoise_is_the_pipelines_prompt_encoding_packing_and_transformer_call(family):
    from diffusers import QwenImagePipeline

    pipe = family.pipeline
    prompts = ["a red cat", "a blue dog wearing a small green hat"]  # different lengths: the mask matters
    cond = family.encode_prompts(prompts)
    embeds, mask = pipe.encode_prompt(prompts, device="cpu")
    assert mask is not None and not mask.all()
    used = embeds.shape[1]
    assert torch.equal(cond["encoder_hidden_states"][:, :used], embeds) and torch.equal(cond["encoder_hidden_states_mask"][:, :used], mask)
    assert cond["encoder_hidden_states_mask"].dtype == torch.long and not cond["encoder_hidden_states_mask"][:, used:].any()

    x = torch.randn(family.latent_shape(2, RESOLUTION), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500.0, 900.0])
    ours = family.denoise(x, t, cond)
    b, c, h, w = x.shape
    reference = pipe.transformer(hidden_states=QwenImagePipeline._pack_latents(x, b, c, h, w), timestep=family.schedule.flow_sigma(t).float(),
                                 encoder_hidden_states=embeds, encoder_hidden_states_mask=mask,
                                 img_shapes=[[(1, h // 2, w // 2)]] * b).sample
    reference = QwenImagePipeline._unpack_latents(reference, RESOLUTION, RESOLUTION, family.vae_scale_factor)[:, :, 0]
    assert ours.shape == x.shape == (2, 16, 16, 16)
    assert torch.allclose(ours, reference, atol=1e-5)
    # a row alone (no padding at all) gives the same output as in the padded batch
    alone = family.denoise(x[:1], t[:1], family.encode_prompts(prompts[:1]))
    assert torch.allclose(alone, ours[:1], atol=1e-5)
    with pytest.raises(ValueError, match="multiple of 16 for the qwen_image family"):
        family.latent_shape(1, 30)


def test_true_cfg_uses_the_empty_prompt_and_batches_with_any_prompt(family):
    assert family.apply_guidance(1.0) == 1.0 and family.apply_guidance(2.5) == 2.5  # the method adds the CFG pass
    from training.families.base import cat_conditions

    cond = family.encode_prompts(["a long prompt about a red cat sitting on a chair in a garden"])
    null = family.null_condition(1)
    assert int(null["encoder_hidden_states_mask"].sum()) < int(cond["encoder_hidden_states_mask"].sum())
    embeds, _ = family.pipeline.encode_prompt([""], device="cpu")
    assert torch.equal(null["encoder_hidden_states"][:, : embeds.shape[1]], embeds)
    x = torch.randn(family.latent_shape(1, RESOLUTION), generator=torch.Generator().manual_seed(1))
    t = torch.tensor([700.0])
    both = family.denoise(torch.cat([x, x]), torch.cat([t, t]), cat_conditions([cond, null]))  # the trainer's batched CFG
    assert torch.allclose(both[1:], family.denoise(x, t, null), atol=1e-5)
    assert torch.allclose(both[:1], family.denoise(x, t, cond), atol=1e-5)
    assert (both[0] - both[1]).abs().max() > 1e-3


def test_decode_undoes_what_the_pipeline_does(family):
    from diffusers import QwenImagePipeline

    pipe = family.pipeline
    run = dict(prompt="a red cat", height=RESOLUTION, width=RESOLUTION, num_inference_steps=2, true_cfg_scale=1.0)
    packed = pipe(**run, generator=torch.Generator().manual_seed(2), output_type="latent").images
    images = pipe(**run, generator=torch.Generator().manual_seed(2), output_type="pt").images
    latents = QwenImagePipeline._unpack_latents(packed, RESOLUTION, RESOLUTION, family.vae_scale_factor)[:, :, 0]
    assert latents.shape == (1, 16, 16, 16)
    ours = family.decode(latents)
    assert ours.shape == images.shape == (1, 3, RESOLUTION, RESOLUTION)
    assert torch.allclose(ours, images, atol=1e-5)
    assert not torch.allclose(family.decode(latents * 1.5), images, atol=1e-3)


def test_training_distill_distils_qwen_image_into_a_lora(folder, tmp_path):
    from training.distill import EXIT_OK, main
    from training.lora_io import read_lora

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na blue dog wearing a hat\n")
    output = tmp_path / "qwen_tdm.safetensors"
    assert main(["--model", str(folder), "--prompts", str(prompts), "--lora-rank", "4", "--batch-size", "2",
                 "--resolution", str(RESOLUTION), "--output", str(output), "--cfg", "2.5", "--max-train-steps", "2",
                 "--validate-every", "2", "--checkpoint-every", "0"]) == EXIT_OK
    tensors, info = read_lora(output)
    assert info.base_family == "qwen_image" and info.prediction_type == "flow" and info.teacher_cfg == 2.5
    assert info.flow_shift == pytest.approx(math.exp(0.5 + 0.4 * (64 - 256) / (8192 - 256)))  # 64 tokens at 128 px
    assert tensors and all(k.startswith("transformer.transformer_blocks.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in tensors)
    for part in ("attn.to_q", "attn.add_k_proj", "attn.to_add_out", "img_mlp.net.0.proj", "txt_mlp.net.2"):
        assert f"transformer.transformer_blocks.1.{part}.lora_B.weight" in tensors, part
    assert any(v.abs().max() > 0 for k, v in tensors.items() if k.endswith(".lora_B.weight"))
    assert list((tmp_path / "qwen_tdm_run" / "validation").glob("step-*.png"))


def test_shipped_qwen_image_configs_are_the_real_model():
    """training/configs/qwen_image builds Qwen-Image's published sizes (on the meta device: no memory)."""
    import json

    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from training.families.qwen_image import CONFIGS

    with torch.device("meta"):
        parts = {
            "transformer": QwenImageTransformer2DModel.from_config(json.loads((CONFIGS / "transformer" / "config.json").read_text())),
            "vae": AutoencoderKLQwenImage.from_config(json.loads((CONFIGS / "vae" / "config.json").read_text())),
            "text_encoder": Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig.from_pretrained(str(CONFIGS / "text_encoder"))),
        }
    counts = {name: sum(p.numel() for p in module.parameters()) for name, module in parts.items()}
    assert counts == {"transformer": 20_430_401_088, "vae": 126_892_531, "text_encoder": 8_292_166_656}
