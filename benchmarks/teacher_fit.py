"""The training loop the benchmark teacher scripts share (digits, shapes, flow and video teachers).

Each script builds its own networks and draws its own batches; :func:`fit` runs the rest the same way for all of
them: AdamW without weight decay, a learning-rate factor per step, the gradient norm clipped to 1, an EMA copy of
chosen modules and a progress line every ``log_every`` steps. :func:`fit_vae` is the VAE objective two of the
scripts share. The order of random draws is the scripts' own, so a seed gives the same teacher as before.
"""
from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F


def num_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1.0 - decay)


def ema_decay_at(step: int, decay: float) -> float:
    """Warmed-up EMA: at step k it averages over roughly the last k / 9 steps, so the random initialisation does
    not linger in it, up to the constant ``decay`` (0.999 binds after about 9,000 steps)."""
    return min(decay, (1.0 + step) / (10.0 + step))


def warmup_cosine(total: int, warmup: int, floor: float = 0.1) -> Callable[[int], float]:
    """Learning-rate factor: linear warm-up over ``warmup`` steps, then cosine decay to ``floor`` at ``total``."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def fit(params: Sequence[torch.nn.Parameter], step_loss: Callable[[int], tuple[torch.Tensor, dict[str, float]]],
        iterations: int, lr: float, lr_factor: Callable[[int], float], ema_of: Sequence[torch.nn.Module] = (),
        ema_decay: float = 0.999, name: str = "train", log_every: int = 250, log=print) -> list[torch.nn.Module]:
    """Runs ``iterations`` optimiser steps on ``step_loss(step) -> (loss, {label: value})``, which draws its own batch.

    Logs ``name``, the step and the mean of each value since the last line. Returns an EMA copy of each module
    in ``ema_of`` (frozen, eval mode), in that order; ``[]`` without any."""
    params = list(params)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    emas = [copy.deepcopy(m).requires_grad_(False) for m in ema_of]
    start, recent = time.perf_counter(), {}
    for step in range(iterations):
        loss, values = step_loss(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        for ema, model in zip(emas, ema_of):
            ema_update(ema, model, ema_decay_at(step, ema_decay))
        for label, value in values.items():
            recent.setdefault(label, []).append(value)
        if step % log_every == 0 or step == iterations - 1:
            shown = "  ".join(f"{label} {sum(v) / len(v):.5f}" for label, v in recent.items())
            log(f"  {name} {step + 1:5d}/{iterations}  {shown}  {time.perf_counter() - start:5.0f} s")
            recent = {}
    return [ema.eval() for ema in emas]


def fit_vae(vae, data: torch.Tensor, iterations: int, batch_size: int, generator: torch.Generator,
            sample_posterior: bool, lr: float = 2e-3, kl_weight: float = 1e-4, log_every: int = 250, log=print):
    """Trains ``vae`` on random batches of ``data``: MSE reconstruction + ``kl_weight`` x (per-element KL to N(0, I)),
    decoding a posterior sample (``sample_posterior``) or its mean; 50 warm-up steps, cosine to 0.1 x ``lr``.
    Returns the VAE frozen, in eval mode."""
    def step_loss(step: int):
        x = data[torch.randint(0, data.shape[0], (batch_size,), generator=generator)]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean
        if sample_posterior:
            z = z + posterior.std * torch.randn(z.shape, generator=generator)
        mse = F.mse_loss(vae.decode(z).sample, x)
        kl = posterior.kl().mean() / x[0].numel()
        return mse + kl_weight * kl, {"mse": mse.item(), "kl": kl.item()}

    fit(vae.parameters(), step_loss, iterations, lr, warmup_cosine(iterations, 50), name="vae", log_every=log_every, log=log)
    return vae.eval().requires_grad_(False)
