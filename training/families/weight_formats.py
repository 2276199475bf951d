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

import contextlib
import json
from pathlib import Path
from typing import Iterator

import torch

SCALED_FP8_MARKER = "scaled_fp8"
SCALE_SUFFIXES = (".scale_weight", ".weight_scale")  # scaled fp8's, the mixed-precision layout's
DROPPED_SUFFIXES = (".scale_input", ".input_scale")  # activation scales: only for fp8 matrix products at run time
QUANT_METADATA = "_quantization_metadata"
MIXED_PRECISION_FORMATS = ("float8_e4m3fn",)  # comfy/quant_ops.py QUANT_ALGOS in ComfyUI 0.3.75
BITSANDBYTES_MARKERS = (".absmax", ".quant_map", ".quant_state.", ".SCB", ".nested_absmax")
USE_INSTEAD = "use the fp16 / bf16 / fp8_e4m3fn / fp8_scaled file of the same model (the ones ComfyUI's templates name)"


def _input_error(message: str):
    from training.models import TrainingInputError

    return TrainingInputError(message)


def _refuse_unreadable_layouts(keys: list[str], metadata: dict, name: str) -> None:
    """A clear error for each layout this loader cannot dequantise exactly."""
    if any(k.endswith(".comfy_quant") for k in keys):
        raise _input_error(f"{name} is quantised per layer with `comfy_quant` entries (ComfyUI releases after 0.3.75), "
                           f"which this trainer does not dequantise: {USE_INSTEAD}")
    bnb = next((k for k in keys if any(m in k for m in BITSANDBYTES_MARKERS)), None)
    if bnb is not None:
        raise _input_error(f"{name} holds bitsandbytes-quantised weights ({bnb}), which ComfyUI's loaders do not read: {USE_INSTEAD}")
    if QUANT_METADATA in metadata:
        try:
            layers = json.loads(metadata[QUANT_METADATA])["layers"]
            formats = {layer: spec.get("format") for layer, spec in layers.items()}
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise _input_error(f"{name} has an unreadable {QUANT_METADATA} entry ({err}): {USE_INSTEAD}") from err
        other = sorted({str(f) for f in formats.values()} - set(MIXED_PRECISION_FORMATS))
        if other:
            raise _input_error(f"{name} quantises layers as {', '.join(other)}, a mixed-precision format ComfyUI 0.3.75 and this "
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
            raise _input_error(f"{name} has a scale {key} without its weight {weight}: the file is damaged or not a ComfyUI model; {USE_INSTEAD}")
        if weight in scales:
            raise _input_error(f"{name} scales {weight} twice ({scales[weight]}, {key}): {USE_INSTEAD}")
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
            raise _input_error(f"{name} stores {key} as {str(tensor.dtype).replace('torch.', '')}, a packed / integer quantisation "
                               f"ComfyUI 0.3.75 does not read as a plain weight: {USE_INSTEAD}")
        return tensor  # position ids, the tokenizer ComfyUI keeps in UMT5 files (spiece_model)
    if scale is None:
        return tensor.to(dtype)
    if not _broadcasts(scale.shape, tensor.shape):
        raise _input_error(f"{name} scales {key} {tuple(tensor.shape)} by a {tuple(scale.shape)} tensor (block-wise scales), "
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
        raise _input_error(f"cannot read {path} as safetensors ({err}): pass an intact .safetensors file") from err


@contextlib.contextmanager
def _diffusers_reads(state: dict[str, torch.Tensor]) -> Iterator[None]:
    """diffusers' pipeline ``from_single_file`` given ``state`` (already dequantised) for the file it would read: it
    takes no state dict itself (its models' ``from_single_file`` do), and it reads the file with one module-level
    function, ``load_single_file_checkpoint``, which is swapped for the duration."""
    import diffusers.loaders.single_file as single_file

    original = single_file.load_single_file_checkpoint
    single_file.load_single_file_checkpoint = lambda *args, **kwargs: state
    try:
        yield
    finally:
        single_file.load_single_file_checkpoint = original


def pipeline_from_state(pipeline_class, path: Path, state: dict[str, torch.Tensor], **kwargs):
    """``pipeline_class.from_single_file(path, **kwargs)`` on the dequantised ``state`` of ``path``."""
    with _diffusers_reads(state):
        return pipeline_class.from_single_file(str(path), **kwargs)
