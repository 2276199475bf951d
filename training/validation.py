"""Validation grids: one row per prompt, columns = teacher (DPM-Solver++, CFG) then the student at
1, 2 and 4 steps, all from the same noise; written as PNG (atomic) with tdm_core samplers."""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from tdm_core import reference_grid, sample_dpmpp_2m, sample_tdm
from tdm_core.grids import diffusers_grid
from tdm_core.training import teacher_cfg_x0

from tdm_core.atomic import save_png_atomic
from .models import STUDENT, use_adapter
from .steps_aware import num_steps

STUDENT_STEPS = (1, 2, 4)
VALIDATION_SEED = 1234  # its own generator: validating never changes the training draws


def _denoiser(family, cond, null_cond=None, cfg_scale: float = 1.0):
    def denoise(x, t):
        out = family.denoise(x, t, cond).float()
        if null_cond is None or cfg_scale == 1.0:
            return out
        # guidance is linear in the model output, so the x0-space CFG kernel applies as is
        return teacher_cfg_x0(out, family.denoise(x, t, null_cond).float(), cfg_scale)

    return denoise


def frames_as_image(decoded: torch.Tensor) -> torch.Tensor:
    """One image per sample: a decoded video (B, 3, F, H, W) becomes its first, middle and last frames side by
    side (B, 3, H, 3W), so a video family's grid stays one PNG; images (B, 3, H, W) pass through."""
    if decoded.ndim == 4:
        return decoded
    frames = decoded.shape[2]
    return torch.cat([decoded[:, :, i] for i in sorted({0, frames // 2, frames - 1})], dim=3)


def student_grids(trained_grid: list[int], total_steps: int) -> list[list[int]]:
    # the trained grid for its own K (it may be a custom one), the reference rule for the others
    return [list(trained_grid) if k == len(trained_grid) else reference_grid(k, total_steps) for k in STUDENT_STEPS]


@torch.no_grad()
def validation_columns(family, cond: dict, null_cond: dict, batch_size: int, resolution: int, device,
                       trained_grid: list[int], total_steps: int, cfg_scale: float, teacher_steps: int) -> list[torch.Tensor]:
    """Decoded images ``[teacher, student@1, student@2, student@4]``, each ``(B, 3, H, W)`` in [0, 1] (videos: three
    frames side by side, :func:`frames_as_image`)."""
    gen = torch.Generator().manual_seed(VALIDATION_SEED)
    noise = torch.randn(family.latent_shape(batch_size, resolution), generator=gen).to(device)
    schedule, prediction = family.schedule, family.prediction_type
    teacher_grid = diffusers_grid(teacher_steps, "trailing", family.num_timesteps, solver="dpmsolver")
    with use_adapter(family.network, None):  # adapters off: the teacher
        columns = [sample_dpmpp_2m(_denoiser(family, cond, null_cond, cfg_scale), noise, teacher_grid, schedule, prediction)]
    with use_adapter(family.network, STUDENT):
        for grid in student_grids(trained_grid, total_steps):
            with num_steps(family.network, len(grid)):  # a steps-aware student runs as a len(grid)-step model
                columns.append(sample_tdm(_denoiser(family, cond), noise, grid, schedule, prediction))
    return [frames_as_image(family.decode(latents)).float().clamp(0, 1).cpu() for latents in columns]


def grid_image(columns: list[torch.Tensor]) -> Image.Image:
    """Rows = samples, columns = samplers, as one RGB image."""
    tiles = [torch.cat([column[b] for column in columns], dim=2) for b in range(columns[0].shape[0])]  # (3, H, C*W)
    image = torch.cat(tiles, dim=1)
    array = (image.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    return Image.fromarray(array)


def write_validation_grid(path: Path, family, cond: dict, null_cond: dict, batch_size: int, resolution: int, device,
                          trained_grid: list[int], total_steps: int, cfg_scale: float, teacher_steps: int) -> Path:
    columns = validation_columns(family, cond, null_cond, batch_size, resolution, device, trained_grid, total_steps,
                                 cfg_scale, teacher_steps)
    return save_png_atomic(grid_image(columns), path)
