"""Procedural captioned clips of one coloured shape moving in a straight line: the data of the video teacher.

Each clip is ``NUM_FRAMES`` (9 = 1 + 4 x 2, the frame count Wan's VAE takes: one frame, then groups of four)
frames of 32x32 RGB in [-1, 1], laid out (3, T, H, W) as diffusers' video VAEs take them. Three attributes are
drawn uniformly and independently and all three are named in the caption, "a red circle moving right":

    colour     red, green, blue, yellow, purple      (benchmarks.shapes_data's palette)
    shape      circle, square, triangle              (benchmarks.shapes_data's anti-aliased drawing)
    direction  left, right, up, down

5 x 3 x 4 = 60 captions. The shape travels ``TRAVEL`` pixels at constant speed, centred on the image centre
(+-2 px along the motion, +-5 px across it); size, tint and background grey vary as in the shapes data.
Deterministic in the split's seed; the held-out split is never trained on.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from benchmarks.shapes_data import COLOUR_NAMES, COLOURS, IMAGE_SIZE, SHAPES, shape_masks

NUM_FRAMES = 9
TRAVEL = 14.0  # pixels from the first frame to the last
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}  # y points down
DIRECTION_NAMES = tuple(DIRECTIONS)
ATTRIBUTES = ("colour", "shape", "direction")
NUM_VALUES = (len(COLOUR_NAMES), len(SHAPES), len(DIRECTION_NAMES))
SPLITS = {"train": (4_000, 0), "heldout": (1_000, 1)}  # name -> (clips, seed)


def caption(colour: int, shape: int, direction: int) -> str:
    return f"a {COLOUR_NAMES[colour]} {SHAPES[shape]} moving {DIRECTION_NAMES[direction]}"


def all_captions() -> list[str]:
    """The 60 captions, colour-major."""
    return [caption(c, s, d) for c in range(NUM_VALUES[0]) for s in range(NUM_VALUES[1]) for d in range(NUM_VALUES[2])]


def parse_caption(text: str) -> tuple[int, int, int]:
    """Inverse of :func:`caption`; a clear error for any other text."""
    table = {c: (i // 12, i // 4 % 3, i % 4) for i, c in enumerate(all_captions())}
    cleaned = " ".join(text.lower().split())
    if cleaned not in table:
        raise ValueError(f"{text!r} is not a video caption: expected 'a <colour> <shape> moving <direction>' with colour in "
                         f"{COLOUR_NAMES}, shape in {SHAPES}, direction in {DIRECTION_NAMES}")
    return table[cleaned]


@dataclass
class VideoSplit:
    clips: Tensor  # (N, 3, T, 32, 32) float32 in [-1, 1]
    labels: Tensor  # (N, 3) long: colour, shape, direction
    captions: list[str]

    def __len__(self) -> int:
        return self.clips.shape[0]

    def frames(self) -> Tensor:
        """All frames as images (N * T, 3, 32, 32), clip-major."""
        return clips_to_frames(self.clips)


def clips_to_frames(clips: Tensor) -> Tensor:
    return clips.transpose(1, 2).reshape(-1, 3, *clips.shape[-2:])


def render_clips(labels: Tensor, generator: torch.Generator, num_frames: int = NUM_FRAMES) -> Tensor:
    """Clips (N, 3, T, 32, 32) for ``labels`` (N, 3), nuisances drawn from ``generator``."""
    n = labels.shape[0]
    half = 4.5 + 2.5 * torch.rand(n, generator=generator)
    along = (torch.rand(n, generator=generator) * 2 - 1) * 2.0
    across = (torch.rand(n, generator=generator) * 2 - 1) * 5.0
    tint = (torch.rand(n, 3, generator=generator) * 2 - 1) * 0.08
    background = 0.1 + 0.3 * torch.rand(n, generator=generator)
    direction = torch.tensor([DIRECTIONS[d] for d in DIRECTION_NAMES])[labels[:, 2]]  # (N, 2) unit vectors
    normal = direction.flip(1)
    progress = torch.linspace(-0.5, 0.5, num_frames) * TRAVEL  # signed distance from the midpoint, per frame
    centre = IMAGE_SIZE / 2 + along[:, None] * direction + across[:, None] * normal  # (N, 2) midpoint of the track
    track = centre[:, None, :] + progress[None, :, None] * direction[:, None, :]  # (N, T, 2)
    masks = shape_masks(labels[:, 1].repeat_interleave(num_frames), track[..., 0].reshape(-1),
                        track[..., 1].reshape(-1), half.repeat_interleave(num_frames))
    masks = masks.view(n, num_frames, 1, IMAGE_SIZE, IMAGE_SIZE).transpose(1, 2)  # (N, 1, T, H, W)
    colours = (torch.tensor([COLOURS[c] for c in COLOUR_NAMES])[labels[:, 0]] + tint).clamp(0, 1)
    bg = background.view(-1, 1, 1, 1, 1)
    rgb = bg + masks * (colours.view(-1, 3, 1, 1, 1) - bg)
    return (rgb * 2 - 1).contiguous()


def make_split(num_clips: int, seed: int) -> VideoSplit:
    """``num_clips`` random captioned clips, a pure function of ``seed``."""
    if num_clips < 1:
        raise ValueError(f"num_clips must be at least 1, got {num_clips}")
    generator = torch.Generator().manual_seed(int(seed))
    labels = torch.stack([torch.randint(0, k, (num_clips,), generator=generator) for k in NUM_VALUES], dim=1)
    clips = torch.cat([render_clips(labels[s : s + 500], generator) for s in range(0, num_clips, 500)])
    return VideoSplit(clips, labels, [caption(*row) for row in labels.tolist()])


_CACHE: dict[str, VideoSplit] = {}


def load_video_split(split: str) -> VideoSplit:
    """The fixed ``"train"`` (4,000 clips, seed 0) or ``"heldout"`` (1,000 clips, seed 1) split."""
    if split not in SPLITS:
        raise ValueError(f"unknown video split {split!r}: use one of {', '.join(SPLITS)}")
    if split not in _CACHE:
        _CACHE[split] = make_split(*SPLITS[split])
    return _CACHE[split]
