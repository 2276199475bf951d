"""Apply a LoRA state dict to a ComfyUI MODEL/CLIP with ComfyUI's own key maps, all or nothing."""
from __future__ import annotations

import logging
import math
from typing import Optional

import torch

import comfy.lora
import comfy.lora_convert
from comfy.weight_adapter import LoRAAdapter

from .comfy_sigmas import TDM_INFO_ATTACHMENT
from .core_import import TDMInfo
from .lora_keys import convert_peft_layout, guess_lora_architecture, is_text_encoder_key, unmatched_layers

# ComfyUI model config class -> the base_family names training.distill writes in the TDM metadata
FAMILY_OF_CONFIG = {"SD15": "sd15", "SDXL": "sdxl", "SD3": "sd3", "PixArtAlpha": "pixart", "PixArtSigma": "pixart", "Flux": "flux",
                    "QwenImage": "qwen_image"}


def model_architecture(model) -> str:
    config = model.model.model_config
    context = config.unet_config.get("context_dim")
    return f"{type(config).__name__}" + (f" (cross-attention context dim {context})" if context else "")


def check_family(model, info: Optional[TDMInfo], lora_name: str) -> None:
    """A TDM LoRA names its base family; refuse it on a model of another family."""
    expected = FAMILY_OF_CONFIG.get(type(model.model.model_config).__name__)
    if info is not None and info.base_family and expected and info.base_family != expected:
        raise ValueError(f"TDM LoRA '{lora_name}' was distilled from a {info.base_family} model but this model is {model_architecture(model)} ({expected}): load the matching base checkpoint")


def lora_key_map(model, clip) -> dict:
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    if clip is not None:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    return key_map


def check_coverage(lora: dict[str, torch.Tensor], key_map: dict, model, has_clip: bool, lora_name: str) -> None:
    """Every key must land on a layer; otherwise name the architecture expected and found."""
    missing = unmatched_layers(lora, key_map)
    if not missing:
        return
    text_keys = [k for k in missing if is_text_encoder_key(k)]
    if text_keys and len(text_keys) == len(missing) and not has_clip:
        raise ValueError(f"LoRA '{lora_name}' has {len(text_keys)} text-encoder weights but no CLIP is connected: connect the CLIP input of the TDM LoRA Loader")
    raise ValueError(
        f"LoRA '{lora_name}' does not fit this model: {len(missing)} of {len(lora)} tensors match no layer (e.g. {', '.join(missing[:3])}). "
        f"Expected a LoRA for {model_architecture(model)}, found one for {guess_lora_architecture(lora)}. "
        f"Nothing was loaded: pick a LoRA made for this base model."
    )


def target_weight_shape(state_shapes: dict, target) -> Optional[tuple]:
    """Shape of the weight a patch lands on; ComfyUI's tuple targets ``(key, (dim, start, size))``
    patch a slice (e.g. the q part of a fused qkv), so that dim is narrowed to ``size``."""
    if isinstance(target, str):
        shape = state_shapes.get(target)
        return None if shape is None else tuple(shape)
    shape = state_shapes.get(target[0])
    if shape is None:
        return None
    shape = list(shape)
    if len(target) > 1 and target[1] is not None:
        dim, _, size = target[1]
        shape[dim] = size
    return tuple(shape)


def check_shapes(patches: dict, state_shapes: dict, model, lora: dict, lora_name: str) -> None:
    """Keys that match but whose low-rank factors have another width (e.g. an SDXL LoRA on SD1.5)."""
    for target, adapter in patches.items():
        shape = target_weight_shape(state_shapes, target)
        if not isinstance(adapter, LoRAAdapter) or shape is None or adapter.weights[5] is not None:
            continue  # other adapter kinds (LoHa, LoKr, diff) and reshaped LoRAs carry their own checks
        up, down = adapter.weights[0], adapter.weights[1]
        input_width = math.prod(shape[1:])  # a conv LoRA's down factor spans in_channels * kernel
        if up.shape[0] != shape[0] or down[0].numel() not in (input_width, shape[1]):
            raise ValueError(
                f"LoRA '{lora_name}' does not fit this model: layer {target} has shape {tuple(shape)} but the LoRA's factors "
                f"are {tuple(up.shape)} x {tuple(down.shape)}. Expected a LoRA for {model_architecture(model)}, "
                f"found one for {guess_lora_architecture(lora)}. Nothing was loaded: pick a LoRA made for this base model."
            )


def apply_lora(model, clip, lora_sd: dict, metadata: dict, strength_model: float, strength_clip: float, use_recommended_strength: bool, lora_name: str):
    """``(model, clip, info)`` with the LoRA patched in (clones; inputs untouched) and the TDM metadata
    attached to the model as the ModelPatcher attachment ``tdm_info`` (read by the TDM Scheduler's ``auto``)."""
    info = TDMInfo.from_safetensors_metadata(metadata)
    check_family(model, info, lora_name)
    lora = comfy.lora_convert.convert_lora(convert_peft_layout(lora_sd, metadata))
    key_map = lora_key_map(model, clip)
    check_coverage(lora, key_map, model, clip is not None, lora_name)
    patches = comfy.lora.load_lora(lora, key_map, log_missing=False)
    shapes = {k: v.shape for k, v in model.model.state_dict().items()}
    if clip is not None:
        shapes.update({k: v.shape for k, v in clip.cond_stage_model.state_dict().items()})
    check_shapes(patches, shapes, model, lora, lora_name)
    if info is not None and use_recommended_strength:
        strength_model = info.recommended_strength
    new_model = model.clone()
    applied = set(new_model.add_patches(patches, strength_model))
    new_clip = None
    if clip is not None:
        new_clip = clip.clone()
        applied |= set(new_clip.add_patches(patches, strength_clip))
    not_applied = [k for k in patches if k not in applied]
    if not_applied:
        raise ValueError(f"LoRA '{lora_name}': {len(not_applied)} layers matched but could not be patched (e.g. {not_applied[:3]}): expected a LoRA for {model_architecture(model)}")
    if info is not None:
        new_model.set_attachments(TDM_INFO_ATTACHMENT, info)
    logging.info("TDM LoRA '%s': %d layers patched at strength %.3f%s", lora_name, len(patches), strength_model, " (TDM metadata attached)" if info else "")
    return new_model, (new_clip if new_clip is not None else clip), info

