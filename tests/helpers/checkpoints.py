"""Model files for end-to-end tests, made here without downloads.

* ``sd15_checkpoint()``: a random-weight checkpoint with the exact SD1.5 architecture, built with
  ComfyUI's own classes so ``CheckpointLoaderSimple`` detects it as SD15 (tiny configs are not
  detected: detection goes by exact shapes). Building takes ~30 s, 2.1 GB on disk and ~6.6 GB of
  memory, so it runs once per machine in a subprocess (the test process never holds that memory)
  and is cached under ``~/.cache/comfyui-tdm/`` keyed by the ComfyUI version.
* ``sd15_slim_checkpoint()``: the same, but a UNet of two levels with one res block each (SD1.5's widths,
  320 channels and 768-wide cross-attention, so it is still detected as SD15): about a tenth of the UNet's
  compute, for tests that train (TDM Distill on the real server) where the full UNet takes minutes per
  iteration on a shared CPU.
* ``write_kohya_lora()``: a small random LoRA for that checkpoint in kohya layout
  (``lora_unet_<diffusers path>.lora_down/lora_up/alpha``), carrying TDM metadata.
"""
from __future__ import annotations

import fcntl
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):  # run as a script by the builder subprocess
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.helpers.comfy_server import comfyui_dir, comfyui_version

BUILDER_VERSION = 2  # bump when the built file changes, so caches rebuild
CACHE_ROOT = Path(os.environ.get("TDM_TEST_CACHE", Path.home() / ".cache" / "comfyui-tdm"))
BUILD_TIMEOUT_S = 900

# The SD1.5 UNet hyper-parameters (public architecture facts), in ComfyUI's unet_config vocabulary.
SD15_UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4,
    "model_channels": 320, "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_middle": 1,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_spatial_transformer": True, "use_linear_in_transformer": False, "legacy": False,
    "context_dim": 768, "num_heads": 8, "adm_in_channels": None,
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
# what ComfyUI's SD15 detection keys on (model_channels 320, context_dim 768, no linear-in transformer) kept; depth cut
SD15_SLIM_UNET_CONFIG = {**SD15_UNET_CONFIG, "num_res_blocks": [1, 1], "channel_mult": [1, 1],
                         "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1]}
SLIM_NAME = "tdm_test_sd15_slim2_random.safetensors"  # bump the name when the slim config changes
SD15_VAE_CONFIG = {
    "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
    "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
}
# LoRA targets: the attention projections, as kohya trainers (and TDM's released LoRAs) pick them
LORA_TARGET_SUFFIXES = (".to_q.weight", ".to_k.weight", ".to_v.weight", ".to_out.0.weight")


def cache_dir() -> Path:
    return CACHE_ROOT / f"comfyui-{comfyui_version()}-builder{BUILDER_VERSION}"


def sd15_checkpoint(name: str = "tdm_test_sd15_random.safetensors") -> Path:
    """Path of the cached random SD1.5 checkpoint, building it first if needed (process-safe)."""
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    targets = lora_targets_path(path)
    if path.is_file() and targets.is_file():
        return path
    # several test sessions may start at once: one builds, the others wait for its lock
    with open(folder / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (path.is_file() and targets.is_file()):
            command = "build-sd15-slim" if name == SLIM_NAME else "build-sd15"
            result = subprocess.run([sys.executable, str(Path(__file__).resolve()), command, str(path)],
                                    capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
            if result.returncode != 0:
                raise RuntimeError(f"building the random SD1.5 checkpoint failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return path


def sd15_slim_checkpoint() -> Path:
    """Path of the cached slim random SD1.5-architecture checkpoint (see the module docstring)."""
    return sd15_checkpoint(SLIM_NAME)


def lora_targets_path(checkpoint: Path) -> Path:
    return checkpoint.with_suffix(".lora_targets.json")


def sd15_lora_targets() -> dict[str, list[int]]:
    """kohya LoRA key prefix -> ``[out_features, in_features]`` of the weight it modifies."""
    return json.loads(lora_targets_path(sd15_checkpoint()).read_text())


def write_kohya_lora(path: Path, rank: int = 4, seed: int = 0, scale: float = 0.05,
                     tdm_info=None, targets: Optional[dict[str, list[int]]] = None) -> Path:
    """A random kohya-layout LoRA for the SD1.5 checkpoint with the ``tdm.*`` metadata of
    ``tdm_info`` (a ``tdm_core.metadata.TDMInfo``; a 4-step sd15 one by default)."""
    import torch
    from safetensors.torch import save_file

    from tdm_core.metadata import TDMInfo
    from tdm_core.grids import reference_grid

    targets = targets if targets is not None else sd15_lora_targets()
    if tdm_info is None:
        tdm_info = TDMInfo(num_steps=4, grid=reference_grid(4), base_family="sd15", lora_rank=rank,
                           lora_alpha=float(rank), recommended_strength=1.0, training_steps=1)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for prefix, (out_features, in_features) in sorted(targets.items()):
        # both factors non-zero (unlike a fresh LoRA) so applying it really changes the model
        tensors[f"{prefix}.lora_down.weight"] = (torch.randn(rank, in_features, generator=generator) * scale).half()
        tensors[f"{prefix}.lora_up.weight"] = (torch.randn(out_features, rank, generator=generator) * scale).half()
        tensors[f"{prefix}.alpha"] = torch.tensor(float(rank)).half()
    return atomic_save(tensors, Path(path), tdm_info.to_safetensors_metadata(), save_file)


def atomic_save(tensors: dict, path: Path, metadata: dict, save_file) -> Path:
    """Writes under a temporary name in the same folder, then renames: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# --- the builder (runs in its own process) ----------------------------------------------------
def _fill_random(module, seed: int) -> None:
    """ComfyUI's layers skip initialisation (weights come from files), so set every tensor by hand:
    norms at 1, biases at 0, other weights ~ N(0, 1/fan_in) so activations stay finite. Norms go by module
    type: the UNet's ResBlock and output GroupNorms are named ``in_layers.0`` / ``out.0``, and at scale 0
    they made the UNet output exactly 0 for every input (nothing could learn from it)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    norm_scales = {f"{name}.weight" for name, sub in module.named_modules()
                   if isinstance(sub, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and sub.weight is not None}
    with torch.no_grad():
        for name, tensor in module.state_dict(keep_vars=True).items():
            if not tensor.is_floating_point():
                continue
            if name.endswith("position_ids"):
                continue
            if tensor.ndim <= 1:
                tensor.fill_(1.0 if name in norm_scales or ("norm" in name and name.endswith("weight")) else 0.0)
            else:
                fan_in = math.prod(tensor.shape[1:])
                tensor.copy_(torch.randn(tensor.shape, generator=generator) / math.sqrt(fan_in))


def _build_sd15(out_path: Path, unet_config: dict = SD15_UNET_CONFIG) -> None:
    import torch

    sys.argv = [sys.argv[0], "--cpu"]
    sys.path.insert(0, str(comfyui_dir()))
    import comfy.options
    comfy.options.enable_args_parsing()
    import comfy.sd1_clip
    import comfy.supported_models
    import comfy.utils
    from comfy.ldm.models.autoencoder import AutoencoderKL

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    model_config = comfy.supported_models.SD15(dict(unet_config))
    model = model_config.get_model({})
    clip = comfy.sd1_clip.SD1ClipModel()
    vae = AutoencoderKL(ddconfig=SD15_VAE_CONFIG, embed_dim=4)
    for seed, module in enumerate((model.diffusion_model, clip, vae)):
        _fill_random(module, seed)
    with torch.no_grad():  # a UNet whose output is constant teaches nothing (it was 0 while its GroupNorm scales were 0)
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        out = model.diffusion_model(x, torch.tensor([500.0, 500.0]), context=torch.randn(2, 77, 768, generator=torch.Generator().manual_seed(1)))
        if not float(out.std()) > 1e-3:
            raise RuntimeError(f"the random UNet's output does not vary (std {float(out.std()):.2e}): a scale is 0 in _fill_random")

    state_dict = model.state_dict_for_saving(clip.state_dict(), vae.state_dict())
    state_dict = {k: v.half() if v.is_floating_point() else v for k, v in state_dict.items()}

    # kohya LoRA keys are diffusers paths; ComfyUI maps them to its ldm keys with this table
    diffusers_to_ldm = comfy.utils.unet_to_diffusers(model_config.unet_config)
    targets = {}
    for diffusers_key, ldm_key in sorted(diffusers_to_ldm.items()):
        if diffusers_key.endswith(LORA_TARGET_SUFFIXES):
            shape = list(state_dict[f"model.diffusion_model.{ldm_key}"].shape)
            targets["lora_unet_" + diffusers_key[: -len(".weight")].replace(".", "_")] = shape[:2]

    from safetensors.torch import save_file
    atomic_save(state_dict, out_path, {"tdm.test": "random-weight SD1.5 architecture"}, save_file)
    targets_path = lora_targets_path(out_path)
    tmp = targets_path.with_name(targets_path.name + ".tmp")
    tmp.write_text(json.dumps(targets, indent=0))
    os.replace(tmp, targets_path)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("build-sd15", "build-sd15-slim"):
        sys.exit("usage: checkpoints.py build-sd15|build-sd15-slim OUT.safetensors")
    _build_sd15(Path(sys.argv[2]), SD15_SLIM_UNET_CONFIG if sys.argv[1] == "build-sd15-slim" else SD15_UNET_CONFIG)
