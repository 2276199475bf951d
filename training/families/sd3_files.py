"""SD3-Medium, SD3.5-Medium and SD3.5-Large from the files a ComfyUI user has, into the diffusers
``StableDiffusion3Pipeline`` the SD3 family wraps.

    models/checkpoints/sd3.5_medium.safetensors                    the MMDiT and the VAE (model.diffusion_model.*,
                                                                   first_stage_model.*), text encoders beside it:
    models/text_encoders/clip_l.safetensors, clip_g.safetensors, t5xxl_fp16.safetensors   (transformers' layout)
    models/checkpoints/sd3_medium_incl_clips_t5xxlfp16.safetensors  or all in one file (text_encoders.clip_l/... inside)

The MMDiT's variant is read from the file (depth, width, SD3.5-Medium's MMDiT-X self-attention blocks, the
query/key norms of SD3.5, the position-embedding size), so one shipped config serves all three:
``training/configs/sd3`` (SD3.5-Medium's pipeline: VAE, shift-3 flow scheduler, CLIP-L, CLIP-G, T5-XXL), or
``--model-config``, a diffusers folder of the same architecture. The MMDiT's weights are converted by diffusers'
own SD3 converter, everything else by diffusers' single-file converters (``weight_formats.pipeline_from_state``);
every file's weight format (fp16, bf16, fp8, ComfyUI's fp8_scaled T5 of ``sd3.5_medium_incl_clips_t5xxlfp8scaled``)
is read by ``weight_formats.read_weights`` first.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from training.errors import TrainingInputError

from .file_weights import CHECKPOINT_PREFIX, network_from_state
from .text_encoders import clip_tokenizers, t5_tokenizer_folders, text_encoder_files, text_model
from .weight_formats import pipeline_from_state, read_weights

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "sd3"
TEXT_ENCODERS = {  # pipeline component -> (key prefix inside an all-in-one file, ComfyUI file pattern, example name)
    "text_encoder": ("text_encoders.clip_l.transformer.", "clip_l*.safetensors", "clip_l.safetensors"),
    "text_encoder_2": ("text_encoders.clip_g.transformer.", "clip_g*.safetensors", "clip_g.safetensors"),
    "text_encoder_3": ("text_encoders.t5xxl.transformer.", "t5xxl*.safetensors", "t5xxl_fp16.safetensors"),
}
VAE_MARKER = "first_stage_model.decoder.conv_in.weight"


def mmdit_config(shapes: dict[str, tuple], base: dict) -> dict:
    """The SD3Transformer2DModel config of an MMDiT checkpoint (``shapes``: key -> shape, prefix stripped)."""
    width, in_channels = shapes["x_embedder.proj.weight"][:2]
    depth = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("joint_blocks."))
    heads = width // base["attention_head_dim"]
    return {**base, "num_layers": depth, "num_attention_heads": heads, "caption_projection_dim": width, "in_channels": in_channels,
            "out_channels": shapes["final_layer.linear.weight"][0] // base["patch_size"] ** 2,
            "joint_attention_dim": shapes["context_embedder.weight"][1], "pooled_projection_dim": shapes["y_embedder.mlp.0.weight"][1],
            "pos_embed_max_size": math.isqrt(shapes["pos_embed"][1]),
            "dual_attention_layers": sorted({int(k.split(".")[1]) for k in shapes if ".x_block.attn2." in k}),
            "qk_norm": "rms_norm" if any(".ln_q." in k for k in shapes) else None}


def _shapes(path: Path) -> dict[str, tuple]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}


def _transformer(path: Path, weights: dict[str, torch.Tensor], config_dir: Path, dtype):
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    base = json.loads((config_dir / "transformer" / "config.json").read_text())
    state = {k[len(CHECKPOINT_PREFIX):]: v for k, v in weights.items() if k.startswith(CHECKPOINT_PREFIX)}
    config = mmdit_config({k: tuple(v.shape) for k, v in state.items()}, {k: v for k, v in base.items() if not k.startswith("_")})
    return network_from_state(SD3Transformer2DModel, config, convert_sd3_transformer_checkpoint_to_diffusers(state), path.name,
                              "MMDiT", "pass an intact SD3 / SD3.5 checkpoint", dtype)


def companion_text_encoders(checkpoint: Path) -> dict[str, Path]:
    """CLIP-L, CLIP-G and T5-XXL in the ComfyUI folders beside ``models/checkpoints``; a clear error otherwise."""
    models = checkpoint.resolve().parent.parent
    found = {name: next(iter(text_encoder_files(models, pattern)), None) for name, (_, pattern, _) in TEXT_ENCODERS.items()}
    missing = [f"models/text_encoders/{TEXT_ENCODERS[name][2]}" for name, f in found.items() if f is None]
    if missing:
        raise TrainingInputError(
            f"{checkpoint.name} is an SD3 checkpoint without its text encoders, and {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} missing under {models}: put the files ComfyUI's SD3.5 workflow loads with "
            "TripleCLIPLoader there (clip_l, clip_g, t5xxl), or pass a checkpoint that includes them (sd3_medium_incl_clips_t5xxlfp16).")
    return found


def _text_encoders(checkpoint: Path, shapes: dict, config_dir: Path, dtype) -> dict:
    """The three text encoders from the sibling ComfyUI files when the checkpoint has none ({} when it has them)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel


    inside = [any(k.startswith(prefix) for k in shapes) for prefix, _, _ in TEXT_ENCODERS.values()]
    if all(inside):
        return {}
    if any(inside):
        raise TrainingInputError(f"{checkpoint.name} holds only some of SD3's three text encoders: pass a checkpoint with all or none of them")
    files = companion_text_encoders(checkpoint)
    classes = {"text_encoder": (CLIPTextModelWithProjection, CLIPTextConfig), "text_encoder_2": (CLIPTextModelWithProjection, CLIPTextConfig),
               "text_encoder_3": (T5EncoderModel, T5Config)}
    return {name: text_model(*classes[name], files[name], config_dir / name, dtype) for name in TEXT_ENCODERS}


def _tokenizers(config_dir: Path) -> dict:
    """The config folder's own tokenizers, else CLIP's (pad "!" for CLIP-G, as SD3's) and T5's from ComfyUI."""
    from transformers import AutoTokenizer


    names = ("tokenizer", "tokenizer_2", "tokenizer_3")
    if all((config_dir / n / "tokenizer_config.json").is_file() for n in names):
        return {}
    clips = clip_tokenizers(config_dir, "sdxl")  # tokenizer (pad <|endoftext|>) and tokenizer_2 (pad "!")
    t5 = next((f for f in [config_dir / "tokenizer_3", *t5_tokenizer_folders()] if (f / "tokenizer_config.json").is_file()), None)
    if t5 is None:
        raise TrainingInputError("no T5 tokenizer found: install the trainer inside ComfyUI (it ships one) or pass --model-config "
                           "with a diffusers SD3 folder that has tokenizer_3/")
    return {**clips, "tokenizer_3": AutoTokenizer.from_pretrained(str(t5), local_files_only=True)}


def load_sd3_file(path: Path, config_path: Path | None, dtype=torch.float32):
    """A StableDiffusion3Pipeline from an SD3 / SD3.5 checkpoint in ComfyUI's layout (see the module docstring)."""
    from diffusers import StableDiffusion3Pipeline

    config_dir = Path(config_path) if config_path else CONFIGS
    shapes = _shapes(path)
    if VAE_MARKER not in shapes:
        raise TrainingInputError(f"{path.name} has no VAE (first_stage_model.*): pass the SD3 / SD3.5 checkpoint from "
                           "models/checkpoints, which includes it")
    weights = read_weights(path, dtype)  # once, dequantised: the MMDiT, the VAE and the text encoders inside come from it
    components = {"transformer": _transformer(path, weights, config_dir, dtype), **_tokenizers(config_dir),
                  **_text_encoders(path, shapes, config_dir, dtype)}
    try:
        return pipeline_from_state(StableDiffusion3Pipeline, weights, config_dir, dtype, **components)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise TrainingInputError(f"cannot read {path.name} with the SD3 config {config_dir} ({err}): pass --model-config with the "
                           "diffusers config of this model") from err
