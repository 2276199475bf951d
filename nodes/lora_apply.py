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
from .comfy_sigmas import is_flow_sampling, is_flux_sampling
from .core_import import TDMInfo, releases
from .lora_keys import convert_peft_layout, guess_lora_architecture, is_text_encoder_key, unmatched_layers

# ComfyUI model config class -> the base_family names training.distill writes in the TDM metadata
FAMILY_OF_CONFIG = {"SD15": "sd15", "SDXL": "sdxl", "SD3": "sd3", "PixArtAlpha": "pixart", "PixArtSigma": "pixart", "Flux": "flux",
                    "ZImage": "z_image",  # not Lumina2: Lumina 2.0 shares the NextDiT class but has a Gemma encoder
                    "QwenImage": "qwen_image", "WAN21_T2V": "wan", "WAN22_T2V": "wan",
                    # families only the TDM Distill node makes LoRAs for (the trainer has no loader for them)
                    "Flux2": "flux2", "HunyuanVideo15": "hunyuan_video15",
                    # subclasses with other layers (SDXL with blocks removed, 8-channel instruct-pix2pix): no family, so
                    # the ancestry lookup below does not let their parent's LoRAs through
                    "SSD1B": "", "Segmind_Vega": "", "KOALA_700M": "", "KOALA_1B": "", "SD15_instructpix2pix": "",
                    "SDXL_instructpix2pix": ""}


def config_family(config_class: type) -> str:
    """The base family of a ComfyUI model config class, through its ancestry (WAN21_I2V and Wan's other variants
    are WAN21_T2V's subclasses, FluxSchnell is Flux's); "" for a class the map does not know."""
    for cls in config_class.__mro__:
        if cls.__name__ in FAMILY_OF_CONFIG:
            return FAMILY_OF_CONFIG[cls.__name__]
    return ""


def family_of(model) -> str:
    """The base family of a ComfyUI MODEL (:func:`config_family` of its config)."""
    return config_family(type(model.model.model_config))


def model_architecture(model) -> str:
    config = model.model.model_config
    context = config.unet_config.get("context_dim")
    return f"{type(config).__name__}" + (f" (cross-attention context dim {context})" if context else "")


def check_family(model, info: Optional[TDMInfo], lora_name: str) -> None:
    """A TDM LoRA names its base family; refuse it on a model of another family."""
    expected = family_of(model)
    if info is not None and info.base_family and expected and info.base_family != expected:
        raise ValueError(f"TDM LoRA '{lora_name}' was distilled from a {info.base_family} model but this model is {model_architecture(model)} ({expected}): load the matching base checkpoint")


def base_model_of(model) -> Optional[str]:
    """The base a release is matched against (tdm_core.releases): SD3.5's MMDiT-X has self-attention x-blocks."""
    config = model.model.model_config
    family = family_of(model)
    if family == "sd3" and config.unet_config.get("x_block_self_attn_layers"):
        return "sd35"
    return family


def recognised_release(model, lora_sd: dict, metadata: dict, lora_name: str) -> Optional["releases.Release"]:
    release = releases.recognise_release(lora_sd.keys(), metadata, lora_name, base_model_of(model))
    if release is not None:
        logging.info("TDM LoRA '%s' has no TDM metadata; its keys and container are those of the %s (%s)", lora_name, release.title, release.file)
    return release


def named_release_tensors(model, release, lora_sd: dict) -> dict:
    """A positional release (TDM-R1: tensors without names) named for this model from its own architecture
    (the depth ComfyUI read from the checkpoint), in ComfyUI's Z-Image LoRA namespace."""
    if release.layout != "positional":
        return lora_sd
    config = model.model.model_config.unet_config
    names = releases.z_image_peft_order(int(config["n_layers"]), int(config.get("n_refiner_layers", 2)))
    return releases.name_positional(lora_sd, names, release, "diffusion_model.", width=config.get("dim"))


def apply_release_shift(model, info: Optional[TDMInfo], lora_name: str):
    """A release's documented flow shift (raw, or converted by training.convert), set on the model as ComfyUI's
    ModelSamplingSD3 node does, unless the model already samples at a shift of the user's choosing (not its
    checkpoint's default). The trainer's own LoRAs leave the shift to the user (the TDM Scheduler warns)."""
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3

    sampling = model.get_model_object("model_sampling")
    if info is None or not info.release or info.flow_shift is None or not is_flow_sampling(sampling) or is_flux_sampling(sampling):
        return model
    default = float(model.model.model_config.sampling_settings.get("shift", 1.0))
    if abs(float(sampling.shift) - default) > 1e-6:
        logging.info("TDM LoRA '%s': keeping the model's flow shift %.3g (the release documents %.3g)", lora_name, float(sampling.shift), info.flow_shift)
        return model
    return ModelSamplingSD3().patch(model, info.flow_shift, multiplier=float(sampling.multiplier))[0]


def settings_summary(info: Optional[TDMInfo], recognised, strength: float, layers: int) -> str:
    """What the loader applied, in words: the node's third output."""
    if info is None:
        return f"LoRA without TDM metadata: strength {strength:g}, {layers} layers patched; set the TDM nodes' grid and solver yourself"
    release = releases.RELEASES.get(info.release)
    if release is not None:
        how = "recognised from the file's keys" if recognised else "converted by training.convert"
        return f"{release.summary(strength)}; {how}, {layers} layers patched"
    shift = f", flow shift {info.flow_shift:.3g}" if info.flow_shift is not None else ""
    return (f"TDM LoRA for {info.base_family or 'its base'}: strength {strength:g}, {info.num_steps} steps, "
            f"{info.solver} solver{shift}; {layers} layers patched")


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
    """``(model, clip, info, summary)`` with the LoRA patched in (clones; inputs untouched) and the TDM metadata
    attached to the model as the ModelPatcher attachment ``tdm_info`` (read by the TDM Scheduler's ``auto``).
    A released TDM LoRA (no metadata, tdm_core.releases) gets its documented settings: strength, solver,
    grid and flow shift."""
    info = TDMInfo.from_safetensors_metadata(metadata)
    release = recognised_release(model, lora_sd, metadata, lora_name) if info is None else None
    if release is not None:
        info = release.info()
        lora_sd = named_release_tensors(model, release, lora_sd)
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
    new_model = apply_release_shift(new_model, info, lora_name)
    summary = settings_summary(info, release is not None, strength_model, len(patches))
    logging.info("TDM LoRA '%s': %s", lora_name, summary)
    return new_model, (new_clip if new_clip is not None else clip), info, summary

