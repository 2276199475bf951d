"""scikit-learn's bundled 8x8 digits (no download), upsampled to 16x16 and scaled to [-1, 1]."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IMAGE_SIZE = 16
NUM_CLASSES = 10
HELDOUT_FRACTION = 0.3
SPLIT_SEED = 0


def upsample_digits(images_8x8: Tensor, size: int = IMAGE_SIZE) -> Tensor:
    # the raw pixels are 0..16 ink levels; bilinear keeps strokes smooth, then map to [-1, 1]
    x = images_8x8.reshape(-1, 1, 8, 8).float() / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x.clamp(0, 1) * 2.0 - 1.0).contiguous()


def load_digits_split(split: str) -> tuple[Tensor, Tensor]:
    """``("train" | "heldout")`` -> images (N, 1, 16, 16) in [-1, 1] and labels (N,), a fixed
    stratified split so the teacher and the classifier never see the held-out images."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "heldout"):
        raise ValueError(f"unknown digits split {split!r}: use 'train' or 'heldout'")
    data = load_digits()
    idx = list(range(len(data.target)))
    train_idx, heldout_idx = train_test_split(
        idx, test_size=HELDOUT_FRACTION, random_state=SPLIT_SEED, stratify=data.target
    )
    chosen = sorted(train_idx if split == "train" else heldout_idx)
    images = torch.from_numpy(data.images[chosen])
    labels = torch.from_numpy(data.target[chosen]).long()
    return upsample_digits(images), labels
