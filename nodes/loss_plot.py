"""The TDM Distill node's plot (an IMAGE): the fake-score and student losses per iteration, and the probe's
"how far the student moved" (% change of its K-step samples from the teacher's) at its points. Drawn with PIL;
ComfyUI's own ``comfy_extras.nodes_train.draw_loss_graph`` draws a single unlabelled curve, so it is not reused."""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw

WIDTH, HEIGHT = 640, 420
MARGIN = 48
COLOURS = {"fake-score loss": (31, 119, 180), "student loss": (255, 127, 14), "student moved (%)": (44, 160, 44)}
LOG_FLOOR = 1e-12  # a loss of 0 on the log axis
AXIS, TEXT, GRID = (90, 90, 90), (20, 20, 20), (225, 225, 225)


def _scale(values: list[float], low: float, high: float, top: int, bottom: int) -> list[float]:
    span = (high - low) or 1.0
    return [bottom - (v - low) / span * (bottom - top) for v in values]


def _panel(draw: ImageDraw.ImageDraw, box: tuple, curves: dict, last_iteration: int, title: str, log: bool = False) -> None:
    """Curves ``{name: [(iteration, value), ...]}`` in ``box`` (left, top, right, bottom), sharing one y range
    (``log``: a log10 axis, so a loss ten times smaller than the other still shows its trend)."""
    left, top, right, bottom = box
    draw.rectangle(box, outline=AXIS)
    if log:
        curves = {name: [(it, math.log10(max(v, LOG_FLOOR))) for it, v in points] for name, points in curves.items()}
    values = [v for points in curves.values() for _, v in points]
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    for fraction in (0.25, 0.5, 0.75):
        y = bottom - fraction * (bottom - top)
        draw.line([(left + 1, y), (right - 1, y)], fill=GRID)
    draw.text((left, top - 14), title, fill=TEXT)
    shown = (lambda v: 10.0**v) if log else (lambda v: v)
    draw.text((4, top), f"{shown(high):.3g}", fill=AXIS)
    draw.text((4, bottom - 10), f"{shown(low):.3g}", fill=AXIS)
    span_x = max(1, last_iteration)
    legend_x = left + 8 * len(title) + 24
    for name, points in curves.items():
        colour = COLOURS[name]
        xs = [left + it / span_x * (right - left) for it, _ in points]
        ys = _scale([v for _, v in points], low, high, top + 4, bottom - 4)
        if len(points) > 1:
            draw.line(list(zip(xs, ys)), fill=colour, width=2)
        for x, y in zip(xs, ys) if len(points) <= 40 else []:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        draw.text((legend_x, top - 14), name, fill=colour)
        legend_x += 8 * len(name) + 16


def loss_plot(history: list[dict], probes: list) -> Image.Image:
    """Top: both losses per iteration (log axis); bottom: the probe's % change at its iterations (0 at iteration 0)."""
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    last = max(len(history), max((it for it, _ in probes), default=0))
    losses = {"fake-score loss": [(i + 1, m["loss_fake"]) for i, m in enumerate(history)],
              "student loss": [(i + 1, m["loss_student"]) for i, m in enumerate(history)]}
    moved = {"student moved (%)": [(0, 0.0)] + [(it, 100.0 * change) for it, change in probes]}
    middle = HEIGHT // 2
    _panel(draw, (MARGIN, 24, WIDTH - 12, middle - 14), losses, last, "losses (log scale)", log=True)
    _panel(draw, (MARGIN, middle + 20, WIDTH - 12, HEIGHT - 26), moved, last, "student vs teacher samples")
    draw.text((MARGIN, HEIGHT - 18), "iteration 0", fill=AXIS)
    draw.text((WIDTH - 100, HEIGHT - 18), f"iteration {last}", fill=AXIS)
    return image


def as_comfy_image(image: Image.Image) -> torch.Tensor:
    """ComfyUI's IMAGE: float [1, H, W, 3] in [0, 1]."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)[None]
