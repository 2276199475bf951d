"""``python -m training.convert``: a released TDM LoRA (as the authors publish it, for diffusers) -> a ComfyUI
LoRA ``.safetensors`` that carries its documented settings.

    python -m training.convert tdm_dreamshaper.pt --output ComfyUI/models/loras/tdm_dreamshaper.safetensors
    python -m training.convert pytorch_lora_weights.safetensors --release tdm_sd3_medium \\
        --output ComfyUI/models/loras/tdm_sd3_medium.safetensors
    python -m training.convert tdmr1_zimage_ema.ckpt --output ComfyUI/models/loras/tdmr1_z_image_turbo.safetensors

The release is recognised from the file's keys and container (tdm_core.releases) or named with ``--release``.
TDM-R1's positional parameter list gets its names by building Z-Image-Turbo's transformer on the meta device,
wrapping it with the release's peft LoraConfig and enumerating its trainable parameters, as the authors' loader does.
The written file has the release's adapter weight baked in (0.125 for SD3: folded into ``lora_B`` as the
trainer's own SD3 export does, or into the kohya ``alpha``), so stock ComfyUI and diffusers load it right at
strength 1, and TDM metadata (solver, grid, flow shift, steps) so the TDM KSampler / Scheduler ``auto`` sample
it as documented. Written to a temporary name, then renamed: a failed run leaves nothing behind.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from tdm_core import lora_files, releases
from tdm_core.atomic import atomic_write
from training.errors import EXIT_BAD_INPUT, TrainingInputError
from training.lora_io import LORA_A, LORA_B, adapter_to_kohya

UNET_PEFT_PREFIX = "unet."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="the released file: .safetensors, or a weights-only .pt/.pth/.ckpt/.bin")
    parser.add_argument("--output", required=True, help="the ComfyUI LoRA to write (e.g. ComfyUI/models/loras/<name>.safetensors)")
    parser.add_argument("--release", choices=["auto", *releases.RELEASES], default="auto",
                        help="which release the file is (auto: from its keys; SD3 and SD3.5 files may need naming)")
    parser.add_argument("--model-config", default=None,
                        help="positional releases (TDM-R1): a diffusers folder of the base whose transformer config names "
                             f"the parameters (default: the shipped {POSITIONAL_CONFIGS['z_image'].name} config)")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


POSITIONAL_CONFIGS = {"z_image": Path(__file__).resolve().parent / "configs" / "z_image"}  # base -> shipped diffusers config
POSITIONAL_PREFIX = {"z_image": "diffusion_model."}  # ComfyUI's LoRA namespace of the base (comfy.lora, Lumina2 map)


def peft_parameter_names(release: releases.Release, config_dir: Path) -> tuple[list[str], int]:
    """The names of the trainable parameters of the release's base transformer wrapped by peft with the release's
    LoraConfig, in peft's order (built on the meta device: no weights), and the transformer's width."""
    import json

    from diffusers import ZImageTransformer2DModel
    from peft import LoraConfig, get_peft_model

    config_file = config_dir / "transformer" / "config.json"
    if not config_file.is_file():
        raise TrainingInputError(f"--model-config {config_dir} has no transformer/config.json: pass a diffusers Z-Image-Turbo folder")
    config = {k: v for k, v in json.loads(config_file.read_text()).items() if not k.startswith("_")}
    with torch.device("meta"):
        network = get_peft_model(ZImageTransformer2DModel.from_config(config), LoraConfig(**release.lora_config), adapter_name="release")
    names = [n.removeprefix("base_model.model.").replace(".release.", ".") for n, p in network.named_parameters()
             if ".release." in n and p.requires_grad]
    return names, int(config["dim"])


def pick_release(lora: dict, metadata: dict, name: str, choice: str) -> releases.Release:
    if releases.has_tdm_metadata(metadata):
        raise TrainingInputError(f"{name} already carries TDM metadata: load it with the TDM LoRA Loader as it is, no conversion needed")
    layout = releases.layout_of(lora)
    if choice != "auto":
        release = releases.RELEASES[choice]
        if release.layout != layout:
            raise TrainingInputError(f"{name} is not shaped like the {release.title} ({release.file}): its keys are "
                                     f"{'of no release' if layout is None else layout + ' keys'}, the release has {release.layout} keys. "
                                     "Pick the matching --release or check the file")
        return release
    named = releases.lora_base_model(lora)
    candidates = [r for r in releases.RELEASES.values()
                  if r.layout == layout and releases.container_of(name) in r.containers and (named is None or r.base_model == named)]
    if len(candidates) == 1:
        return candidates[0]
    known = ", ".join(f"{r.name} ({r.file})" for r in releases.RELEASES.values())
    if not candidates:
        raise TrainingInputError(f"{name} is shaped like none of the released TDM weights ({known}): a LoRA from training.distill "
                                 "needs no conversion; for a release, pass --release")
    raise TrainingInputError(f"{name} could be {' or '.join(r.title for r in candidates)}: their files look alike, "
                             f"so name it with --release {' or --release '.join(r.name for r in candidates)}")


def check_pairs(lora: dict, name: str) -> None:
    """Every lora_A has its lora_B of a matching rank (a truncated or edited file fails here, not in ComfyUI)."""
    for key, down in lora.items():
        if key.endswith(LORA_A):
            up = lora.get(key[: -len(LORA_A)] + LORA_B)
            if up is None or up.shape[-1] != down.shape[0]:
                raise TrainingInputError(f"{name}: {key} has no matching lora_B of rank {down.shape[0]}; the file is damaged: download it again")


def baked_tensors(lora: dict, release: releases.Release, name: str, model_config: str | None = None) -> dict[str, torch.Tensor]:
    """The release's tensors in a layout stock ComfyUI maps, with its adapter weight baked in."""
    if release.layout == "positional":  # TDM-R1: names from peft's enumeration of the base with the release's LoraConfig
        names, width = peft_parameter_names(release, Path(model_config) if model_config else POSITIONAL_CONFIGS[release.base_model])
        try:
            named = releases.name_positional(lora, names, release, POSITIONAL_PREFIX[release.base_model], width)
        except ValueError as err:
            raise TrainingInputError(f"{name}: {err}") from err
        return {k: (v * release.strength if k.endswith(LORA_B) else v).contiguous() for k, v in named.items()}
    if release.layout == "transformer":  # diffusers' SD3 keys stay; weight folded into lora_B (no alpha key)
        check_pairs(lora, name)
        return {k: (v * release.strength if k.endswith(LORA_B) else v).contiguous() for k, v in lora.items()}
    if all(k.startswith(UNET_PEFT_PREFIX) for k in lora):  # diffusers/PEFT UNet keys: to kohya, which ComfyUI maps fully
        adapter = {k[len(UNET_PEFT_PREFIX):]: v for k, v in lora.items()}
        check_pairs(adapter, name)
        rank = next(v.shape[0] for k, v in adapter.items() if k.endswith(LORA_A))
        return adapter_to_kohya(adapter, "lora_unet", rank * release.strength)
    out = {}
    for key, tensor in lora.items():  # kohya: lora_down/lora_up/alpha as published; the weight goes into alpha
        if key.endswith(".alpha"):
            tensor = tensor * release.strength
        out[key] = tensor.contiguous()
    return out


def convert(input_path: str, output: str, choice: str = "auto", model_config: str | None = None) -> Path:
    path = Path(input_path)
    if not path.is_file():
        raise TrainingInputError(f"{input_path} does not exist: pass the downloaded release file")
    try:
        lora, metadata = lora_files.read_lora_file(str(path))
    except ValueError as err:
        raise TrainingInputError(str(err)) from err
    release = pick_release(lora, metadata, path.name, choice)
    tensors = baked_tensors(lora, release, path.name, model_config)
    info = release.info()
    info.recommended_strength = 1.0  # baked in above
    info.lora_rank = int(next(v.shape[0] for k, v in tensors.items() if k.endswith((LORA_A, ".lora_down.weight"))))
    output_path = Path(output)
    if output_path.suffix != ".safetensors":
        raise TrainingInputError(f"--output {output} must end in .safetensors (ComfyUI's models/loras reads it)")
    with atomic_write(output_path) as temp:
        save_file(tensors, str(temp), metadata={"format": "pt", **info.to_safetensors_metadata()})
    print(f"{path.name}: {release.title} -> {output_path} ({len(tensors)} tensors; {release.summary(1.0)})")
    return output_path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        convert(args.input, args.output, args.release, args.model_config)
    except TrainingInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
