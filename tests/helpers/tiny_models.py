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
import re
from pathlib import Path

import torch

FAMILIES = ("sd15", "sdxl", "pixart", "sd3")  # the families with native 8x8 latents; "flux" builds too (tests/test_flux_family.py)
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


def _clip_config(hidden_size: int = 32):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        hidden_size=hidden_size, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
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
        # context = CLIP-L-like (32) + CLIP-G-like (40) hidden states; widths differ as in SDXL so single-file detection works
        cross_attention_dim=72, attention_head_dim=(2, 4), transformer_layers_per_block=(1, 1),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32, norm_num_groups=32,
    )


def _scheduler(family: str, prediction_type: str, zero_snr: bool):
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    if family == "sd3":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    if family == "flux":  # Flux.1-dev's scheduler config: the shift follows the image's token count
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                               max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    beta_schedule, start, end = ("linear", 0.0001, 0.02) if family == "pixart" else ("scaled_linear", 0.00085, 0.012)
    return DDIMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule, beta_start=start, beta_end=end,
                         prediction_type=prediction_type, rescale_betas_zero_snr=zero_snr, clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, timestep_spacing="trailing" if zero_snr else "leading")


def build_tiny_pipeline(family: str, tmp_root: str | os.PathLike, seed: int = 0,
                        prediction_type: str = "epsilon", zero_snr: bool = False, pixart_sample_size: int = 8,
                        sd35: bool = False):
    """A random-weight diffusers pipeline of ``family`` (see FAMILIES), deterministic in ``seed``.

    ``pixart_sample_size``: ComfyUI's PixArt derives its position embedding from the latent size and
    needs latents of at least 64; 8 keeps every other test fast. ``sd35`` (family "sd3"): SD3.5's MMDiT-X,
    RMS query/key norms and a second (self-)attention in the first block, as SD3.5 Medium has."""
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
            vae=_vae(), text_encoder=CLIPTextModel(_clip_config()), text_encoder_2=CLIPTextModelWithProjection(_clip_config(hidden_size=40)),
            tokenizer=_tokenizer(tmp_root), tokenizer_2=_tokenizer(tmp_root), unet=tiny_sdxl_unet(),
            scheduler=_scheduler(family, prediction_type, zero_snr),
        )
    if family == "pixart":
        transformer = diffusers.PixArtTransformer2DModel(
            sample_size=pixart_sample_size, num_layers=2, attention_head_dim=8, num_attention_heads=2, in_channels=4, out_channels=8,
            patch_size=2, cross_attention_dim=16, caption_channels=32, norm_type="ada_norm_single",
            use_additional_conditions=False, norm_elementwise_affine=False, norm_eps=1e-6,
        )
        return diffusers.PixArtAlphaPipeline(
            tokenizer=_tokenizer(tmp_root), text_encoder=_t5(32), vae=_vae(), transformer=transformer,
            scheduler=_scheduler(family, prediction_type, zero_snr),
        )
    if family == "sd3":
        # ComfyUI's MMDiT ties the width to the depth (64 * depth, heads of 64): 2 blocks of width 128.
        # The two CLIPs differ in width (32, 40) as CLIP-L and CLIP-G do, so single-file detection can tell
        # them apart; their hidden states (72 wide) are zero-padded to the T5 width (80) by the pipeline.
        transformer = diffusers.SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=64,
            num_attention_heads=2, joint_attention_dim=80, caption_projection_dim=128, pooled_projection_dim=64,
            pos_embed_max_size=16, **({"qk_norm": "rms_norm", "dual_attention_layers": (0,)} if sd35 else {}),
        )
        clip_l = CLIPTextModelWithProjection(_clip_config())
        with torch.no_grad():  # single-file SD3 checkpoints carry no CLIP-L projection; loaders use the identity
            clip_l.text_projection.weight.copy_(torch.eye(32))
        return diffusers.StableDiffusion3Pipeline(
            transformer=transformer, scheduler=_scheduler(family, prediction_type, zero_snr),
            vae=_vae(shift_factor=0.1, scaling_factor=1.5),
            text_encoder=clip_l, tokenizer=_tokenizer(tmp_root),
            text_encoder_2=CLIPTextModelWithProjection(_clip_config(hidden_size=40)), tokenizer_2=_tokenizer(tmp_root),
            text_encoder_3=_t5(80), tokenizer_3=_tokenizer(tmp_root),
        )
    if family == "flux":
        return diffusers.FluxPipeline(
            transformer=tiny_flux_transformer(), scheduler=_scheduler(family, prediction_type, zero_snr),
            vae=_vae(latent_channels=16, shift_factor=0.1, scaling_factor=0.5),
            text_encoder=CLIPTextModel(_clip_config()), tokenizer=_tokenizer(tmp_root),
            text_encoder_2=_t5(TINY_FLUX["context_in_dim"]), tokenizer_2=_tokenizer(tmp_root),
        )
    raise ValueError(f"unknown tiny family {family!r}: use one of {FAMILIES} or flux")


# ComfyUI's Flux fixes nothing the tiny model needs to change: its width is heads x head width and the rope
# axes must add up to the head width (16 = 4 + 6 + 6); pooled CLIP 32 wide, T5 48 wide
TINY_FLUX = {"hidden_size": 32, "num_heads": 2, "axes_dim": [4, 6, 6], "depth": 1, "depth_single_blocks": 1,
             "vec_in_dim": 32, "context_in_dim": 48}


def tiny_flux_transformer(guidance_embeds: bool = True):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=TINY_FLUX["depth"], num_single_layers=TINY_FLUX["depth_single_blocks"],
        attention_head_dim=TINY_FLUX["hidden_size"] // TINY_FLUX["num_heads"], num_attention_heads=TINY_FLUX["num_heads"],
        joint_attention_dim=TINY_FLUX["context_in_dim"], pooled_projection_dim=TINY_FLUX["vec_in_dim"],
        guidance_embeds=guidance_embeds, axes_dims_rope=tuple(TINY_FLUX["axes_dim"]),
    )


def save_tiny_pipeline(family: str, folder: str | os.PathLike, seed: int = 0, **options) -> Path:
    """Build and save a tiny ``family`` pipeline as a diffusers folder; returns the folder."""
    folder = Path(folder)
    pipe = build_tiny_pipeline(family, folder.parent / f".{folder.name}_build", seed=seed, **options)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


# --- ComfyUI side: the same tiny UNets as ComfyUI models, and single-file checkpoints ------------------
def import_comfy():
    """ComfyUI's ``comfy`` package, imported in-process for CPU (see COMFY_HOST.md)."""
    from tests.helpers.comfy_inprocess import setup_comfy

    setup_comfy()
    import comfy.lora
    import comfy.model_management
    import comfy.sd
    import comfy.supported_models
    import comfy.utils

    return comfy


def comfy_unet_config(unet_config) -> dict:
    """ComfyUI's ``unet_config`` vocabulary for a diffusers UNet2DConditionModel config."""
    levels = len(unet_config["block_out_channels"])
    layers = unet_config["layers_per_block"]
    depth = unet_config.get("transformer_layers_per_block", 1)
    depth = list(depth) if isinstance(depth, (list, tuple)) else [depth] * levels
    heads = unet_config.get("num_attention_heads") or unet_config["attention_head_dim"]
    heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * levels
    has_attention = ["CrossAttn" in kind for kind in unet_config["down_block_types"]]
    up_attention = ["CrossAttn" in kind for kind in unet_config["up_block_types"]][::-1]  # in resolution order
    channels = unet_config["block_out_channels"]
    config = {
        "use_checkpoint": False, "image_size": unet_config["sample_size"], "in_channels": unet_config["in_channels"],
        "out_channels": unet_config["out_channels"], "model_channels": channels[0], "num_res_blocks": [layers] * levels,
        "channel_mult": [c // channels[0] for c in channels],
        "transformer_depth": [depth[i] if has_attention[i] else 0 for i in range(levels) for _ in range(layers)],
        "transformer_depth_output": [depth[i] if up_attention[i] else 0 for i in range(levels) for _ in range(layers + 1)],
        "transformer_depth_middle": depth[-1], "use_spatial_transformer": True,
        "use_linear_in_transformer": bool(unet_config.get("use_linear_projection", False)), "legacy": False,
        "context_dim": unet_config["cross_attention_dim"], "use_temporal_attention": False, "use_temporal_resblock": False,
        "adm_in_channels": unet_config.get("projection_class_embeddings_input_dim"),
    }
    # diffusers' legacy "attention_head_dim" is the number of heads per level; ComfyUI takes either a
    # fixed head count (SD1.5) or a fixed head width (SDXL)
    if len(set(heads)) == 1:
        config.update(num_heads=heads[0], num_head_channels=-1)
    else:
        config.update(num_heads=-1, num_head_channels=channels[-1] // heads[-1])
    if config["adm_in_channels"]:
        config["num_classes"] = "sequential"
    return config


def comfy_model_from_diffusers_unet(unet, family: str):
    """A ComfyUI ``BaseModel`` of ``family`` ("sd15"/"sdxl") holding exactly ``unet``'s weights."""
    comfy = import_comfy()
    config = comfy_unet_config(dict(unet.config))
    model_config = {"sd15": comfy.supported_models.SD15, "sdxl": comfy.supported_models.SDXL}[family](config)
    model_config.unet_config.update(num_heads=config["num_heads"], num_head_channels=config["num_head_channels"])
    model = model_config.get_model({})
    diffusers_to_ldm = comfy.utils.unet_to_diffusers(model_config.unet_config)
    state = unet.state_dict()
    ldm_state = {ldm: state[diff] for diff, ldm in diffusers_to_ldm.items() if diff in state}
    missing, unexpected = model.diffusion_model.load_state_dict(ldm_state, strict=False)
    if missing or len(ldm_state) != len(state):
        raise RuntimeError(f"tiny UNet does not map onto ComfyUI's UNet: missing {missing[:5]}, unmapped {sorted(set(state) - set(diffusers_to_ldm))[:5]}")
    return model.to(torch.float32).eval()


def _assemble_ldm(state: dict[str, torch.Tensor], key_map: dict) -> dict[str, torch.Tensor]:
    """Apply one of ComfyUI's ``*_to_diffusers`` key maps in reverse: entries are ``ldm_key`` or
    ``(ldm_key, (dim, offset, size) | None[, transform])``; fused tensors (qkv) are put together from slices."""
    out: dict[str, torch.Tensor] = {}
    pieces: dict[str, list] = {}
    for diffusers_key, target in key_map.items():
        if diffusers_key not in state:
            continue
        tensor = state[diffusers_key].detach().clone()
        if isinstance(target, str):
            out[target] = tensor
            continue
        ldm_key, span = target[0], target[1]
        if len(target) > 2:
            tensor = target[2](tensor)
        if span is None:
            out[ldm_key] = tensor
        else:
            pieces.setdefault(ldm_key, []).append((span, tensor))
    for ldm_key, parts in pieces.items():
        parts.sort(key=lambda item: item[0][1])
        out[ldm_key] = torch.cat([tensor for _, tensor in parts], dim=parts[0][0][0])
    return out


def comfy_model_from_diffusers_transformer(transformer, family: str):
    """A ComfyUI ``BaseModel`` ("sd3" MMDiT, "pixart" PixArtMS or "flux") holding exactly ``transformer``'s weights."""
    comfy = import_comfy()
    import comfy.model_detection

    config = dict(transformer.config)
    if family == "sd3":
        key_map = comfy.utils.mmdit_to_diffusers({"depth": config["num_layers"]})
        ldm_state = _assemble_ldm(transformer.state_dict(), key_map)
        model_config = comfy.supported_models.SD3(comfy.model_detection.detect_unet_config(ldm_state, ""))
    elif family == "pixart":
        hidden = config["num_attention_heads"] * config["attention_head_dim"]
        key_map = comfy.utils.pixart_to_diffusers({"depth": config["num_layers"], "hidden_size": hidden})
        ldm_state = _assemble_ldm(transformer.state_dict(), key_map)
        model_config = comfy.supported_models.PixArtAlpha({
            "image_model": "pixart_alpha", "depth": config["num_layers"], "hidden_size": hidden,
            "num_heads": config["num_attention_heads"], "patch_size": config["patch_size"], "in_channels": config["in_channels"],
            "input_size": config["sample_size"], "caption_channels": config["caption_channels"], "model_max_length": 120,
            "micro_condition": bool(config["use_additional_conditions"]), "pe_interpolation": 1,
        })
    elif family == "flux":
        key_map = comfy.utils.flux_to_diffusers(TINY_FLUX)
        ldm_state = _assemble_ldm(transformer.state_dict(), key_map)
        unet_config = comfy.model_detection.detect_unet_config(ldm_state, "")
        # ComfyUI's detection assumes Flux.1's 128-wide heads and rope axes; the tiny model says its own
        unet_config.update(num_heads=TINY_FLUX["num_heads"], axes_dim=TINY_FLUX["axes_dim"])
        model_config = comfy.supported_models.Flux(unet_config)
    else:
        raise ValueError(f"no ComfyUI transformer twin for family {family!r}")
    model = model_config.get_model({})
    missing, unexpected = model.diffusion_model.load_state_dict(ldm_state, strict=False)
    if unexpected:
        raise RuntimeError(f"ComfyUI's {family} model has no place for {unexpected[:5]}")
    return model.to(torch.float32).eval(), missing


def _ldm_unet_state(unet, family: str) -> dict[str, torch.Tensor]:
    comfy = import_comfy()
    diffusers_to_ldm = comfy.utils.unet_to_diffusers(comfy_unet_config(dict(unet.config)))
    state = unet.state_dict()
    return {f"model.diffusion_model.{ldm}": state[diff] for diff, ldm in diffusers_to_ldm.items() if diff in state}


def _clip_checkpoint_keys(encoder) -> dict[str, torch.Tensor]:
    # checkpoints keep transformers' classic "text_model." layout (CLIPTextModel is flattened in transformers >= 5.6)
    return {(k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}"): v for k, v in encoder.state_dict().items()}


def single_file_state_dict(pipe, family: str) -> dict[str, torch.Tensor]:
    """The pipeline's weights in the single-file (LDM / ComfyUI ``models/checkpoints``) key layout."""
    comfy = import_comfy()
    from comfy import diffusers_convert

    if family not in ("sd15", "sdxl", "sd3"):
        raise ValueError(f"single-file tiny checkpoints exist for sd15, sdxl and sd3, not {family!r}")
    if family == "sd3":  # ComfyUI's SD3 "incl. clips" layout
        state = {f"model.diffusion_model.{k}": v for k, v in
                 _assemble_ldm(pipe.transformer.state_dict(), comfy.utils.mmdit_to_diffusers({"depth": pipe.transformer.config.num_layers})).items()}
        for name, encoder in (("clip_l", pipe.text_encoder), ("clip_g", pipe.text_encoder_2)):
            state.update({f"text_encoders.{name}.transformer.{k}": v for k, v in _clip_checkpoint_keys(encoder).items()})
        state.update({f"text_encoders.t5xxl.transformer.{k}": v for k, v in pipe.text_encoder_3.state_dict().items()})
    else:
        state = _ldm_unet_state(pipe.unet, family)
    state.update({f"first_stage_model.{k}": v for k, v in ldm_vae_state(pipe.vae).items()})
    if family == "sd15":
        state.update({f"cond_stage_model.transformer.{k}": v for k, v in _clip_checkpoint_keys(pipe.text_encoder).items()})
    elif family == "sdxl":
        state.update({f"conditioner.embedders.0.transformer.{k}": v for k, v in _clip_checkpoint_keys(pipe.text_encoder).items()})
        # the second (OpenCLIP-G) encoder is stored in open_clip's layout
        hf = {f"transformer.{k}": v for k, v in _clip_checkpoint_keys(pipe.text_encoder_2).items()}
        openclip = diffusers_convert.convert_text_enc_state_dict_v20(hf)
        state.update({f"conditioner.embedders.1.model.{k}": v for k, v in openclip.items()})
    return {k: v.detach().clone().contiguous() for k, v in state.items()}  # T5 ties shared/embed_tokens: unshare


def ldm_vae_state(vae) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL's weights in the LDM layout (single files, Flux's ae.safetensors)."""
    import_comfy()
    from comfy import diffusers_convert

    state = diffusers_convert.convert_vae_state_dict(vae.state_dict())
    # that converter numbers decoder levels as for SD's 4-level VAE (up.3 = first up block); renumber for ours
    levels = len(vae.config.block_out_channels)
    return {re.sub(r"^decoder\.up\.(\d+)\.", lambda m: f"decoder.up.{int(m.group(1)) - (4 - levels)}.", k): v.contiguous()
            for k, v in state.items()}


def save_tiny_single_file(family: str, folder: str | os.PathLike, seed: int = 0, **options) -> tuple[Path, Path]:
    """A tiny ``family`` model as one ``.safetensors`` checkpoint plus its diffusers config folder.

    Returns ``(checkpoint_path, config_folder)``; the config folder is a full diffusers save of the
    same weights, so tests can compare what the single-file loader built against it.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    config_folder = save_tiny_pipeline(family, folder / f"{family}_diffusers", seed=seed, **options)
    import diffusers

    pipe = getattr(diffusers, {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
                               "sd3": "StableDiffusion3Pipeline"}[family]).from_pretrained(str(config_folder))
    checkpoint = folder / f"{family}_tiny.safetensors"
    save_file(single_file_state_dict(pipe, family), str(checkpoint))
    return checkpoint, config_folder


def trained_tdm_family(folder: str | os.PathLike, rank: int = 4, alpha: float = 2.0, seed: int = 7):
    """The family of ``folder`` with both TDM adapters, their weights random and non-zero (as if trained)."""
    from training.models import FAKE_SCORE, STUDENT, adapter_parameters, add_tdm_adapters, load_family

    family = load_family(str(folder))
    add_tdm_adapters(family, rank=rank, alpha=alpha)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in (STUDENT, FAKE_SCORE):
            for p in adapter_parameters(family.network, name):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return family
