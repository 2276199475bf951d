"""The Z-Image trainer family on a tiny diffusers ZImagePipeline folder: one Euler step of the family equals one
step of ZImagePipeline's own __call__ (prompt encoding incl. the chat template and variable lengths, the
transformer's 1 - sigma timestep, its negated output, the scheduler config's shift, CFG as the pipeline's
guidance_scale + 1), the turbo model refuses a CFG it was distilled not to need, and ``training.distill``
distils it into a LoRA in the "diffusion_model." namespace stock ComfyUI maps for Lumina2 / Z-Image."""
from __future__ import annotations

import json

import pytest
import torch

from tests.helpers.tiny_zimage import save_tiny_zimage

torch.set_num_threads(1)
RESOLUTION = 32  # 16x16 latents of the tiny 2x VAE, 8x8 = 64 tokens (no image padding)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_zimage(tmp_path_factory.mktemp("z_image") / "z_image")


@pytest.fixture(scope="module")
def family(folder):
    from training.models import load_family

    family = load_family(str(folder))
    family.set_resolution(RESOLUTION)
    return family


def one_pipeline_step(pipe, prompts, latents, sigma, guidance_scale):
    """ZImagePipeline.__call__ itself for one Euler step from ``sigma`` (before its shift) to 0, as latents."""
    return pipe(prompt=list(prompts), latents=latents.clone(), sigmas=[sigma], num_inference_steps=1,
                guidance_scale=guidance_scale, output_type="latent", height=RESOLUTION, width=RESOLUTION).images


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_one_step_of_the_family_is_one_step_of_zimage_pipeline(family, cfg):
    prompts = ["a red cat", "a blue dog under a tall green tree at night"]  # different lengths: padding + mask
    cond = family.encode_prompts(prompts)
    lengths = cond["prompt_mask"].sum(1)
    assert lengths[0] < lengths[1] and cond["prompt_embeds"].shape[1] == family.max_sequence_length
    embeds, _ = family.pipeline.encode_prompt(list(prompts), do_classifier_free_guidance=False)
    for row, e in enumerate(embeds):
        assert torch.equal(cond["prompt_embeds"][row, : len(e)], e) and int(lengths[row]) == len(e)

    x = torch.randn(family.latent_shape(2, RESOLUTION), generator=torch.Generator().manual_seed(0))
    unshifted = 0.7
    t = torch.full((2,), unshifted * family.num_timesteps)
    sigma = family.schedule.flow_sigma(t).float().view(-1, 1, 1, 1)
    assert family.apply_guidance(cfg) == cfg  # the method's CFG: cond + (w - 1) (cond - uncond)
    v = family.denoise(x, t, cond)
    if cfg != 1:
        v_null = family.denoise(x, t, family.null_condition(2))
        v = v + (cfg - 1) * (v - v_null)
    ours = x - sigma * v  # Euler from sigma to 0 with velocity eps - x0
    reference = one_pipeline_step(family.pipeline, prompts, x, unshifted, guidance_scale=cfg - 1)
    assert family.schedule.shift == 3.0 and sigma[0].item() == pytest.approx(3 * 0.7 / (1 + 2 * 0.7))
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=5e-5)  # CFG scales float noise by w


def test_shift_is_the_scheduler_configs_and_resolution_must_fit_the_patches(family):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift

    from training.families.z_image import ZImageFamily

    with pytest.raises(ValueError, match="multiple of 4 for the z_image family"):
        family.latent_shape(1, 30)
    pipe = family.pipeline
    original = pipe.scheduler
    try:
        pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=6.0)
        assert ZImageFamily(pipe).schedule.shift == 6.0
        pipe.scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
        other = ZImageFamily(pipe)
        other.set_resolution(64)  # 32x32 latents: 256 tokens
        import math
        assert other.schedule.shift == pytest.approx(math.exp(calculate_shift(256)))
    finally:
        pipe.scheduler = original


def test_turbo_refuses_cfg_and_cfg_below_one_is_refused(family, folder, tmp_path, capsys):
    from training.distill import main
    from training.families.z_image import ZImageFamily

    with pytest.raises(ValueError, match="below 1"):
        family.apply_guidance(0.0)
    turbo = ZImageFamily(family.pipeline, source_path="/models/Z-Image-Turbo")
    assert turbo.apply_guidance(1.0) == 1.0
    with pytest.raises(ValueError, match="distilled to sample without CFG .* use --cfg 1"):
        turbo.apply_guidance(4.0)

    turbo_folder = tmp_path / "Z-Image-Turbo"
    turbo_folder.symlink_to(folder, target_is_directory=True)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\n")
    out = tmp_path / "bad.safetensors"
    assert main(["--model", str(turbo_folder), "--prompts", str(prompts), "--output", str(out), "--cfg", "4",
                 "--resolution", "32", "--lora-rank", "2", "--batch-size", "1"]) == 2
    assert "use --cfg 1" in capsys.readouterr().err and not out.exists()


def test_training_distill_distils_z_image_into_a_diffusion_model_namespace_lora(folder, tmp_path):
    from training.distill import EXIT_OK, main
    from training.lora_io import read_lora

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na blue dog under a tree\n")
    output = tmp_path / "z_image_tdm.safetensors"
    assert main(["--model", str(folder), "--prompts", str(prompts), "--lora-rank", "4", "--batch-size", "2",
                 "--resolution", "32", "--output", str(output), "--cfg", "2", "--max-train-steps", "2",
                 "--validate-every", "2", "--checkpoint-every", "0"]) == EXIT_OK
    tensors, info = read_lora(output)
    assert info.base_family == "z_image" and info.prediction_type == "flow" and info.teacher_cfg == 2.0
    assert info.flow_shift == 3.0  # what ComfyUI's ModelSamplingAuraFlow must be set to
    assert tensors and all(k.startswith("diffusion_model.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in tensors)
    for part in ("layers.0.attention.to_q", "layers.1.attention.to_out.0", "layers.0.feed_forward.w2",
                 "noise_refiner.0.attention.to_k", "context_refiner.0.feed_forward.w1"):
        assert f"diffusion_model.{part}.lora_B.weight" in tensors, part
    assert any(v.abs().max() > 0 for k, v in tensors.items() if k.endswith(".lora_B.weight"))


def test_shipped_configs_are_z_image_turbo():
    """training/configs/z_image builds Z-Image-Turbo's published sizes (meta device: no memory); bf16 bytes = 2 x."""
    from diffusers import ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    from training.families.z_image_files import CONFIGS

    with torch.device("meta"):
        transformer = ZImageTransformer2DModel.from_config(json.loads((CONFIGS / "transformer" / "config.json").read_text()))
        text_encoder = Qwen3Model(Qwen3Config.from_pretrained(str(CONFIGS / "text_encoder")))
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in (("transformer", transformer), ("text_encoder", text_encoder))}
    assert counts == {"transformer": 6_154_908_736, "text_encoder": 4_022_468_096}
    scheduler = json.loads((CONFIGS / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["shift"] == 3.0 and not scheduler["use_dynamic_shifting"]
