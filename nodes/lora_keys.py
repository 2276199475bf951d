"""LoRA files and key layouts, pure torch (no ComfyUI): reading, PEFT renaming, coverage help."""
from __future__ import annotations

import json
import re
from typing import Iterable, Optional

import torch

from .core_import import lora_files

read_lora_file = lora_files.read_lora_file  # the file formats are host-free: tdm_core.lora_files


# Suffixes ComfyUI's weight adapters read (comfy/weight_adapter, comfy/lora.py); the rest of a key names the layer
ADAPTER_SUFFIXES = tuple(
    sorted(
        {
            ".lora_up.weight", ".lora_down.weight", ".lora_mid.weight", ".lora_B.weight", ".lora_A.weight",
            ".lora_B.default.weight", ".lora_A.default.weight", "_lora.up.weight", "_lora.down.weight",
            ".lora.up.weight", ".lora.down.weight", ".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight",
            ".lora_B", ".lora_A", ".alpha", ".dora_scale", ".diff", ".diff_b", ".set_weight", ".reshape_weight",
            ".w_norm", ".b_norm", ".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".hada_t1", ".hada_t2",
            ".lokr_w1", ".lokr_w2", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2_a", ".lokr_w2_b", ".lokr_t2",
            ".oft_blocks", ".oft_diag", ".rescale",
        },
        key=len,
        reverse=True,  # longest first so ".lora_A.weight" wins over ".lora_A"
    )
)
DIFFUSERS_UNET_ROOTS = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in.", "conv_out.", "conv_norm_out.", "time_embedding.", "add_embedding.", "class_embedding.")
TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder", "te_", "te1_", "te2_", "clip_")
PEFT_ATTENTION = re.compile(r"\.(attn\d?)\.to_(q|k|v|out\.0)$")


def split_adapter_key(key: str) -> tuple[str, Optional[str]]:
    """``"unet.x.to_q.lora_A.weight"`` -> ``("unet.x.to_q", ".lora_A.weight")``; unknown suffix -> ``(key, None)``."""
    for suffix in ADAPTER_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], suffix
    return key, None


def is_diffusers_unet_layer(layer: str) -> bool:
    return layer.startswith("unet.") or layer.startswith(DIFFUSERS_UNET_ROOTS)


def peft_layer_to_comfy(layer: str) -> str:
    """A diffusers/PEFT UNet layer name -> the form ComfyUI's key map lists: ``unet.`` prefix, and
    attention projections under ``.processor.`` (``attn1.to_q`` -> ``attn1.processor.to_q``,
    ``to_out.0`` -> ``processor.to_out``), which stock ComfyUI otherwise silently skips."""
    if layer.startswith("base_model.model."):
        layer = layer[len("base_model.model."):]
    if not is_diffusers_unet_layer(layer):
        return layer
    if not layer.startswith("unet."):
        layer = "unet." + layer
    match = PEFT_ATTENTION.search(layer)
    if match:
        projection = "to_out" if match.group(2) == "out.0" else "to_" + match.group(2)
        layer = layer[: match.start()] + f".{match.group(1)}.processor.{projection}"
    return layer


def peft_alpha_from_metadata(metadata: dict[str, str], prefix: str = "unet.") -> Optional[float]:
    """PEFT keeps ``lora_alpha`` outside the tensors; diffusers' ``save_lora_weights`` writes it in the
    header (``lora_adapter_metadata``). ComfyUI scales by ``alpha / rank``, PEFT by ``lora_alpha / r``
    (``lora_alpha / sqrt(r)`` with rsLoRA, returned here as an ``alpha`` that gives the same scale)."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"LoRA header 'lora_adapter_metadata' is not valid JSON ({err}): save the LoRA again") from err
    if config.get(prefix + "alpha_pattern") or config.get(prefix + "rank_pattern"):
        raise ValueError("PEFT LoRAs with per-layer rank_pattern/alpha_pattern are not supported: save the LoRA with one rank and alpha")
    if config.get(prefix + "use_dora"):
        raise ValueError("DoRA adapters saved by PEFT are not supported by the TDM LoRA Loader: export a plain LoRA")
    alpha = config.get(prefix + "lora_alpha")
    if alpha is None:
        return None
    if config.get(prefix + "use_rslora"):
        return float(alpha) * float(config.get(prefix + "r", 1)) ** 0.5
    return float(alpha)


DIFFUSERS_COMPONENTS = ("unet.", "transformer.", "text_encoder.", "text_encoder_2.")


def convert_peft_layout(lora: dict[str, torch.Tensor], metadata: Optional[dict[str, str]] = None) -> dict[str, torch.Tensor]:
    """Rename diffusers/PEFT UNet keys to what ComfyUI applies and add ``.alpha`` from the header
    (per diffusers component); kohya and ComfyUI layouts pass through unchanged."""
    alphas = {prefix: peft_alpha_from_metadata(metadata or {}, prefix) for prefix in DIFFUSERS_COMPONENTS}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in lora.items():
        layer, suffix = split_adapter_key(key)
        if suffix is None:
            out[key] = tensor
            continue
        suffix = suffix.replace(".default.weight", ".weight")
        new_layer = peft_layer_to_comfy(layer)
        out[new_layer + suffix] = tensor
        component = new_layer.split(".", 1)[0] + "."
        alpha = alphas.get(component)
        if alpha is not None and suffix == ".lora_A.weight" and f"{layer}.alpha" not in lora:
            out[f"{new_layer}.alpha"] = torch.tensor(alpha)
    return out


def unmatched_layers(lora_keys: Iterable[str], known_layers) -> list[str]:
    """Keys whose layer is not in ``known_layers`` (ComfyUI's key map), or whose suffix no adapter reads."""
    missing = []
    for key in lora_keys:
        layer, suffix = split_adapter_key(key)
        if suffix is None or layer not in known_layers:
            missing.append(key)
    return missing


def is_text_encoder_key(key: str) -> bool:
    return key.startswith(TEXT_ENCODER_PREFIXES)


def cross_attention_dim(lora: dict[str, torch.Tensor]) -> Optional[int]:
    """Context width of a UNet LoRA: the input width of its cross-attention key projection."""
    for key, tensor in lora.items():
        flat = key.replace("_", ".")
        if "attn2.to.k" in flat and (".lora.down" in flat or ".lora.A" in flat) and tensor.ndim == 2:
            return int(tensor.shape[1])
    return None


UNET_CONTEXT_FAMILIES = {768: "SD1.5", 1024: "SD2.x", 2048: "SDXL", 1280: "SDXL refiner"}


def guess_lora_architecture(lora: dict[str, torch.Tensor]) -> str:
    """A human description of what a LoRA was made for, from its key names and shapes."""
    keys = list(lora)
    joined = "\n".join(keys)
    if keys and all(k.startswith(lora_files.POSITIONAL_KEY + ".") for k in keys):
        return "Z-Image-Turbo (TDM-R1's positional parameter list, no key names)"
    if "double_blocks" in joined or "single_blocks" in joined or "single_transformer_blocks" in joined:
        return "Flux (double/single stream blocks)"
    if "context_refiner" in joined or "noise_refiner" in joined:
        return "Z-Image (NextDiT: noise and context refiners)"
    if "joint_blocks" in joined or "context_block" in joined or "add_q_proj" in joined or "lora_transformer_transformer_blocks" in joined:
        return "SD3 (MMDiT joint blocks)"
    if any(k.startswith(("transformer.", "lora_transformer_")) for k in keys):
        return "a diffusion transformer (PixArt/SD3-style 'transformer.' keys)"
    if all(is_text_encoder_key(k) for k in keys):
        return "a text encoder only"
    unet_like = any(s in joined for s in ("down_blocks", "input_blocks", "output_blocks", "up_blocks", "middle_block", "mid_block"))
    if unet_like:
        dim = cross_attention_dim(lora)
        if dim is None:
            return "a UNet (no cross-attention weights)"
        family = UNET_CONTEXT_FAMILIES.get(dim)
        return f"{family} UNet (cross-attention context dim {dim})" if family else f"a UNet with cross-attention context dim {dim}"
    return "an unknown architecture"
