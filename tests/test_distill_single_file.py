"""The README path: a ComfyUI models/checkpoints single file in, a models/loras LoRA out."""
from __future__ import annotations

import pytest

from training.distill import EXIT_OK, main
from training.lora_io import read_lora


@pytest.mark.slow
def test_single_file_checkpoint_trains_into_a_lora_stock_comfyui_loads(tmp_path):
    from diffusers import UNet2DConditionModel

    from tests.helpers.tiny_models import comfy_model_from_diffusers_unet, import_comfy, save_tiny_single_file
    from training.models import file_sha256

    checkpoint, config_folder = save_tiny_single_file("sd15", tmp_path / "checkpoints")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\n")
    output = tmp_path / "loras" / "tdm_sd15.safetensors"
    code = main([str(x) for x in ["--model", checkpoint, "--model-config", config_folder, "--prompts", prompts,
                                  "--output", output, "--max-train-steps", 2, "--lora-rank", 4, "--validate-every", 0]])
    assert code == EXIT_OK
    tensors, info = read_lora(output)
    assert info.base_hash == file_sha256(checkpoint) and info.base_family == "sd15"
    comfy = import_comfy()
    comfy_model = comfy_model_from_diffusers_unet(UNet2DConditionModel.from_pretrained(str(config_folder / "unet")), "sd15")
    patches = comfy.lora.load_lora(tensors, comfy.lora.model_lora_keys_unet(comfy_model, {}), log_missing=False)
    assert len(patches) == sum(k.endswith(".lora_down.weight") for k in tensors) > 0  # no key skipped
