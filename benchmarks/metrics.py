"""Quality metrics in the feature space of a small digits classifier (the FID recipe with a domain
network): Frechet distance, class accuracy of conditional samples, k-NN precision/recall.

The classifier is trained deterministically on the digits training split and cached (small) as
``benchmarks/assets/digits_classifier.safetensors``; delete that file to retrain it.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.digits_data import NUM_CLASSES, load_digits_split
from tdm_core.atomic import atomic_write

CLASSIFIER_PATH = Path(__file__).resolve().parent / "assets" / "digits_classifier.safetensors"
FEATURE_DIM = 64


class DigitsClassifier(nn.Module):
    """Conv net on 16x16 digits in [-1, 1]; ``features`` is the 64-d penultimate layer."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 4 * 4, FEATURE_DIM), nn.ReLU(),
        )
        self.head = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x.float().clamp(-1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def random_shift(x: Tensor, generator: torch.Generator, max_shift: int = 1) -> Tensor:
    # +-1 pixel translations: the classifier must not depend on exact stroke placement
    dx, dy = (torch.randint(-max_shift, max_shift + 1, (2,), generator=generator)).tolist()
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def train_classifier(epochs: int = 30, seed: int = 0, batch_size: int = 64) -> DigitsClassifier:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images, labels = load_digits_split("train")
    model = DigitsClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        order = torch.randperm(images.shape[0], generator=generator)
        for start in range(0, images.shape[0], batch_size):
            idx = order[start : start + batch_size]
            # torch.roll wraps around, harmless here: the outermost pixels of every digit are background
            loss = F.cross_entropy(model(random_shift(images[idx], generator)), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


def save_classifier(model: DigitsClassifier, path: Path) -> None:
    from safetensors.torch import save_file

    with atomic_write(path) as temp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(temp))


def load_classifier(path: Path = CLASSIFIER_PATH, train_if_missing: bool = True) -> DigitsClassifier:
    from safetensors.torch import load_file

    model = DigitsClassifier()
    if path.is_file():
        model.load_state_dict(load_file(str(path)))
        return model.eval().requires_grad_(False)
    if not train_if_missing:
        raise FileNotFoundError(f"no digits classifier at {path}: run `python -m benchmarks.metrics` to train it")
    model = train_classifier()
    save_classifier(model, path)
    return model.requires_grad_(False)


@torch.no_grad()
def classifier_outputs(model: DigitsClassifier, images: Tensor, batch_size: int = 500) -> tuple[Tensor, Tensor]:
    """``(features (N, 64) float64, predicted class (N,))``."""
    feats, preds = [], []
    for start in range(0, images.shape[0], batch_size):
        f = model.features(images[start : start + batch_size])
        feats.append(f.double())
        preds.append(model.head(f).argmax(1))
    return torch.cat(feats), torch.cat(preds)


def _psd_sqrt(mat: Tensor) -> Tensor:
    vals, vecs = torch.linalg.eigh(mat)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def frechet_distance(feats_a: Tensor, feats_b: Tensor) -> float:
    # Heusel et al. 2017: |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)
    feats_a, feats_b = feats_a.double(), feats_b.double()
    mu_a, mu_b = feats_a.mean(0), feats_b.mean(0)
    cov_a, cov_b = torch.cov(feats_a.T), torch.cov(feats_b.T)
    root_a = _psd_sqrt(cov_a)
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    fd = float((mu_a - mu_b).pow(2).sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * cross)
    return max(fd, 0.0)  # a set against itself can come out at -1e-5 from eigenvalue round-off


def _knn_radii(feats: Tensor, k: int) -> Tensor:
    dist = torch.cdist(feats, feats)
    return dist.kthvalue(k + 1, dim=1).values  # k+1: the point itself is at distance 0


def precision_recall(real: Tensor, fake: Tensor, k: int = 3) -> tuple[float, float]:
    # Kynkaanniemi et al. 2019: precision = share of fakes inside some real k-NN ball, recall vice versa
    real, fake = real.double(), fake.double()
    real_r, fake_r = _knn_radii(real, k), _knn_radii(fake, k)
    precision = (torch.cdist(fake, real) <= real_r[None, :]).any(1).double().mean()
    recall = (torch.cdist(real, fake) <= fake_r[None, :]).any(1).double().mean()
    return float(precision), float(recall)


def class_accuracy(predicted: Tensor, wanted: Tensor) -> float:
    return float((predicted == wanted).double().mean())


def quality(model: DigitsClassifier, samples: Tensor, classes: Tensor, real_feats: Tensor, reference_feats: Tensor | None = None) -> dict:
    """FD to real held-out data, FD to a reference sample set (e.g. the teacher's 50-step samples),
    class accuracy, precision and recall."""
    feats, preds = classifier_outputs(model, samples)
    precision, recall = precision_recall(real_feats, feats)
    return {
        "fd_real": frechet_distance(feats, real_feats),
        "fd_teacher": frechet_distance(feats, reference_feats) if reference_feats is not None else float("nan"),
        "accuracy": class_accuracy(preds, classes),
        "precision": precision,
        "recall": recall,
    }


def main() -> int:
    torch.set_num_threads(1)
    model = load_classifier()
    images, labels = load_digits_split("heldout")
    _, preds = classifier_outputs(model, images)
    print(f"digits classifier at {CLASSIFIER_PATH}: held-out accuracy {class_accuracy(preds, labels):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
