"""The flow benchmark teacher (a tiny diffusers ``FluxTransformer2DModel`` without a guidance embedding) as a
ComfyUI Flux MODEL, its prompts as ComfyUI Flux conditionings, and the TDM Distill node's student LoRA (ComfyUI
keys, fused qkv / linear1) as the trainer's PEFT adapter state.

Loading: ComfyUI's own diffusers -> BFL key map (``comfy.model_detection.convert_diffusers_mmdit``), its own
Flux config detection (``detect_unet_config``) and ComfyUI's ``FluxSchnell`` model config (Flux without a
guidance embedding: ComfyUI's discrete-flow sampling at multiplier 1). What detection cannot read off the weights
is set from the teacher's diffusers config, stated here:

- heads and rope axes (detection assumes Flux.1's 24 heads and axes 16/56/56; the teacher has 4 heads of 32 and
  axes 8/12/12) and the output channels (detection assumes Flux.1's 16 latent channels; the teacher's latent has 4,
  packed by 2x2 patches into the 16 the diffusers config names);
- the latent format: Flux's 16-channel one (scale 0.3611, shift 0.1159) would make ComfyUI's samplers widen an
  empty 4-channel latent to 16 channels (``comfy.sample.fix_empty_latent_channels``, which the node applies too);
  the model gets a 4-channel ``LatentFormat`` with the teacher VAE's own scaling factor and no shift. It is never
  applied between the node and the network (``calc_cond_batch`` takes latents as they are), only by KSampler;
- the schedule: the trainer's Flux family distils this teacher at 32 px with the fixed shift exp(mu) (1.583,
  FluxPipeline's ``calculate_shift`` at 16 tokens); ``FluxSchnell``'s discrete flow gets that shift
  (``sampling_settings``), what stock ``ModelSamplingAuraFlow`` at that shift gives a Flux model.

Text: the teacher's CLIP-L and T5 are not ComfyUI text encoders, so each prompt's conditioning is the teacher's own
``FluxPipeline.encode_prompt`` output (the trainer's ``encode_prompts``) wrapped as a ComfyUI CONDITIONING
``[[t5_embedding, {"pooled_output": clip_pooled}]]``, what ``CLIPTextEncode`` gives a Flux model (no ``guidance``:
the teacher has no guidance embedding; its CFG is true CFG with the empty prompt, as in the trainer).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from benchmarks.comfy_host import setup_comfy

WEIGHT = ".weight"


def comfy_flux_config(config: dict) -> dict:
    """What ComfyUI's Flux detection cannot read off the weights, from the diffusers transformer config."""
    heads, head_dim = int(config["num_attention_heads"]), int(config["attention_head_dim"])
    axes = [int(a) for a in config["axes_dims_rope"]]
    if sum(axes) != head_dim:
        raise ValueError(f"rope axes {axes} do not add up to the head width {head_dim}")
    patch = 2  # ComfyUI's Flux packs 2x2 latent patches itself; diffusers' in_channels counts the packed channels
    return {"num_heads": heads, "axes_dim": axes, "out_channels": int(config.get("out_channels") or config["in_channels"]) // (patch * patch)}


def comfy_flux_state(transformer_dir: Path) -> tuple[dict, dict]:
    """The transformer's weights under ComfyUI's Flux names and ComfyUI's diffusers -> Flux key map."""
    setup_comfy()
    import comfy.model_detection
    import comfy.utils
    from safetensors.torch import load_file

    state = load_file(str(transformer_dir / "diffusion_pytorch_model.safetensors"))
    depth = comfy.model_detection.count_blocks(state, "transformer_blocks.{}.")
    single = comfy.model_detection.count_blocks(state, "single_transformer_blocks.{}.")
    key_map = comfy.utils.flux_to_diffusers({"depth": depth, "depth_single_blocks": single, "hidden_size": state["x_embedder.bias"].shape[0]})
    comfy_state = comfy.model_detection.convert_diffusers_mmdit(state, "")  # takes the keys it converts out of ``state``
    if comfy_state is None:
        raise RuntimeError(f"{transformer_dir}: ComfyUI does not read these diffusers keys as Flux")
    return comfy_state, key_map


def flux_latent_format(channels: int, scale_factor: float):
    """ComfyUI's plain ``LatentFormat`` with the teacher's latent channels and VAE scaling (shift 0)."""
    import comfy.latent_formats

    latent_format = comfy.latent_formats.LatentFormat()
    latent_format.latent_channels, latent_format.scale_factor = int(channels), float(scale_factor)
    return latent_format


def load_comfy_flux(model_dir: Path, shift: float):
    """The flow teacher folder's transformer as a ComfyUI MODEL (ModelPatcher over ``model_base.Flux``, fp32,
    ComfyUI's discrete flow at multiplier 1 and ``shift``) and ComfyUI's diffusers -> Flux key map."""
    setup_comfy()
    import comfy.model_detection
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    transformer_dir = model_dir / "transformer"
    config = json.loads((transformer_dir / "config.json").read_text())
    if config.get("guidance_embeds"):
        raise ValueError(f"{transformer_dir}: a guidance-distilled Flux (Flux.1-dev) loads as ComfyUI's Flux, not FluxSchnell")
    comfy_state, key_map = comfy_flux_state(transformer_dir)
    unet_config = comfy.model_detection.detect_unet_config(comfy_state, "")
    unet_config.update(comfy_flux_config(config))
    model_config = comfy.supported_models.FluxSchnell(unet_config)
    model_config.sampling_settings = {"multiplier": 1.0, "shift": float(shift)}
    vae_config = json.loads((model_dir / "vae" / "config.json").read_text())
    model_config.latent_format = flux_latent_format(unet_config["in_channels"], vae_config["scaling_factor"])
    model_config.set_inference_dtype(torch.float32, None)
    base = model_config.get_model({})
    base.diffusion_model.load_state_dict(comfy_state, strict=True)
    base.eval()
    patcher = comfy.model_patcher.ModelPatcher(base, load_device=comfy.model_management.get_torch_device(),
                                               offload_device=comfy.model_management.unet_offload_device())
    return patcher, key_map


def flux_conditionings(family, prompts: list[str]) -> tuple[list, list]:
    """One ComfyUI Flux CONDITIONING per prompt and the empty prompt's, from the teacher's own CLIP-L and T5."""

    def one(prompt: str) -> list:
        cond = family.encode_prompts([prompt])
        return [[cond["encoder_hidden_states"].detach().clone(), {"pooled_output": cond["pooled_projections"].detach().clone()}]]

    return [one(p) for p in prompts], one("")


def comfy_targets_of_diffusers(key_map: dict) -> dict:
    """``{diffusers linear path: (ComfyUI module path, output rows (start, size) or None)}`` for weights."""
    out = {}
    for diffusers, target in key_map.items():
        if not diffusers.endswith(WEIGHT):
            continue
        comfy_key, span = (target, None) if isinstance(target, str) else (target[0], target[1])
        if not comfy_key.endswith(WEIGHT):
            continue
        if span is not None and span[0] != 0:
            raise ValueError(f"{diffusers}: ComfyUI fuses it along dim {span[0]}, not the output rows")
        out[diffusers[: -len(WEIGHT)]] = (comfy_key[: -len(WEIGHT)], None if span is None else (span[1], span[2]))
    return out


def peft_state_from_comfy_flux_lora(lora: dict, key_map: dict, peft_shapes: dict, alpha_to: float, prefix: str = "diffusion_model.") -> dict:
    """The node's Flux LoRA (``diffusion_model.<flux module>.lora_up/lora_down.weight`` + ``.alpha``) as the
    trainer's adapter state for a PEFT adapter of the same rank and alpha ``alpha_to`` on the diffusers modules
    ``peft_shapes`` (``{path: (out, in)}``, every module the trainer adapts).

    A fused ComfyUI linear (``img_attn.qkv``, ``linear1`` = q, k, v and the MLP input) is one LoRA ``up @ down``;
    each diffusers module it fuses gets ``lora_A = down`` and ``lora_B`` = its rows of ``up``, which is exact.
    Modules the node does not adapt (none on this teacher since it adapts the final layer too) get zero ``lora_B``.
    Every module of the node's LoRA must land on a PEFT module (raises otherwise)."""
    targets = comfy_targets_of_diffusers(key_map)
    rank = next(v.shape[0] for k, v in lora.items() if k.endswith(".lora_down.weight"))
    out, used = {}, set()
    for path, (rows, cols) in peft_shapes.items():
        comfy_module, span = targets.get(path, (None, None))
        down = lora.get(f"{prefix}{comfy_module}.lora_down.weight") if comfy_module else None
        if down is None:
            out[f"{path}.lora_A.weight"] = torch.zeros(rank, cols)
            out[f"{path}.lora_B.weight"] = torch.zeros(rows, rank)
            continue
        up, alpha = lora[f"{prefix}{comfy_module}.lora_up.weight"].float(), float(lora[f"{prefix}{comfy_module}.alpha"])
        if span is not None:
            up = up.narrow(0, span[0], span[1])
        out[f"{path}.lora_A.weight"] = down.float().clone()
        out[f"{path}.lora_B.weight"] = (up * (alpha / alpha_to)).clone()
        used.add(comfy_module)
    modules = {k[len(prefix): -len(".lora_down.weight")] for k in lora if k.endswith(".lora_down.weight")}
    if modules - used:
        raise ValueError(f"node LoRA modules with no PEFT module of the trainer: {sorted(modules - used)[:5]}")
    return out


def peft_shapes_of(transformer_dir: Path, target_modules) -> dict:
    """``{path: (out, in)}`` of the teacher's linear layers that the trainer's PEFT ``target_modules`` name (read
    off the weights file, so the family's network may already carry adapters)."""
    from safetensors import safe_open

    from tdm_core.lora_targets import is_target

    with safe_open(str(transformer_dir / "diffusion_pytorch_model.safetensors"), "pt") as f:
        shapes = {k[: -len(WEIGHT)]: tuple(f.get_slice(k).get_shape()) for k in f.keys() if k.endswith(WEIGHT)}
    return {path: shape for path, shape in shapes.items() if len(shape) == 2 and is_target(path, target_modules)}
