"""What a TDM Distill run was made from, as short hashes (one per part), so a checkpoint is resumed only by a
run of the same model, prompts and settings, and the report can say which part differs.

The model's part covers the architecture, the noise schedule as sampled (``model_sampling``: a
``ModelSampling*`` node's shift changes it), the unpatched base weights (64 evenly spaced values of every
tensor: a different finetune differs there; weights ComfyUI has patched in place are read from its backup)
the graph's weight patches (LoRAs: their keys, strengths and tensor samples) and its model patches (FreeU,
attention patches, wrappers, object patches: by function name, the plain values its closure holds, and
plain settings). ``iterations`` and
``gradient_checkpointing`` are left out on purpose: neither changes what an iteration computes (the warm-up
schedule does not depend on the run's length; checkpointing recomputes the same forward), so a cancelled run
can be resumed with more iterations, or with checkpointing switched on after running out of memory.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib

import torch

SAMPLES_PER_TENSOR = 64
UNTRACKED_OPTIONS = ("iterations", "gradient_checkpointing")


def _digest(parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else str(part).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def tensor_sample(tensor: torch.Tensor) -> bytes:
    """Shape, dtype and ``SAMPLES_PER_TENSOR`` evenly spaced values (float64 bytes) of ``tensor``."""
    head = f"{tuple(tensor.shape)}{tensor.dtype}".encode()
    try:
        flat = tensor.detach().reshape(-1)
        if flat.numel() == 0:
            return head
        index = torch.linspace(0, flat.numel() - 1, min(SAMPLES_PER_TENSOR, flat.numel()), dtype=torch.float64, device=flat.device).long()  # float32 rounds n - 1 up past 2**24
        return head + flat[index].to(device="cpu", dtype=torch.float64).numpy().tobytes()
    except (RuntimeError, TypeError, NotImplementedError):  # a quantised tensor type without indexing: its shape only
        return head


def tensors_in(value, depth: int = 0) -> list[torch.Tensor]:
    """The tensors inside a weight patch (tuples, lists, dicts, adapter objects' ``weights``)."""
    if depth > 4:
        return []
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in tensors_in(v, depth + 1)]
    if isinstance(value, dict):
        return [t for k in sorted(value, key=str) for t in tensors_in(value[k], depth + 1)]
    if hasattr(value, "weights"):  # comfy.weight_adapter adapters (LoRAAdapter, ...)
        return tensors_in(value.weights, depth + 1)
    return []


def plain_value(value, depth: int = 0) -> str:
    """A stable text of a conditioning extra or patch setting: tensors by content, plain values by repr, patch
    functions by name and the values they close over (FreeU's scales), other objects by type only (their repr may
    hold a memory address)."""
    if depth > 8:  # model_options nest patch functions five levels down; their closures go a few further
        return "..."
    if isinstance(value, torch.Tensor):
        return hashlib.sha256(tensor_sample(value)).hexdigest()[:16]
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(plain_value(v, depth + 1) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{plain_value(value[k], depth + 1)}" for k in sorted(value, key=str)) + "}"
    if value is None or isinstance(value, (bool, int, float, str)):
        return repr(value)
    if isinstance(value, functools.partial):
        return f"partial({plain_value(value.func, depth + 1)},{plain_value(value.args, depth + 1)},{plain_value(value.keywords, depth + 1)})"
    if callable(value) and hasattr(value, "__qualname__"):  # a patch function (FreeU's, a wrapper): name and closure
        closure = [cell.cell_contents for cell in getattr(value, "__closure__", None) or ()]
        return f"{getattr(value, '__module__', '')}.{value.__qualname__}{plain_value(closure, depth + 1)}"
    return type(value).__qualname__


def model_fingerprint(model) -> str:
    base = model.model
    parts = [type(base.model_config).__name__, plain_value(getattr(base.model_config, "unet_config", None)), str(base.model_type),
             str(model.model_dtype())]
    sampling = model.get_model_object("model_sampling")
    parts += [type(sampling).__qualname__, plain_value(getattr(sampling, "sigmas", None)), plain_value(getattr(sampling, "shift", None)),
              plain_value(getattr(sampling, "multiplier", None))]
    backup = getattr(model, "backup", {})
    for name, tensor in sorted(base.diffusion_model.state_dict(prefix="diffusion_model.", keep_vars=True).items()):
        saved = backup.get(name)
        parts += [name, tensor_sample(saved.weight if saved is not None else tensor)]
    for key in sorted(model.patches):
        for patch in model.patches[key]:
            parts += [key, plain_value(patch[0]), plain_value(patch[2:])]  # strength, then offset and function
            parts += [tensor_sample(t) for t in tensors_in(patch[1])]
    # the graph's model patches (FreeU, attention patches, wrappers: by name and settings) and object patches
    parts += ["model_options", plain_value(model.model_options)]
    parts += ["object_patches", plain_value({k: v for k, v in model.object_patches.items() if k != "model_sampling"})]
    return _digest(parts)


def conditioning_fingerprint(conditionings: list) -> str:
    parts = []
    for conditioning in conditionings:
        for tensor, extras in conditioning or []:
            parts += [hashlib.sha256(tensor.detach().to("cpu", torch.float64).numpy().tobytes()).hexdigest(), plain_value(extras)]
        parts.append("|")
    return _digest(parts)


def settings_fingerprint(options) -> str:
    fields = {k: v for k, v in dataclasses.asdict(options).items() if k not in UNTRACKED_OPTIONS}
    return _digest([plain_value(fields), plain_value(options.rates())])


def run_fingerprint(model, positives: list, negative, latent_shape, options, low_noise_model=None) -> dict[str, str]:
    """``{part: hash}`` of the run: model (and a low-noise expert), prompts, negative, settings, latent (shape
    with the batch)."""
    parts = {
        "model": model_fingerprint(model),
        "prompts": conditioning_fingerprint(list(positives)),
        "negative": conditioning_fingerprint([negative] if negative is not None else []),
        "settings": settings_fingerprint(options),
        "latent shape": _digest([tuple(latent_shape)]),
    }
    if low_noise_model is not None:
        parts["low-noise model"] = model_fingerprint(low_noise_model)
    return parts
