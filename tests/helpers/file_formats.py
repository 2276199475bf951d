"""State dicts and ``.safetensors`` files in each weight format ComfyUI ships, written as ComfyUI's files are
(fp16, bf16, plain fp8, scaled fp8 with ``scale_weight``, 0.3.75's mixed-precision layout)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max: ComfyUI's scale = amax / 448
PLAIN_FP8 = {"fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def _quantisable(key: str, tensor: torch.Tensor) -> bool:
    return key.endswith(".weight") and tensor.is_floating_point() and tensor.ndim >= 2


def _scaled(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight / scale, the fp32 scalar scale) with scale = amax / 448, as ComfyUI's fp8_scaled files store them."""
    scale = (tensor.abs().max().float() / E4M3_MAX).clamp(min=1e-12)
    return (tensor.float() / scale).to(torch.float8_e4m3fn), scale.reshape(())


def in_format(state: dict[str, torch.Tensor], fmt: str, quantise=lambda key: True) -> tuple[dict, dict]:
    """(tensors, safetensors metadata) of ``state`` in ``fmt``; in the fp8 sets only the weight matrices of keys
    ``quantise`` accepts become fp8, the rest bf16 (norms, biases, a VAE)."""
    if fmt in ("fp16", "bf16"):
        dtype = torch.float16 if fmt == "fp16" else torch.bfloat16
        return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}, {}
    out, layers = {}, {}
    for key, tensor in state.items():
        if not (_quantisable(key, tensor) and quantise(key)):
            out[key] = tensor.to(torch.bfloat16) if tensor.is_floating_point() else tensor
        elif fmt in PLAIN_FP8:
            out[key] = tensor.to(PLAIN_FP8[fmt])
        else:
            layer = key[: -len(".weight")]
            out[key], scale = _scaled(tensor)
            names = ("scale_weight", "scale_input") if fmt == "fp8_e4m3fn_scaled" else ("weight_scale", "input_scale")
            out[f"{layer}.{names[0]}"], out[f"{layer}.{names[1]}"] = scale, torch.ones(())
            layers[layer] = {"format": "float8_e4m3fn"}
    if fmt == "fp8_e4m3fn_scaled":
        out["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)  # ComfyUI's marker (its dtype: the fp8 kind)
    metadata = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})} if layers else {}
    return out, metadata


def convert_file(source: Path, destination: Path, fmt: str, quantise=lambda key: True) -> Path:
    """``source`` rewritten in ``fmt`` at ``destination``."""
    from safetensors.torch import load_file, save_file

    destination.parent.mkdir(parents=True, exist_ok=True)
    tensors, metadata = in_format(load_file(str(source)), fmt, quantise)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(destination), metadata=metadata or None)
    return destination
