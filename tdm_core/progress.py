"""How far a student moved from its teacher, and whether its losses diverged: the measures and thresholds both
distillers report with (``training.progress``, the TDM Distill node).

``probe_change``: on a fixed probe (noise and prompts chosen once per run), the mean absolute change of the
student's K-step samples from the teacher's own K-step samples on the same grid, relative to the teacher's
mean absolute sample value.
"""
from __future__ import annotations

import torch

# probe_change below this: the LoRA does next to nothing. Measured at 500 steps (benchmarks/RESULTS_defaults.md):
# the defaults moved the shapes teacher's student 16 % and the digits teacher's 14-17 %; the old defaults
# (rank 32, lr 2e-5, cosine restarts, batch 1), which the issue found to learn nothing on an SD-style
# teacher, moved the shapes student 3.5 % (LoRA |dW|/|W| 9e-4); the tiny test teacher at lr 1e-9 stays
# below 0.1 % (tests/test_distill_run.py).
BARELY_MOVED = 0.05
PROBE_SEED = 4321  # its own generator: probing never changes the training draws
PROBE_SIZE = 4


def relative_change(student: torch.Tensor, teacher: torch.Tensor) -> float:
    """``mean |student - teacher| / mean |teacher|`` of two batches of K-step samples."""
    return float((student - teacher).abs().mean() / teacher.abs().mean().clamp(min=1e-8))


def trend(values: list[float]) -> tuple[float, float]:
    """Mean of the first and of the last tenth (at least one value each) of a loss curve."""
    n = max(1, len(values) // 10)
    return sum(values[:n]) / n, sum(values[-n:]) / n


# A loss whose last tenth averages DIVERGED_GROWTH times its first tenth after the warm-up marks a diverging run.
# The fake-score loss is the one that shows it: the run (--gradient-checkpointing training the fake score
# through the student's adapter, an SD1.5-style teacher, 500 steps) went 0.04 -> 1.35, 34x, while healthy runs
# stay flat: 0.9-1.7x on the tiny test teacher at 30-100 steps, at the default rates and at 25-500x them.
# The student loss starts near 0 by design (the fake score starts as the teacher) and rises as the fake score
# learns the student: 3.7x in a healthy 40-step tiny run, 6.9x at 100 steps; 12x at 80 steps and 14x at 100 with
# the student rate at 500x the default, 0.1 (its LoRA ends 11x the norm of the weights it adapts). Under the
# squared L2 distance (the default since issue 22) the student loss tells them apart no more: 44x in a healthy
# 40-step tiny run, 16x at 80 steps, 14x at 80 steps with the student rate at 0.1. What tells them apart is the
# student's LoRA itself, |dW|/|W| over the layers it adapts: 0.012 and 0.021 in those healthy tiny runs, 0.048-0.108
# after 1000 steps on the benchmark teachers (digits 0.048, flow 0.066-0.069, shapes 0.078, video 0.108), 17 at the
# rate 0.1 (9.0 with the old defaults). So a run diverged
# when its fake-score loss grew DIVERGED_GROWTH-fold or its student's LoRA reached OUTGROWN_LORA times the norm
# of the weights it adapts. Neither rule sees a run that blows up inside the warm-up (the digits teacher at 125x
# the student rate: fake-score loss 0.014 -> 2.4 by step 5): its loss is high from the first judged step on.
DIVERGED_GROWTH = {"fake-score": 5.0}
OUTGROWN_LORA = 1.0
STUDENT_LORA = "student LoRA"  # the name of that sign among diverging()'s
MIN_JUDGED_STEPS = 20  # logged steps after the warm-up before a trend is judged (two a tenth)


def growth(values: list[float], warmup_steps: int) -> float | None:
    """How many times the last tenth's mean loss is the first tenth's, counted after the warm-up (whose losses
    follow a learning rate still rising); None while too few steps are logged to judge."""
    judged = values[warmup_steps:]
    if len(judged) < MIN_JUDGED_STEPS:
        return None
    start, end = trend(judged)
    return end / start if start > 0 else float("inf")


def diverging(losses: dict[str, list[float]], warmup_steps: int, lora_delta: float | None = None) -> dict[str, float]:
    """The signs of a diverging run: ``{name: growth}`` of each loss curve with a ``DIVERGED_GROWTH`` that grew at
    least that many-fold, and ``{STUDENT_LORA: lora_delta}`` when the student's LoRA (``|dW| / |W|``, where known)
    is at least ``OUTGROWN_LORA``."""
    unknown = set(losses) - set(DIVERGED_GROWTH)
    if unknown:
        raise ValueError(f"no divergence rule for the losses {sorted(unknown)}: judged are {sorted(DIVERGED_GROWTH)}")
    grown = {name: growth(values, warmup_steps) for name, values in losses.items()}
    signs = {name: g for name, g in grown.items() if g is not None and g >= DIVERGED_GROWTH[name]}
    if lora_delta is not None and lora_delta >= OUTGROWN_LORA:
        signs[STUDENT_LORA] = lora_delta
    return signs


def divergence_reasons(signs: dict[str, float]) -> str:
    """``diverging()``'s signs in words, each with the limit healthy runs stay below."""
    return " and ".join(
        f"the student's LoRA is {value:.3g}x the norm of the weights it adapts (|dW|/|W|; healthy runs stay below {OUTGROWN_LORA:g})"
        if name == STUDENT_LORA else f"the {name} loss grew {value:.3g}x (healthy runs stay below {DIVERGED_GROWTH[name]:g}x)"
        for name, value in signs.items())
