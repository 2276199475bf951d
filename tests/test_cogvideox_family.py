"""The CogVideoX trainer family on tiny diffusers CogVideoXPipeline folders (2B's sin-cos layout and 5B's rotary
one): its schedule is the pipeline scheduler's own table (SNR shift, zero terminal SNR, v-prediction), one denoise
is exactly the transformer call CogVideoXPipeline makes (captured from a real pipeline run with CFG, negative prompt
included), frame counts the VAE cannot encode are refused, and ``training.distill`` runs end to end on 5-D latents."""
from __future__ import annotations

import json

import pytest
import torch

from tests.helpers.tiny_cogvideox import SHIPPED, save_tiny_cogvideox

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("cogvideox")
    return {"2b": save_tiny_cogvideox(root / "cog2b"), "5b": save_tiny_cogvideox(root / "cog5b", seed=1, rotary=True)}


def load(folder):
    from training.models import load_family

    return load_family(str(folder))


def test_shipped_configs_are_cogvideox_2b():
    """training/configs/cogvideox builds CogVideoX-2B's published sizes on the meta device (the memory of docs/models/cogvideox.md)."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    transformer_config = json.loads((SHIPPED / "transformer" / "config.json").read_text())
    with torch.device("meta"):
        parts = {
            "transformer": CogVideoXTransformer3DModel.from_config(transformer_config),
            "vae": AutoencoderKLCogVideoX.from_config(json.loads((SHIPPED / "vae" / "config.json").read_text())),
            "text_encoder": T5EncoderModel(T5Config.from_pretrained(str(SHIPPED / "text_encoder"))),
        }
    counts = {name: sum(p.numel() for p in module.parameters()) for name, module in parts.items()}
    assert counts == {"transformer": 1_693_783_872, "vae": 215_583_907, "text_encoder": 4_762_310_656}
    assert not parts["transformer"].config.use_rotary_positional_embeddings  # 2B: sin-cos positions (5B: rotary)
    scheduler = json.loads((SHIPPED / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction" and scheduler["rescale_betas_zero_snr"] and scheduler["snr_shift_scale"] == 3.0


def test_schedule_is_the_pipeline_schedulers_table(folders):
    """SNR shift 3 then zero terminal SNR on alphas_cumprod, as CogVideoXDDIMScheduler builds it; tdm_core's x0 from
    v equals the scheduler's own pred_original_sample, and t = 999 is pure noise."""
    from training.families.pipeline_family import schedule_from_scheduler_config

    family = load(folders["2b"])
    scheduler = family.pipeline.scheduler
    assert family.prediction_type == "v_prediction"
    assert torch.equal(family.schedule.alphas_cumprod, scheduler.alphas_cumprod.double())
    assert family.schedule.alphas_cumprod[-1] == 0
    # the generic betas rule (no SNR shift) would train on another schedule: the family must not use it
    generic = schedule_from_scheduler_config(dict(scheduler.config))
    assert (generic.alphas_cumprod - family.schedule.alphas_cumprod).abs().max() > 0.05

    from tdm_core.parameterization import x0_eps_from_output

    gen = torch.Generator().manual_seed(0)
    x, v = torch.randn(1, 4, 3, 4, 6, generator=gen), torch.randn(1, 4, 3, 4, 6, generator=gen)
    scheduler.set_timesteps(4)
    for t in scheduler.timesteps.tolist():
        a, s = family.schedule.alpha_sigma(torch.tensor([float(t)]))
        x0, _ = x0_eps_from_output(v.double(), x.double(), a, s, "v_prediction")
        reference = scheduler.step(v, t, x).pred_original_sample
        torch.testing.assert_close(x0.float(), reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["2b", "5b"])
def test_denoise_is_the_pipelines_own_transformer_call(folders, variant):
    """A real CogVideoXPipeline run (CFG 3, 2 steps) with a hook on its transformer: the family's denoise of the
    same latents (trainer layout) with its prompt / empty-prompt conditions gives the same outputs, rotary
    embeddings (5B) included."""
    family = load(folders[variant])
    family.set_num_frames(9)
    pipe = family.pipeline
    calls = []
    hook = pipe.transformer.register_forward_hook(lambda module, args, kwargs, out: calls.append((kwargs, out[0])), with_kwargs=True)
    latents = torch.randn(1, 3, 4, 4, 6, generator=torch.Generator().manual_seed(2))  # the pipeline's (B, F, C, H, W)
    try:
        pipe("a red cat", num_frames=9, height=32, width=48, num_inference_steps=2, guidance_scale=3.0,
             latents=latents, output_type="latent")
    finally:
        hook.remove()
    assert len(calls) == 2
    kwargs, reference = calls[0]
    assert (kwargs["image_rotary_emb"] is not None) == (variant == "5b")
    cond = family.encode_prompts(["a red cat"])
    both = {"encoder_hidden_states": torch.cat([family.null_condition(1)["encoder_hidden_states"], cond["encoder_hidden_states"]])}
    x = kwargs["hidden_states"].permute(0, 2, 1, 3, 4)  # trainer layout (B, C, F, H, W)
    assert x.shape == family.latent_shape(2, None) == (2, 4, 3, 4, 6)
    ours = family.denoise(x, kwargs["timestep"].float(), both)
    torch.testing.assert_close(ours, reference.permute(0, 2, 1, 3, 4), atol=1e-5, rtol=1e-5)


def test_frame_counts_and_sizes_the_vae_cannot_take_are_refused(folders):
    family = load(folders["2b"])
    assert family.num_frames == 9 and family.latent_shape(1) == (1, 4, 3, 4, 6)  # the model's own sample_frames
    with pytest.raises(ValueError, match=r"--num-frames 8 cannot be encoded by the CogVideoX VAE: it needs 4k \+ 1 frames, e.g. 5 or 9"):
        family.set_num_frames(8)
    family.set_num_frames(17)
    assert family.latent_shape(2, 32) == (2, 4, 5, 4, 4)
    with pytest.raises(ValueError, match="not a positive multiple of 16"):
        family.latent_shape(1, 24)


def test_training_distill_runs_end_to_end_on_video_latents(folders, tmp_path, capsys):
    from training.distill import EXIT_OK, main
    from training.lora_io import read_lora

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na blue dog\n")
    common = ["--model", str(folders["2b"]), "--prompts", str(prompts), "--lora-rank", "4", "--batch-size", "2",
              "--resolution", "32", "--checkpoint-every", "0"]
    bad = tmp_path / "bad.safetensors"
    assert main([*common, "--output", str(bad), "--num-frames", "8"]) == 2
    assert "--num-frames 8 cannot be encoded by the CogVideoX VAE" in capsys.readouterr().err
    assert not bad.exists() and not (tmp_path / "bad_run").exists()

    output = tmp_path / "cog_tdm.safetensors"
    assert main([*common, "--output", str(output), "--num-frames", "5", "--cfg", "3", "--grid", "999,856,665,399",
                 "--max-train-steps", "2", "--validate-every", "2", "--teacher-validation-steps", "2"]) == EXIT_OK
    tensors, info = read_lora(output)
    assert info.base_family == "cogvideox" and info.prediction_type == "v_prediction" and info.grid == [999, 856, 665, 399]
    assert info.teacher_cfg == 3
    assert tensors and all(k.startswith("transformer.transformer_blocks.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in tensors)
    assert any(v.abs().max() > 0 for k, v in tensors.items() if k.endswith(".lora_B.weight"))
    from PIL import Image

    grid = Image.open(next((tmp_path / "cog_tdm_run" / "validation").glob("step-*.png")))
    assert grid.size == (4 * 3 * 32, 2 * 32)  # first, middle and last frame of each video: teacher + student at 1, 2, 4 steps


def test_image_inputs_to_the_video_family_are_refused(folders, tmp_path, capsys):
    from tests.helpers.tiny_models import save_tiny_pipeline
    from training.distill import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\n")
    sd15 = save_tiny_pipeline("sd15", tmp_path / "sd15")
    out = tmp_path / "x.safetensors"
    base = ["--prompts", str(prompts), "--output", str(out), "--lora-rank", "4", "--batch-size", "1"]
    assert main(["--model", str(sd15), "--num-frames", "9", *base]) == 2
    assert "--num-frames 9 is for video models; sd15 makes images: drop --num-frames" in capsys.readouterr().err
    assert main(["--model", str(sd15), "--family", "cogvideox", *base]) == 2
    assert "holds a sd15 model, not cogvideox" in capsys.readouterr().err
    single = tmp_path / "model.safetensors"
    from safetensors.torch import save_file

    save_file({"cond_stage_model.transformer.x": torch.zeros(1)}, str(single))
    assert main(["--model", str(single), "--family", "cogvideox", *base]) == 2
    assert "CogVideoX loads from a diffusers folder (model_index.json), not a single file (model.safetensors holds a sd15 model)" in capsys.readouterr().err
    assert not out.exists()
