"""How far the student has moved from the teacher, during a run and in its final word.

Two measures, both 0 for an untrained student (LoRA B = 0):
- ``lora_delta``: ``||delta W|| / ||W||`` over every layer the student's LoRA adapts (peft's own
  ``get_delta_weight``, so rank, alpha and conv shapes are peft's business);
- ``probe_change``: on a fixed probe (noise and prompts chosen once per run), the mean absolute change of
  the student's K-step samples from the teacher's own K-step samples on the same grid, relative to the
  teacher's mean absolute sample value. The teacher's K-step sampler is what the student starts as,
  so this is how much the LoRA changes what a user sees.

A run whose ``probe_change`` stays below ``BARELY_MOVED`` ends with a warning that names the flags to
change (issue: a default run that learns nothing must say so). A run whose fake-score loss grows
``DIVERGED_GROWTH``-fold after the warm-up, or whose student LoRA reaches ``OUTGROWN_LORA`` times the weights it
adapts (``lora_delta``), is flagged on the progress line and in the final word, which names what to change
(issue 20: a diverging run summed up as a student that "moved 96 %"; the rules: ``tdm_core.progress``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tdm_core import sample_tdm
from tdm_core.fidelity import drifting_step, fidelity_table, step_fidelity, teacher_ode_points
from tdm_core.iteration import TDMSettings
from tdm_core.progress import (  # noqa: F401 (re-exported)
    BARELY_MOVED, DIVERGED_GROWTH, MIN_JUDGED_STEPS, PROBE_SEED, PROBE_SIZE, STUDENT_LORA, diverging, divergence_reasons, growth, relative_change, trend,
)

from .loop import denoisers
from .models import STUDENT, use_adapter
from .steps_aware import num_steps



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
    """Fixed noise and conditions, the teacher's K-step samples from them, and its guided ODE at the student's
    times (tdm_core.fidelity: neither changes during a run, so both are made once)."""

    noise: torch.Tensor
    cond: dict
    null_cond: dict
    grid: list  # the exported LoRA's grid (steps-aware: the largest K's)
    teacher_samples: torch.Tensor
    teacher_points: list

    @classmethod
    def build(cls, parts, cond: dict, null_cond: dict, latent_shape, grid: list) -> "Probe":
        batch = next(iter(cond.values())).shape[0]
        gen = torch.Generator().manual_seed(PROBE_SEED)
        noise = torch.randn((batch, *latent_shape[1:]), generator=gen).to(parts.accelerator.device)
        teacher = denoisers(parts, cond, null_cond).teacher
        with use_adapter(parts.family.network, None):
            points = teacher_ode_points(teacher, noise, _settings(parts, grid), parts.family.schedule)
        return cls(noise, cond, null_cond, list(grid), _k_step_samples(parts, None, noise, cond, grid), points)

    def change(self, parts) -> float:
        student = _k_step_samples(parts, STUDENT, self.noise, self.cond, self.grid)
        return relative_change(student, self.teacher_samples)

    def fidelity(self, parts) -> list[dict]:
        """Per student step (tdm_core.fidelity): how far the student's points are from the teacher's ODE, the fake
        score's and the teacher's denoising error on the student's predictions, the DM-to-CFG ratio."""
        with num_steps(parts.family.network, len(self.grid)):
            return step_fidelity(denoisers(parts, self.cond, self.null_cond), self.noise, _settings(parts, self.grid),
                                 parts.family.schedule, self.teacher_points)

    def measure(self, parts) -> dict:
        return {"probe_change": self.change(parts), "lora_delta": lora_delta(parts.family.network), "fidelity": self.fidelity(parts)}


def _settings(parts, grid: list) -> TDMSettings:
    return TDMSettings(grid=tuple(grid), prediction_type=parts.family.prediction_type, total_steps=parts.total_steps,
                       cfg_scale=parts.cfg_scale)


def _k_step_samples(parts, adapter, noise, cond, grid) -> torch.Tensor:
    family = parts.family

    def denoise(x, t):
        with parts.precision.autocast():
            return family.denoise(x, t, cond).float()

    with torch.no_grad(), use_adapter(family.network, adapter), num_steps(family.network, len(grid)):
        return sample_tdm(denoise, noise, grid, family.schedule, family.prediction_type)




class LossWatch:
    """The run's losses so far, for the progress line: its fields, with ``diverging`` once a loss has grown."""

    def __init__(self, warmup_steps: int):
        self.warmup_steps, self.losses = warmup_steps, {"fake-score": []}

    def postfix(self, metrics: dict, movement: dict) -> dict[str, str]:
        """Records this step's losses; the progress bar's fields."""
        self.losses["fake-score"].append(metrics["loss_fake"])
        fields = {"fake": f"{metrics['loss_fake']:.4g}", "student": f"{metrics['loss_student']:.4g}"}
        if movement:
            fields["moved"] = f"{100 * movement['probe_change']:.1f}%"
        grown = diverging(self.losses, self.warmup_steps, movement.get("lora_delta") if movement else None)
        if grown:
            fields["diverging"] = ", ".join(f"student LoRA {g:.3g}x its weights" if name == STUDENT_LORA else f"{name} loss x{g:.3g}"
                                            for name, g in grown.items())
        return fields


def divergence_warning(grown: dict[str, float], cfg) -> str:
    growth_is = (f" (a loss's growth: the mean of the last tenth of the run against the first tenth after the "
                 f"{cfg.lr_warmup_steps} warm-up steps)" if set(grown) - {STUDENT_LORA} else "")
    return (f"\nwarning: the run diverged: {divergence_reasons(grown)}{growth_is}. Its LoRA is "
            f"likely worse than an earlier one. Lower --learning-rate (fake score {cfg.fake_lr():.2g}) and "
            f"--student-learning-rate ({cfg.student_lr():.2g}); check --gradient-checkpointing and --mixed-precision "
            f"(a few hundred steps without them should not grow); or resume from an earlier checkpoint (delete the "
            f"later ones under the run's checkpoints folder, then --resume) with lower rates.")


def fidelity_text(steps: list[dict]) -> str:
    """The per-step fidelity table of the run's final word, with the step whose gap to the teacher grows most."""
    text = ("\nper step, on the probe (tdm_core.fidelity): the student's point after each step vs the teacher's guided ODE "
            "from the same noise (paired / per-channel moments, relative), the fake score's and the teacher's denoising "
            "error on the student's prediction, and the distribution-matching to guidance ratio:\n" + fidelity_table(steps))
    worst = drifting_step(steps)
    if worst is not None:
        text += f"\nthe gap to the teacher grows most at step {worst} of {len(steps)}"
    return text


def final_word(movement: dict, fake_losses: list[float], student_losses: list[float], cfg) -> tuple[str, bool, bool]:
    """The run's closing summary, whether the student barely moved and whether the run diverged (the text then
    says what to change)."""
    fake_start, fake_end = trend(fake_losses)
    student_start, student_end = trend(student_losses)
    text = (f"student vs teacher: probe samples changed by {100 * movement['probe_change']:.1f}% "
            f"(LoRA |dW|/|W| = {movement['lora_delta']:.2e}); fake-score loss {fake_start:.4g} -> {fake_end:.4g}, "
            f"student loss {student_start:.4g} -> {student_end:.4g} (first vs last tenth of the run)")
    if movement.get("fidelity"):
        text += fidelity_text(movement["fidelity"])
    barely = movement["probe_change"] < BARELY_MOVED
    if barely:
        text += (f"\nwarning: the student barely moved from the teacher (probe change below {100 * BARELY_MOVED:.0f}%): "
                 f"this LoRA will do almost nothing. Raise --learning-rate (fake score {cfg.fake_lr():.2g}) and "
                 f"--student-learning-rate ({cfg.student_lr():.2g}), train longer (--max-train-steps "
                 f"{cfg.max_train_steps}), or raise --lora-alpha / --batch-size; the defaults are chosen to distil.")
    grown = diverging({"fake-score": fake_losses}, cfg.lr_warmup_steps, movement["lora_delta"])
    if grown:
        text += divergence_warning(grown, cfg)
    return text, barely, bool(grown)
