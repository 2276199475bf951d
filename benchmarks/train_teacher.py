"""Trains the digits teacher and writes it as a diffusers-style folder.

    python -m benchmarks.train_teacher [--output benchmarks/assets/digits_teacher] [--iterations 1000]

DDPM eps-prediction with linear betas (1e-4..0.02, 1000 steps), class-conditional through
cross-attention, 10% condition dropout to the null class for classifier-free guidance, EMA
weights saved. Deterministic for a given seed and thread count; a few minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from benchmarks.digits_data import load_digits_split
from tdm_core.schedules import expand_like
from training.families import digits

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "assets" / "digits_teacher"


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


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1.0 - decay)


def save_teacher(output: Path, unet, table: torch.nn.Embedding) -> None:
    """Writes the folder under a temporary name beside ``output``, then swaps it in."""
    from safetensors.torch import save_file

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}-", dir=output.parent))
    unet.save_pretrained(tmp / "unet", safe_serialization=True)
    (tmp / "scheduler").mkdir()
    (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(digits.SCHEDULER_CONFIG, indent=2) + "\n")
    save_file({digits.EMBEDDINGS_KEY: table.weight.detach().contiguous()}, str(tmp / digits.EMBEDDINGS_FILE))
    (tmp / "tdm_family.json").write_text(json.dumps({"family": digits.FAMILY_NAME}) + "\n")
    if output.exists():
        old = output.with_name(f".{output.name}-old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(output, old)
        os.replace(tmp, output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, output)


def train_teacher(output: Path, iterations: int, batch_size: int = 64, lr: float = 2e-3, seed: int = 0,
                  ema_decay: float = 0.995, cond_drop: float = 0.1, progress: bool = True) -> Path:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images, labels = load_digits_split("train")
    unet = digits.build_unet()
    table = torch.nn.Embedding(digits.NUM_CLASSES + 1, digits.EMBED_DIM)
    torch.nn.init.normal_(table.weight, std=1.0)
    schedule = digits.schedule_from_config(digits.SCHEDULER_CONFIG)
    params = list(unet.parameters()) + list(table.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / 100))  # short warm-up
    ema_unet, ema_table = copy.deepcopy(unet), copy.deepcopy(table)
    bar = tqdm(range(iterations), desc="teacher", disable=not progress)
    for step in bar:
        idx = torch.randint(0, images.shape[0], (batch_size,), generator=generator)
        loss = ddpm_loss(unet, table, images[idx], drop_conditions(labels[idx], cond_drop, generator), schedule, generator)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        # the EMA starts late so that the random initialisation does not linger in it
        decay = ema_decay if step > iterations // 5 else 0.0
        ema_update(ema_unet, unet, decay)
        ema_update(ema_table, table, decay)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    save_teacher(output, ema_unet, ema_table)
    return output


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a shared 2-core machine)")
    args = parser.parse_args(argv)
    if args.iterations < 1 or args.batch_size < 1:
        parser.error("--iterations and --batch-size must be at least 1")
    torch.set_num_threads(args.threads)
    out = train_teacher(args.output, args.iterations, args.batch_size, seed=args.seed)
    print(f"teacher written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
