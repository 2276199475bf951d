"""Export the ``student`` adapter as a kohya-layout LoRA ``.safetensors`` that stock ComfyUI,
Forge/A1111 and diffusers ``load_lora_weights`` load, carrying the TDM metadata.

Key layout per family prefix (``family.kohya_prefix``):
- ``lora_unet`` / ``lora_transformer``: ``<prefix>_<diffusers module path with "_">.lora_down.weight``,
  ``.lora_up.weight`` and ``.alpha`` (kohya / OneTrainer; ComfyUI maps these for UNets and SD3);
- a prefix ending in ``.`` (PixArt: ``transformer.``): ``<prefix><diffusers module path>.lora_down.weight`` ...,
  the only PixArt layout ComfyUI 0.3.75 maps.
The effective update is ``up @ down * alpha / rank``, the same as PEFT's ``B @ A * lora_alpha / r``.

Families with ``lora_layout = "peft"`` (SD3: diffusers has no kohya converter for it) are written in
diffusers' own layout instead, ``transformer.<path>.lora_A.weight`` / ``.lora_B.weight`` with the
``alpha / rank`` scale folded into ``lora_B`` (no alpha key), which ComfyUI and diffusers both load.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from tdm_core.lora_files import write_lora_file
from tdm_core.metadata import TDMInfo
from tdm_core.releases import PEFT_SUFFIXES
from training.errors import TrainingInputError
from training.models import STUDENT, adapter_state_dict, base_model_hash

LORA_A, LORA_B = PEFT_SUFFIXES  # a PEFT LoRA's down and up weights


def kohya_module_key(prefix: str, module_path: str) -> str:
    """The exported name of the LoRA on diffusers module ``module_path``."""
    if prefix.endswith("."):
        return prefix + module_path
    return f"{prefix}_{module_path.replace('.', '_')}"


def adapter_to_kohya(adapter_state: dict[str, torch.Tensor], prefix: str, alpha: float, dtype=None) -> dict[str, torch.Tensor]:
    """PEFT ``<path>.lora_A/B.weight`` tensors -> kohya ``<key>.lora_down/lora_up.weight`` + ``<key>.alpha``."""
    out = {}
    for name, tensor in adapter_state.items():
        if not name.endswith(LORA_A):
            continue
        module_path = name[: -len(LORA_A)]
        key = kohya_module_key(prefix, module_path)
        down, up = tensor, adapter_state[module_path + LORA_B]
        if dtype is not None:
            down, up = down.to(dtype), up.to(dtype)
        out[f"{key}.lora_down.weight"] = down.contiguous()
        out[f"{key}.lora_up.weight"] = up.contiguous()
        out[f"{key}.alpha"] = torch.tensor(float(alpha), dtype=down.dtype)
    return out


def adapter_to_peft_layout(adapter_state: dict[str, torch.Tensor], prefix: str, alpha: float, rank: int, dtype=None) -> dict[str, torch.Tensor]:
    """PEFT tensors -> diffusers' layout ``<prefix><path>.lora_A/B.weight``, ``alpha / rank`` folded into B."""
    out = {}
    for name, tensor in adapter_state.items():
        down_or_up = tensor * (alpha / rank) if name.endswith(LORA_B) else tensor
        out[prefix + name] = (down_or_up.to(dtype) if dtype is not None else down_or_up).contiguous()
    return out


def kohya_to_adapter(lora: dict[str, torch.Tensor], network: torch.nn.Module, prefix: str, rank: int) -> dict[str, torch.Tensor]:
    """Inverse of the export for ``network``: kohya (down/up, alpha assumed equal to the adapter's) or the
    peft layout (lora_A/B with the scale folded into B, unfolded here with the adapter's own alpha / rank)."""
    out = {}
    peft_keys = [k for k in lora if k.endswith(LORA_A)]
    if peft_keys:
        config = getattr(network, "peft_config", {}).get(STUDENT)
        scale = (config.lora_alpha / config.r) if config is not None else 1.0
        for key in peft_keys:
            path = key[len(prefix):-len(LORA_A)] if key.startswith(prefix) else key[: -len(LORA_A)]
            out[path + LORA_A] = lora[key]
            out[path + LORA_B] = lora[key[: -len(LORA_A)] + LORA_B] / scale
        return out
    paths = {kohya_module_key(prefix, name): name for name, _ in network.named_modules() if name}
    for key, tensor in lora.items():
        if not key.endswith(".lora_down.weight"):
            continue
        base = key[: -len(".lora_down.weight")]
        if base not in paths:
            raise TrainingInputError(f"LoRA key {key} matches no module of this network: load a LoRA trained on the same architecture.")
        out[paths[base] + LORA_A] = tensor
        out[paths[base] + LORA_B] = lora[base + ".lora_up.weight"]
    return out


def renamed_modules(adapter_state: dict[str, torch.Tensor], rename) -> dict[str, torch.Tensor]:
    """PEFT tensors ``<path>.lora_A/B.weight`` under ``rename(<path>)``, for a family whose loaders know its
    modules by other names than diffusers'."""
    out = {}
    for name, tensor in adapter_state.items():
        suffix = LORA_A if name.endswith(LORA_A) else LORA_B
        out[rename(name[: -len(suffix)]) + suffix] = tensor
    return out


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """``tdm_core.lora_files.write_lora_file`` (temporary file, then rename) after checking the output name."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise TrainingInputError(f"output {path} must end in .safetensors: e.g. ComfyUI/models/loras/my_tdm.safetensors")
    if path.is_dir():
        raise TrainingInputError(f"output {path} is a folder: give a file name ending in .safetensors")
    return write_lora_file(tensors, path, metadata)


def export_student_lora(family, path: str | os.PathLike, info: TDMInfo, dtype=None, base_hash: str | None = None) -> Path:
    """Write ``family.network``'s student adapter to ``path`` (kohya layout, TDM metadata, base file hash)."""
    config = family.network.peft_config[STUDENT]
    info.lora_rank, info.lora_alpha = int(config.r), float(config.lora_alpha)
    info.base_family = info.base_family or family.name
    info.prediction_type = family.prediction_type
    if base_hash is None and not info.base_hash and getattr(family, "source_path", ""):
        base_hash = base_model_hash(family.source_path)
    info.base_hash = base_hash or info.base_hash
    adapter = adapter_state_dict(family.network, STUDENT)
    rename = getattr(family, "lora_module_path", None)  # Wan: ComfyUI maps only the original, non-diffusers names
    if rename is not None:
        adapter = renamed_modules(adapter, rename)
    if getattr(family, "lora_layout", "kohya") == "peft":
        tensors = adapter_to_peft_layout(adapter, family.kohya_prefix, config.lora_alpha, config.r, dtype)
    else:
        tensors = adapter_to_kohya(adapter, family.kohya_prefix, config.lora_alpha, dtype)
    metadata = info.to_safetensors_metadata()
    # kohya's own fields, shown by A1111/Forge and LoRA managers
    metadata.update({"ss_network_module": "networks.lora", "ss_network_dim": str(info.lora_rank),
                     "ss_network_alpha": str(info.lora_alpha), "ss_base_model_version": family.name})
    return save_safetensors_atomic(tensors, path, metadata)


def read_lora(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], TDMInfo | None]:
    """Tensors and TDM metadata (None for a plain LoRA) of a LoRA file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    return load_file(str(path)), TDMInfo.from_safetensors_metadata(metadata)
