"""Qwen-Image from ComfyUI's split files (models/diffusion_models + text_encoders + vae), written by the test from a
tiny diffusers QwenImagePipeline: the trainer detects the file, finds its companions, and builds the same model
(the same prompt embeddings and network output; decoding equal to ComfyUI's own Wan VAE holding the VAE file).
Bad input: the shipped (real-size) configs refuse a file of another width naming --model-config, and a
diffusion model without its text encoder / VAE is refused by training.distill naming the files, nothing written."""
from __future__ import annotations

import pytest
import torch

from tests.helpers.tiny_qwen import comfy_wan_vae, save_tiny_qwen_pipeline, write_comfy_qwen_files

torch.set_num_threads(1)
RESOLUTION = 128


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_qwen_pipeline(tmp_path_factory.mktemp("qwen_files") / "qwen_image")


@pytest.fixture(scope="module")
def family(folder):
    from training.models import load_family

    family = load_family(str(folder))
    family.set_resolution(RESOLUTION)
    return family


@pytest.mark.parametrize("prefix,fp8", [("", False), ("model.diffusion_model.", True)], ids=["bf16-layout", "prefixed+fp8-scaled-text-only"])
def test_comfyui_qwen_image_files_load_as_the_same_model(folder, family, tmp_path, prefix, fp8):
    from safetensors.torch import load_file

    from training.models import _safetensors_keys, detect_single_file_family, load_family

    path = write_comfy_qwen_files(family.pipeline, tmp_path / "ComfyUI" / "models", prefix, text_encoder_fp8=fp8)
    assert detect_single_file_family(_safetensors_keys(path)) == "qwen_image"
    loaded = load_family(str(path), config_path=str(folder))  # the tiny architecture: its diffusers config folder
    assert loaded.name == "qwen_image" and loaded.network.config.num_layers == 2
    loaded.set_resolution(RESOLUTION)

    prompts = ["a red cat", "a blue dog wearing a hat"]
    cond, ours = family.encode_prompts(prompts), loaded.encode_prompts(prompts)
    assert torch.equal(ours["encoder_hidden_states_mask"], cond["encoder_hidden_states_mask"])
    x = torch.randn(family.latent_shape(2, RESOLUTION), generator=torch.Generator().manual_seed(2))
    t = torch.tensor([850.0, 300.0])
    if fp8:  # ComfyUI's scaled fp8: weight = fp8 * scale_weight, as ComfyUI computes it
        stored = load_file(str(next((path.parent.parent / "text_encoders").glob("*fp8_scaled*"))))
        key = "model.layers.0.self_attn.q_proj"
        dequantised = stored[f"{key}.weight"].float() * stored[f"{key}.scale_weight"]
        assert torch.equal(loaded.pipeline.text_encoder.state_dict()[f"model.language_model.layers.0.self_attn.q_proj.weight"], dequantised)
        assert not torch.equal(ours["encoder_hidden_states"], cond["encoder_hidden_states"])
        cond = ours  # fp8 rounding moves the embeddings; the transformer (kept exact) is compared on the same ones
    else:
        assert torch.allclose(ours["encoder_hidden_states"], cond["encoder_hidden_states"], atol=1e-6)
    assert torch.allclose(loaded.denoise(x, t, cond), family.denoise(x, t, cond), atol=1e-5)

    # the VAE file decodes as ComfyUI's own Wan VAE holding it decodes
    import comfy.latent_formats

    comfy_vae = comfy_wan_vae()
    comfy_vae.load_state_dict(load_file(str(path.parent.parent / "vae" / "qwen_image_vae.safetensors")))
    with torch.no_grad():
        raw = comfy.latent_formats.Wan21().process_out(x[:1].unsqueeze(2))
        comfy_images = ((comfy_vae.decode(raw)[:, :, 0] + 1) / 2).clamp(0, 1)
    assert torch.allclose(loaded.decode(x[:1]), comfy_images, atol=1e-5)
    assert torch.allclose(loaded.decode(x[:1]), family.decode(x[:1]), atol=1e-5)


def test_fp8_diffusion_model_is_cast_to_the_run_dtype(family, folder, tmp_path):
    from safetensors.torch import save_file

    from training.models import load_family

    path = write_comfy_qwen_files(family.pipeline, tmp_path / "models")
    save_file({k: v.to(torch.float8_e4m3fn) if v.ndim == 2 else v for k, v in family.network.state_dict().items()}, str(path))
    loaded = load_family(str(path), config_path=str(folder))
    weight = loaded.network.transformer_blocks[0].attn.to_q.weight
    assert weight.dtype == torch.float32
    assert torch.equal(weight, family.network.transformer_blocks[0].attn.to_q.weight.to(torch.float8_e4m3fn).float())


def test_bad_input_is_named_and_nothing_is_written(family, folder, tmp_path, capsys):
    from training.distill import main
    from training.errors import TrainingInputError
    from training.models import load_family

    models = tmp_path / "ComfyUI" / "models"
    path = write_comfy_qwen_files(family.pipeline, models)
    # Qwen-Image's own (shipped) configs refuse a file of another width, naming the fix
    with pytest.raises(TrainingInputError, match="--model-config"):
        load_family(str(path))
    # a diffusion model without its text encoder and VAE: both expected files named, no LoRA, no run folder
    for companion in (*(models / "text_encoders").iterdir(), models / "vae" / "qwen_image_vae.safetensors"):
        companion.unlink()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\n")
    output = tmp_path / "out" / "qwen_tdm.safetensors"
    assert main(["--model", str(path), "--model-config", str(folder), "--prompts", str(prompts), "--output", str(output),
                 "--resolution", str(RESOLUTION), "--max-train-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "qwen_image_bf16.safetensors is a Qwen-Image diffusion model" in err
    assert "models/text_encoders/qwen_2.5_vl_7b_fp8_scaled.safetensors and models/vae/qwen_image_vae.safetensors are missing" in err
    assert "Traceback" not in err
    leftovers = list((tmp_path / "out").rglob("*")) if (tmp_path / "out").exists() else []
    assert not output.exists() and leftovers == []


def test_without_a_config_folder_the_tokenizer_is_comfyuis_own():
    from transformers import Qwen2Tokenizer

    from tests.helpers.tiny_qwen import comfy_tokenizer_folder
    from training.families.qwen_image import CONFIGS
    from training.families.qwen_image_files import _tokenizer

    ours = _tokenizer(CONFIGS)  # the shipped configs carry no vocabulary: ComfyUI's comfy/text_encoders/qwen25_tokenizer
    reference = Qwen2Tokenizer.from_pretrained(str(comfy_tokenizer_folder()))
    text = "<|im_start|>user\na red fox in the snow<|im_end|>"
    assert ours(text).input_ids == reference(text).input_ids and len(ours) == len(reference) == 151669


def test_training_distill_runs_from_the_comfyui_files(family, folder, tmp_path):
    from training.distill import EXIT_OK, main
    from training.lora_io import read_lora
    from training.models import file_sha256

    path = write_comfy_qwen_files(family.pipeline, tmp_path / "ComfyUI" / "models")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\n")
    output = tmp_path / "ComfyUI" / "models" / "loras" / "qwen_image_tdm4.safetensors"
    assert main(["--model", str(path), "--model-config", str(folder), "--prompts", str(prompts), "--output", str(output),
                 "--resolution", str(RESOLUTION), "--batch-size", "1", "--lora-rank", "4", "--cfg", "2.5", "--max-train-steps", "1",
                 "--validate-every", "0", "--checkpoint-every", "0"]) == EXIT_OK
    tensors, info = read_lora(output)
    assert info.base_family == "qwen_image" and info.base_hash == file_sha256(path) and info.teacher_cfg == 2.5
    assert tensors and all(k.startswith("transformer.transformer_blocks.") for k in tensors)
