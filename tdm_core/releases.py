"""The TDM weights the authors released, how each must be sampled, and how to tell them from their files.

METHOD.md "Released inference settings" gives the settings; the authors publish the files for diffusers only
(``pipe.load_lora_weights``), without TDM metadata. Host-free (no ComfyUI, no diffusers): the ComfyUI TDM
LoRA Loader recognises a release from its keys and container and applies these settings, and
``training.convert`` writes a release as a ComfyUI LoRA that carries them (TDM metadata, alpha baked in).

Strength: diffusers scales a LoRA by ``alpha / rank`` (alpha from the file's ``.alpha`` tensors or its PEFT
header, else alpha = rank) times the ``set_adapters`` weight; ComfyUI scales by ``alpha / rank`` (the same
defaults) times the strength. So the ComfyUI strength that reproduces a release is its documented adapter
weight: 0.125 for the SD3 LoRA ("IMPORTANT"), 1 where the authors load the file without ``set_adapters``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Optional

from . import grids
from .lora_files import POSITIONAL_KEY
from .metadata import PREFIX, TDMInfo

UNET_PREFIXES = ("lora_unet_", "unet.")  # kohya (the authors' training script) or diffusers/PEFT UNet keys
TRANSFORMER_PREFIX = "transformer."  # diffusers' StableDiffusion3Pipeline.save_lora_weights
PEFT_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


@dataclass(frozen=True)
class Release:
    name: str  # TDMInfo.release
    title: str
    base_family: str  # TDMInfo.base_family
    base_model: str  # the base it fits: "sd15", "sd3" (SD3-Medium), "sd35" (SD3.5-Medium, MMDiT-X), "cogvideox"
    prediction_type: str
    grid: tuple[float, ...]  # the timesteps its documented sampler visits (4 steps)
    solver: str  # TDMInfo.solver
    flow_shift: Optional[float]  # flow models: the shift of its documented sampler
    strength: float  # the documented adapter weight (see the module docstring)
    file: str  # where the authors publish it
    layout: str  # "unet": SD1.5 UNet keys; "transformer": diffusers transformer keys with lora_A / lora_B
    containers: tuple[str, ...]  # file kinds it is published as: "pickle" (.pt) or "safetensors"
    note: str = ""  # what the pack had to assume
    lora_config: Optional[dict] = None  # positional releases: the peft LoraConfig whose trainable parameters they list

    def info(self) -> TDMInfo:
        """The TDM metadata that makes the TDM nodes sample this release as documented (strength 1 once the
        adapter weight is baked into the file's alpha, as training.convert does)."""
        return TDMInfo(num_steps=len(self.grid), grid=list(self.grid), prediction_type=self.prediction_type,
                       base_family=self.base_family, teacher_cfg=1.0, recommended_strength=self.strength,
                       flow_shift=self.flow_shift, solver=self.solver, release=self.name)

    def summary(self, strength: float) -> str:
        shift = f", flow shift {self.flow_shift:g}" if self.flow_shift is not None else ""
        return (f"{self.title}: strength {strength:g}, {self.solver} at timesteps {[round(t, 2) for t in self.grid]}"
                f"{shift}, cfg 1" + (f" ({self.note})" if self.note else ""))


SD15_DPM_GRID = tuple(grids.diffusers_grid(4, "leading", 1000, steps_offset=1, solver="dpmsolver"))
FLOW_DPM_GRID = tuple(grids.dpmsolver_flow_grid(4))
# TDM-R1 on Z-Image-Turbo: ZImagePipeline(num_inference_steps=5) of the authors' diffusers, whose scheduler ran with
# sigma_min 0: unshifted sigmas 1, 0.75, 0.5, 0.25, 0 (the call at 0 changes nothing: "4 DiT forwards"), Euler
Z_IMAGE_R1_GRID = (1000, 750, 500, 250)
# the TDM-R1 README's LoraConfig (add_k_proj / add_v_proj match nothing in Z-Image's single-stream blocks)
TDMR1_LORA_CONFIG = {"r": 32, "lora_alpha": 64, "target_modules": ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj"]}

RELEASES = {r.name: r for r in (
    Release("tdm_dreamshaper", "TDM Dreamshaper-v7 LoRA (SD1.5)", "sd15", "sd15", "epsilon", SD15_DPM_GRID, "dpmpp_2m",
            None, 1.0, "Luo-Yihong/TDM_dreamshaper_LoRA: tdm_dreamshaper.pt", "unet", ("pickle",)),
    Release("tdm_sd3_medium", "TDM SD3-Medium LoRA", "sd3", "sd3", "flow", FLOW_DPM_GRID, "dpmpp_2m",
            6.0, 0.125, "Luo-Yihong/TDM_sd3_lora: pytorch_lora_weights.safetensors", "transformer", ("safetensors",)),
    Release("tdm_sd35_medium", "TDM SD3.5-Medium LoRA", "sd3", "sd35", "flow", FLOW_DPM_GRID, "dpmpp_2m",
            6.0, 1.0, "Luo-Yihong/TDM_sd3-5_lora", "transformer", ("safetensors",),
            note="the authors document no adapter weight or shift for it: 1 as diffusers' load_lora_weights applies, "
                 "the SD3 release's DPM-Solver++ shift 6; if images look burnt, lower the strength (0.125 as for SD3)"),
    # no ComfyUI model: used by the headless sampler (training.sample) and training.convert; the authors sample it at
    # guidance 1, 4 steps; the pack uses the grid it was trained on (they call the default uniform scheduler inferior)
    Release("tdm_cogvideox_2b", "TDM CogVideoX-2B LoRA", "cogvideox", "cogvideox", "v_prediction", grids.RELEASED_GRIDS["cogvideox_2b"],
            "tdm", None, 1.0, "Luo-Yihong/TDM_CogVideoX-2B_LoRA: pytorch_lora_weights.safetensors", "transformer", ("safetensors",)),
    Release("tdmr1_z_image_turbo", "TDM-R1 Z-Image-Turbo LoRA", "z_image", "z_image", "flow", Z_IMAGE_R1_GRID, "tdm",
            3.0, 1.0, "Luo-Yihong/TDM-R1: tdmr1_zimage_ema.ckpt", "positional", ("pickle",), lora_config=TDMR1_LORA_CONFIG),
)}


def container_of(file_name: str) -> str:
    return "safetensors" if file_name.lower().endswith((".safetensors", ".sft")) else "pickle"


def has_tdm_metadata(metadata: Optional[Mapping[str, str]]) -> bool:
    return PREFIX + "method" in (metadata or {})


def layout_of(keys: Iterable[str]) -> Optional[str]:
    """"positional" (a list without names), "unet" (UNet-only keys), "transformer" (diffusers transformer keys,
    lora_A / lora_B, no alpha) or None."""
    keys = list(keys)
    if keys and all(k.startswith(POSITIONAL_KEY + ".") for k in keys):
        return "positional"
    if keys and all(k.startswith(UNET_PREFIXES) for k in keys):
        return "unet"
    if keys and all(k.startswith(TRANSFORMER_PREFIX) and k.endswith(PEFT_SUFFIXES) for k in keys):
        return "transformer"
    return None


def lora_base_model(keys: Iterable[str]) -> Optional[str]:
    """What the keys alone tell: MMDiT-X's second attention (``attn2``) only exists in SD3.5; transformer blocks
    with ``attn1`` and no ``attn2`` (no cross-attention) are CogVideoX's."""
    keys = list(keys)
    if any(".attn2." in k for k in keys):
        return "sd35"
    if any(k.startswith(TRANSFORMER_PREFIX + "transformer_blocks.") and ".attn1." in k for k in keys):
        return "cogvideox"
    return None


def recognise_release(keys: Iterable[str], metadata: Optional[Mapping[str, str]], file_name: str,
                      base_model: Optional[str]) -> Optional[Release]:
    """The release a LoRA file is, from its structure and the base it is loaded on; ``None`` for files that
    carry TDM metadata (they say for themselves) and for files shaped like no release."""
    if has_tdm_metadata(metadata):
        return None
    keys = list(keys)
    layout, container = layout_of(keys), container_of(file_name)
    base_model = lora_base_model(keys) or base_model
    for release in RELEASES.values():
        if release.layout == layout and container in release.containers and release.base_model == base_model:
            return release
    return None


# --- positional releases: names from the order peft lists the trainable parameters in -----------------------
Z_IMAGE_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")  # the targets of TDMR1_LORA_CONFIG that exist in Z-Image


def z_image_peft_order(n_layers: int, n_refiner_layers: int) -> list[str]:
    """The LoRA parameters of a peft-wrapped diffusers ZImageTransformer2DModel, in ``named_parameters`` order
    (its module order: noise refiner, context refiner, main layers; q, k, v, out; A before B). Pure, so the ComfyUI
    loader needs no diffusers; tests/test_released_tdmr1.py proves it equal to peft's own enumeration."""
    blocks = ([f"noise_refiner.{i}" for i in range(n_refiner_layers)] + [f"context_refiner.{i}" for i in range(n_refiner_layers)]
              + [f"layers.{i}" for i in range(n_layers)])
    return [f"{block}.attention.{target}.lora_{ab}.weight" for block in blocks for target in Z_IMAGE_ATTENTION for ab in "AB"]


def name_positional(lora: Mapping, names: list[str], release: Release, prefix: str, width: Optional[int] = None) -> dict:
    """``{"ema_parameters.<i>": tensor}`` -> ``{prefix + name: tensor}`` with the LoRA's ``lora_alpha / r`` folded into
    lora_B (the file has no alpha; strength 1 is then right in ComfyUI and diffusers); length and shapes checked."""
    tensors = [lora[f"{POSITIONAL_KEY}.{i}"] for i in range(len(lora))]
    if len(tensors) != len(names):
        raise ValueError(f"the {release.title} lists {len(tensors)} tensors, but this model's peft LoRA (r={release.lora_config['r']}) "
                         f"has {len(names)}: it was made for a model of another depth. Nothing was loaded: load it on Z-Image-Turbo")
    rank, scale = release.lora_config["r"], release.lora_config["lora_alpha"] / release.lora_config["r"]
    out = {}
    for name, tensor in zip(names, tensors):
        is_a = name.endswith(PEFT_SUFFIXES[0])
        expected = (rank, width) if is_a else (width, rank)
        if tensor.ndim != 2 or any(e is not None and e != got for e, got in zip(expected, tensor.shape)):
            raise ValueError(f"the {release.title}'s tensor for {name} has shape {tuple(tensor.shape)}, this model needs "
                             f"{tuple('?' if e is None else e for e in expected)}. Nothing was loaded: load it on Z-Image-Turbo")
        out[prefix + name] = tensor if is_a else tensor * scale
    return out
