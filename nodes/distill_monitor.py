"""Watching a TDM Distill run: every few iterations (and at the end) the student's K-step samples on the fixed
probe (``tdm_core.progress``: probe noise, the first prompts) give "how far the student moved" from the
teacher's samples, and the first prompt's sample, decoded by ComfyUI's latent previewer, is the progress bar's
preview. The teacher's probe samples never change, so they are computed once per run."""
from __future__ import annotations

from typing import Optional

import torch

import latent_preview

from .core_import import fidelity, progress
from .distill_adapters import STUDENT

PREVIEW_FORMAT = "JPEG"  # what ComfyUI's sampler previews send
POINTS_PER_RUN = 20  # probe / preview points over a run
MAX_INTERVAL = 25  # at most this many iterations apart (500 iterations: every 25, about 2 % of the run's time)


def monitor_interval(iterations: int) -> int:
    return max(1, min(MAX_INTERVAL, iterations // POINTS_PER_RUN))


class Monitor:
    """The probe (the first prompts on the probe's fixed noise; the last point is the report's number), the
    per-step fidelity at the end (``tdm_core.fidelity``, as the trainer's final word) and the previewer (None when ComfyUI's preview method is 'none': no preview images, as for KSampler)."""

    def __init__(self, distiller, model, iterations: int):
        self.distiller = distiller
        self.interval = monitor_interval(iterations)
        self.iterations = iterations
        self.rows = list(range(min(progress.PROBE_SIZE, len(distiller.positives))))
        generator = torch.Generator().manual_seed(progress.PROBE_SEED)
        self.noise_cpu = torch.randn((len(self.rows), *distiller.latent_shape[1:]), generator=generator)
        self.previewer = latent_preview.get_previewer(distiller.device, model.model.latent_format)
        self.teacher: Optional[torch.Tensor] = None

    def due(self, iteration: int) -> bool:
        return iteration % self.interval == 0 or iteration == self.iterations

    def measure(self) -> tuple[float, torch.Tensor]:
        """``(change, student samples)`` now; the model must be loaded."""
        noise = self.noise_cpu.to(self.distiller.device)
        if self.teacher is None:
            self.teacher = self.distiller.k_step_samples(None, self.rows, noise)
        student = self.distiller.k_step_samples(STUDENT, self.rows, noise)
        return progress.relative_change(student, self.teacher), student

    def fidelity(self) -> list[dict]:
        """Per student step: the gap to the teacher's guided ODE from the probe's noise, the fake score's and the
        teacher's denoising error on the student's predictions, the DM-to-CFG ratio (tdm_core.fidelity)."""
        noise = self.noise_cpu.to(self.distiller.device)
        denoisers = self.distiller.iteration_denoisers(self.rows, noise)
        settings, schedule = self.distiller.options.settings(), self.distiller.schedule.schedule
        with torch.inference_mode(False), torch.no_grad():
            points = fidelity.teacher_ode_points(denoisers.teacher, noise, settings, schedule)
            return fidelity.step_fidelity(denoisers, noise, settings, schedule, points)

    def preview(self, samples: torch.Tensor):
        """ComfyUI's preview tuple of the first prompt's sample, or None without a previewer."""
        if self.previewer is None:
            return None
        return self.previewer.decode_latent_to_preview_image(PREVIEW_FORMAT, samples[:1])

    def observe(self, iteration: int, probes: list):
        """At a due iteration: append ``(iteration, change)`` to ``probes`` and return the preview (or None)."""
        if not self.due(iteration):
            return None
        change, samples = self.measure()
        probes.append((iteration, change))
        return self.preview(samples)
