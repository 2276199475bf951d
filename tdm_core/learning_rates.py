"""The distillers' scale-free default learning rates (docs/training.md, "Why these defaults"), one place for
``training.config`` and the TDM Distill node.

AdamW moves each LoRA entry by about lr per step, so the relative change of W = W0 + (alpha / r) B A
grows like lr * alpha / sqrt(r); lr = C * sqrt(r) / alpha keeps it fixed. C = 4e-3 gives the fake score
1e-3 at rank = alpha = 16, the rate measured to distil (issue 9; today benchmarks/RESULTS_defaults.md); the student runs
at a fifth of it, the reference script's ratio (METHOD.md step 8).
"""
from __future__ import annotations

LR_PER_SQRT_RANK_OVER_ALPHA = 4e-3
FAKE_TO_STUDENT_LR = 5
ADAMW_BETAS = (0.0, 0.95)  # METHOD.md step 8, both optimisers
LR_WARMUP_STEPS = 10  # the learning rate rises linearly from 0 over these steps (diffusers' constant_with_warmup)


def default_fake_score_lr(rank: int, alpha: float) -> float:
    return LR_PER_SQRT_RANK_OVER_ALPHA * rank**0.5 / alpha


def default_student_lr(fake_score_lr: float) -> float:
    return fake_score_lr / FAKE_TO_STUDENT_LR


def warmup_factor(step: int, warmup_steps: int = LR_WARMUP_STEPS) -> float:
    """The learning-rate multiplier before optimiser step ``step`` (0-based): ``step / warmup_steps`` during
    the warm-up, then 1 (diffusers' constant_with_warmup, the trainer's default schedule)."""
    return step / max(1, warmup_steps) if step < warmup_steps else 1.0
