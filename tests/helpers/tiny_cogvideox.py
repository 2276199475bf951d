"""A tiny random-weight CogVideoXPipeline (diffusers' own classes from small configs) for the CogVideoX tests.

The scheduler is CogVideoX-2B's real one (training/configs/cogvideox/scheduler: v-prediction, SNR shift 3, zero
terminal SNR); the transformer is 1 block of 2 heads of 16 (rotary needs head width 4 + 6 + 6), native latents
4 x 6 (32 x 48 px, non-square as CogVideoX's 60 x 90) and 9 frames; ``rotary=True`` is the 5B layout."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from tests.helpers.tiny_models import _t5, _tokenizer

SHIPPED = Path(__file__).resolve().parents[2] / "training" / "configs" / "cogvideox"
TEXT_WIDTH = 16


def tiny_cogvideox_transformer(rotary: bool = False):
    from diffusers import CogVideoXTransformer3DModel

    return CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=TEXT_WIDTH, num_layers=1, sample_width=6, sample_height=4, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=226, use_rotary_positional_embeddings=rotary)


def tiny_cogvideox_vae():
    from diffusers import AutoencoderKLCogVideoX

    return AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
        layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4, scaling_factor=1.15258426)


def cogvideox_scheduler():
    from diffusers import CogVideoXDDIMScheduler

    return CogVideoXDDIMScheduler.from_config(json.loads((SHIPPED / "scheduler" / "scheduler_config.json").read_text()))


def build_tiny_cogvideox(tmp_root: str | os.PathLike, seed: int = 0, rotary: bool = False):
    from diffusers import CogVideoXPipeline

    torch.manual_seed(seed)
    return CogVideoXPipeline(tokenizer=_tokenizer(Path(tmp_root)), text_encoder=_t5(TEXT_WIDTH), vae=tiny_cogvideox_vae(),
                             transformer=tiny_cogvideox_transformer(rotary), scheduler=cogvideox_scheduler())


def save_tiny_cogvideox(folder: str | os.PathLike, seed: int = 0, rotary: bool = False) -> Path:
    folder = Path(folder)
    build_tiny_cogvideox(folder.parent / f".{folder.name}_build", seed=seed, rotary=rotary).save_pretrained(str(folder))
    return folder


def cogvideox_student(folder: str | os.PathLike, seed: int = 7, rank: int = 4, alpha: float = 2.0):
    """The family of ``folder`` with both TDM adapters, the student's weights random (as if trained)."""
    from tests.helpers.tiny_models import trained_tdm_family

    return trained_tdm_family(folder, rank, alpha, seed)


def save_release_layout_lora(folder: str | os.PathLike, out_dir: str | os.PathLike, seed: int = 3) -> Path:
    """A LoRA in the released TDM CogVideoX-2B's layout, written by diffusers' own ``CogVideoXPipeline.save_lora_weights``
    (as the authors' diffusers training saves it: ``pytorch_lora_weights.safetensors``, lora_A/B, no alpha, no TDM
    metadata) from a peft LoRA (r 8, the attention projections) with random weights on the tiny transformer."""
    from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel
    from peft import LoraConfig, get_peft_model_state_dict

    transformer = CogVideoXTransformer3DModel.from_pretrained(str(Path(folder) / "transformer"))
    transformer.add_adapter(LoraConfig(r=8, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=True))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    CogVideoXPipeline.save_lora_weights(str(out_dir), transformer_lora_layers=get_peft_model_state_dict(transformer))
    return Path(out_dir) / "pytorch_lora_weights.safetensors"
