"""How far a student moved from its teacher: the measure and threshold both distillers report with
(``training.progress``, the TDM Distill node).

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
