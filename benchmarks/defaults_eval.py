"""The evaluators of ``benchmarks.defaults``: one per benchmark teacher, each scoring teacher rows and
student checkpoints with that teacher's own domain feature net."""
from __future__ import annotations

from pathlib import Path

from tdm_core import reference_grid
from training.config import DistillConfig


def _default_rank_alpha() -> tuple[int, float]:
    defaults = DistillConfig()
    return defaults.lora_rank, defaults.alpha()


class DigitsEvaluator:
    """benchmarks.run_all's digits evaluator (FD in the digits classifier's features, class accuracy)."""

    def __init__(self, num_eval: int, seeds: tuple, cfg: float):
        from benchmarks.demo import TEACHER_DIR
        from benchmarks.run_all import Evaluator, Plan

        self.model_dir, self.cfg = TEACHER_DIR, cfg
        self.inner = Evaluator(Plan(num_eval=num_eval, eval_seeds=seeds), TEACHER_DIR)

    def prompts_file(self, folder: Path) -> Path:
        path = folder / "prompts.txt"
        path.write_text("".join(f"{c}\n" for c in range(10)))
        return path

    def student_grid(self, k: int) -> list[int]:
        return reference_grid(k, DistillConfig().total_steps)

    def teacher_row(self, steps: int) -> dict:
        return self.inner.teacher_row(steps, self.cfg)

    def student_row(self, adapter_state: dict, grid: list[int]) -> dict:
        rank, alpha = _default_rank_alpha()
        return self.inner.student_row(None, self.cfg, adapter_state=adapter_state, rank=rank, alpha=alpha, grid=grid)
