"""The authors' released TDM LoRAs as files with their published structure, on tiny models (the real files are not
reachable here; ``tests/test_released_weights.py`` says what each structure follows)."""
from __future__ import annotations

import copy
from pathlib import Path

import torch

SD3_RELEASE_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


def write_dreamshaper_release(path: Path, unet, seed: int = 4) -> Path:
    """SD1.5 Dreamshaper-v7: a ``torch.save``d ``.pt`` of kohya keys (``lora_unet_*.lora_down/up.weight`` + ``.alpha``),
    fp16, no metadata, for the tiny diffusers ``unet`` (``comfy_inprocess.tiny_diffusers_unet``)."""
    from tests.helpers import comfy_inprocess as h

    kohya = {k: v.half() for k, v in h.kohya_state(h.add_random_peft_lora(copy.deepcopy(unet), seed=seed)).items()}
    torch.save(kohya, path)
    return Path(path)


def write_sd3_release(transformer, folder: Path, file: str, seed: int = 5) -> Path:
    """SD3-Medium / SD3.5-Medium: what ``StableDiffusion3Pipeline.save_lora_weights`` writes for a peft LoRA on the
    attention projections (``transformer.<path>.lora_A/B.weight``, no alpha, header ``{"format": "pt"}`` only)."""
    from diffusers import StableDiffusion3Pipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    lora_net = copy.deepcopy(transformer)
    torch.manual_seed(seed)
    lora_net.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=SD3_RELEASE_TARGETS, init_lora_weights=False))
    StableDiffusion3Pipeline.save_lora_weights(str(folder), transformer_lora_layers=get_peft_model_state_dict(lora_net), weight_name=file)
    return Path(folder) / file
