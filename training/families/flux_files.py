"""Flux.1 from the files a ComfyUI user has, into a diffusers ``FluxPipeline`` the trainer's Flux family wraps.

    models/diffusion_models/flux1-dev.safetensors   Black Forest Labs' key layout (double_blocks.*, single_blocks.*)
    models/text_encoders/clip_l.safetensors         CLIP-L in transformers' layout
    models/text_encoders/t5xxl_fp16.safetensors      T5-XXL encoder in transformers' layout (any t5xxl_* file:
                                                     t5xxl_fp8_e4m3fn_scaled too, see weight_formats.py)
    models/vae/ae.safetensors                        the Flux autoencoder in the LDM layout

``--model`` names the diffusion-model file; the text encoders and the VAE are looked up in the sibling ComfyUI
folders. The configurations come from ``training/configs/flux`` (Flux.1-dev; the numbers of blocks and the
guidance embedding are read from the file, so Flux.1-schnell loads too) or from ``--model-config``, a
diffusers folder of the same architecture, whose tokenizer folders are used when it has them; otherwise the
tokenizers are ComfyUI's own (``comfy/sd1_tokenizer``, ``comfy/text_encoders/t5_tokenizer``).

The BFL -> diffusers renaming is ComfyUI's own key map (``comfy.utils.flux_to_diffusers``, the one its LoRA
loader uses for Flux), applied in reverse, so the weights land where ComfyUI itself would read them; diffusers'
own converter fixes the width at Flux.1's 3072 and cannot take other widths.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from training.errors import TrainingInputError

from .file_weights import CHECKPOINT_PREFIX, network_from_state, strip_checkpoint_prefix
from .text_encoders import clip_vocabulary_folders, t5_tokenizer_folders, text_encoder_files, text_model
from .weight_formats import read_weights

BFL_MARKER = "double_blocks.0.img_attn.qkv.weight"
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "flux"


def is_bfl_flux(keys) -> bool:
    return any(k in (BFL_MARKER, CHECKPOINT_PREFIX + BFL_MARKER) for k in keys)


def companion_files(diffusion_model: Path) -> dict[str, Path]:
    """CLIP-L, T5 and the VAE in the ComfyUI folders beside ``models/diffusion_models``; a clear error otherwise."""
    models = diffusion_model.resolve().parent.parent
    wanted = {"clip_l": (text_encoder_files(models, "clip_l*.safetensors"), "models/text_encoders/clip_l.safetensors"),
              "t5": (text_encoder_files(models, "t5xxl*.safetensors"), "models/text_encoders/t5xxl_fp16.safetensors"),
              "vae": ([f for f in (models / "vae" / "ae.safetensors", models / "vae" / "flux_vae.safetensors") if f.is_file()],
                      "models/vae/ae.safetensors")}
    missing = [where for found, where in wanted.values() if not found]
    if missing:
        raise TrainingInputError(
            f"{diffusion_model.name} is a Flux diffusion model in ComfyUI's layout, but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} missing under {models}: put the files ComfyUI's Flux workflow uses there "
            "(clip_l, t5xxl and ae.safetensors), or pass a diffusers FLUX.1 folder as --model.")
    return {name: found[0] for name, (found, _) in wanted.items()}


def _comfy_utils():
    """ComfyUI's ``comfy.utils`` (its Flux key map), found wherever ComfyUI is (``training.comfy_host``)."""
    from training.comfy_host import import_comfy, missing_comfy_fix

    utils = import_comfy("utils")
    if utils is None:
        raise TrainingInputError(f"reading a Flux file in ComfyUI's layout uses ComfyUI's own Flux key map (comfy/utils.py), and no "
                           f"ComfyUI was found: {missing_comfy_fix()}; or pass a diffusers FLUX.1 folder as --model")
    return utils


def block_counts(keys) -> tuple[int, int]:
    """(double-stream, single-stream) blocks of a BFL-layout state dict without the checkpoint prefix."""
    return tuple(len({k.split(".")[1] for k in keys if k.startswith(prefix)}) for prefix in ("double_blocks.", "single_blocks."))


def bfl_to_diffusers(state: dict[str, torch.Tensor], hidden_size: int) -> dict[str, torch.Tensor]:
    """The diffusers FluxTransformer2DModel state dict of a BFL-layout one, through ComfyUI's key map."""
    state = strip_checkpoint_prefix(state)
    double, single = block_counts(state)
    key_map = _comfy_utils().flux_to_diffusers({"depth": double, "depth_single_blocks": single, "hidden_size": hidden_size})
    out = {}
    for diffusers_key, target in key_map.items():
        bfl_key, span, transform = (target, None, None) if isinstance(target, str) else (target[0], target[1], target[2] if len(target) > 2 else None)
        if bfl_key not in state:
            continue
        tensor = state[bfl_key]
        if span is not None:
            dim, start, size = span
            tensor = tensor.narrow(dim, start, size)
        out[diffusers_key] = transform(tensor) if transform is not None else tensor  # swap_scale_shift is its own inverse
    return out


def _transformer(path: Path, config_dir: Path, dtype):
    from diffusers import FluxTransformer2DModel

    state = strip_checkpoint_prefix(read_weights(path, dtype))
    config = json.loads((config_dir / "transformer" / "config.json").read_text())
    hidden = state["img_in.weight"].shape[0]
    if hidden != config["num_attention_heads"] * config["attention_head_dim"]:
        raise TrainingInputError(f"{path.name} is {hidden} wide, the Flux config {config_dir} {config['num_attention_heads']} x "
                           f"{config['attention_head_dim']}: pass --model-config with the diffusers config of this model")
    double, single = block_counts(state)
    config.update(num_layers=double, num_single_layers=single,
                  guidance_embeds="guidance_in.in_layer.weight" in state)  # Flux.1-dev has it, Flux.1-schnell not
    return network_from_state(FluxTransformer2DModel, config, bfl_to_diffusers(state, hidden), path.name, "Flux",
                              "pass an intact Flux.1 file", dtype)


def _tokenizers(config_dir: Path):
    """CLIP's and T5's tokenizers: the config folder's own, else the ones ComfyUI ships."""
    from transformers import AutoTokenizer

    comfy_clip = [f for f in clip_vocabulary_folders() if (f / "vocab.json").is_file()]
    found = [next((f for f in folders if (f / "tokenizer_config.json").is_file()), None)
             for folders in ([config_dir / "tokenizer", *comfy_clip], [config_dir / "tokenizer_2", *t5_tokenizer_folders()])]
    if None in found:
        raise TrainingInputError("no CLIP / T5 tokenizer found: install the trainer inside ComfyUI (it ships both) or pass "
                           "--model-config with a diffusers FLUX.1 folder that has tokenizer/ and tokenizer_2/")
    return tuple(AutoTokenizer.from_pretrained(str(f), local_files_only=True) for f in found)


def load_flux_vae(path: Path, config_dir: Path, dtype=torch.float32):
    """The Flux autoencoder (``models/vae/ae.safetensors``, LDM layout) with ``config_dir/vae``'s config; Z-Image uses it too."""
    from diffusers import AutoencoderKL

    try:
        return AutoencoderKL.from_single_file(read_weights(path, dtype), config=str(config_dir), subfolder="vae",
                                              local_files_only=True, torch_dtype=dtype)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise TrainingInputError(f"cannot read {path} as the VAE of {config_dir} ({err}): pass Flux's ae.safetensors, "
                           "or --model-config with the diffusers config of this model") from err


def load_flux_files(path: Path, config_path: Path | None, dtype=torch.float32):
    """A FluxPipeline from ComfyUI's Flux files (see the module docstring)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    config_dir = Path(config_path) if config_path else CONFIGS
    files = companion_files(path)
    transformer = _transformer(path, config_dir, dtype)
    tokenizer, tokenizer_2 = _tokenizers(config_dir)
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(str(config_dir), subfolder="scheduler"),
        vae=load_flux_vae(files["vae"], config_dir, dtype), transformer=transformer,
        text_encoder=text_model(CLIPTextModel, CLIPTextConfig, files["clip_l"], config_dir / "text_encoder", dtype),
        text_encoder_2=text_model(T5EncoderModel, T5Config, files["t5"], config_dir / "text_encoder_2", dtype),
        tokenizer=tokenizer, tokenizer_2=tokenizer_2,
    )
