"""Tiny random-weight diffusers models of every supported family, built offline in seconds.

Each builder returns a diffusers pipeline whose components are a few hundred K parameters;
``save_tiny_pipeline(family, folder)`` writes it as a diffusers folder (``model_index.json``,
one subfolder per component), and ``save_tiny_single_file(family, folder)`` writes the same
weights as one ComfyUI-style ``.safetensors`` checkpoint (LDM key layout) beside a folder with
the matching diffusers configs, as ``training.models.load_family(..., config_path=...)`` wants.

Other engineers' tests use these; keep the function names and signatures stable.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

FAMILIES = ("sd15", "sdxl", "pixart", "sd3")
TOKENIZER_MAX_LENGTH = 77


def _bytes_to_unicode() -> dict[int, str]:
    # the reversible byte -> printable-character table of GPT-2/CLIP byte-level BPE
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def save_tiny_clip_tokenizer(folder: str | os.PathLike) -> Path:
    """A real CLIPTokenizer with a byte-level vocabulary and no merges (every byte is a token)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=TOKENIZER_MAX_LENGTH)
    tokenizer.save_pretrained(str(folder))
    return folder


def _tokenizer(tmp_root: Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(save_tiny_clip_tokenizer(tmp_root / "_tokenizer")))


def _clip_config(projection: bool = False):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=600, max_position_embeddings=TOKENIZER_MAX_LENGTH, projection_dim=32,
        bos_token_id=512, eos_token_id=513, pad_token_id=513, hidden_act="quick_gelu",
    )


def _t5(d_model: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=2, vocab_size=600,
                                   relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0))


def _vae(latent_channels: int = 4, **extra):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(32, 32),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=32, sample_size=16, **extra,
    )


def tiny_sd15_unet(prediction_type_channels: int = 4):
    from diffusers import UNet2DConditionModel

    # GroupNorm(32) and 8 heads as in SD1.5 so ComfyUI's fixed-layout UNet can hold the same weights
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
    )


def tiny_sdxl_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=(2, 4), transformer_layers_per_block=(1, 1),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32, norm_num_groups=32,
    )


def _scheduler(family: str, prediction_type: str, zero_snr: bool):
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    if family == "sd3":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    beta_schedule, start, end = ("linear", 0.0001, 0.02) if family == "pixart" else ("scaled_linear", 0.00085, 0.012)
    return DDIMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule, beta_start=start, beta_end=end,
                         prediction_type=prediction_type, rescale_betas_zero_snr=zero_snr, clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, timestep_spacing="trailing" if zero_snr else "leading")


def build_tiny_pipeline(family: str, tmp_root: str | os.PathLike, seed: int = 0,
                        prediction_type: str = "epsilon", zero_snr: bool = False):
    """A random-weight diffusers pipeline of ``family`` (see FAMILIES), deterministic in ``seed``."""
    import diffusers
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tmp_root = Path(tmp_root)
    torch.manual_seed(seed)
    if family == "sd15":
        return diffusers.StableDiffusionPipeline(
            vae=_vae(), text_encoder=CLIPTextModel(_clip_config()), tokenizer=_tokenizer(tmp_root),
            unet=tiny_sd15_unet(), scheduler=_scheduler(family, prediction_type, zero_snr),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    if family == "sdxl":
        return diffusers.StableDiffusionXLPipeline(
            vae=_vae(), text_encoder=CLIPTextModel(_clip_config()), text_encoder_2=CLIPTextModelWithProjection(_clip_config()),
            tokenizer=_tokenizer(tmp_root), tokenizer_2=_tokenizer(tmp_root), unet=tiny_sdxl_unet(),
            scheduler=_scheduler(family, prediction_type, zero_snr),
        )
    if family == "pixart":
        transformer = diffusers.PixArtTransformer2DModel(
            sample_size=8, num_layers=2, attention_head_dim=8, num_attention_heads=2, in_channels=4, out_channels=8,
            patch_size=2, cross_attention_dim=16, caption_channels=32, norm_type="ada_norm_single",
            use_additional_conditions=False, norm_elementwise_affine=False, norm_eps=1e-6,
        )
        return diffusers.PixArtAlphaPipeline(
            tokenizer=_tokenizer(tmp_root), text_encoder=_t5(32), vae=_vae(), transformer=transformer,
            scheduler=_scheduler(family, prediction_type, zero_snr),
        )
    if family == "sd3":
        transformer = diffusers.SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=16, pooled_projection_dim=64,
            pos_embed_max_size=16,
        )
        return diffusers.StableDiffusion3Pipeline(
            transformer=transformer, scheduler=_scheduler(family, prediction_type, zero_snr),
            vae=_vae(shift_factor=0.1, scaling_factor=1.5),
            text_encoder=CLIPTextModelWithProjection(_clip_config()), tokenizer=_tokenizer(tmp_root),
            text_encoder_2=CLIPTextModelWithProjection(_clip_config()), tokenizer_2=_tokenizer(tmp_root),
            text_encoder_3=_t5(64), tokenizer_3=_tokenizer(tmp_root),
        )
    raise ValueError(f"unknown tiny family {family!r}: use one of {FAMILIES}")


def save_tiny_pipeline(family: str, folder: str | os.PathLike, seed: int = 0, **options) -> Path:
    """Build and save a tiny ``family`` pipeline as a diffusers folder; returns the folder."""
    folder = Path(folder)
    pipe = build_tiny_pipeline(family, folder.parent / f".{folder.name}_build", seed=seed, **options)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder
