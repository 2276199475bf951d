"""``python -m training.sample``: render a TDM video LoRA headless, the teacher beside it, as an animated ``.webp``.

    python -m training.sample --model CogVideoX-2b --lora pytorch_lora_weights.safetensors \\
        --prompt "a panda playing guitar in a bamboo forest" --output panda.webp

CogVideoX has no native ComfyUI model, so this is the way to see a CogVideoX TDM student: the trainer's LoRA or
the released ``Luo-Yihong/TDM_CogVideoX-2B_LoRA`` (diffusers' ``pytorch_lora_weights.safetensors``). The LoRA is
loaded by diffusers' own ``load_lora_weights`` (every key must land on a layer: a file with keys this model lacks
is refused, nothing skipped). The student runs ``tdm_core.sample_tdm`` on the family (the trainer's own denoise)
at guidance 1, on the trained grid: the file's TDM metadata, else the release's (999, 856, 665, 399 for the
CogVideoX release, the grid it was trained on: the authors call the pipeline's default uniform scheduler
inferior), else ``--grid``. The teacher, left, is the pipeline itself with the LoRA off: its own scheduler,
``--teacher-steps`` at ``--teacher-cfg`` (CogVideoXPipeline's defaults, 50 steps at 6), from the same noise.
Written as a lossless animated WebP (PIL; no video encoder needed) to a temporary name, then renamed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from tdm_core import grids, releases, sample_tdm
from tdm_core.lora_files import read_lora_file
from tdm_core.metadata import TDMInfo
from tdm_core.atomic import atomic_write
from training.errors import EXIT_BAD_INPUT, TrainingInputError
from training.lora_io import LORA_A
from training.models import load_family
from training.precision import WEIGHT_DTYPES, Precision

ADAPTER = "tdm"
WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.sample", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the base model: a diffusers folder (e.g. THUDM/CogVideoX-2b downloaded)")
    parser.add_argument("--lora", required=True, help="the TDM LoRA: training.distill's output or the released pytorch_lora_weights.safetensors")
    parser.add_argument("--prompt", required=True, help="what to render")
    parser.add_argument("--output", required=True, help="the animated .webp to write (teacher left, student right)")
    parser.add_argument("--grid", default=None, help="the student's timesteps, e.g. 999,856,665,399 (default: the LoRA's own)")
    parser.add_argument("--num-frames", type=int, default=None, help="frames, 4k + 1 (default: the model's own, 49 for CogVideoX)")
    parser.add_argument("--resolution", type=int, default=None, help="square frame size in pixels (default: the model's native 480 x 720)")
    parser.add_argument("--teacher-steps", type=int, default=50, help="steps of the teacher's own sampler (0: no teacher column)")
    parser.add_argument("--teacher-cfg", type=float, default=6.0, help="the teacher's guidance (CogVideoXPipeline's default 6)")
    parser.add_argument("--strength", type=float, default=1.0, help="LoRA weight (1: as trained / as the authors load it)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shared starting noise")
    parser.add_argument("--fps", type=float, default=8.0, help="frames per second of the .webp (CogVideoX makes 8)")
    parser.add_argument("--mixed-precision", choices=list(WEIGHT_DTYPES), default="no",
                        help="the base's dtype, forwards under autocast as in training.distill (bf16 on a GPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where to run")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


# --- the LoRA ------------------------------------------------------------------------------------
def read_video_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], TDMInfo | None, releases.Release | None]:
    """Tensors, TDM metadata and the release the file is (None for the trainer's own files)."""
    path = Path(path)
    if not path.is_file():
        raise TrainingInputError(f"LoRA {path} does not exist: pass training.distill's output or the downloaded release file")
    try:
        lora, metadata = read_lora_file(str(path))
    except ValueError as err:
        raise TrainingInputError(str(err)) from err
    if releases.layout_of(lora) != "transformer":
        raise TrainingInputError(f"{path.name} is not a LoRA in diffusers' transformer layout (transformer.<layer>.lora_A/B.weight): "
                                 "pass a LoRA trained on this model (training.distill) or the released pytorch_lora_weights.safetensors")
    info = TDMInfo.from_safetensors_metadata(metadata) if releases.has_tdm_metadata(metadata) else None
    release = releases.RELEASES.get(info.release) if info is not None else releases.recognise_release(lora, metadata, path.name, None)
    return lora, info, release


def load_lora(family, lora: dict[str, torch.Tensor], strength: float, name: str) -> int:
    """Put ``lora`` on the family's network with diffusers' ``load_lora_weights``; every layer it names must take
    it (nothing skipped). Returns the number of layers adapted."""
    from peft.tuners.lora import LoraLayer

    modules = dict(family.network.named_modules())
    paths = sorted({k[len(releases.TRANSFORMER_PREFIX):-len(LORA_A)] for k in lora if k.endswith(LORA_A)})
    missing = [p for p in paths if not isinstance(modules.get(p), torch.nn.Linear)]
    if missing:
        raise TrainingInputError(f"{name} has LoRA keys for layers this {family.name} model lacks ({', '.join(missing[:3])}"
                                 f"{', ...' if len(missing) > 3 else ''}): it was made for another model; load it on its own base")
    try:
        family.pipeline.load_lora_weights(dict(lora), adapter_name=ADAPTER)
    except (ValueError, RuntimeError, KeyError) as err:  # shape mismatches: another width (e.g. a 2B LoRA on 5B)
        raise TrainingInputError(f"{name} does not fit this {family.name} model ({err}): load it on the base it was trained on") from err
    family.pipeline.set_adapters([ADAPTER], [strength])
    adapted = [n for n, m in family.network.named_modules() if isinstance(m, LoraLayer) and ADAPTER in m.lora_A]
    if sorted(adapted) != paths:
        skipped = sorted(set(paths) - set(adapted))
        raise TrainingInputError(f"{name}: diffusers left {len(skipped)} of its layers unloaded ({', '.join(skipped[:3])}): "
                                 "the file does not match this model")
    return len(adapted)


def student_grid(grid: str | None, info: TDMInfo | None, release: releases.Release | None, family) -> list[float]:
    if grid:
        return grids.parse_grid(grid)
    if info is not None and info.grid:
        return list(info.grid)
    if release is not None:
        return list(release.grid)
    if family.name == "cogvideox":
        return list(grids.RELEASED_GRIDS["cogvideox_2b"])
    raise TrainingInputError("the LoRA carries no grid: pass --grid, e.g. --grid 999,856,665,399")


# --- sampling ------------------------------------------------------------------------------------
def student_latents(family, cond: dict, noise: torch.Tensor, grid: list[float]) -> torch.Tensor:
    """The TDM student (the network as loaded, LoRA on) at guidance 1: ``tdm_core.sample_tdm`` on the family."""
    return sample_tdm(lambda x, t: family.denoise(x, t, cond).float(), noise, grid, family.schedule, family.prediction_type)


@torch.no_grad()
def teacher_latents(family, prompt: str, noise: torch.Tensor, steps: int, cfg: float) -> torch.Tensor:
    """The pipeline's own sampler with the LoRA off, from the same noise (trainer layout in and out)."""
    pipe = family.pipeline
    _, _, _, h, w = noise.shape
    pipe.disable_lora()
    try:
        out = pipe(prompt, num_frames=family.num_frames, height=h * family.vae_scale_factor, width=w * family.vae_scale_factor,
                   num_inference_steps=steps, guidance_scale=cfg, latents=noise.permute(0, 2, 1, 3, 4).to(family.dtype),
                   output_type="latent").frames
    finally:
        pipe.enable_lora()
    return out.permute(0, 2, 1, 3, 4).float()


def video_frames(videos: list[torch.Tensor]):
    """Decoded videos ``(1, 3, F, H, W)`` in [0, 1] side by side, as PIL frames."""
    from PIL import Image

    joined = torch.cat([v[0] for v in videos], dim=-1)  # (3, F, H, sum W)
    array = (joined.permute(1, 2, 3, 0).float().numpy() * 255).round().astype("uint8")
    return [Image.fromarray(frame) for frame in array]


def save_webp_atomic(frames, path: str | Path, fps: float) -> Path:
    with atomic_write(path) as temp:
        frames[0].save(temp, format="WEBP", save_all=True, append_images=frames[1:], duration=round(1000 / fps), loop=0, lossless=True)
    return Path(path)


def check_args(args: argparse.Namespace) -> None:
    if Path(args.output).suffix.lower() != ".webp":
        raise TrainingInputError(f"--output {args.output} must end in .webp (an animated WebP, PIL writes it)")
    if args.teacher_steps < 0 or args.fps <= 0 or args.teacher_cfg < 1:
        raise TrainingInputError("--teacher-steps must be 0 or more, --fps positive and --teacher-cfg at least 1")


def render(args: argparse.Namespace) -> Path:
    check_args(args)
    lora, info, release = read_video_lora(args.lora)
    precision = Precision(args.mixed_precision, torch.device(args.device).type)
    family = load_family(args.model, device=args.device, dtype=precision.weight_dtype)
    if not getattr(family, "is_video", False):
        if hasattr(family, "set_num_frames"):  # a video family ComfyUI has a model for (Wan)
            workflows = sorted(p.name for p in WORKFLOWS.glob(f"{family.name}_*.json"))
            raise TrainingInputError(f"{args.model} is a {family.name} video model, which ComfyUI samples itself: training.sample "
                                     "renders the video families ComfyUI has no model for (CogVideoX); load the LoRA with ComfyUI's "
                                     f"LoraLoader and the TDM nodes ({', '.join('workflows/' + w for w in workflows) or 'workflows/'})")
        raise TrainingInputError(f"{args.model} is a {family.name} model, which makes images: training.sample renders video "
                                 "families (CogVideoX); see the images with the ComfyUI TDM nodes")
    try:
        family.set_num_frames(args.num_frames)
        shape = family.latent_shape(1, args.resolution)
        grid = student_grid(args.grid, info, release, family)
    except ValueError as err:
        raise TrainingInputError(str(err)) from err
    layers = load_lora(family, lora, args.strength, Path(args.lora).name)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed)).to(args.device)
    with torch.no_grad(), precision.autocast():
        latents = [student_latents(family, family.encode_prompts([args.prompt]), noise, grid)]
        if args.teacher_steps:
            latents.insert(0, teacher_latents(family, args.prompt, noise, args.teacher_steps, args.teacher_cfg))
        frames = video_frames([family.decode(x.to(family.dtype)).float().cpu() for x in latents])
    path = save_webp_atomic(frames, args.output, args.fps)
    what = release.title if release is not None else "TDM LoRA"
    print(f"{Path(args.lora).name} ({what}, {layers} layers): student at {grid}, guidance 1"
          + (f"; teacher {args.teacher_steps} steps at cfg {args.teacher_cfg:g} (left)" if args.teacher_steps else "")
          + f" -> {path} ({len(frames)} frames)")
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        render(args)
    except TrainingInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
