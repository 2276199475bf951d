"""A labelled PNG grid: one row per sampler, one column per sample (same seeds and classes)."""
from __future__ import annotations


import torch
from PIL import Image, ImageDraw


def to_pil(image: torch.Tensor, scale: int) -> Image.Image:
    # (3, H, W) in [0, 1] -> nearest-neighbour upscaled RGB, so pixels stay visible
    array = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    pil = Image.fromarray(array, "RGB")
    return pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)


def labelled_grid(rows: list[tuple[str, torch.Tensor]], column_labels: list[str], scale: int = 4, label_width: int = 230) -> Image.Image:
    """``rows`` = [(label, images (N, 3, H, W) in [0, 1])], every row with the same N."""
    n = rows[0][1].shape[0]
    h, w = rows[0][1].shape[2] * scale, rows[0][1].shape[3] * scale
    pad, header = 4, 18
    canvas = Image.new("RGB", (label_width + n * (w + pad) + pad, header + len(rows) * (h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for j, text in enumerate(column_labels):
        draw.text((label_width + pad + j * (w + pad) + w // 2 - 3, 3), text, fill="black")
    for i, (label, images) in enumerate(rows):
        if images.shape[0] != n:
            raise ValueError(f"row {label!r} has {images.shape[0]} images, expected {n}")
        top = header + pad + i * (h + pad)
        draw.text((6, top + h // 2 - 6), label, fill="black")
        for j in range(n):
            canvas.paste(to_pil(images[j], scale), (label_width + pad + j * (w + pad), top))
    return canvas
