"""Wan from ComfyUI's split files (models/diffusion_models + text_encoders + vae, the names of ComfyUI's Wan 2.1
template), written by the test from a tiny diffusers WanPipeline: the trainer detects the file, finds its
companions and builds the same model (prompt embeddings, network output, decoding; the VAE file also decodes
as ComfyUI's own WanVAE). Bad input: a diffusion model without its VAE, a non-Wan file given as --family wan and one expert of Wan 2.2 A14B (told by ComfyUI's file name), are refused by training.distill naming the fix,
nothing written."""
from __future__ import annotations

import pytest
import torch

from tests.helpers.tiny_wan import comfy_wan_vae, save_tiny_wan_pipeline, write_comfy_wan_files

torch.set_num_threads(1)
RESOLUTION, FRAMES = 64, 5


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_wan_pipeline(tmp_path_factory.mktemp("wan_files") / "wan")


@pytest.fixture(scope="module")
def family(folder):
    from training.models import load_family

    family = load_family(str(folder))
    family.set_num_frames(FRAMES)
    family.set_resolution(RESOLUTION)
    return family


@pytest.mark.parametrize("prefix,fp8", [("", False), ("model.diffusion_model.", True)], ids=["bf16-layout", "prefixed+fp8-scaled-umt5"])
def test_comfyui_wan_files_load_as_the_same_model(folder, family, tmp_path, prefix, fp8):
    from training.models import _safetensors_keys, detect_single_file_family, load_family

    path = write_comfy_wan_files(family.pipeline, tmp_path / "ComfyUI" / "models", prefix, fp8=fp8)
    assert detect_single_file_family(_safetensors_keys(path)) == "wan"
    loaded = load_family(str(path), config_path=str(folder))  # the tiny architecture and its tokenizer
    assert loaded.name == "wan" and loaded.network.config.num_layers == 2 and loaded.schedule.shift == 3.0
    loaded.set_num_frames(FRAMES)
    loaded.set_resolution(RESOLUTION)

    prompts = ["a red cat", "a blue dog wearing a hat"]
    cond, ours = family.encode_prompts(prompts), loaded.encode_prompts(prompts)
    if fp8:  # fp8 rounding moves the embeddings; the transformer (kept exact) is compared on the same ones
        from safetensors.torch import load_file

        stored = load_file(str(path.parent.parent / "text_encoders" / "umt5_xxl_fp8_e4m3fn_scaled.safetensors"))
        key = "encoder.block.1.layer.0.SelfAttention.q"  # ComfyUI's scaled fp8: weight = fp8 * scale_weight
        dequantised = stored[f"{key}.weight"].float() * stored[f"{key}.scale_weight"]
        assert torch.equal(loaded.pipeline.text_encoder.state_dict()[f"{key}.weight"], dequantised)
        assert not torch.equal(ours["encoder_hidden_states"], cond["encoder_hidden_states"])
    else:
        assert torch.equal(ours["encoder_hidden_states"], cond["encoder_hidden_states"])
    x = torch.randn(family.latent_shape(2, RESOLUTION), generator=torch.Generator().manual_seed(2))
    t = torch.tensor([850.0, 300.0])
    assert torch.allclose(loaded.denoise(x, t, cond), family.denoise(x, t, cond), atol=1e-6)
    assert torch.allclose(loaded.decode(x[:1]), family.decode(x[:1]), atol=1e-6)


def test_the_vae_file_decodes_as_comfyuis_own_wan_vae(family, tmp_path):
    from safetensors.torch import load_file

    path = write_comfy_wan_files(family.pipeline, tmp_path / "models")
    comfy_vae = comfy_wan_vae()
    comfy_vae.load_state_dict(load_file(str(path.parent.parent / "vae" / "wan_2.1_vae.safetensors")))
    z = torch.randn(family.latent_shape(1, RESOLUTION), generator=torch.Generator().manual_seed(3))
    raw = family.pipeline.vae.decode(z).sample  # both decode the VAE's own latent scale
    with torch.no_grad():
        theirs = comfy_vae.decode(z)
    assert raw.shape == theirs.shape == (1, 3, FRAMES, RESOLUTION, RESOLUTION)
    assert torch.allclose(raw.clamp(-1, 1), theirs.clamp(-1, 1), atol=1e-5)


def test_training_distill_runs_from_the_split_files(folder, family, tmp_path):
    from training.distill import EXIT_OK, main
    from training.lora_io import read_lora
    from training.models import file_sha256

    path = write_comfy_wan_files(family.pipeline, tmp_path / "ComfyUI" / "models")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\n")
    output = tmp_path / "wan_tdm.safetensors"
    assert main(["--model", str(path), "--model-config", str(folder), "--prompts", str(prompts), "--lora-rank", "2",
                 "--resolution", str(RESOLUTION), "--num-frames", str(FRAMES), "--output", str(output), "--max-train-steps", "1",
                 "--validate-every", "0", "--checkpoint-every", "0"]) == EXIT_OK
    tensors, info = read_lora(output)
    assert info.base_family == "wan" and info.base_hash == file_sha256(path)  # the diffusion-model file it was distilled from
    assert all(k.startswith("diffusion_model.blocks.") for k in tensors)


def test_missing_vae_and_a_non_wan_file_are_refused_and_nothing_is_written(folder, family, tmp_path, capsys):
    from safetensors.torch import save_file

    from training.distill import EXIT_OK, main

    models = tmp_path / "ComfyUI" / "models"
    path = write_comfy_wan_files(family.pipeline, models)
    (models / "vae" / "wan_2.1_vae.safetensors").unlink()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\n")
    output = tmp_path / "out" / "wan_tdm.safetensors"
    common = ["--model-config", str(folder), "--prompts", str(prompts), "--output", str(output), "--max-train-steps", "1", "--num-frames", str(FRAMES),
              "--resolution", str(RESOLUTION)]
    assert main(["--model", str(path)] + common) != EXIT_OK
    err = capsys.readouterr().err
    assert "is a Wan diffusion model in ComfyUI's layout, but models/vae/wan_2.1_vae.safetensors is missing" in err
    other = models / "diffusion_models" / "not_wan.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(6, 2)}, str(other))
    assert main(["--model", str(other), "--family", "wan"] + common) != EXIT_OK
    assert "not_wan.safetensors is not a Wan diffusion model" in capsys.readouterr().err
    expert = models / "diffusion_models" / "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors"  # ComfyUI's A14B file name
    expert.symlink_to(path)
    assert main(["--model", str(expert)] + common) != EXIT_OK
    assert "is one expert of the two-expert Wan 2.2 A14B: TDM for it is designed (one LoRA pair per expert" in capsys.readouterr().err
    assert not output.exists() and not (tmp_path / "out").exists()
