"""Load a teacher as a :class:`training.families.base.ModelFamily`, offline, and put the TDM adapters on it.

``load_family(path)`` accepts a diffusers folder (``model_index.json``), a single-file checkpoint
(``.safetensors`` as in ComfyUI's ``models/checkpoints``, converted with the configs shipped in
``training/configs/<family>`` or the folder given as ``config_path``) or a folder holding
``tdm_family.json`` (``{"family": "digits", ...}``) for families that are not diffusers pipelines.
Nothing here touches the network: hub access is disabled while loading.

The student and the fake score are two PEFT LoRA adapters on ``family.network``; the teacher is
the same network with adapters disabled (METHOD.md "One training iteration").
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import warnings
from pathlib import Path
from typing import Callable, Iterator

import torch

from tdm_core.iteration import FAKE_SCORE, ROLES, STUDENT  # the adapters are named after the roles tdm_core updates
from training.errors import TrainingInputError
from training.families.base import ModelFamily

TDM_ADAPTERS = ROLES
CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
FAMILY_FILE = "tdm_family.json"


# --- family registry -----------------------------------------------------------------------------
# name -> loader(model_path, device, dtype, config_path) -> ModelFamily
FAMILY_LOADERS: dict[str, Callable[..., ModelFamily]] = {}
PIPELINE_FAMILIES = {  # diffusers pipeline class (model_index.json "_class_name") -> family name
    "StableDiffusionPipeline": "sd15",
    "StableDiffusionXLPipeline": "sdxl",
    "PixArtAlphaPipeline": "pixart",
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
    "ZImagePipeline": "z_image",
    "QwenImagePipeline": "qwen_image",
    "CogVideoXPipeline": "cogvideox",
    "WanPipeline": "wan",
}


def register_family(name: str, loader: Callable[..., ModelFamily]) -> None:
    """Make ``load_family(path, family=name)`` (and folders whose tdm_family.json names it) use ``loader``."""
    FAMILY_LOADERS[name] = loader


def _family_class(name: str):
    from training.families.cogvideox import CogVideoXFamily
    from training.families.flux import FluxFamily
    from training.families.pixart import PixArtFamily
    from training.families.qwen_image import QwenImageFamily
    from training.families.sd3 import SD3Family
    from training.families.sd15 import SD15Family
    from training.families.sdxl import SDXLFamily
    from training.families.wan import WanFamily
    from training.families.z_image import ZImageFamily

    return {"sd15": SD15Family, "sdxl": SDXLFamily, "pixart": PixArtFamily, "sd3": SD3Family, "flux": FluxFamily,
            "z_image": ZImageFamily, "qwen_image": QwenImageFamily, "cogvideox": CogVideoXFamily, "wan": WanFamily}[name]


def known_families() -> list[str]:
    return sorted(set(PIPELINE_FAMILIES.values()) | set(FAMILY_LOADERS))


# --- detection -----------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise TrainingInputError(f"cannot read {path}: {err}. Fix or re-save the model folder.") from err


def detect_folder_family(folder: Path) -> str:
    """Family of a diffusers folder from model_index.json, else from the unet/transformer config."""
    if (folder / FAMILY_FILE).is_file():
        return str(_read_json(folder / FAMILY_FILE).get("family", ""))
    if (folder / "model_index.json").is_file():
        pipeline_class = _read_json(folder / "model_index.json").get("_class_name", "")
        if pipeline_class in PIPELINE_FAMILIES:
            return PIPELINE_FAMILIES[pipeline_class]
    for sub in ("unet", "transformer"):
        if (folder / sub / "config.json").is_file():
            config = _read_json(folder / sub / "config.json")
            kind = config.get("_class_name", "")
            if kind == "UNet2DConditionModel":
                return "sdxl" if config.get("addition_embed_type") == "text_time" else "sd15"
            if kind == "PixArtTransformer2DModel":
                return "pixart"
            if kind == "SD3Transformer2DModel":
                return "sd3"
            if kind == "ZImageTransformer2DModel":
                return "z_image"
    raise TrainingInputError(
        f"{folder} is not a model folder this trainer knows: expected a diffusers folder with model_index.json "
        f"(one of {', '.join(sorted(PIPELINE_FAMILIES))}) or a {FAMILY_FILE} naming the family. "
        "Pass a diffusers model folder or a single-file .safetensors checkpoint."
    )


# unique key prefixes of the single-file (LDM / ComfyUI checkpoint) layout of each family
SINGLE_FILE_MARKERS = (
    ("sd3", "model.diffusion_model.joint_blocks."),
    ("pixart", "model.diffusion_model.t_block."),
    ("sdxl", "conditioner.embedders.1."),
    ("sd15", "cond_stage_model.transformer."),
)


def detect_single_file_family(keys) -> str | None:
    from training.families.flux_files import is_bfl_flux
    from training.families.qwen_image_files import is_qwen_image
    from training.families.wan_files import is_wan
    from training.families.z_image_files import is_comfy_z_image

    keys = list(keys)
    if is_bfl_flux(keys):  # a Flux diffusion model in Black Forest Labs' layout (ComfyUI's models/diffusion_models)
        return "flux"
    if is_comfy_z_image(keys):  # a Z-Image diffusion model in ComfyUI's Lumina2 layout
        return "z_image"
    if is_qwen_image(keys):  # a Qwen-Image diffusion model (ComfyUI's models/diffusion_models)
        return "qwen_image"
    if is_wan(keys):  # a Wan diffusion model in its original layout (ComfyUI's models/diffusion_models)
        return "wan"
    for family, marker in SINGLE_FILE_MARKERS:
        if any(k.startswith(marker) for k in keys):
            return family
    return None


def _safetensors_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    except Exception as err:  # safetensors raises several error types for a damaged header
        raise TrainingInputError(f"cannot read {path} as safetensors ({err}): pass an intact .safetensors checkpoint.") from err


# --- loading -------------------------------------------------------------------------------------
@contextlib.contextmanager
def _offline() -> Iterator[None]:
    # loading must never reach the hub: everything comes from the given path or the shipped configs
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE")}
    os.environ.update({k: "1" for k in saved})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _pipeline_class(family: str):
    import diffusers

    return getattr(diffusers, _family_class(family).pipeline_class)


def _load_pipeline_folder(folder: Path, family: str, dtype):
    extra = {"safety_checker": None} if family == "sd15" else {}  # the teacher never needs the NSFW classifier
    with _offline():
        try:
            return _pipeline_class(family).from_pretrained(str(folder), local_files_only=True, torch_dtype=dtype, **extra)
        except (OSError, ValueError, KeyError) as err:
            raise TrainingInputError(f"cannot load the {family} diffusers folder {folder}: {err}. Check that the folder is complete.") from err


def _load_pipeline_single_file(path: Path, family: str, config_path: Path | None, dtype):
    config = Path(config_path) if config_path else CONFIGS_DIR / family
    if not (config / "model_index.json").is_file():
        raise TrainingInputError(
            f"no diffusers config for the {family} family at {config}: pass config_path (a diffusers folder of the same "
            f"architecture; weights are not needed) or use a diffusers model folder instead of {path.name}."
        )
    from training.families.text_encoders import clip_tokenizers
    from training.families.weight_formats import pipeline_from_state, read_weights

    extra = clip_tokenizers(config, family) if family in ("sd15", "sdxl") else {}
    weights = read_weights(path, dtype)  # ComfyUI's weight formats (fp8, fp8_scaled) dequantised, or refused by name
    with _offline():
        try:
            return pipeline_from_state(_pipeline_class(family), weights, config, dtype, **extra)
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            raise TrainingInputError(
                f"cannot convert {path} with the {family} config {config}: {err}. "
                "If the checkpoint is another variant of the architecture, pass its diffusers config folder as config_path."
            ) from err


def _load_registered(name: str, path: Path, device, dtype, config_path):
    if name not in FAMILY_LOADERS:
        try:  # a plug-in family lives in training/families/<name>.py and names its loader FAMILY_LOADER
            module = importlib.import_module(f"training.families.{name}")
        except ModuleNotFoundError:
            module = None
        if getattr(module, "FAMILY_LOADER", None) is not None:
            register_family(name, module.FAMILY_LOADER)
    if name not in FAMILY_LOADERS:
        raise TrainingInputError(f"unknown model family {name!r} for {path}: use one of {', '.join(known_families())}.")
    return FAMILY_LOADERS[name](str(path), device=device, dtype=dtype, config_path=config_path)


def load_family(model_path: str, family: str | None = None, device="cpu", dtype=torch.float32, config_path=None) -> ModelFamily:
    """The frozen teacher at ``model_path`` (diffusers folder, single-file checkpoint or tdm_family.json folder)."""
    path = Path(model_path).expanduser()
    if not path.exists():
        raise TrainingInputError(f"model path {path} does not exist: pass a diffusers model folder or a .safetensors checkpoint.")
    if not os.access(path, os.R_OK):
        raise TrainingInputError(f"model path {path} is not readable: check its permissions.")
    if path.is_dir():
        detected = detect_folder_family(path) if family is None or (path / "model_index.json").is_file() else family
        if family is not None and family != detected and detected in PIPELINE_FAMILIES.values():
            raise TrainingInputError(f"{path} holds a {detected} model, not {family}: drop the family option or pass a {family} model.")
        name = family or detected
        if name not in PIPELINE_FAMILIES.values():
            return _load_registered(name, path, device, dtype, config_path)
        pipeline = _load_pipeline_folder(path, name, dtype)
    else:
        if path.suffix.lower() != ".safetensors":
            raise TrainingInputError(f"{path.name} is not a .safetensors checkpoint: convert it to safetensors or pass a diffusers folder.")
        detected = detect_single_file_family(_safetensors_keys(path))
        name = family or detected
        if name is None:
            raise TrainingInputError(
                f"unknown architecture in {path.name}: no SD1.5, SDXL, PixArt, SD3, Flux, Z-Image, Qwen-Image or Wan keys found. Pass family= and "
                "config_path= for a supported architecture, or a diffusers model folder."
            )
        if name not in PIPELINE_FAMILIES.values():
            return _load_registered(name, path, device, dtype, config_path)
        if name == "cogvideox":  # no single-file layout: diffusers' folder (THUDM/CogVideoX-2b) only
            found = f" ({path.name} holds a {detected} model)" if detected else ""
            raise TrainingInputError(f"CogVideoX loads from a diffusers folder (model_index.json), not a single file{found}: "
                                     "pass the CogVideoX-2b / 5b diffusers folder as --model.")
        if name == "flux":  # ComfyUI's split files: the text encoders and the VAE sit in the sibling folders
            from training.families.flux_files import load_flux_files

            with _offline():
                pipeline = load_flux_files(path, config_path, dtype)
        elif name == "sd3":  # SD3 / SD3.5 checkpoints, text encoders inside or in models/text_encoders
            from training.families.sd3_files import load_sd3_file

            with _offline():
                pipeline = load_sd3_file(path, config_path, dtype)
        elif name == "z_image":  # the same for Z-Image: Qwen3-4B and the Flux VAE in the sibling folders
            from training.families.z_image_files import load_z_image_files

            with _offline():
                pipeline = load_z_image_files(path, config_path, dtype)
        elif name == "qwen_image":  # the same: the text encoder and the VAE in the sibling folders
            from training.families.qwen_image_files import load_qwen_image_files

            with _offline():
                pipeline = load_qwen_image_files(path, config_path, dtype)
        elif name == "wan":  # the same: UMT5 and the Wan VAE in the sibling folders
            from training.families.wan_files import load_wan_files

            with _offline():
                pipeline = load_wan_files(path, config_path, dtype)
        else:
            pipeline = _load_pipeline_single_file(path, name, config_path, dtype)
    return _family_class(name)(pipeline, device=device, dtype=dtype, source_path=str(path))


# --- base model hash (LoRA metadata) ---------------------------------------------------------------
def file_sha256(path: str | os.PathLike, chunk_size: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def base_model_hash(model_path: str | os.PathLike) -> str:
    """sha256 of a checkpoint file, or of the weight files of a model folder (sorted relative paths and contents)."""
    path = Path(model_path)
    if path.is_file():
        return file_sha256(path)
    digest = hashlib.sha256()
    for weight in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in {".safetensors", ".bin", ".pt", ".pth", ".ckpt"}):
        digest.update(str(weight.relative_to(path)).encode())
        digest.update(bytes.fromhex(file_sha256(weight)))
    return digest.hexdigest()


# --- the two TDM adapters --------------------------------------------------------------------------
SWITCH_ATTR = "_tdm_adapter_switch"  # the network's PEFT layers, found once (see _switch_of)


def _tuner_layers(network: torch.nn.Module):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in network.modules() if isinstance(m, BaseTunerLayer)]


class _AdapterSwitch:
    """Every PEFT layer of one network, found once. Switching sets each layer's active adapter and its
    disabled flag directly: peft's ``set_adapter`` / ``enable_adapters`` also rewrite ``requires_grad``
    of the adapter weights (METHOD.md pitfall) and cost a walk over the whole network per switch."""

    def __init__(self, network: torch.nn.Module):
        self.layers = _tuner_layers(network)

    def active(self) -> str | None:
        if not self.layers or self.layers[0].disable_adapters:
            return None
        return self.layers[0].active_adapters[0]

    def activate(self, name: str | None) -> None:
        for layer in self.layers:
            layer._disable_adapters = name is None
            if name is not None:
                layer._active_adapter = [name]


def _switch_of(network: torch.nn.Module) -> _AdapterSwitch:
    switch = network.__dict__.get(SWITCH_ATTR)
    if switch is None:  # adapters loaded some other way than add_tdm_adapters (e.g. benchmarks)
        switch = _AdapterSwitch(network)
        network.__dict__[SWITCH_ATTR] = switch
    return switch


def add_tdm_adapters(family: ModelFamily, rank: int, alpha: float, target_modules: list[str] | None = None) -> None:
    """Put the ``student`` and ``fake_score`` LoRA adapters on ``family.network`` (both start as the teacher).

    The LoRA weights are float32 whatever the base's dtype (diffusers' LoRA scripts'
    ``cast_training_params``): in bf16/fp16 most AdamW updates of a small learning rate would round away.
    """
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig, inject_adapter_in_model

    if rank < 1:
        raise TrainingInputError(f"LoRA rank {rank} must be at least 1: use e.g. --lora-rank 16.")
    if alpha <= 0:
        raise TrainingInputError(f"LoRA alpha {alpha} must be positive: use e.g. the rank.")
    network = family.network
    network.requires_grad_(False)
    targets = list(target_modules or family.lora_target_modules)
    configs = {}
    for name in TDM_ADAPTERS:
        # B = 0 at init: student and fake score both start exactly at the teacher (METHOD.md)
        configs[name] = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=True)
        try:  # peft directly: not every diffusers model class has diffusers' add_adapter (PixArt has not)
            with warnings.catch_warnings():  # a second adapter is the point here, not a mistake
                warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                inject_adapter_in_model(configs[name], network, adapter_name=name)
        except ValueError as err:
            raise TrainingInputError(f"cannot add LoRA adapters to {family.name}: {err}. Check target_modules {targets}.") from err
    network.peft_config = configs
    for name in TDM_ADAPTERS:
        for param in adapter_parameters(network, name):
            param.requires_grad_(True)
    cast_training_params(network, torch.float32)  # only the parameters that require grad: the adapters
    network.__dict__[SWITCH_ATTR] = _AdapterSwitch(network)
    _switch_of(network).activate(STUDENT)


def adapter_parameters(network: torch.nn.Module, name: str) -> list[torch.nn.Parameter]:
    """The LoRA weights of adapter ``name`` (what its optimiser owns)."""
    marker = f".{name}."
    return [p for n, p in network.named_parameters() if marker in n and ".lora_" in n]


def active_adapter(network: torch.nn.Module) -> str | None:
    """The adapter the network currently runs with, or None for the teacher (adapters disabled)."""
    return _switch_of(network).active()


@contextlib.contextmanager
def use_adapter(network: torch.nn.Module, name: str | None) -> Iterator[None]:
    """Run ``network`` as ``name`` ("student", "fake_score") or as the teacher (None), restoring afterwards.

    O(1) in the network's size beyond its PEFT layers; ``requires_grad`` is never touched, so both
    optimisers keep their gradients.
    """
    if name is not None and name not in TDM_ADAPTERS and not adapter_parameters(network, name):
        raise ValueError(f"no adapter named {name!r} on this network: use one of {TDM_ADAPTERS} or None for the teacher")
    switch = _switch_of(network)
    previous = switch.active()
    switch.activate(name)
    try:
        yield
    finally:
        switch.activate(previous)


def adapter_state_dict(network: torch.nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Detached copies of adapter ``name``'s LoRA weights, keyed ``<module path>.lora_A.weight`` / ``.lora_B.weight``."""
    marker = f".{name}."
    return {
        n.replace(marker, "."): p.detach().clone()
        for n, p in network.named_parameters()
        if marker in n and ".lora_" in n
    }


def load_adapter_state_dict(network: torch.nn.Module, name: str, state: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`adapter_state_dict` (checkpoint resume); the key sets must match exactly."""
    params = {n.replace(f".{name}.", "."): p for n, p in network.named_parameters() if f".{name}." in n and ".lora_" in n}
    if set(params) != set(state):
        missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        raise TrainingInputError(
            f"adapter checkpoint for {name!r} does not match this model (missing {missing[:3]}, unexpected {unexpected[:3]}): "
            "resume with the same model, LoRA rank and target modules."
        )
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(state[key].to(param.device, param.dtype))
