"""Quality metrics for the video teacher: per-frame Frechet distance and attribute accuracy in the shapes
classifier's features, and temporal consistency from the shape's centroid track.

Per frame (every frame is a 32x32 shapes-like image, read by the committed shapes classifier of
:mod:`benchmarks.text_metrics`, imported, not retrained):

    fd             Frechet distance between the features of all sample frames and of all frames of the
                   1,000 held-out real clips (9,000 frames). Lower is better; real training clips score the
                   floor of this sample size.
    colour         share of frames whose predicted colour is the one the caption asks for.
    shape          share of clips whose majority vote over frames is the caption's shape. A vote, not per
                   frame: the classifier never saw a shape at the image centre (its data puts shapes left, right,
                   top or bottom), where every track passes, and misreads shapes there (real clips: 0.81 of frames
                   right, the first and last frames ~0.93). ``shape_frames`` is the per-frame share.

Per clip (temporal):

    direction      share of clips whose centroid track moves the way the caption says: the shape's centroid per
                   frame (pixels weighted by their distance from the background colour, read from the corners),
                   a least-squares line through it over the frames, and the direction of its slope.
    all            share of clips with the colour vote, the shape vote and the direction right.
    area_cv        per clip, the coefficient of variation over frames of the shape's ink (summed weight of the
                   centroid), averaged: about 0 for a shape of constant size, large when it flickers, fades,
                   grows or vanishes mid-clip.
    speed          mean centroid speed in pixels per frame (the data moves 14 / 8 = 1.75 px per frame).
    track_rms      RMS distance in pixels of the centroids from their fitted line: 0 for a shape gliding at
                   constant speed, large for jitter, jumps or flicker (real clips: a little, from the shape
                   leaving the frame at the edges).
    frame_l1       mean absolute frame-to-frame pixel change ([-1, 1] units), to compare with the real clips'.
"""
from __future__ import annotations

import time

import torch
from torch import Tensor

from benchmarks.metrics import frechet_distance
from benchmarks.text_metrics import classifier_outputs, load_classifier
from benchmarks.video_data import DIRECTIONS, DIRECTION_NAMES, NUM_FRAMES, clips_to_frames, load_video_split

CORNER = 2  # corner patches (px) that no track reaches: they show the background
INK_THRESHOLD = 0.2  # summed |RGB - background| below this is background noise, not shape


def background_colour(clips: Tensor) -> Tensor:
    """(N, 3): per clip the median colour of the four corner patches over all frames."""
    c = CORNER
    corners = torch.cat([clips[..., :c, :c], clips[..., :c, -c:], clips[..., -c:, :c], clips[..., -c:, -c:]], dim=-1)
    return corners.flatten(2).median(dim=2).values


def centroid_tracks(clips: Tensor) -> tuple[Tensor, Tensor]:
    """``(centroids (N, T, 2) as (x, y) pixels, ink (N, T))``; a frame with no ink gets the image centre."""
    ink = (clips - background_colour(clips)[:, :, None, None, None]).abs().sum(1)  # (N, T, H, W)
    weight = (ink - INK_THRESHOLD).clamp(min=0)
    total = weight.sum((2, 3))
    coords = torch.arange(clips.shape[-1], dtype=clips.dtype) + 0.5
    x = (weight * coords.view(1, 1, 1, -1)).sum((2, 3)) / total.clamp(min=1e-6)
    y = (weight * coords.view(1, 1, -1, 1)).sum((2, 3)) / total.clamp(min=1e-6)
    centre = clips.shape[-1] / 2
    empty = total < 1e-6
    return torch.stack([x.masked_fill(empty, centre), y.masked_fill(empty, centre)], dim=-1), total


def track_fit(centroids: Tensor) -> tuple[Tensor, Tensor]:
    """Least-squares line through each track: ``(velocity (N, 2) px per frame, RMS residual (N,) px)``."""
    t = torch.arange(centroids.shape[1], dtype=centroids.dtype)
    t = t - t.mean()
    mean = centroids.mean(1, keepdim=True)
    velocity = (t.view(1, -1, 1) * (centroids - mean)).sum(1) / t.pow(2).sum()
    residual = centroids - mean - t.view(1, -1, 1) * velocity[:, None, :]
    return velocity, residual.pow(2).sum(-1).mean(1).sqrt()


def predicted_direction(velocity: Tensor) -> Tensor:
    """(N,) index into DIRECTION_NAMES of the direction closest to each velocity."""
    units = torch.tensor([DIRECTIONS[d] for d in DIRECTION_NAMES], dtype=velocity.dtype)
    return (velocity @ units.T).argmax(1)


def real_heldout_features(model) -> Tensor:
    return classifier_outputs(model, load_video_split("heldout").frames())[0]


def quality(model, clips: Tensor, labels: Tensor, real_feats: Tensor) -> dict:
    """Every metric of the module docstring for ``clips`` (N, 3, T, H, W) asked for with ``labels`` (N, 3)."""
    n, frames = clips.shape[0], clips.shape[2]
    feats, preds = classifier_outputs(model, clips_to_frames(clips.float()))
    preds = preds.view(n, frames, -1)[..., :2]  # colour, shape (the classifier's position head is not used)
    votes = preds.mode(dim=1).values  # (N, 2) majority over frames
    centroids, ink = centroid_tracks(clips.float())
    velocity, rms = track_fit(centroids)
    direction_right = predicted_direction(velocity) == labels[:, 2]
    return {
        "fd": frechet_distance(feats, real_feats),
        "acc_colour": float((preds[..., 0] == labels[:, None, 0]).double().mean()),
        "acc_shape": float((votes[:, 1] == labels[:, 1]).double().mean()),
        "acc_shape_frames": float((preds[..., 1] == labels[:, None, 1]).double().mean()),
        "acc_direction": float(direction_right.double().mean()),
        "acc_all": float(((votes == labels[:, :2]).all(1) & direction_right).double().mean()),
        "area_cv": float((ink.std(1) / ink.mean(1).clamp(min=1e-6)).mean()),
        "speed": float(velocity.norm(dim=1).mean()),
        "track_rms": float(rms.mean()),
        "frame_l1": float((clips[:, :, 1:] - clips[:, :, :-1]).abs().mean()),
    }


def format_rows(rows: list[dict]) -> list[str]:
    header = (f"{'':34s} {'FD':>7s} {'colour':>7s} {'shape':>7s} {'direct.':>7s} {'all':>6s} {'area cv':>7s} "
              f"{'px/frame':>8s} {'track rms':>9s} {'frame L1':>8s}")
    lines = [header]
    for r in rows:
        lines.append(f"{r['name']:34s} {r['fd']:7.2f} {r['acc_colour']:7.3f} {r['acc_shape']:7.3f} {r['acc_direction']:7.3f} "
                     f"{r['acc_all']:6.3f} {r['area_cv']:7.3f} {r['speed']:8.2f} {r['track_rms']:9.2f} {r['frame_l1']:8.4f}")
    return lines


def balanced_prompts(num_samples: int) -> tuple[list[str], Tensor]:
    """``num_samples`` captions cycling through all 60, and their labels (N, 3)."""
    from benchmarks.video_data import all_captions, parse_caption

    captions = all_captions()
    prompts = [captions[i % len(captions)] for i in range(num_samples)]
    return prompts, torch.tensor([parse_caption(p) for p in prompts])


@torch.no_grad()
def check_teacher(folder, num_samples: int = 500, cfg: float = 3.0, seed: int = 1234, log=print) -> list[dict]:
    """The teacher's table: real training clips and their VAE reconstructions (the floors), then Euler 50 and 4
    steps at CFG 1 and ``cfg``, ``num_samples`` samples (balanced captions, fixed noise)."""
    from benchmarks.video_sampling import decode, latent_shape, load_teacher, sample_clips

    start = time.perf_counter()
    pipeline = load_teacher(folder)
    model = load_classifier()
    real = real_heldout_features(model)
    train = load_video_split("train")
    ref, ref_labels = train.clips[:num_samples], train.labels[:num_samples]
    rows = [{"name": f"real training clips ({num_samples})", **quality(model, ref, ref_labels, real)}]
    latents = pipeline.vae.encode(ref).latent_dist.mean
    mean = torch.tensor(pipeline.vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(pipeline.vae.config.latents_std).view(1, -1, 1, 1, 1)
    rows.append({"name": "their VAE reconstructions", **quality(model, decode(pipeline, (latents - mean) / std), ref_labels, real)})
    prompts, labels = balanced_prompts(num_samples)
    noise = torch.randn(latent_shape(pipeline, num_samples, NUM_FRAMES, ref.shape[-1]), generator=torch.Generator().manual_seed(seed))
    for steps in (50, 4):
        for w in (1.0, cfg):
            clips = sample_clips(pipeline, prompts, noise, steps, w)
            rows.append({"name": f"teacher Euler {steps} steps, CFG {w:g}", **quality(model, clips, labels, real)})
    log(f"video teacher {folder}: per-frame FD to the {real.shape[0]} held-out frames, accuracy, temporal measures; "
        f"{num_samples} samples")
    for line in format_rows(rows):
        log(line)
    log(f"check took {time.perf_counter() - start:.0f} s")
    return rows
