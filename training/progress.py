"""How far the student has moved from the teacher, during a run and in its final word.

Two measures, both 0 for an untrained student (LoRA B = 0):
- ``lora_delta``: ``||delta W|| / ||W||`` over every layer the student's LoRA adapts (peft's own
  ``get_delta_weight``, so rank, alpha and conv shapes are peft's business);
- ``probe_change``: on a fixed probe (noise and prompts chosen once per run), the mean absolute change of
  the student's K-step samples from the teacher's own K-step samples on the same grid, relative to the
  teacher's mean absolute sample value. The teacher's K-step sampler is what the student starts as,
  so this is how much the LoRA changes what a user sees.

A run whose ``probe_change`` stays below ``BARELY_MOVED`` ends with a warning that names the flags to
change (issue: a default run that learns nothing must say so).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tdm_core import sample_tdm

from .models import STUDENT, use_adapter
from .steps_aware import num_steps

# probe_change below this: the LoRA does next to nothing. Measured at 500 steps (benchmarks/RESULTS_defaults.md):
# the defaults moved the shapes teacher's student 16 % and the digits teacher's 14-17 %; the old defaults
# (rank 32, lr 2e-5, cosine restarts, batch 1), which the issue found to learn nothing on an SD-style
# teacher, moved the shapes student 3.5 % (LoRA |dW|/|W| 9e-4); the tiny test teacher at lr 1e-9 stays
# below 0.1 % (tests/test_distill_run.py).
BARELY_MOVED = 0.05
PROBE_SEED = 4321  # its own generator: probing never changes the training draws
PROBE_SIZE = 4


def lora_delta(network: torch.nn.Module, adapter: str = STUDENT) -> float:
    """``sqrt(sum ||delta W||^2) / sqrt(sum ||W||^2)`` over the layers ``adapter`` adapts."""
    from peft.tuners.lora import LoraLayer

    delta_sq = base_sq = 0.0
    with torch.no_grad():
        for layer in network.modules():
            if isinstance(layer, LoraLayer) and adapter in layer.lora_A:
                delta_sq += float(layer.get_delta_weight(adapter).float().pow(2).sum())
                base_sq += float(layer.get_base_layer().weight.float().pow(2).sum())
    return (delta_sq / base_sq) ** 0.5 if base_sq > 0 else 0.0


@dataclass
class Probe:
    """Fixed noise and conditions, and the teacher's K-step samples from them."""

    noise: torch.Tensor
    cond: dict
    grid: list  # the exported LoRA's grid (steps-aware: the largest K's)
    teacher_samples: torch.Tensor

    @classmethod
    def build(cls, parts, cond: dict, latent_shape, grid: list) -> "Probe":
        batch = next(iter(cond.values())).shape[0]
        gen = torch.Generator().manual_seed(PROBE_SEED)
        noise = torch.randn((batch, *latent_shape[1:]), generator=gen).to(parts.accelerator.device)
        return cls(noise, cond, list(grid), _k_step_samples(parts, None, noise, cond, grid))

    def change(self, parts) -> float:
        student = _k_step_samples(parts, STUDENT, self.noise, self.cond, self.grid)
        return float((student - self.teacher_samples).abs().mean() / self.teacher_samples.abs().mean().clamp(min=1e-8))

    def measure(self, parts) -> dict:
        return {"probe_change": self.change(parts), "lora_delta": lora_delta(parts.family.network)}


def _k_step_samples(parts, adapter, noise, cond, grid) -> torch.Tensor:
    family = parts.family

    def denoise(x, t):
        with parts.precision.autocast():
            return family.denoise(x, t, cond).float()

    with torch.no_grad(), use_adapter(family.network, adapter), num_steps(family.network, len(grid)):
        return sample_tdm(denoise, noise, grid, family.schedule, family.prediction_type)


def trend(values: list[float]) -> tuple[float, float]:
    """Mean of the first and of the last tenth (at least one value each) of a loss curve."""
    n = max(1, len(values) // 10)
    return sum(values[:n]) / n, sum(values[-n:]) / n


def final_word(movement: dict, fake_losses: list[float], student_losses: list[float], cfg) -> tuple[str, bool]:
    """The run's closing summary and whether the student barely moved (then the text says what to change)."""
    fake_start, fake_end = trend(fake_losses)
    student_start, student_end = trend(student_losses)
    text = (f"student vs teacher: probe samples changed by {100 * movement['probe_change']:.1f}% "
            f"(LoRA |dW|/|W| = {movement['lora_delta']:.2e}); fake-score loss {fake_start:.4g} -> {fake_end:.4g}, "
            f"student loss {student_start:.4g} -> {student_end:.4g} (first vs last tenth of the run)")
    barely = movement["probe_change"] < BARELY_MOVED
    if barely:
        text += (f"\nwarning: the student barely moved from the teacher (probe change below {100 * BARELY_MOVED:.0f}%): "
                 f"this LoRA will do almost nothing. Raise --learning-rate (fake score {cfg.fake_lr():.2g}) and "
                 f"--student-learning-rate ({cfg.student_lr():.2g}), train longer (--max-train-steps "
                 f"{cfg.max_train_steps}), or raise --lora-alpha / --batch-size; the defaults are chosen to distil.")
    return text, barely
