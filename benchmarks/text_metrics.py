"""Quality metrics for the shapes teacher in the feature space of a small shapes classifier (the FID recipe
with a domain network): Frechet distance, attribute accuracy (prompt adherence), k-NN precision/recall.

The classifier reads the three caption attributes (colour, shape, position) of a 32x32 image; its 64-d
penultimate layer is the feature space of the Frechet distance. It is trained deterministically on the
shapes training split, never on the held-out split, and cached (small) as
``benchmarks/assets/shapes_classifier.safetensors``; delete that file to retrain it
(``python -m benchmarks.text_metrics``). The FD and precision/recall formulas are those of
:mod:`benchmarks.metrics`, imported, not copied.

    python -m benchmarks.text_metrics                       # (re)train if missing, print its held-out accuracy
    python -m benchmarks.text_metrics --check FOLDER        # the teacher quality table of a shapes teacher folder
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.metrics import frechet_distance, precision_recall
from benchmarks.shapes_data import ATTRIBUTES, NUM_VALUES, load_shapes_split
from tdm_core.atomic import atomic_write

CLASSIFIER_PATH = Path(__file__).resolve().parent / "assets" / "shapes_classifier.safetensors"
FEATURE_DIM = 64


class ShapesClassifier(nn.Module):
    """Conv net on 32x32 RGB in [-1, 1]; ``features`` is the 64-d penultimate layer, the head gives
    one set of logits per attribute (colour, shape, position)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 16x16
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 8x8
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 4x4
            nn.Flatten(), nn.Linear(64 * 4 * 4, FEATURE_DIM), nn.ReLU(),
        )
        self.head = nn.Linear(FEATURE_DIM, sum(NUM_VALUES))

    def features(self, x: Tensor) -> Tensor:
        return self.body(x.float().clamp(-1, 1))

    def split_logits(self, logits: Tensor) -> list[Tensor]:
        return list(logits.split(list(NUM_VALUES), dim=1))

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.split_logits(self.head(self.features(x)))


def augment(x: Tensor, generator: torch.Generator) -> Tensor:
    """+-1 px shifts and a little pixel noise. No blur: the features should see blur, the typical failure of
    a few-step sampler (a blur-invariant classifier rated 4-step samples as good as 50-step ones)."""
    dx, dy = torch.randint(-1, 2, (2,), generator=generator).tolist()
    x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))  # the wrapped border is background in almost every image
    return x + 0.03 * torch.randn(x.shape, generator=generator)


def train_classifier(epochs: int = 8, seed: int = 0, batch_size: int = 64, log=None) -> ShapesClassifier:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    train = load_shapes_split("train")
    model = ShapesClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for epoch in range(epochs):
        order = torch.randperm(len(train), generator=generator)
        for start in range(0, len(train), batch_size):
            idx = order[start : start + batch_size]
            logits = model(augment(train.images[idx], generator))
            loss = sum(F.cross_entropy(lg, train.labels[idx, k]) for k, lg in enumerate(logits))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if log:
            log(f"  classifier epoch {epoch + 1}/{epochs}: loss {loss.item():.4f}")
    return model.eval()


def save_classifier(model: ShapesClassifier, path: Path) -> None:
    from safetensors.torch import save_file

    with atomic_write(path) as temp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(temp))


def load_classifier(path: Path = CLASSIFIER_PATH, train_if_missing: bool = True) -> ShapesClassifier:
    from safetensors.torch import load_file

    model = ShapesClassifier()
    if Path(path).is_file():
        model.load_state_dict(load_file(str(path)))
        return model.eval().requires_grad_(False)
    if not train_if_missing:
        raise FileNotFoundError(f"no shapes classifier at {path}: run `python -m benchmarks.text_metrics` to train it")
    model = train_classifier()
    save_classifier(model, Path(path))
    return model.requires_grad_(False)


@torch.no_grad()
def classifier_outputs(model: ShapesClassifier, images: Tensor, batch_size: int = 500) -> tuple[Tensor, Tensor]:
    """``(features (N, 64) float64, predicted attributes (N, 3))``."""
    feats, preds = [], []
    for start in range(0, images.shape[0], batch_size):
        f = model.features(images[start : start + batch_size])
        feats.append(f.double())
        preds.append(torch.stack([lg.argmax(1) for lg in model.split_logits(model.head(f))], dim=1))
    return torch.cat(feats), torch.cat(preds)


def attribute_accuracy(predicted: Tensor, wanted: Tensor) -> dict[str, float]:
    """Per attribute, the share of samples drawn with the colour / shape / position their prompt asked for,
    among the prompts that name it (``wanted`` is -1 where the prompt says nothing); ``all``: the share of
    prompts naming at least one attribute whose every named attribute is drawn right."""
    said = wanted >= 0
    right = (predicted == wanted) | ~said
    out = {}
    for k, name in enumerate(ATTRIBUTES):
        out[name] = float(right[said[:, k], k].double().mean()) if said[:, k].any() else float("nan")
    some = said.any(1)
    out["all"] = float(right[some].all(1).double().mean()) if some.any() else float("nan")
    return out


def quality(model: ShapesClassifier, samples: Tensor, labels: Tensor, real_feats: Tensor,
            reference_feats: Tensor | None = None) -> dict:
    """FD to real held-out data, FD to a reference sample set (e.g. the teacher's 50-step samples),
    attribute accuracy, precision and recall."""
    feats, preds = classifier_outputs(model, samples)
    precision, recall = precision_recall(real_feats, feats)
    return {
        "fd_real": frechet_distance(feats, real_feats),
        "fd_teacher": frechet_distance(feats, reference_feats) if reference_feats is not None else float("nan"),
        **{f"acc_{k}": v for k, v in attribute_accuracy(preds, labels).items()},
        "precision": precision,
        "recall": recall,
    }


def real_heldout_features(model: ShapesClassifier) -> Tensor:
    return classifier_outputs(model, load_shapes_split("heldout").images)[0]


@torch.no_grad()
def check_teacher(folder: Path, num_samples: int = 500, cfg: float = 3.0, seed: int = 1234, log=print) -> list[dict]:
    """The teacher's quality table: 50 and 4 DDIM steps at CFG 1 and ``cfg``, FD to the 2,000 held-out
    real images and attribute accuracy, ``num_samples`` samples (balanced captions, fixed noise); with two
    reference rows (real training images, and their VAE reconstructions) that show the floor of FD at this
    sample size and what the VAE alone costs."""
    from benchmarks.text_sampling import balanced_prompts, noise_for, sample_text_teacher
    from training.models import load_family

    start = time.perf_counter()
    family = load_family(str(folder))
    model = load_classifier()
    real = real_heldout_features(model)
    train = load_shapes_split("train")
    prompts, labels = balanced_prompts(num_samples)
    noise = noise_for(family, num_samples, seed)
    rows = []
    ref = train.images[:num_samples]
    rows.append({"name": f"real training images ({num_samples})", **quality(model, ref, train.labels[:num_samples], real)})
    vae = family.pipeline.vae
    recon = vae.decode(vae.encode(ref.to(vae.dtype)).latent_dist.mean).sample.float().clamp(-1, 1)
    rows.append({"name": "their VAE reconstructions", **quality(model, recon, train.labels[:num_samples], real)})
    for steps in (50, 4):
        for w in (1.0, cfg):
            samples = sample_text_teacher(family, steps, prompts, noise, w)
            rows.append({"name": f"teacher DDIM {steps} steps, CFG {w:g}", **quality(model, samples, labels, real)})
    header = f"{'':40s} {'FD':>7s} {'colour':>7s} {'shape':>7s} {'pos.':>7s} {'all 3':>7s} {'prec.':>6s} {'recall':>6s}"
    log(f"shapes teacher {folder}: FD to the {real.shape[0]} held-out images, attribute accuracy, {num_samples} samples")
    log(header)
    for r in rows:
        log(f"{r['name']:40s} {r['fd_real']:7.2f} {r['acc_colour']:7.3f} {r['acc_shape']:7.3f} {r['acc_position']:7.3f} "
            f"{r['acc_all']:7.3f} {r['precision']:6.3f} {r['recall']:6.3f}")
    log(f"check took {time.perf_counter() - start:.0f} s")
    return rows


# --- the command line the teacher scripts share (benchmarks.train_text_teacher, benchmarks.train_flow_teacher) ---
def add_check_arguments(parser, default_output: Path) -> None:
    parser.add_argument("--output", type=Path, default=default_output)
    parser.add_argument("--no-check", action="store_true", help="skip the quality check after training")
    parser.add_argument("--check-only", action="store_true", help="only run the quality check on an existing --output folder")
    parser.add_argument("--check-samples", type=int, default=500)
    parser.add_argument("--check-cfg", type=float, default=3.0, help="the moderate guidance scale of the check (besides 1)")


def checked_output(parser, args) -> Path:
    """The resolved ``--output`` after the checks every teacher script makes (parser.error otherwise)."""
    if args.check_samples < 10:
        parser.error("--check-samples must be at least 10")
    if args.check_cfg < 1:
        parser.error("--check-cfg must be at least 1")
    output = args.output.resolve()
    if not output.parent.is_dir():
        parser.error(f"the parent folder of --output {output} does not exist: create it first")
    if args.check_only and not (output / "model_index.json").is_file():
        parser.error(f"--check-only: {output} holds no model_index.json; build it first (drop --check-only)")
    return output


def check_unless_told_not(args, output: Path) -> None:
    if not args.no_check:
        check_teacher(output, num_samples=args.check_samples, cfg=args.check_cfg, log=print)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", type=Path, metavar="FOLDER", help="print the quality table of this shapes teacher folder")
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--cfg", type=float, default=3.0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.check is not None:
        if not (args.check / "model_index.json").is_file():
            parser.error(f"--check {args.check}: no model_index.json there; build it with `python -m benchmarks.train_text_teacher`")
        if args.samples < 10:
            parser.error("--samples must be at least 10")
        check_teacher(args.check, args.samples, args.cfg)
        return 0
    start = time.perf_counter()
    model = load_classifier()
    heldout = load_shapes_split("heldout")
    _, preds = classifier_outputs(model, heldout.images)
    acc = attribute_accuracy(preds, heldout.labels)
    print(f"shapes classifier at {CLASSIFIER_PATH}: held-out accuracy " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items())
          + f" ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
