"""The pack's icon for the Comfy Registry (pyproject.toml [tool.comfy] Icon): docs/icon.png, 400 x 400.

    .venv/bin/python scripts/make_icon.py [--output docs/icon.png]

What it shows is what TDM does: a many-step sampler's trajectory (the thin dotted curve, from noise at the top
left to an image at the bottom right) and the distilled student covering it in four steps (the bold arrows).
Drawn with Pillow at 4x and scaled down (anti-aliased); deterministic, written atomically.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

from PIL import Image, ImageDraw

from tdm_core.atomic import save_png_atomic

ICON = Path(__file__).resolve().parents[1] / "docs" / "icon.png"
SIZE, SCALE = 400, 4
BACKGROUND, CURVE, STUDENT, NOISE, IMAGE = (24, 26, 38), (120, 126, 150), (255, 176, 59), (90, 96, 120), (92, 200, 160)
STUDENT_STEPS = 4


BEND = ((0.2, 0.18), (0.14, 0.92), (0.82, 0.8))  # a quadratic Bezier: noise, the pull of the bend, image


def trajectory(t: float) -> tuple[float, float]:
    """A point of the teacher's curved path at t in [0, 1], in units of the icon's side."""
    (x0, y0), (x1, y1), (x2, y2) = BEND
    return ((1 - t) ** 2 * x0 + 2 * t * (1 - t) * x1 + t * t * x2, (1 - t) ** 2 * y0 + 2 * t * (1 - t) * y1 + t * t * y2)


def arrow(draw: ImageDraw.ImageDraw, start, end, width: int, colour) -> None:
    draw.line([start, end], fill=colour, width=width)
    angle = math.atan2(end[1] - start[1], end[0] - start[0])
    head = 3.2 * width
    left = (end[0] - head * math.cos(angle - 0.45), end[1] - head * math.sin(angle - 0.45))
    right = (end[0] - head * math.cos(angle + 0.45), end[1] - head * math.sin(angle + 0.45))
    draw.polygon([end, left, right], fill=colour)


def draw_icon() -> Image.Image:
    side = SIZE * SCALE
    image = Image.new("RGB", (side, side), BACKGROUND)
    draw = ImageDraw.Draw(image)
    px = lambda t: tuple(side * c for c in trajectory(t))  # noqa: E731 (one-line coordinate map)
    for i in range(61):  # the teacher: many small steps
        x, y = px(i / 60)
        r = side * 0.006
        draw.ellipse([x - r, y - r, x + r, y + r], fill=CURVE)
    start, end = px(0.0), px(1.0)
    for (x, y), radius, colour in ((start, 0.05, NOISE), (end, 0.055, IMAGE)):
        r = side * radius
        draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
    chords = [px(k / STUDENT_STEPS) for k in range(STUDENT_STEPS + 1)]
    for a, b in zip(chords[:-1], chords[1:]):  # the student: four steps along the same path
        shrink = 0.12
        tail = (a[0] + shrink * (b[0] - a[0]), a[1] + shrink * (b[1] - a[1]))
        tip = (b[0] - shrink * (b[0] - a[0]), b[1] - shrink * (b[1] - a[1]))
        arrow(draw, tail, tip, int(side * 0.022), STUDENT)
    return image.resize((SIZE, SIZE), Image.LANCZOS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=ICON, help="where to write the PNG (default: docs/icon.png)")
    args = parser.parse_args(argv)
    save_png_atomic(draw_icon(), args.output)
    print(f"wrote {args.output} ({SIZE} x {SIZE})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
