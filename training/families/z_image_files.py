"""Z-Image from the files a ComfyUI user has, into a diffusers ``ZImagePipeline`` the trainer's z_image family wraps.

    models/diffusion_models/z_image_turbo_bf16.safetensors   ComfyUI's Lumina2 (NextDiT) key layout, fused qkv
    models/text_encoders/qwen_3_4b.safetensors                Qwen3-4B in transformers' layout (any qwen_3_4b* file)
    models/vae/ae.safetensors                                  the Flux autoencoder (read as training.families.flux_files does)

``--model`` names the diffusion-model file; the text encoder and the VAE are looked up in the sibling ComfyUI
folders. The configurations come from ``training/configs/z_image`` (Z-Image-Turbo's transformer, Qwen3-4B and
scheduler; the VAE's is Flux.1's, ``training/configs/flux/vae``) or from ``--model-config``, a diffusers folder of
the same architecture (its tokenizer is used when it has one; otherwise ComfyUI's bundled Qwen vocabulary with
Qwen3's chat template). The transformer goes through diffusers' own ``ZImageTransformer2DModel.from_single_file``.
"""
from __future__ import annotations

from pathlib import Path

import torch

from training.errors import TrainingInputError

from .file_weights import CHECKPOINT_PREFIX
from .text_encoders import QWEN_TOKENIZER, comfy_tokenizer_folders, text_encoder_files
from .weight_formats import read_weights

# What Qwen3's chat template renders for plain user messages with add_generation_prompt and enable_thinking
# (ZImagePipeline.encode_prompt's call): no default system message, no empty think block. It is also ComfyUI's
# own Z-Image prompt format (comfy.text_encoders.z_image.ZImageTokenizer.llama_template); ComfyUI's bundled
# Qwen tokenizer (qwen25_tokenizer) carries Qwen2.5's template instead, which adds a system message.
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "z_image"

# NextDiT keys every Z-Image file has; cap_pad_token tells Z-Image from Lumina 2.0 (same class, Gemma encoder, no pad tokens)
MARKERS = ("cap_embedder.1.weight", "layers.0.attention.qkv.weight", "cap_pad_token")
TEXT_ENCODER_GLOB, TEXT_ENCODER_FILE = "qwen_3_4b*.safetensors", "models/text_encoders/qwen_3_4b.safetensors"
VAE_FILES, VAE_FILE = ("ae.safetensors", "flux_vae.safetensors"), "models/vae/ae.safetensors"


def is_comfy_z_image(keys) -> bool:
    keys = set(keys)
    return any(all(prefix + marker in keys for marker in MARKERS) for prefix in ("", CHECKPOINT_PREFIX))


def companion_files(diffusion_model: Path) -> dict[str, Path]:
    """Qwen3-4B and the Flux VAE in the ComfyUI folders beside ``models/diffusion_models``; a clear error otherwise."""
    models = diffusion_model.resolve().parent.parent
    text = text_encoder_files(models, TEXT_ENCODER_GLOB)
    vae = [models / "vae" / name for name in VAE_FILES if (models / "vae" / name).is_file()]
    missing = [where for found, where in ((text, TEXT_ENCODER_FILE), (vae, VAE_FILE)) if not found]
    if missing:
        raise TrainingInputError(
            f"{diffusion_model.name} is a Z-Image diffusion model in ComfyUI's layout, but {' and '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} missing under {models}: put the files ComfyUI's Z-Image-Turbo workflow "
            "uses there (qwen_3_4b.safetensors, ae.safetensors), or pass a diffusers Z-Image folder as --model.")
    return {"text_encoder": text[0], "vae": vae[0]}


def _transformer(path: Path, config_dir: Path, dtype):
    """diffusers' own single-file path: convert_z_image_transformer_checkpoint_to_diffusers splits the fused qkv."""
    from diffusers import ZImageTransformer2DModel

    try:
        return ZImageTransformer2DModel.from_single_file(read_weights(path, dtype), config=str(config_dir), subfolder="transformer",
                                                         local_files_only=True, torch_dtype=dtype)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise TrainingInputError(f"cannot read {path.name} as the Z-Image transformer of {config_dir} ({str(err)[:300]}): pass an "
                           "intact Z-Image file, or --model-config with the diffusers config of this model") from err


def _text_encoder(path: Path, config_dir: Path, dtype):
    """Qwen3-4B from ComfyUI's file as the Qwen3Model ZImagePipeline uses; transformers itself maps the causal-LM
    layout of that file (``model.`` prefix, an lm_head it leaves out) onto the base model."""
    from transformers import Qwen3Config, Qwen3Model

    state = read_weights(path, dtype)
    try:
        model, info = Qwen3Model.from_pretrained(None, config=Qwen3Config.from_pretrained(str(config_dir / "text_encoder")),
                                                 state_dict=state, torch_dtype=dtype, output_loading_info=True)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise TrainingInputError(f"cannot read {path} as the Qwen3 text encoder of {config_dir}: {str(err)[:300]}") from err
    if info["missing_keys"]:
        raise TrainingInputError(f"{path.name} is not the Qwen3 text encoder {config_dir} describes: it lacks {len(info['missing_keys'])} "
                           f"weights (e.g. {info['missing_keys'][:3]}); pass the qwen_3_4b file ComfyUI's Z-Image workflow uses")
    return model.eval()


def _tokenizer(config_dir: Path):
    """The config folder's own tokenizer, else ComfyUI's bundled Qwen vocabulary with Qwen3's chat template."""
    from transformers import AutoTokenizer

    own = config_dir / "tokenizer"
    if (own / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(own), local_files_only=True)
    found = next((f for f in comfy_tokenizer_folders(QWEN_TOKENIZER) if (f / "vocab.json").is_file()), None)
    if found is None:
        raise TrainingInputError("no Qwen tokenizer found: install the trainer inside ComfyUI (it ships one in "
                           "comfy/text_encoders/qwen25_tokenizer) or pass --model-config with a diffusers Z-Image folder")
    tokenizer = AutoTokenizer.from_pretrained(str(found), local_files_only=True)
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    return tokenizer


def load_z_image_files(path: Path, config_path: Path | None, dtype=torch.float32):
    """A ZImagePipeline from ComfyUI's Z-Image files (see the module docstring); nothing is read before all three exist."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    from training.families.flux_files import CONFIGS as FLUX_CONFIGS
    from training.families.flux_files import load_flux_vae

    config_dir = Path(config_path) if config_path else CONFIGS
    files = companion_files(path)
    vae_config = config_dir if (config_dir / "vae" / "config.json").is_file() else FLUX_CONFIGS  # Z-Image's VAE is Flux's
    return ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(str(config_dir), subfolder="scheduler"),
        vae=load_flux_vae(files["vae"], vae_config, dtype), transformer=_transformer(path, config_dir, dtype),
        text_encoder=_text_encoder(files["text_encoder"], config_dir, dtype), tokenizer=_tokenizer(config_dir),
    )
