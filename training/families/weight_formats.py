"""The weight formats of the files ComfyUI 0.3.75 reads, turned into floating weights of the run's dtype: the one
dequantisation path of every loader (``training/families/*_files.py`` and the all-in-one checkpoints of
``training/models.py``).

Accepted (what ComfyUI 0.3.75's ``comfy/ops.py``, ``comfy/quant_ops.py`` and ``comfy/model_detection.py`` read):

    fp32, fp16, bf16                  cast to the run's dtype
    float8_e4m3fn, float8_e5m2        plain fp8 (``*_fp8_e4m3fn.safetensors``): cast, as ComfyUI's manual_cast does
    scaled fp8                        ``*_fp8_scaled`` / ``*_fp8_e4m3fn_scaled``: ``<layer>.weight`` in fp8 with a
                                      ``<layer>.scale_weight`` beside it, a ``scaled_fp8`` marker, optional
                                      ``<layer>.scale_input``; weight = fp8 * scale_weight, in fp32 (ComfyUI's
                                      ``scaled_fp8_ops.convert_weight``). ``scale_input`` only quantises activations
                                      at run time: dropped.
    mixed precision                   the safetensors metadata ``_quantization_metadata`` ({"layers": {name:
                                      {"format": "float8_e4m3fn"}}}), ``<layer>.weight_scale`` and ``<layer>.input_scale``;
                                      weight = fp8 * weight_scale (``TensorCoreFP8Layout.dequantize``); input_scale dropped.

Refused by name, with what to use instead (never loaded wrong):

    a mixed-precision layer of another format than float8_e4m3fn (the only one ComfyUI 0.3.75 knows)
    ``<layer>.comfy_quant`` entries (the per-layer quantisation of ComfyUI releases after 0.3.75)
    integer weights: bitsandbytes nf4 / fp4 / int8 (``.absmax``, ``.quant_map``, ``.quant_state.*``, ``.SCB``) or any
    other packed format
    a scale that does not broadcast to its weight (block-wise scales) or a scale without its weight
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from training.errors import TrainingInputError

SCALED_FP8_MARKER = "scaled_fp8"
SCALE_SUFFIXES = (".scale_weight", ".weight_scale")  # scaled fp8's, the mixed-precision layout's
DROPPED_SUFFIXES = (".scale_input", ".input_scale")  # activation scales: only for fp8 matrix products at run time
QUANT_METADATA = "_quantization_metadata"
MIXED_PRECISION_FORMATS = ("float8_e4m3fn",)  # comfy/quant_ops.py QUANT_ALGOS in ComfyUI 0.3.75
BITSANDBYTES_MARKERS = (".absmax", ".quant_map", ".quant_state.", ".SCB", ".nested_absmax")
USE_INSTEAD = "use the fp16 / bf16 / fp8_e4m3fn / fp8_scaled file of the same model (the ones ComfyUI's templates name)"


def _refuse_unreadable_layouts(keys: list[str], metadata: dict, name: str) -> None:
    """A clear error for each layout this loader cannot dequantise exactly."""
    if any(k.endswith(".comfy_quant") for k in keys):
        raise TrainingInputError(f"{name} is quantised per layer with `comfy_quant` entries (ComfyUI releases after 0.3.75), "
                           f"which this trainer does not dequantise: {USE_INSTEAD}")
    bnb = next((k for k in keys if any(m in k for m in BITSANDBYTES_MARKERS)), None)
    if bnb is not None:
        raise TrainingInputError(f"{name} holds bitsandbytes-quantised weights ({bnb}), which ComfyUI's loaders do not read: {USE_INSTEAD}")
    if QUANT_METADATA in metadata:
        try:
            layers = json.loads(metadata[QUANT_METADATA])["layers"]
            formats = {layer: spec.get("format") for layer, spec in layers.items()}
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise TrainingInputError(f"{name} has an unreadable {QUANT_METADATA} entry ({err}): {USE_INSTEAD}") from err
        other = sorted({str(f) for f in formats.values()} - set(MIXED_PRECISION_FORMATS))
        if other:
            raise TrainingInputError(f"{name} quantises layers as {', '.join(other)}, a mixed-precision format ComfyUI 0.3.75 and this "
                               f"trainer do not read (only {', '.join(MIXED_PRECISION_FORMATS)}): {USE_INSTEAD}")


def _is_dropped(key: str) -> bool:
    return key.rsplit(".", 1)[-1] == SCALED_FP8_MARKER or key.endswith(DROPPED_SUFFIXES)


def _scale_keys(keys: list[str], name: str) -> dict[str, str]:
    """weight key -> the key of its dequantisation scale."""
    present = set(keys)
    scales = {}
    for key in keys:
        suffix = next((s for s in SCALE_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            continue
        weight = key[: -len(suffix)] + ".weight"
        if weight not in present:
            raise TrainingInputError(f"{name} has a scale {key} without its weight {weight}: the file is damaged or not a ComfyUI model; {USE_INSTEAD}")
        if weight in scales:
            raise TrainingInputError(f"{name} scales {weight} twice ({scales[weight]}, {key}): {USE_INSTEAD}")
        scales[weight] = key
    return scales


def _broadcasts(scale: torch.Size, weight: torch.Size) -> bool:
    try:
        return torch.broadcast_shapes(weight, scale) == weight
    except RuntimeError:
        return False


def _floating(key: str, tensor: torch.Tensor, scale: torch.Tensor | None, dtype, name: str) -> torch.Tensor:
    """One tensor as the run's dtype: scaled fp8 multiplied out in fp32; integer weights refused."""
    if not tensor.is_floating_point():
        if key.endswith(".weight"):
            raise TrainingInputError(f"{name} stores {key} as {str(tensor.dtype).replace('torch.', '')}, a packed / integer quantisation "
                               f"ComfyUI 0.3.75 does not read as a plain weight: {USE_INSTEAD}")
        return tensor  # position ids, the tokenizer ComfyUI keeps in UMT5 files (spiece_model)
    if scale is None:
        return tensor.to(dtype)
    if not _broadcasts(scale.shape, tensor.shape):
        raise TrainingInputError(f"{name} scales {key} {tuple(tensor.shape)} by a {tuple(scale.shape)} tensor (block-wise scales), "
                           f"which this trainer does not dequantise: {USE_INSTEAD}")
    return (tensor.to(torch.float32) * scale.to(torch.float32)).to(dtype)


def read_weights(path: Path, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Every tensor of a ``.safetensors`` file as floating weights of ``dtype`` (see the module docstring);
    quantisation scales and markers are consumed, integer buffers kept. Tensors are read and converted one at a
    time, so a file in fp8 never exists twice in memory at full width."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys, metadata = list(handle.keys()), handle.metadata() or {}
            _refuse_unreadable_layouts(keys, metadata, path.name)
            scale_of = _scale_keys(keys, path.name)
            consumed = set(scale_of.values())
            return {key: _floating(key, handle.get_tensor(key), handle.get_tensor(scale_of[key]) if key in scale_of else None, dtype, path.name)
                    for key in keys if key not in consumed and not _is_dropped(key)}
    except (OSError, SafetensorError) as err:
        raise TrainingInputError(f"cannot read {path} as safetensors ({err}): pass an intact .safetensors file") from err


def _component_from_state(name: str, library: str, class_name: str, state: dict[str, torch.Tensor], config: str, dtype):
    """One pipeline component as diffusers' single-file loading makes it, from the dict ``state``: models through
    their own converters (diffusers models' ``from_single_file``, which takes a state dict; diffusers' CLIP and T5
    single-file builders for transformers' text encoders), everything without weights (scheduler, tokenizers) from
    the config folder."""
    import importlib

    import diffusers
    from diffusers.loaders.single_file_utils import (create_diffusers_clip_model_from_ldm, create_diffusers_t5_model_from_checkpoint,
                                                     is_clip_model_in_single_file, is_t5_in_single_file)

    module = getattr(diffusers.pipelines, library) if hasattr(diffusers.pipelines, library) else importlib.import_module(library)
    cls = getattr(module, class_name)
    common = {"config": config, "subfolder": name, "local_files_only": True}
    if issubclass(cls, diffusers.FromOriginalModelMixin):
        return cls.from_single_file(state, dtype=dtype, **common)
    common["torch_dtype"] = dtype  # the name diffusers' text-encoder builders take
    if library == "transformers" and issubclass(cls, torch.nn.Module):
        if is_clip_model_in_single_file(cls, state):
            return create_diffusers_clip_model_from_ldm(cls, checkpoint=state, **common)
        if is_t5_in_single_file(state):
            return create_diffusers_t5_model_from_checkpoint(cls, checkpoint=state, **common)
    if issubclass(cls, torch.nn.Module):
        raise ValueError(f"the checkpoint holds no {name} ({class_name}) diffusers can convert")
    return cls.from_pretrained(config, subfolder=name, local_files_only=True)


def pipeline_from_state(pipeline_class, state: dict[str, torch.Tensor], config: Path, dtype, **components):
    """``pipeline_class`` from the dequantised ``state`` of an all-in-one checkpoint (``read_weights``) and the
    diffusers config folder ``config`` (its ``model_index.json`` names the components), as diffusers' pipeline
    ``from_single_file`` builds it from a file, without reading any file's weights: each component not given in
    ``components`` comes from ``_component_from_state``; the safety checker is never loaded (as in
    ``from_single_file``), components the config marks null are None."""
    import inspect

    config = str(config)
    index = pipeline_class.load_config(config)
    accepted = inspect.signature(pipeline_class.__init__).parameters
    arguments = {}
    for name, value in index.items():
        if name.startswith("_") or name not in accepted:
            continue
        if not (isinstance(value, (list, tuple)) and len(value) == 2):
            arguments[name] = value  # requires_safety_checker, force_zeros_for_empty_prompt, ...
        elif name in components:
            arguments[name] = components[name]
        elif value[0] is None or name == "safety_checker":
            arguments[name] = None
        else:
            arguments[name] = _component_from_state(name, value[0], value[1], state, config, dtype)
    return pipeline_class(**{**arguments, **{k: v for k, v in components.items() if k in accepted}})
