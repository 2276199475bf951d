"""An animated ``.webp`` of rows of clips (e.g. teacher 50 steps / teacher 4 steps / student 4 steps), for the README.

    python -m benchmarks.video_webp --teacher benchmarks/assets/video_teacher --output benchmarks/video_teacher.webp
        [--student FOLDER] [--columns 8] [--cfg 3]

Each animation frame is a grid: one row per sampler, one column per prompt, the same prompts and noise in every row.
``--student`` takes a ``WanPipeline`` folder (e.g. the teacher with a distilled student fused in), sampled in 4
Euler steps at CFG 1, as TDM students are. Lossless, looping; written under a temporary name, then renamed.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import Tensor

from tdm_core.atomic import atomic_write

PAD = 2  # pixels between clips
FRAME_MS = 125


def grid_frames(rows: list[Tensor], scale: int = 3) -> list:
    """One PIL image per video frame; ``rows``: clips (N, 3, T, H, W) in [-1, 1], every row the same shape."""
    from PIL import Image

    shapes = {tuple(r.shape) for r in rows}
    if len(shapes) != 1:
        raise ValueError(f"every row needs the same clip shape (N, 3, T, H, W), got {sorted(shapes)}")
    n, _, frames, h, w = rows[0].shape
    grid = torch.ones(frames, 3, len(rows) * (h + PAD) + PAD, n * (w + PAD) + PAD)
    for i, row in enumerate(rows):
        for j in range(n):
            top, left = PAD + i * (h + PAD), PAD + j * (w + PAD)
            grid[:, :, top : top + h, left : left + w] = (row[j].float().clamp(-1, 1) + 1).transpose(0, 1) / 2
    pixels = (grid * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(p).resize((p.shape[1] * scale, p.shape[0] * scale), Image.NEAREST) for p in pixels]


def save_webp(rows: list[Tensor], path: Path, scale: int = 3, frame_ms: int = FRAME_MS) -> Path:
    frames = grid_frames(rows, scale)
    with atomic_write(path) as temp:
        frames[0].save(temp, format="WEBP", save_all=True, append_images=frames[1:], duration=frame_ms, loop=0, lossless=True)
    return Path(path)


def comparison_rows(teacher: Path, student: Path | None, columns: int, cfg: float, seed: int = 7) -> list[Tensor]:
    """Teacher 50 and 4 Euler steps at ``cfg``, then the student at 4 steps CFG 1, on ``columns`` spread-out prompts."""
    from benchmarks.video_data import NUM_FRAMES, all_captions
    from benchmarks.video_sampling import latent_shape, load_teacher, sample_clips

    captions = all_captions()
    prompts = [captions[(i * 13) % len(captions)] for i in range(columns)]  # 13 is coprime to 60: varied attributes
    pipeline = load_teacher(teacher)
    noise = torch.randn(latent_shape(pipeline, columns, NUM_FRAMES, 32), generator=torch.Generator().manual_seed(seed))
    rows = [sample_clips(pipeline, prompts, noise, 50, cfg), sample_clips(pipeline, prompts, noise, 4, cfg)]
    if student is not None:
        rows.append(sample_clips(load_teacher(student), prompts, noise, 4, 1.0))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", type=Path, required=True)
    parser.add_argument("--student", type=Path)
    parser.add_argument("--output", type=Path, required=True, help="the .webp to write")
    parser.add_argument("--columns", type=int, default=8)
    parser.add_argument("--cfg", type=float, default=3.0)
    args = parser.parse_args(argv)
    for name, folder in (("--teacher", args.teacher), ("--student", args.student)):
        if folder is not None and not (folder / "model_index.json").is_file():
            parser.error(f"{name} {folder}: no model_index.json there; pass a WanPipeline folder")
    if args.columns < 1:
        parser.error("--columns must be at least 1")
    if not args.output.parent.is_dir():
        parser.error(f"the folder of --output {args.output} does not exist: create it first")
    torch.set_num_threads(1)
    save_webp(comparison_rows(args.teacher, args.student, args.columns, args.cfg), args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
