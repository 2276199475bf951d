"""Trains the digits teacher, writes it as a diffusers-style folder and checks its samples.

    python -m benchmarks.train_teacher [--output benchmarks/assets/digits_teacher] [--iterations 2000]
    python -m benchmarks.train_teacher --check-only      # only the check, on the committed teacher

The recipe (the defaults): the UNet and noise schedule of ``training/families/digits.py`` (SD1.5's
scaled_linear betas), DDPM eps-prediction loss with uniform timesteps, class-conditional through
cross-attention with 10% of the labels dropped to the null class (for classifier-free guidance),
AdamW at 3e-3 with a 100-iteration warm-up and cosine decay to 0 over 2000 iterations of batch 64,
gradient norm clipped to 1; the saved weights are an EMA with decay min(0.999, (1 + k) / (10 + k)) at
iteration k, i.e. an average over roughly the last tenth of the run (the cap only binds after ~4500
iterations). Deterministic for a seed and thread count.

The check after training (skip it with ``--no-check``) samples 500 digits from fixed noise with
plain DDIM (eta 0, trailing grid from t=999, no clipping) at CFG 1, 50 and 4 steps, and with the x0
prediction clipped to [-1, 1], and prints the Frechet distance to the held-out digits and the class
accuracy, both in the features of ``benchmarks/assets/digits_classifier.safetensors``.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.digits_data import load_digits_split
from benchmarks.teacher_fit import fit
from tdm_core.schedules import expand_like
from tdm_core.atomic import atomic_folder
from training.families import digits

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "assets" / "digits_teacher"
CHECK_NOISE_SEED = 2  # the check's noise does not depend on the training seed


def drop_conditions(labels: torch.Tensor, drop_prob: float, generator: torch.Generator) -> torch.Tensor:
    # classifier-free guidance training: replace a share of the labels by the null class
    dropped = torch.rand(labels.shape, generator=generator) < drop_prob
    return torch.where(dropped, torch.full_like(labels, digits.NULL_CLASS), labels)


def ddpm_loss(unet, table, x0, labels, schedule, generator) -> torch.Tensor:
    t = torch.randint(0, schedule.num_timesteps, (x0.shape[0],), generator=generator)
    a, s = schedule.alpha_sigma(t)
    eps = torch.randn(x0.shape, generator=generator)
    x_t = expand_like(a, x0) * x0 + expand_like(s, x0) * eps
    pred = unet(x_t, t.float(), encoder_hidden_states=table(labels).unsqueeze(1)).sample
    return F.mse_loss(pred, eps)


def learning_rate_factor(step: int, iterations: int, warmup: int) -> float:
    # linear warm-up, then cosine decay to 0 at the last iteration
    ramp = min(1.0, (step + 1) / max(warmup, 1))
    return ramp * 0.5 * (1.0 + math.cos(math.pi * min(step, iterations) / iterations))


def save_teacher(output: Path, unet, table: torch.nn.Embedding) -> None:
    """Writes the folder under a temporary name beside ``output``, then swaps it in."""
    from safetensors.torch import save_file

    with atomic_folder(output) as tmp:
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(digits.SCHEDULER_CONFIG, indent=2) + "\n")
        save_file({digits.EMBEDDINGS_KEY: table.weight.detach().contiguous()}, str(tmp / digits.EMBEDDINGS_FILE))
        (tmp / "tdm_family.json").write_text(json.dumps({"family": digits.FAMILY_NAME}) + "\n")


def train_teacher(output: Path, iterations: int = 2000, batch_size: int = 64, lr: float = 3e-3, seed: int = 0,
                  ema_decay: float = 0.999, cond_drop: float = 0.1, warmup: int = 100, progress: bool = True) -> Path:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images, labels = load_digits_split("train")
    unet = digits.build_unet()
    table = torch.nn.Embedding(digits.NUM_CLASSES + 1, digits.EMBED_DIM)
    torch.nn.init.normal_(table.weight, std=1.0)
    schedule = digits.schedule_from_config(digits.SCHEDULER_CONFIG)
    params = list(unet.parameters()) + list(table.parameters())

    def step_loss(step: int):
        idx = torch.randint(0, images.shape[0], (batch_size,), generator=generator)
        loss = ddpm_loss(unet, table, images[idx], drop_conditions(labels[idx], cond_drop, generator), schedule, generator)
        return loss, {"loss": loss.item()}

    ema_unet, ema_table = fit(params, step_loss, iterations, lr, lambda k: learning_rate_factor(k, iterations, warmup),
                              ema_of=[unet, table], ema_decay=ema_decay, name="teacher",
                              log=print if progress else (lambda *_: None))
    save_teacher(output, ema_unet, ema_table)
    return output


def check_teacher(folder: Path, num_samples: int = 500, log=print) -> list[dict]:
    """Plain DDIM at CFG 1 (50 and 4 steps) and 50-step DDIM with x0 clipped: FD to the held-out
    digits and class accuracy of ``num_samples`` class-balanced samples from fixed noise."""
    from benchmarks import metrics, sampling
    from training.models import load_family

    family = load_family(str(folder))
    classifier = metrics.load_classifier(train_if_missing=False)
    real_feats, _ = metrics.classifier_outputs(classifier, load_digits_split("heldout")[0])
    classes = sampling.balanced_classes(num_samples)
    noise = sampling.noise_for(family, num_samples, CHECK_NOISE_SEED)
    rows = []
    log(f"[check] {folder}: {num_samples} samples per row, CFG 1, FD to the {real_feats.shape[0]} held-out digits")
    for name, steps, clip in (("DDIM 50 steps", 50, False), ("DDIM 50 steps, x0 clipped", 50, True), ("DDIM 4 steps", 4, False)):
        samples = sampling.sample_teacher(family, steps, classes, noise, 1.0, clip_x0=clip)
        feats, predicted = metrics.classifier_outputs(classifier, samples)
        row = {"name": name, "steps": steps, "clip_x0": clip, "fd_real": metrics.frechet_distance(feats, real_feats),
               "accuracy": metrics.class_accuracy(predicted, classes)}
        rows.append(row)
        log(f"[check] {name:<26} FD {row['fd_real']:7.1f}   class accuracy {row['accuracy']:.3f}")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=3e-3, help="peak AdamW learning rate (cosine-decayed to 0)")
    parser.add_argument("--ema-decay", type=float, default=0.999, help="the cap of the warmed-up EMA decay (1 + k) / (10 + k)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a shared 2-core machine)")
    parser.add_argument("--no-check", action="store_true", help="skip the sample check after training")
    parser.add_argument("--check-only", action="store_true", help="only check the teacher already at --output")
    parser.add_argument("--check-samples", type=int, default=500, help="samples per row of the check")
    args = parser.parse_args(argv)
    if args.iterations < 1 or args.batch_size < 1:
        parser.error("--iterations and --batch-size must be at least 1")
    if not args.learning_rate > 0:
        parser.error("--learning-rate must be positive")
    if not 0.0 <= args.ema_decay < 1.0:
        parser.error("--ema-decay must be in [0, 1)")
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    if args.check_samples < 10:
        parser.error("--check-samples must be at least 10 (one per class; a Frechet distance needs many more)")
    if args.check_only and args.no_check:
        parser.error("--check-only and --no-check exclude each other")
    if args.check_only and not (args.output / "tdm_family.json").is_file():
        parser.error(f"--check-only: no digits teacher at {args.output}; build it first (drop --check-only)")
    torch.set_num_threads(args.threads)
    if not args.check_only:
        start = time.time()
        out = train_teacher(args.output, args.iterations, args.batch_size, lr=args.learning_rate, seed=args.seed,
                            ema_decay=args.ema_decay)
        print(f"teacher written to {out} ({args.iterations} iterations, batch {args.batch_size}, "
              f"{time.time() - start:.0f} s, {args.threads} thread(s))")
    if not args.no_check:
        start = time.time()
        check_teacher(args.output, args.check_samples)
        print(f"[check] {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
