"""Z-Image from ComfyUI's split files (models/diffusion_models in ComfyUI's Lumina2 layout, text_encoders/qwen_3_4b,
vae/ae): the loader builds the same model as the diffusers folder, through diffusers' own from_single_file; a
diffusion model without its companions is refused naming the expected files, with nothing written; the shipped
chat template on ComfyUI's bundled Qwen vocabulary tokenizes a prompt exactly as ComfyUI's own Z-Image tokenizer."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers.tiny_zimage import comfy_zimage_state, save_tiny_zimage

torch.set_num_threads(1)
RESOLUTION = 32
DIFFUSION_MODEL = "z_image_turbo_bf16.safetensors"  # the names ComfyUI's Z-Image-Turbo template uses
TEXT_ENCODER, VAE = "qwen_3_4b.safetensors", "ae.safetensors"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def folder_family(tmp_path_factory):
    from training.models import load_family

    folder = save_tiny_zimage(tmp_path_factory.mktemp("z_image_files") / "z_image")
    return folder, load_family(str(folder))


def write_comfy_z_image_files(pipe, models: Path, prefix: str = "") -> Path:
    """The tiny pipeline as ComfyUI's files: the transformer in ComfyUI's NextDiT layout (its own key map, fused qkv,
    plus the unused norm_final its files carry), Qwen3 in the causal-LM layout ("model." prefix, lm_head), the VAE
    in the LDM layout. Returns the diffusion-model file."""
    from safetensors.torch import save_file

    from tests.helpers.tiny_models import ldm_vae_state

    for sub in ("diffusion_models", "text_encoders", "vae"):
        (models / sub).mkdir(parents=True, exist_ok=True)
    state = comfy_zimage_state(pipe.transformer)
    state["norm_final.weight"] = torch.ones(pipe.transformer.config.dim)
    save_file({prefix + k: v.contiguous() for k, v in state.items()}, str(models / "diffusion_models" / DIFFUSION_MODEL))
    text = {f"model.{k}": v.detach().clone().contiguous() for k, v in pipe.text_encoder.state_dict().items()}
    text["lm_head.weight"] = text["model.embed_tokens.weight"].clone()
    save_file(text, str(models / "text_encoders" / TEXT_ENCODER))
    save_file(ldm_vae_state(pipe.vae), str(models / "vae" / VAE))
    return models / "diffusion_models" / DIFFUSION_MODEL


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_comfyui_z_image_files_load_as_the_same_model(folder_family, tmp_path, prefix):
    from training.errors import TrainingInputError
    from training.models import detect_single_file_family, load_family, _safetensors_keys

    folder, family = folder_family
    path = write_comfy_z_image_files(family.pipeline, tmp_path / "ComfyUI" / "models", prefix)
    assert detect_single_file_family(_safetensors_keys(path)) == "z_image"
    loaded = load_family(str(path), config_path=str(folder))  # the tiny width is not Z-Image's: its config says it
    assert loaded.name == "z_image" and loaded.is_turbo and loaded.schedule.shift == 3.0
    with pytest.raises(ValueError, match="use --cfg 1"):
        loaded.apply_guidance(2.0)
    for f in (family, loaded):
        f.set_resolution(RESOLUTION)
    prompts = ["a red cat", "a blue dog under a tree"]
    cond = family.encode_prompts(prompts)
    got = loaded.encode_prompts(prompts)
    assert torch.equal(got["prompt_mask"], cond["prompt_mask"])
    torch.testing.assert_close(got["prompt_embeds"], cond["prompt_embeds"], rtol=1e-5, atol=1e-6)
    x = torch.randn(family.latent_shape(2, RESOLUTION), generator=torch.Generator().manual_seed(2))
    t = torch.tensor([850.0, 300.0])
    torch.testing.assert_close(loaded.denoise(x, t, cond), family.denoise(x, t, cond), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loaded.decode(x[:, :, :8, :8]), family.decode(x[:, :, :8, :8]), rtol=1e-5, atol=1e-5)

    # Z-Image-Turbo's own configs (shipped) refuse a file of another width, naming the fix
    with pytest.raises(TrainingInputError, match="--model-config"):
        load_family(str(path))


def test_a_diffusion_model_without_its_companions_is_refused_naming_them(folder_family, tmp_path, capsys):
    from training.distill import main
    from training.errors import TrainingInputError
    from training.models import load_family

    folder, family = folder_family
    models = tmp_path / "ComfyUI" / "models"
    path = write_comfy_z_image_files(family.pipeline, models)
    (models / "text_encoders" / TEXT_ENCODER).unlink()
    with pytest.raises(TrainingInputError, match=r"models/text_encoders/qwen_3_4b.safetensors is missing"):
        load_family(str(path), config_path=str(folder))
    (models / "vae" / VAE).unlink()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\n")
    output = tmp_path / "out" / "z_image_tdm.safetensors"
    assert main(["--model", str(path), "--model-config", str(folder), "--prompts", str(prompts), "--output", str(output),
                 "--resolution", "32", "--lora-rank", "2", "--batch-size", "1"]) == 2
    err = capsys.readouterr().err
    assert "models/text_encoders/qwen_3_4b.safetensors and models/vae/ae.safetensors are missing" in err
    assert "qwen_3_4b.safetensors, ae.safetensors" in err and not output.exists()
    assert not output.parent.exists() or not any(output.parent.iterdir())


def test_comfyuis_qwen_vocabulary_with_the_shipped_template_tokenizes_as_comfyuis_z_image_tokenizer(pack):
    import comfy.text_encoders.z_image

    from training.families.z_image_files import CONFIGS, _tokenizer

    tokenizer = _tokenizer(CONFIGS)  # no tokenizer in the shipped configs: ComfyUI's qwen25_tokenizer + Qwen3's template
    prompt = "A cat in a hat, photo; 4k <|im_end|> end"
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True,
                                             enable_thinking=True)
    comfy_tokenizer = comfy.text_encoders.z_image.ZImageTokenizer()
    assert rendered == comfy_tokenizer.llama_template.format(prompt)
    ours = tokenizer(rendered).input_ids
    theirs = [token for token, _ in comfy_tokenizer.tokenize_with_weights(prompt)["qwen3_4b"][0]]
    assert ours == theirs and ours[0] == 151644  # <|im_start|>
