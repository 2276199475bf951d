"""Procedural coloured shapes with captions: the text-to-image data of the shapes teacher.

Each image is one shape on a plain grey background, 32x32 RGB in [-1, 1], with three attributes drawn
uniformly and independently:

    colour   red, green, blue, yellow, purple
    shape    circle, square, triangle
    position on the left, on the right, at the top, at the bottom

Its caption mentions each attribute with probability 0.7 (the shape word becomes "shape" when the
shape is not mentioned): "a red circle on the left", "a red circle", "a shape at the top", "a shape".
That gives 6 x 4 x 5 = 120 distinct captions; the 60 that mention all three pin the image down up to
its nuisances, the others leave whole modes open (a caption without a position has four places to
put the shape), which is what a few-step sampler finds hard. Size (half-width 4.5..7 px), placement
(+-2 px around the position), colour (+-0.08 per channel) and background grey (0.1..0.4) vary
continuously, so no two images repeat and the held-out split is never seen in training. Shapes are
drawn at 4x resolution and box-filtered down (anti-aliased edges). Everything is deterministic in the
split's seed; nothing is downloaded.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

IMAGE_SIZE = 32
COLOURS = {
    "red": (0.90, 0.15, 0.15),
    "green": (0.15, 0.75, 0.20),
    "blue": (0.20, 0.35, 0.95),
    "yellow": (0.95, 0.85, 0.15),
    "purple": (0.65, 0.25, 0.85),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {  # phrase -> shape centre (x, y) in pixels, y pointing down
    "on the left": (9.0, 16.0),
    "on the right": (23.0, 16.0),
    "at the top": (16.0, 9.0),
    "at the bottom": (16.0, 23.0),
}
COLOUR_NAMES = tuple(COLOURS)
POSITION_NAMES = tuple(POSITIONS)
ATTRIBUTES = ("colour", "shape", "position")
NUM_VALUES = (len(COLOUR_NAMES), len(SHAPES), len(POSITION_NAMES))  # classes per attribute
SPLITS = {"train": (10_000, 0), "heldout": (2_000, 1)}  # name -> (size, seed)
MENTION_PROB = 0.7  # chance that a caption names a given attribute
UNSAID = -1  # label of an attribute the caption does not mention
SUPERSAMPLE = 4


def caption(colour: int, shape: int, position: int) -> str:
    """``"a [colour] <shape|shape-word> [position]"``; an index of :data:`UNSAID` (-1) leaves that attribute out."""
    words = ["a"]
    if colour != UNSAID:
        words.append(COLOUR_NAMES[colour])
    words.append(SHAPES[shape] if shape != UNSAID else "shape")
    if position != UNSAID:
        words.append(POSITION_NAMES[position])
    return " ".join(words)


def all_captions() -> list[str]:
    """Every caption of the dataset (120), attribute by attribute, each value before "not mentioned"."""
    return [caption(c, s, p) for c in [*range(NUM_VALUES[0]), UNSAID] for s in [*range(NUM_VALUES[1]), UNSAID]
            for p in [*range(NUM_VALUES[2]), UNSAID]]


def full_captions() -> list[str]:
    """The 60 captions that name all three attributes."""
    return [c for c in all_captions() if UNSAID not in parse_caption(c)]


def caption_words() -> list[str]:
    """The closed vocabulary of the captions, sorted."""
    return sorted({word for text in all_captions() for word in text.split()})


_PARSE = {}


def parse_caption(text: str) -> tuple[int, int, int]:
    """Inverse of :func:`caption` (case and extra spaces ignored): the named attribute indices, -1 where
    the caption says nothing; a clear error for any other text."""
    if not _PARSE:
        for c in [*range(NUM_VALUES[0]), UNSAID]:
            for s in [*range(NUM_VALUES[1]), UNSAID]:
                for p in [*range(NUM_VALUES[2]), UNSAID]:
                    _PARSE[caption(c, s, p)] = (c, s, p)
    cleaned = " ".join(text.lower().split())
    if cleaned not in _PARSE:
        raise ValueError(f"{text!r} is not a shapes caption: expected 'a [colour] <shape> [position]' with colour in "
                         f"{COLOUR_NAMES}, shape in {SHAPES} (or the word 'shape'), position in {POSITION_NAMES}")
    return _PARSE[cleaned]


def shape_masks(shape: Tensor, cx: Tensor, cy: Tensor, half: Tensor, size: int = IMAGE_SIZE) -> Tensor:
    """Coverage (N, 1, size, size) in [0, 1] of each shape, box-filtered from SUPERSAMPLE x resolution."""
    fine = size * SUPERSAMPLE
    coords = (torch.arange(fine, dtype=torch.float32) + 0.5) / SUPERSAMPLE  # pixel-centre coordinates
    dx = coords.view(1, 1, fine) - cx.view(-1, 1, 1)
    dy = coords.view(1, fine, 1) - cy.view(-1, 1, 1)
    r = half.view(-1, 1, 1)
    circle = dx.pow(2) + dy.pow(2) <= r.pow(2)
    square = torch.maximum(dx.abs(), dy.abs()) <= 0.85 * r  # about the circle's area
    # apex up at cy - r, base at cy + 0.75 r, half-base r
    triangle = (dy >= -r) & (dy <= 0.75 * r) & (dx.abs() <= (dy + r) / 1.75)
    kind = shape.view(-1, 1, 1)
    inside = torch.where(kind == 0, circle, torch.where(kind == 1, square, triangle)).float()
    return F.avg_pool2d(inside.unsqueeze(1), SUPERSAMPLE)


@dataclass
class ShapesSplit:
    images: Tensor  # (N, 3, 32, 32) float32 in [-1, 1]
    labels: Tensor  # (N, 3) long: colour, shape, position indices of what is drawn
    captions: list[str]  # each names a random subset of the labels

    def __len__(self) -> int:
        return self.images.shape[0]


def render(labels: Tensor, generator: torch.Generator, chunk: int = 500) -> Tensor:
    """Images for ``labels`` (N, 3), with the continuous nuisances drawn from ``generator``."""
    n = labels.shape[0]
    half = 4.5 + 2.5 * torch.rand(n, generator=generator)
    jitter = (torch.rand(n, 2, generator=generator) * 2 - 1) * 2.0
    tint = (torch.rand(n, 3, generator=generator) * 2 - 1) * 0.08
    background = 0.1 + 0.3 * torch.rand(n, generator=generator)
    centres = torch.tensor([POSITIONS[p] for p in POSITION_NAMES])[labels[:, 2]] + jitter
    colours = (torch.tensor([COLOURS[c] for c in COLOUR_NAMES])[labels[:, 0]] + tint).clamp(0, 1)
    out = []
    for start in range(0, n, chunk):
        sl = slice(start, start + chunk)
        mask = shape_masks(labels[sl, 1], centres[sl, 0], centres[sl, 1], half[sl])
        bg = background[sl].view(-1, 1, 1, 1)
        rgb = bg + mask * (colours[sl].view(-1, 3, 1, 1) - bg)
        out.append(rgb * 2 - 1)
    return torch.cat(out).contiguous()


def make_split(num_images: int, seed: int) -> ShapesSplit:
    """``num_images`` random captioned images, a pure function of ``seed``."""
    if num_images < 1:
        raise ValueError(f"num_images must be at least 1, got {num_images}")
    generator = torch.Generator().manual_seed(int(seed))
    labels = torch.stack([torch.randint(0, k, (num_images,), generator=generator) for k in NUM_VALUES], dim=1)
    mentioned = torch.rand(num_images, len(NUM_VALUES), generator=generator) < MENTION_PROB
    images = render(labels, generator)
    said = torch.where(mentioned, labels, torch.full_like(labels, UNSAID))
    return ShapesSplit(images, labels, [caption(*row) for row in said.tolist()])


_CACHE: dict[str, ShapesSplit] = {}


def load_shapes_split(split: str) -> ShapesSplit:
    """The fixed ``"train"`` (10,000 images, seed 0) or ``"heldout"`` (2,000 images, seed 1) split."""
    if split not in SPLITS:
        raise ValueError(f"unknown shapes split {split!r}: use one of {', '.join(SPLITS)}")
    if split not in _CACHE:
        _CACHE[split] = make_split(*SPLITS[split])
    return _CACHE[split]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Write the shapes captions (one per line) for training.distill --prompts.")
    parser.add_argument("--prompts", type=Path, required=True, help="output .txt file")
    args = parser.parse_args(argv)
    from tdm_core.atomic import write_text_atomic

    if not args.prompts.parent.is_dir():
        parser.error(f"the folder of --prompts {args.prompts} does not exist: create it first")
    write_text_atomic(args.prompts, "\n".join(all_captions()) + "\n")
    print(f"{len(all_captions())} captions written to {args.prompts}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
