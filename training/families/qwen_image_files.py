"""Qwen-Image from the files a ComfyUI user has, into a diffusers ``QwenImagePipeline`` the trainer's family wraps.

    models/diffusion_models/qwen_image_bf16.safetensors   the transformer (also qwen_image_fp8_e4m3fn, any name)
    models/text_encoders/qwen_2.5_vl_7b*.safetensors       Qwen2.5-VL-7B (qwen_2.5_vl_7b_fp8_scaled.safetensors in
                                                            ComfyUI's Qwen-Image template; ComfyUI's older "clip" folder too)
    models/vae/qwen_image_vae.safetensors                  the Qwen-Image VAE in Wan 2.1's original layout

``--model`` names the diffusion-model file; the text encoder and the VAE are looked up in the sibling ComfyUI
folders. ComfyUI's Qwen-Image file uses diffusers' own parameter names (ComfyUI's QwenImage model is written
with them), optionally under ``model.diffusion_model.``. The text encoder file is in Qwen2.5-VL's original layout
(``model.layers.*``, ``visual.*``), which transformers converts itself. Every file's weight format (fp16, bf16, fp8,
ComfyUI's "fp8_scaled") is read by ``weight_formats.read_weights``. The VAE goes through diffusers' own Wan VAE
converter. The configurations come from
``training/configs/qwen_image`` (Qwen-Image's own; the number of blocks is read from the file) or from
``--model-config``, a diffusers folder of the same architecture, whose tokenizer folder is used when it has
one; otherwise the tokenizer is ComfyUI's own (``comfy/text_encoders/qwen25_tokenizer``).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate import init_empty_weights

from training.errors import TrainingInputError

from .file_weights import CHECKPOINT_PREFIX, network_from_state, strip_checkpoint_prefix
from .qwen_image import CONFIGS
from .text_encoders import QWEN_TOKENIZER, comfy_tokenizer_folders, text_encoder_files
from .weight_formats import read_weights

MARKERS = ("txt_norm.weight", "transformer_blocks.0.img_mlp.net.0.proj.weight")  # what only a Qwen-Image DiT has
TEXT_ENCODER_GLOB, TEXT_ENCODER_FILE = "qwen_2.5_vl_7b*.safetensors", "models/text_encoders/qwen_2.5_vl_7b_fp8_scaled.safetensors"
VAE_FILE = "qwen_image_vae.safetensors"
UNUSED_TEXT_WEIGHTS = ("model.visual.", "lm_head.")  # the vision tower and the LM head: text-to-image never runs them


def is_qwen_image(keys) -> bool:
    keys = set(keys)
    return all(k in keys for k in MARKERS) or all(CHECKPOINT_PREFIX + k in keys for k in MARKERS)


def companion_files(diffusion_model: Path) -> dict[str, Path]:
    """The text encoder and the VAE in the ComfyUI folders beside ``models/diffusion_models``; a clear error otherwise."""
    models = diffusion_model.resolve().parent.parent
    wanted = {"text_encoder": (text_encoder_files(models, TEXT_ENCODER_GLOB), TEXT_ENCODER_FILE),
              "vae": ([f for f in (models / "vae" / VAE_FILE,) if f.is_file()], f"models/vae/{VAE_FILE}")}
    missing = [where for found, where in wanted.values() if not found]
    if missing:
        raise TrainingInputError(
            f"{diffusion_model.name} is a Qwen-Image diffusion model in ComfyUI's layout, but {' and '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} missing under {models}: put the files ComfyUI's Qwen-Image workflow uses "
            f"there (a {TEXT_ENCODER_GLOB} text encoder and {VAE_FILE}), or pass a diffusers Qwen-Image folder as --model.")
    return {name: found[0] for name, (found, _) in wanted.items()}


def _transformer(path: Path, config_dir: Path, dtype):
    from diffusers import QwenImageTransformer2DModel

    state = strip_checkpoint_prefix(read_weights(path, dtype))
    config = json.loads((config_dir / "transformer" / "config.json").read_text())
    width = state["img_in.weight"].shape[0]
    if width != config["num_attention_heads"] * config["attention_head_dim"]:
        raise TrainingInputError(f"{path.name} is {width} wide, the Qwen-Image config {config_dir} {config['num_attention_heads']} x "
                           f"{config['attention_head_dim']}: pass --model-config with the diffusers config of this model")
    config["num_layers"] = len({k.split(".")[1] for k in state if k.startswith("transformer_blocks.")})
    return network_from_state(QwenImageTransformer2DModel, config, state, path.name, "Qwen-Image", "pass an intact Qwen-Image file", dtype)


def _text_encoder(path: Path, config_dir: Path, dtype):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    state = read_weights(path, dtype)
    try:  # transformers reads Qwen2.5-VL's original layout (model.layers.*, visual.*) and renames it itself
        model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            None, config=Qwen2_5_VLConfig.from_pretrained(str(config_dir / "text_encoder")), state_dict=state, torch_dtype=dtype,
            output_loading_info=True)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise TrainingInputError(f"cannot read {path} as the Qwen2.5-VL text encoder of {config_dir}: {err}") from err
    missing = sorted(k for k in info["missing_keys"] if not k.startswith(UNUSED_TEXT_WEIGHTS))
    if missing:
        raise TrainingInputError(f"{path.name} is not the Qwen2.5-VL the Qwen-Image config {config_dir} describes: it lacks {len(missing)} "
                           f"weights (e.g. {missing[:3]}); pass the qwen_2.5_vl_7b file ComfyUI's Qwen-Image workflow uses")
    return model.eval()


def _vae(path: Path, config_dir: Path, dtype):
    from diffusers import AutoencoderKLQwenImage
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    config = json.loads((config_dir / "vae" / "config.json").read_text())
    with init_empty_weights():
        model = AutoencoderKLQwenImage.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    try:
        model.load_state_dict(convert_wan_vae_to_diffusers(read_weights(path, dtype)), assign=True)
    except (KeyError, RuntimeError) as err:  # other names (another VAE) or other widths (another config)
        raise TrainingInputError(f"cannot read {path} as the Qwen-Image VAE of {config_dir} ({str(err)[:200]}): pass ComfyUI's "
                           f"{VAE_FILE}, or --model-config with the diffusers config of this model") from err
    return model.to(dtype).eval()


def _tokenizer(config_dir: Path):
    """Qwen2.5's tokenizer: the config folder's own, else the one ComfyUI ships."""
    from transformers import Qwen2Tokenizer

    candidates = [config_dir / "tokenizer", *comfy_tokenizer_folders(QWEN_TOKENIZER)]
    found = next((f for f in candidates if (f / "vocab.json").is_file() and (f / "merges.txt").is_file()), None)
    if found is None:
        raise TrainingInputError("no Qwen2.5 tokenizer found: install the trainer inside ComfyUI (it ships comfy/text_encoders/qwen25_tokenizer) "
                           "or pass --model-config with a diffusers Qwen-Image folder that has tokenizer/")
    return Qwen2Tokenizer.from_pretrained(str(found), local_files_only=True)


def load_qwen_image_files(path: Path, config_path: Path | None, dtype=torch.float32):
    """A QwenImagePipeline from ComfyUI's Qwen-Image files (see the module docstring)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    config_dir = Path(config_path) if config_path else CONFIGS
    files = companion_files(path)
    transformer = _transformer(path, config_dir, dtype)  # first: a file of another width is named before anything loads
    tokenizer = _tokenizer(config_dir)
    return QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(str(config_dir), subfolder="scheduler"),
        vae=_vae(files["vae"], config_dir, dtype), transformer=transformer,
        text_encoder=_text_encoder(files["text_encoder"], config_dir, dtype), tokenizer=tokenizer,
    )
