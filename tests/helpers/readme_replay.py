"""Replays a documented trainer command (``tests/helpers/readme_commands.py``) as written, on tiny models.

The command runs in a fresh process of the project's own Python (the ``.venv`` the tests run in), with no
``PYTHONPATH`` and with the working folder a ComfyUI-like tree where the command's relative paths point: every model,
prompt and config file it names is built there, tiny, in the same ComfyUI or diffusers layout and under the same name
(:data:`INPUTS`). What the replay changes, and nothing else:

- the program: ``python`` / ``.venv/bin/python`` is this venv's Python, ``accelerate`` this venv's accelerate, with
  2 processes (gloo on CPU) on a free port instead of 8 GPUs;
- ``--model-config`` the tiny model's own diffusers folder, added where the command has none (the shipped configs
  are the real sizes), ``FILE``-style placeholders a file of the release the command names;
- appended cost limits (the last of a repeated flag wins): ``--max-train-steps 2 --batch-size 1``, no validation
  grid, intermediate checkpoint or probe but the final one, the tiny model's ``--resolution`` (and ``--num-frames``
  for video); ``training.sample`` 2 teacher steps. Every other flag stays as written (``--mixed-precision bf16``,
  ``--gradient-checkpointing``, ``--precompute-embeddings``, ``--gradient-accumulation-steps`` ...).

A path the documentation names that no entry of :data:`INPUTS` builds stops the replay with :class:`Unmapped`,
which says how to add one.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from tests.helpers.readme_commands import ROOT, Command

VENV_BIN = Path(sys.executable).parent  # the tests run in the project's .venv
PYTHONS = {"python", "python3", ".venv/bin/python", ".venv/bin/python3"}
INPUT_FLAGS = ("--model", "--model-config", "--prompts", "--config", "--lora")
REPLAY_TIMEOUT_S = 600
HOW_TO_ADD = ("add an entry for it to INPUTS in tests/helpers/readme_replay.py that builds a tiny file of the same "
              "layout under that name (reuse tests/helpers/tiny_*.py and the tests' ComfyUI-layout writers)")


class Unmapped(AssertionError):
    """A documented command the replay cannot run as written; the message names the fix."""


@dataclass
class Model:
    """The tiny stand-in of a model the documentation names."""
    family: str  # the trainer's family name, as the LoRA's metadata records it
    build: Callable[["Workspace", str], Path]  # writes the files under the documented name; returns its diffusers folder
    resolution: int
    num_frames: Optional[int] = None  # video models
    comfy_twin: Optional[Callable[[Path], object]] = None  # diffusers folder -> ComfyUI model of the same weights


@dataclass
class Workspace:
    """The replay's working folder, laid out like a ComfyUI install; each input is built once, when first named."""
    root: Path
    built: dict[str, Path] = field(default_factory=dict)
    outputs: set[str] = field(default_factory=set)  # what the documented commands write (a LoRA a later one samples)

    def tiny(self, name: str) -> Path:
        return self.root / ".tiny" / name.replace("/", "_")

    def input(self, name: str, command: Command) -> Path:
        if name not in self.built:
            entry = INPUTS.get(name)
            if entry is None:
                raise Unmapped(f"{command.source} names {name!r}, which no replay builds: {HOW_TO_ADD}")
            self.built[name] = entry.build(self, name) if isinstance(entry, Model) else entry(self, name)
        return self.built[name]


# --- the tiny models, under the names the documentation uses ---------------------------------------
def _single_file(family: str):
    def build(ws: Workspace, name: str) -> Path:
        from tests.helpers.tiny_models import save_tiny_single_file

        checkpoint, config = save_tiny_single_file(family, ws.tiny(name))
        (ws.root / name).parent.mkdir(parents=True, exist_ok=True)
        checkpoint.rename(ws.root / name)
        return config
    return build


def _comfy_files(save_folder: Callable[[Path], Path], write_files: Callable, **options):
    """A tiny diffusers folder and its weights as ComfyUI's split files (the writer names them as ComfyUI's
    templates do; the diffusion model is renamed to the documented name when they differ)."""
    def build(ws: Workspace, name: str) -> Path:
        from diffusers import DiffusionPipeline

        folder = save_folder(ws.tiny(name))
        path = write_files(DiffusionPipeline.from_pretrained(str(folder)), ws.root / "ComfyUI" / "models", **options)
        if path != ws.root / name:
            path.rename(ws.root / name)
        return folder
    return build


def _flux_files(ws: Workspace, name: str) -> Path:
    from tests.helpers.file_formats import convert_file
    from tests.helpers.tiny_models import save_tiny_pipeline
    from tests.test_flux_family import write_comfy_flux_files

    folder = _comfy_files(lambda f: save_tiny_pipeline("flux", f), write_comfy_flux_files)(ws, name)
    # the T5 as ComfyUI's Flux template names it: t5xxl_fp8_e4m3fn_scaled.safetensors (scale_weight per weight)
    encoders = ws.root / "ComfyUI" / "models" / "text_encoders"
    convert_file(encoders / "t5xxl_fp16.safetensors", encoders / "t5xxl_fp8_e4m3fn_scaled.safetensors", "fp8_e4m3fn_scaled")
    (encoders / "t5xxl_fp16.safetensors").unlink()
    return folder


def _z_image_files(ws: Workspace, name: str) -> Path:
    from tests.helpers.tiny_zimage import save_tiny_zimage
    from tests.test_z_image_files import write_comfy_z_image_files

    # comfy_twin: wide enough for ComfyUI's Lumina2 to hold the weights (the LoRA check below needs it)
    return _comfy_files(lambda f: save_tiny_zimage(f, comfy_twin=True), write_comfy_z_image_files)(ws, name)


def _qwen_files(ws: Workspace, name: str) -> Path:
    from tests.helpers.tiny_qwen import save_tiny_qwen_pipeline, write_comfy_qwen_files

    # the text encoder as ComfyUI's Qwen-Image template has it: qwen_2.5_vl_7b_fp8_scaled.safetensors
    return _comfy_files(save_tiny_qwen_pipeline, write_comfy_qwen_files, text_encoder_fp8=True)(ws, name)


def _wan_files(ws: Workspace, name: str) -> Path:
    from tests.helpers.tiny_wan import write_comfy_wan_files

    # the text encoder as ComfyUI's Wan 2.1 template has it: umt5_xxl_fp8_e4m3fn_scaled.safetensors; the model is
    # the tiny Wan2.1-T2V-1.3B-Diffusers folder the command passes as --model-config
    folder = ws.input("Wan2.1-T2V-1.3B-Diffusers", NESTED)
    return _comfy_files(lambda _: folder, write_comfy_wan_files, fp8=True)(ws, name)


def _wan_folder(ws: Workspace, name: str) -> Path:
    from tests.helpers.tiny_wan import save_tiny_wan_pipeline

    return save_tiny_wan_pipeline(ws.root / name)


def _pixart_folder(ws: Workspace, name: str) -> Path:
    from tests.helpers.tiny_models import save_tiny_pipeline

    return save_tiny_pipeline("pixart", ws.root / name)


def _cogvideox_folder(ws: Workspace, name: str) -> Path:
    from tests.helpers.tiny_cogvideox import save_tiny_cogvideox

    return save_tiny_cogvideox(ws.root / name)


# --- their ComfyUI twins, for the "stock ComfyUI loads the LoRA with no key skipped" check ------------
def _twin_unet(family: str):
    def twin(folder: Path):
        from diffusers import UNet2DConditionModel

        from tests.helpers.tiny_models import comfy_model_from_diffusers_unet

        return comfy_model_from_diffusers_unet(UNet2DConditionModel.from_pretrained(str(folder / "unet")), family)
    return twin


def _twin_flux(folder: Path):
    from diffusers import FluxTransformer2DModel

    from tests.helpers.tiny_models import comfy_model_from_diffusers_transformer

    return comfy_model_from_diffusers_transformer(FluxTransformer2DModel.from_pretrained(str(folder / "transformer")), "flux")[0]


def _twin_z_image(folder: Path):
    from diffusers import ZImageTransformer2DModel

    from tests.helpers.tiny_zimage import comfy_zimage_model

    return comfy_zimage_model(ZImageTransformer2DModel.from_pretrained(str(folder / "transformer")))


def _twin_qwen(folder: Path):
    from diffusers import QwenImageTransformer2DModel

    from tests.helpers.tiny_qwen import comfy_qwen_from_diffusers_transformer

    return comfy_qwen_from_diffusers_transformer(QwenImageTransformer2DModel.from_pretrained(str(folder / "transformer")))


def _twin_wan(folder: Path):
    from diffusers import WanTransformer3DModel

    from tests.helpers.tiny_wan import comfy_wan_from_diffusers_transformer

    return comfy_wan_from_diffusers_transformer(WanTransformer3DModel.from_pretrained(str(folder / "transformer")))


def _twin_pixart(folder: Path):
    from diffusers import PixArtTransformer2DModel

    from tests.helpers.tiny_models import comfy_model_from_diffusers_transformer

    return comfy_model_from_diffusers_transformer(PixArtTransformer2DModel.from_pretrained(str(folder / "transformer")), "pixart")[0]


def _twin_sd15_release(_folder: Path):
    from tests.helpers import comfy_inprocess

    return comfy_inprocess.build_model("sd15_eps").model  # the architecture of comfy_inprocess.tiny_diffusers_unet


def _twin_sd3(folder: Path):
    from diffusers import SD3Transformer2DModel

    from tests.helpers.tiny_models import comfy_model_from_diffusers_transformer

    return comfy_model_from_diffusers_transformer(SD3Transformer2DModel.from_pretrained(str(folder / "transformer")), "sd3")[0]


# --- other inputs ------------------------------------------------------------------------------------
PROMPTS = "a red cat\na blue dog\n"
RUN_CONFIG_MODEL = "ComfyUI/models/checkpoints/dreamshaper_8.safetensors"


def _prompts(ws: Workspace, name: str) -> Path:
    (ws.root / name).write_text(PROMPTS)
    return ws.root / name


def _run_config(ws: Workspace, name: str) -> Path:
    """``--config my_run.yaml``: docs/multi_gpu.md's "same flags" as YAML, on the SD1.5 checkpoint of the first command."""
    import yaml

    ws.input(RUN_CONFIG_MODEL, NESTED)
    ws.input("prompts.txt", NESTED)
    (ws.root / name).write_text(yaml.safe_dump({"model": RUN_CONFIG_MODEL, "prompts": "prompts.txt",
                                                "output": "ComfyUI/models/loras/my_run_tdm.safetensors", "cfg": 2.0}))
    return ws.root / name


@dataclass
class Release:
    """A released LoRA for ``training.convert``, picked by the command's ``--release`` (auto: one its keys tell)."""
    file: str
    write: Callable[[Path], Path]  # the workspace's .tiny folder -> the written file
    comfy_twin: Callable[[Path], object]  # the folder it was written in -> a ComfyUI model of its base


def _dreamshaper(folder: Path) -> Path:
    from tests.helpers import comfy_inprocess
    from tests.helpers.release_files import write_dreamshaper_release

    folder.mkdir(parents=True, exist_ok=True)
    return write_dreamshaper_release(folder / "tdm_dreamshaper.pt", comfy_inprocess.tiny_diffusers_unet(seed=3))


def _sd3_release(folder: Path) -> Path:
    from tests.helpers.release_files import write_sd3_release
    from tests.helpers.tiny_models import build_tiny_pipeline

    pipe = build_tiny_pipeline("sd3", folder / "tokenizer", seed=1)
    pipe.transformer.save_pretrained(str(folder / "transformer"))
    return write_sd3_release(pipe.transformer, folder, "pytorch_lora_weights.safetensors")


RELEASES = {
    "auto": Release("tdm_dreamshaper.pt", _dreamshaper, _twin_sd15_release),
    "tdm_sd3_medium": Release("pytorch_lora_weights.safetensors", _sd3_release, _twin_sd3),
}
PLACEHOLDERS = {"FILE"}  # a released file the command leaves to the reader


INPUTS: dict[str, Model | Callable[[Workspace, str], Path]] = {
    "ComfyUI/models/checkpoints/dreamshaper_8.safetensors": Model("sd15", _single_file("sd15"), 16, comfy_twin=_twin_unet("sd15")),
    "ComfyUI/models/checkpoints/sd_xl_base_1.0.safetensors": Model("sdxl", _single_file("sdxl"), 16, comfy_twin=_twin_unet("sdxl")),
    "ComfyUI/models/checkpoints/sd3_medium_incl_clips_t5xxlfp16.safetensors": Model("sd3", _single_file("sd3"), 16, comfy_twin=_twin_sd3),
    "ComfyUI/models/diffusion_models/flux1-dev.safetensors": Model("flux", _flux_files, 32, comfy_twin=_twin_flux),
    "ComfyUI/models/diffusion_models/z_image_turbo_bf16.safetensors": Model("z_image", _z_image_files, 16, comfy_twin=_twin_z_image),
    "ComfyUI/models/diffusion_models/qwen_image_bf16.safetensors": Model("qwen_image", _qwen_files, 128, comfy_twin=_twin_qwen),
    "ComfyUI/models/diffusion_models/wan2.1_t2v_1.3B_fp16.safetensors": Model("wan", _wan_files, 64, 5, comfy_twin=_twin_wan),
    "Wan2.1-T2V-1.3B-Diffusers": _wan_folder,
    "PixArt-XL-2-512x512": Model("pixart", _pixart_folder, 16, comfy_twin=_twin_pixart),  # a diffusers folder
    "CogVideoX-2b": Model("cogvideox", _cogvideox_folder, 32, 5),  # no ComfyUI model: diffusers' loader checks its LoRA
    "prompts.txt": _prompts,
    "my_run.yaml": _run_config,
}
NESTED = Command("tests/helpers/readme_replay.py", "(an input another input is built with)", "distill", ())


# --- turning a documented command into the replay's argv ----------------------------------------------
@dataclass
class Plan:
    command: Command
    argv: list[str]
    model: Optional[Model] = None  # the teacher of a distill / sample command
    model_folder: Optional[Path] = None  # its tiny diffusers folder
    output: Optional[str] = None  # what the command writes (relative to the workspace)
    release: Optional[Release] = None  # training.convert's input
    release_folder: Optional[Path] = None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _actions(program: str) -> dict:
    """The option strings of the program's own argparse parser -> their actions."""
    import importlib

    from training.config import build_parser

    parser = build_parser() if program == "distill" else importlib.import_module(f"training.{program}").build_parser()
    return parser._option_string_actions


def _launcher(command: Command, words: list[str]) -> tuple[list[str], list[str]]:
    """(the replay's program words up to and including ``-m training.X``, the program's own arguments)."""
    module = f"training.{command.program}"
    if module in words and words.index(module) > 0 and words[words.index(module) - 1] == "-m":
        split = words.index(module) + 1
    else:
        raise Unmapped(f"{command.source}: `{command.text}` does not run the trainer as `-m {module}`; extend "
                       "tests/helpers/readme_replay.py::_launcher for this form")
    head, args = words[:split], words[split:]
    if head[0] in PYTHONS:
        return [str(VENV_BIN / "python"), *head[1:]], args
    if head[:2] == ["accelerate", "launch"]:
        launch = [str(VENV_BIN / "accelerate"), "launch"]
        options = head[2:-2]
        i = 0
        while i < len(options):
            option = options[i]
            if option == "--num_processes":  # 2 CPU processes over gloo stand in for the GPUs
                launch += [option, "2"]
                i += 2
            elif option == "--config_file":  # a file of the project (the command runs from the project's root)
                if not (ROOT / options[i + 1]).is_file():
                    raise Unmapped(f"{command.source}: --config_file {options[i + 1]} is not a file of the project")
                launch += [option, str(ROOT / options[i + 1])]
                i += 2
            else:
                launch.append(option)
                i += 1
        return [*launch, "--main_process_port", str(free_port()), *head[-2:]], args
    raise Unmapped(f"{command.source}: `{head[0]}` launches the trainer in a way the replay does not know: "
                   "extend tests/helpers/readme_replay.py::_launcher")


def outputs_of(command: Command) -> list[str]:
    words = list(command.argv)
    return [words[i + 1] for i, w in enumerate(words[:-1]) if w == "--output"]


def plan(command: Command, ws: Workspace) -> Plan:
    """The replay of ``command`` in ``ws``, building the inputs it names; :class:`Unmapped` if one is unknown."""
    head, args = _launcher(command, list(command.argv))
    actions = _actions(command.program)
    result = Plan(command, [])
    given: dict[str, str] = {}
    out: list[str] = []
    i = 0
    while i < len(args):
        word = args[i]
        if word.startswith("--"):
            action = actions.get(word)
            if action is None:
                raise Unmapped(f"{command.source}: {word} is not an option of training.{command.program}")
            value = args[i + 1] if action.nargs != 0 and i + 1 < len(args) else None
            out += [word] + ([value] if value is not None else [])
            if value is not None:
                given[word] = value
            i += 2 if value is not None else 1
        else:  # a positional: training.convert's released file
            given["input"] = word
            out.append(word)
            i += 1
    if {"--help", "-h"} & set(out):
        result.argv = [*head, *out]
        return result

    for flag in INPUT_FLAGS:
        if flag in given and not (flag == "--lora" and given[flag] in ws.outputs):
            ws.input(given[flag], command)
    result.output = given.get("--output")
    if command.program == "convert":
        release = RELEASES.get(given.get("--release", "auto"))
        if release is None or given.get("input") not in PLACEHOLDERS | {release.file}:
            raise Unmapped(f"{command.source}: no released file stands in for {given.get('input')!r} with --release "
                           f"{given.get('--release', 'auto')}: add it to RELEASES in tests/helpers/readme_replay.py")
        folder = ws.tiny("release_" + given.get("--release", "auto"))
        if "release_" + release.file not in ws.built:
            ws.built["release_" + release.file] = release.write(folder)
        source = ws.built["release_" + release.file]
        out[out.index(given["input"])] = str(source)
        result.release, result.release_folder = release, folder
        result.argv = [*head, *out]
        return result

    model_name = given.get("--model")
    if model_name is None and "--config" in given:  # the model the config file names
        import yaml

        config = yaml.safe_load((ws.root / given["--config"]).read_text())
        model_name, result.output = config.get("model"), result.output or config.get("output")
        given.setdefault("--model-config", config.get("model_config"))
    model = INPUTS.get(model_name)
    if not isinstance(model, Model):
        raise Unmapped(f"{command.source}: the model {model_name!r} is not a tiny model the replay builds: {HOW_TO_ADD}")
    result.model, result.model_folder = model, ws.input(model_name, command)
    if given.get("--model-config") is None and not (ws.root / model_name).is_dir():
        out += ["--model-config", str(result.model_folder)]  # the shipped configs are the real sizes
    if command.program == "distill":
        out += ["--max-train-steps", "2", "--batch-size", "1", "--validate-every", "0", "--probe-every", "0",
                "--checkpoint-every", "0", "--resolution", str(model.resolution)]
    else:  # training.sample
        out += ["--teacher-steps", "2", "--resolution", str(model.resolution)]
    if model.num_frames is not None:
        out += ["--num-frames", str(model.num_frames)]
    result.argv = [*head, *out]
    return result


def run(p: Plan, ws: Workspace) -> tuple[subprocess.CompletedProcess, float]:
    """The replay in a fresh process: cwd the workspace, nothing added to sys.path; its output removed first."""
    if p.output:
        target = ws.root / p.output
        target.unlink(missing_ok=True)
        run_dir = target.with_name(target.stem + "_run")
        if run_dir.exists():
            import shutil

            shutil.rmtree(run_dir)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TDM_COMFYUI", "TDM_CLIP_TOKENIZER")}
    env["OMP_NUM_THREADS"] = "1"  # 2 shared cores; the tiny models gain nothing from threads
    start = time.monotonic()
    process = subprocess.run(p.argv, cwd=ws.root, env=env, capture_output=True, text=True, timeout=REPLAY_TIMEOUT_S)
    return process, time.monotonic() - start


def lora_modules(tensors: dict) -> int:
    return sum(k.endswith((".lora_A.weight", ".lora_down.weight")) for k in tensors)


def comfy_load(comfy_model, lora_path: Path) -> tuple[list, int, int]:
    """Stock ComfyUI's LoraLoader path on ``comfy_model``: (skipped-key warnings, patches made, LoRA modules)."""
    from tests.test_lora_export import comfy_apply_lora

    _, skipped, consumed, lora = comfy_apply_lora(comfy_model, lora_path)
    return skipped, len(consumed), lora_modules(lora)


def diffusers_load(folder: Path, lora_path: Path) -> int:
    """A LoRA of a model ComfyUI has no model for (CogVideoX), put on by training.sample's loader (diffusers'
    ``load_lora_weights``; every layer it names must take it): the number of layers adapted."""
    from tdm_core.lora_files import read_lora_file
    from training.models import load_family
    from training.sample import load_lora

    lora, _ = read_lora_file(str(lora_path))
    return load_lora(load_family(str(folder)), lora, 1.0, lora_path.name)


def option_table_flags(files: Optional[list[Path]] = None) -> list[str]:
    """The options of the documentation's table of ``training.distill`` options (rows starting ``| `--``; the table
    is in ``docs/training.md``, wherever it is the documentation files are read)."""
    import re

    from tests.helpers.readme_commands import documentation_files

    flags = []
    for path in files if files is not None else documentation_files():
        for line in path.read_text().splitlines():
            if line.startswith("| `--"):
                flags += re.findall(r"`(--[a-z0-9-]+)", line.split("|")[1])
    return flags

