"""Every weight format ComfyUI ships loads as the fp32 model within the format's precision, or is refused by name
(training/families/weight_formats.py: the one dequantisation path of the ComfyUI-file loaders and of the all-in-one
checkpoints).

For each family's ComfyUI file layout (the SD1.5, SDXL and SD3.5 all-in-one checkpoints; Flux, Z-Image, Qwen-Image and
Wan diffusion models with their text encoders and VAE beside them) the test writes a tiny model's
files in fp32 and again in fp16, bf16, fp8_e4m3fn, fp8_e5m2, ComfyUI's scaled fp8 (fp8 weight / scale with a per-tensor
``scale_weight`` and ``scale_input``, the ``scaled_fp8`` marker) and ComfyUI 0.3.75's mixed-precision layout
(``_quantization_metadata``, ``weight_scale``, ``input_scale``); VAEs stay bf16 in the fp8 sets (ComfyUI ships no fp8
VAE). Each set loads through ``load_family`` and every weight of every component must equal the fp32 load's within
the format's rounding (tolerances below). The defect of issue 20: a T5 in ``t5xxl_fp8_e4m3fn_scaled`` beside Flux and
inside ``sd3.5_medium_incl_clips_t5xxlfp8scaled`` encodes as the fp32 T5 does.

Tolerances, element-wise |loaded - fp32| <= rtol * |fp32| + atol, from round-to-nearest in each format:
    fp16   10 mantissa bits: rtol 2^-11 (half an ulp), atol 2^-25 (half fp16's smallest subnormal, 2^-24)
    bf16   7 mantissa bits: rtol 2^-8; fp32's exponent range, so no subnormal floor: atol 0
    fp8_e4m3fn   3 mantissa bits: rtol 2^-4; atol 2^-10, half the smallest e4m3 subnormal (2^-9)
    fp8_e5m2     2 mantissa bits: rtol 2^-3; atol 2^-17, half the smallest e5m2 subnormal (2^-16)
    scaled / mixed fp8   the same on weight / scale, scale = amax / 448: rtol 2^-4, atol 2^-10 * scale (the
                  largest scale of the component's tensors, amax(component) / 448)
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers import file_formats
from tests.helpers.file_formats import E4M3_MAX, in_format

torch.set_num_threads(1)

TOLERANCE = {"fp16": (2.0 ** -11, 2.0 ** -25), "bf16": (2.0 ** -8, 0.0), "fp8_e4m3fn": (2.0 ** -4, 2.0 ** -10),
             "fp8_e5m2": (2.0 ** -3, 2.0 ** -17),
             "fp8_e4m3fn_scaled": (2.0 ** -4, None), "fp8_mixed": (2.0 ** -4, None)}  # None: 2^-10 * the largest scale
FORMATS = tuple(TOLERANCE)
FP8_SETS = ("fp8_e4m3fn", "fp8_e5m2", "fp8_e4m3fn_scaled", "fp8_mixed")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def not_the_vae(key: str) -> bool:
    return not key.startswith("first_stage_model.")  # an all-in-one checkpoint's VAE: ComfyUI ships no fp8 VAE


def convert_file(source: Path, destination: Path, fmt: str, quantise=not_the_vae) -> Path:
    return file_formats.convert_file(source, destination, fmt, quantise)


def rewrite(models: Path, target: Path, fmt: str) -> Path:
    """A copy of the ComfyUI ``models`` folder with every .safetensors file in ``fmt`` (VAE files: bf16 in the fp8 sets)."""
    for source in models.rglob("*.safetensors"):
        vae = source.parent.name == "vae"
        convert_file(source, target / source.relative_to(models), "bf16" if vae and fmt in FP8_SETS else fmt)
    return target


# --- the five families in ComfyUI's file layouts, written in fp32 ------------------------------------------------
def _flux(root: Path) -> tuple[Path, Path]:
    from diffusers import FluxPipeline

    from tests.helpers.tiny_models import save_tiny_pipeline
    from tests.test_flux_family import write_comfy_flux_files

    folder = save_tiny_pipeline("flux", root / "flux")
    return folder, write_comfy_flux_files(FluxPipeline.from_pretrained(str(folder)), root / "ComfyUI" / "models")


def _sd3(root: Path) -> tuple[Path, Path]:
    from diffusers import StableDiffusion3Pipeline
    from safetensors.torch import save_file

    from tests.helpers.tiny_models import save_tiny_pipeline, single_file_state_dict

    folder = save_tiny_pipeline("sd3", root / "sd3", seed=2, sd35=True)
    path = root / "ComfyUI" / "models" / "checkpoints" / "sd3.5_medium_incl_clips_t5xxlfp16.safetensors"
    path.parent.mkdir(parents=True)
    save_file(single_file_state_dict(StableDiffusion3Pipeline.from_pretrained(str(folder)), "sd3"), str(path))
    return folder, path


def _checkpoint(family: str, name: str):
    def build(root: Path) -> tuple[Path, Path]:
        """An all-in-one checkpoint in models/checkpoints (models.py's from_single_file path)."""
        from tests.helpers.tiny_models import save_tiny_single_file

        checkpoint, folder = save_tiny_single_file(family, root)
        path = root / "ComfyUI" / "models" / "checkpoints" / name
        path.parent.mkdir(parents=True)
        checkpoint.rename(path)
        return folder, path
    return build


def _z_image(root: Path) -> tuple[Path, Path]:
    from diffusers import ZImagePipeline

    from tests.helpers.tiny_zimage import save_tiny_zimage
    from tests.test_z_image_files import write_comfy_z_image_files

    folder = save_tiny_zimage(root / "z_image")
    return folder, write_comfy_z_image_files(ZImagePipeline.from_pretrained(str(folder)), root / "ComfyUI" / "models")


def _qwen_image(root: Path) -> tuple[Path, Path]:
    from diffusers import QwenImagePipeline

    from tests.helpers.tiny_qwen import save_tiny_qwen_pipeline, write_comfy_qwen_files

    folder = save_tiny_qwen_pipeline(root / "qwen_image")
    return folder, write_comfy_qwen_files(QwenImagePipeline.from_pretrained(str(folder)), root / "ComfyUI" / "models")


def _wan(root: Path) -> tuple[Path, Path]:
    from diffusers import WanPipeline

    from tests.helpers.tiny_wan import save_tiny_wan_pipeline, write_comfy_wan_files

    folder = save_tiny_wan_pipeline(root / "wan")
    return folder, write_comfy_wan_files(WanPipeline.from_pretrained(str(folder)), root / "ComfyUI" / "models")


BUILDERS = {"sd15": _checkpoint("sd15", "v1-5-pruned-emaonly-fp16.safetensors"), "sdxl": _checkpoint("sdxl", "sd_xl_base_1.0.safetensors"),
            "flux": _flux, "sd3": _sd3, "z_image": _z_image, "qwen_image": _qwen_image, "wan": _wan}


@pytest.fixture(scope="module", params=list(BUILDERS))
def fp32_files(request, tmp_path_factory):
    """(family, diffusers config folder, the fp32 ComfyUI file --model names, its fp32 load)."""
    from training.models import load_family

    root = tmp_path_factory.mktemp(request.param)
    folder, path = BUILDERS[request.param](root)
    return request.param, folder, path, load_family(str(path), config_path=str(folder))


def _modules(family) -> dict[str, torch.nn.Module]:
    return {name: part for name, part in family.pipeline.components.items() if isinstance(part, torch.nn.Module)}


def worst_error_ratio(loaded: torch.nn.Module, fp32: torch.nn.Module, rtol: float, atol: float | None) -> float:
    """max over the module's weights of |loaded - fp32| / (rtol |fp32| + atol); atol None: 2^-10 * amax / 448."""
    reference = fp32.state_dict()
    state = loaded.state_dict()
    assert state.keys() == reference.keys()
    if atol is None:
        atol = 2.0 ** -10 * max(v.abs().max().item() for v in reference.values() if v.is_floating_point() and v.numel()) / E4M3_MAX
    worst = 0.0
    for key, expected in reference.items():
        got = state[key]
        if not expected.is_floating_point():
            assert torch.equal(got, expected), key
            continue
        assert got.dtype == torch.float32, key
        bound = rtol * expected.abs() + atol
        worst = max(worst, ((got - expected).abs() / bound.clamp(min=1e-30)).max().item() if expected.numel() else 0.0)
    return worst


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_component_loads_within_the_formats_precision(fp32_files, fmt, tmp_path):
    from training.models import load_family

    name, folder, path, fp32 = fp32_files
    models = path.parent.parent
    target = rewrite(models, tmp_path / "ComfyUI" / "models", fmt)
    loaded = load_family(str(target / path.relative_to(models)), config_path=str(folder))
    rtol, atol = TOLERANCE[fmt]
    for component, module in _modules(fp32).items():
        vae = component == "vae" and fmt in FP8_SETS  # ComfyUI ships VAEs in fp16 / bf16 / fp32 only: bf16 here
        ratio = worst_error_ratio(getattr(loaded.pipeline, component), module, *(TOLERANCE["bf16"] if vae else (rtol, atol)))
        print(f"measured: {name} {fmt} {component}: worst error / bound {ratio:.3g}")
        assert ratio <= 1.0, f"{name} {component} in {fmt}: an error {ratio:.3g} times the format's rounding bound"


# --- issue 20, defect 2: ComfyUI's fp8-scaled T5 beside Flux and inside the SD3.5 all-in-one checkpoint --------
T5_OUTPUT_RTOL = 0.1  # see test_fp8_scaled_t5_encodes_as_the_fp32_one


def _t5_output(encoder) -> torch.Tensor:
    ids = torch.randint(0, encoder.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return encoder(input_ids=ids).last_hidden_state


@pytest.mark.parametrize("layout", ["flux", "sd3"])
def test_fp8_scaled_t5_encodes_as_the_fp32_one(layout, tmp_path):
    """The files ComfyUI's templates name: t5xxl_fp8_e4m3fn_scaled.safetensors beside an fp16 Flux, and
    sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors (its T5 in scaled fp8, the rest bf16). The T5's weights are each within
    the fp8 rounding of the fp32 ones (rtol 2^-4), its output within T5_OUTPUT_RTOL of the fp32 output in norm: each
    weight is rounded by at most 2^-4 relative, about 2^-4 / sqrt(3) = 0.036 rms, and the tiny T5's matrix products
    add such errors in quadrature; without the scale the weights are up to 448x off and the output off by O(1)."""
    from training.models import load_family

    folder, path = BUILDERS[layout](tmp_path / "fp32")
    fp32 = load_family(str(path), config_path=str(folder))
    models = path.parent.parent
    if layout == "flux":  # the T5 file scaled, everything else fp16 (ComfyUI's Flux template)
        target = rewrite(models, tmp_path / "ComfyUI" / "models", "fp16")
        (target / "text_encoders" / "t5xxl_fp16.safetensors").unlink()
        convert_file(models / "text_encoders" / "t5xxl_fp16.safetensors", target / "text_encoders" / "t5xxl_fp8_e4m3fn_scaled.safetensors",
                     "fp8_e4m3fn_scaled")
        given, encoder = target / path.relative_to(models), "text_encoder_2"
    else:  # one checkpoint, only text_encoders.t5xxl.* in scaled fp8
        given = convert_file(path, tmp_path / "ComfyUI" / "models" / "checkpoints" / "sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors",
                             "fp8_e4m3fn_scaled", quantise=lambda key: key.startswith("text_encoders.t5xxl."))
        encoder = "text_encoder_3"
    loaded = load_family(str(given), config_path=str(folder))
    ratio = worst_error_ratio(getattr(loaded.pipeline, encoder), getattr(fp32.pipeline, encoder), 2.0 ** -4, None)
    ours, reference = _t5_output(getattr(loaded.pipeline, encoder)), _t5_output(getattr(fp32.pipeline, encoder))
    relative = ((ours - reference).norm() / reference.norm()).item()
    print(f"measured: {layout} T5 fp8_scaled: weights' worst error / bound {ratio:.3g}, output relative error {relative:.3g}")
    assert ratio <= 1.0, f"the scaled-fp8 T5's weights are {ratio:.3g} times the fp8 rounding bound off the fp32 ones"
    assert relative <= T5_OUTPUT_RTOL, f"the scaled-fp8 T5 encodes {relative:.3g} off the fp32 one (output scale {reference.abs().max():.3g})"


# --- refused by name --------------------------------------------------------------------------------------------
def _write(path: Path, tensors: dict, metadata: dict | None = None) -> Path:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    return path


W = torch.randn(8, 4)
REFUSED = {  # what the file holds -> (tensors, metadata, what the error must say)
    "comfy_quant": ({"l.weight": W.to(torch.float8_e4m3fn), "l.weight_scale": torch.ones(()),
                     "l.comfy_quant": torch.tensor(list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8)},
                    None, r"`comfy_quant` entries \(ComfyUI releases after 0.3.75\)"),
    "mixed_nvfp4": ({"l.weight": torch.zeros(8, 2, dtype=torch.uint8), "l.weight_scale": torch.ones(())},
                    {"_quantization_metadata": json.dumps({"layers": {"l": {"format": "nvfp4"}}})},
                    r"quantises layers as nvfp4, a mixed-precision format ComfyUI 0.3.75"),
    "bitsandbytes_nf4": ({"l.weight": torch.zeros(16, 1, dtype=torch.uint8), "l.weight.absmax": torch.ones(1),
                          "l.weight.quant_state.bitsandbytes__nf4": torch.zeros(4, dtype=torch.uint8)},
                         None, r"bitsandbytes-quantised weights"),
    "int8_weight": ({"l.weight": torch.zeros(8, 4, dtype=torch.int8)}, None, r"stores l.weight as int8"),
    "block_scales": ({"l.weight": W.to(torch.float8_e4m3fn), "l.weight_scale": torch.ones(8, 2)}, None, r"block-wise scales"),
    "scale_without_weight": ({"l.bias": torch.ones(8), "l.scale_weight": torch.ones(())}, None, r"a scale l.scale_weight without its weight"),
}


@pytest.mark.parametrize("kind", REFUSED)
def test_unreadable_layouts_are_refused_by_name(kind, tmp_path):
    from training.families.weight_formats import USE_INSTEAD, read_weights
    from training.errors import TrainingInputError

    tensors, metadata, says = REFUSED[kind]
    path = _write(tmp_path / f"{kind}.safetensors", tensors, metadata)
    with pytest.raises(TrainingInputError, match=f"{kind}.safetensors .*{says}") as error:
        read_weights(path)
    assert USE_INSTEAD in str(error.value)


def test_a_refused_text_encoder_stops_load_family_naming_the_file(tmp_path):
    """Through the real loader: Flux's T5 in a layout it cannot dequantise is refused before anything runs."""
    from safetensors.torch import load_file

    from training.errors import TrainingInputError
    from training.models import load_family

    folder, path = _flux(tmp_path)
    t5 = path.parent.parent / "text_encoders" / "t5xxl_fp16.safetensors"
    tensors, _ = in_format(load_file(str(t5)), "fp8_mixed")
    _write(t5, tensors, {"_quantization_metadata": json.dumps({"layers": {"encoder.block.0.layer.0.SelfAttention.q": {"format": "nvfp4"}}})})
    with pytest.raises(TrainingInputError, match=r"t5xxl_fp16.safetensors quantises layers as nvfp4.*use the fp16 / bf16"):
        load_family(str(path), config_path=str(folder))


# --- no library is patched while loading -------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["sd15", "sd3"])
def test_the_all_in_one_loader_changes_nothing_in_diffusers(layout, tmp_path):
    """The pipelines of the all-in-one checkpoints are built from read_weights' dequantised dict through the model
    classes' own single-file converters: no diffusers attribute is replaced while they are (an earlier loader swapped
    diffusers.loaders.single_file.load_single_file_checkpoint for the duration of from_single_file). Checked while
    every module of the pipeline is constructed, through torch's global module-registration hook (nothing patched
    here either), on a scaled-fp8 checkpoint, the case that needs the dequantised dict."""
    import diffusers.loaders.single_file as single_file
    import diffusers.loaders.single_file_model as single_file_model
    import diffusers.loaders.single_file_utils as single_file_utils
    from torch.nn.modules.module import register_module_module_registration_hook

    from training.models import load_family

    builder = _checkpoint("sd15", "v1-5-pruned-emaonly-fp16.safetensors") if layout == "sd15" else _sd3
    folder, path = builder(tmp_path / "fp32")
    given = convert_file(path, tmp_path / "ComfyUI" / "models" / "checkpoints" / f"{layout}_fp8_scaled.safetensors", "fp8_e4m3fn_scaled")
    modules = (single_file, single_file_model, single_file_utils)
    before = [dict(vars(module)) for module in modules]
    checks, replaced = [], set()

    def same_attributes(*_):
        checks.append(1)
        for module, attributes in zip(modules, before):
            current = vars(module)
            replaced.update(f"{module.__name__}.{name}" for name, value in attributes.items() if current.get(name) is not value)

    handle = register_module_module_registration_hook(same_attributes)
    try:
        loaded = load_family(str(given), config_path=str(folder))
    finally:
        handle.remove()
    assert loaded.name == layout and checks, "no module was constructed under the hook"
    assert not replaced, f"diffusers attributes replaced while loading: {sorted(replaced)}"
