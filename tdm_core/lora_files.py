"""Reading and writing LoRA files, host-free: safetensors (tensors and header) or pickles through a weights-only
load; written atomically.

Both hosts read the same files (the ComfyUI TDM LoRA Loader and ``training.convert``) and write them the same way
(``training.lora_io``, the TDM Distill node)."""
from __future__ import annotations

import os
import pickle

import torch
from safetensors import safe_open

from .atomic import atomic_write

SAFETENSORS_EXTENSIONS = (".safetensors", ".sft")
POSITIONAL_KEY = "ema_parameters"  # the TDM-R1 release: {"ema_parameters": [tensor, ...]} in PEFT's parameter order
PICKLE_EXTENSIONS = (".pt", ".pth", ".ckpt", ".bin")


def read_lora_file(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(state_dict, safetensors metadata)``; pickles only through a weights-only load."""
    name = os.path.basename(path)
    ext = os.path.splitext(path)[1].lower()
    if ext in SAFETENSORS_EXTENSIONS:
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except Exception as err:  # safetensors raises its own error types for truncated headers/buffers
            raise ValueError(f"LoRA file '{name}' is not a readable .safetensors file ({err}); it is probably truncated or corrupt: copy or export it again") from err
    if ext in PICKLE_EXTENSIONS:
        return read_pickled_weights(path, name), {}
    raise ValueError(f"LoRA file '{name}' has an unsupported extension {ext!r}: use .safetensors (or a weights-only {'/'.join(PICKLE_EXTENSIONS)})")


def read_pickled_weights(path: str, name: str) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"LoRA file '{name}' holds Python objects or code besides tensors, so it was refused (only weights-only "
            f"loads are allowed): convert it to .safetensors in a trusted environment"
        ) from err
    except Exception as err:
        raise ValueError(f"LoRA file '{name}' could not be read as a torch weights file ({type(err).__name__}: {err}); it may be truncated or corrupt") from err
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if isinstance(obj, dict) and isinstance(obj.get(POSITIONAL_KEY), (list, tuple)):  # TDM-R1: tensors without names
        obj = positional_state(obj[POSITIONAL_KEY], name)
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise ValueError(f"LoRA file '{name}' does not contain a flat dictionary of named tensors: it is not a LoRA")
    return obj


def positional_state(tensors, name: str) -> dict[str, torch.Tensor]:
    """A positional parameter list as ``{"ema_parameters.<i>": tensor}`` (names come later: tdm_core.releases)."""
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        raise ValueError(f"LoRA file '{name}' has a '{POSITIONAL_KEY}' list with entries that are not tensors: it is not a TDM-R1 file")
    return {f"{POSITIONAL_KEY}.{i}": t for i, t in enumerate(tensors)}


def write_lora_file(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> str | os.PathLike:
    """``tensors`` and the header ``metadata`` as a safetensors file at ``path``, through a temporary file in the
    same folder renamed into place: a crash never leaves a half-written file."""
    from safetensors.torch import save_file

    with atomic_write(path) as temp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(temp), metadata=metadata)
    return path
