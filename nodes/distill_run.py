"""The TDM Distill node's run: the iterations (progress bar with the student's preview, Cancel between
iterations, checkpoints and resume), the student's LoRA written to ``models/loras`` with TDM metadata
(atomically), the teacher with that LoRA applied, a loss plot and a report that says plainly when the student
did not learn."""
from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

import comfy.model_management
import comfy.sd
import comfy.utils
import folder_paths

from .comfy_sigmas import TDM_INFO_ATTACHMENT
from .core_import import TDMInfo, fidelity, learning_rates, lora_files, progress
from . import distill_checkpoint
from .distill import Distiller, DistillOptions
from .distill_adapters import FAKE_SCORE, STUDENT, lora_delta
from .distill_experts import low_noise_suffix
from .distill_checkpoint import Checkpoints, RunState, checkpoint_path, start_or_resume
from .distill_fingerprint import run_fingerprint
from .distill_monitor import Monitor
from .distill_schedule import prediction_type_of
from .lora_apply import family_of
from .loss_plot import as_comfy_image, loss_plot

LORA_EXTENSION = ".safetensors"
DEFAULT_CHECKPOINT_EVERY = 50


@dataclass
class DistillResult:
    model: object  # the teacher with the student LoRA applied
    lora: dict  # the student LoRA as a LORA_MODEL (stock SaveLoRA's input)
    path: str  # where the LoRA file was written
    report: str
    plot: torch.Tensor  # IMAGE [1, H, W, 3]: losses and how far the student moved
    history: list  # one metrics dict per iteration (a resumed run: the checkpoint's, then its own)
    fake_score: dict  # the fake score's LoRA at the end, in the LORA_MODEL layout (not written: it only serves training)
    probes: list  # [(iteration, how far the student moved)]
    low_noise_model: object = None  # two experts: the low-noise expert with its student LoRA
    low_noise_lora: Optional[dict] = None  # and that LoRA (written beside the first, "<lora_name>_low_noise")
    low_noise_path: str = ""


def lora_stem(lora_name: str) -> str:
    """``lora_name`` without surrounding blanks and without ``.safetensors``."""
    name = lora_name.strip()
    return name[: -len(LORA_EXTENSION)] if name.endswith(LORA_EXTENSION) else name


def lora_path(lora_name: str) -> str:
    """``models/loras/<lora_name>.safetensors`` (the first loras folder ComfyUI lists)."""
    name = lora_stem(lora_name)
    if not name or name.startswith(".") or os.sep in name or (os.altsep and os.altsep in name):
        raise ValueError(f"lora_name {lora_name!r} must be a plain file name (no folders, not hidden), e.g. tdm_student")
    return os.path.join(folder_paths.get_folder_paths("loras")[0], name + LORA_EXTENSION)


def tdm_info(model, distiller: Distiller, iterations: int) -> TDMInfo:
    options, schedule = distiller.options, distiller.schedule
    return TDMInfo(num_steps=options.steps, grid=options.grid(), total_steps=options.total_steps, num_timesteps=schedule.num_timesteps,
                   prediction_type=prediction_type_of(model), base_family=family_of(model),
                   teacher_cfg=options.cfg, distance=options.distance, lora_rank=options.rank, lora_alpha=options.lora_alpha(),
                   recommended_strength=1.0, training_steps=iterations,
                   flow_shift=float(schedule.schedule.shift) if schedule.flow else None)


def write_lora(state: dict, path: str, info: TDMInfo) -> str:
    return lora_files.write_lora_file(state, path, info.to_safetensors_metadata())


def check_finite(metrics: dict, iteration_number: int) -> None:
    for key in ("loss_fake", "loss_student"):
        if not math.isfinite(metrics[key]):
            raise ValueError(f"the {key[5:]} loss became {metrics[key]} at iteration {iteration_number}: lower the learning rates "
                             "(or keep the model in fp32) and queue again")


def report(history: list[dict], change: float, options: DistillOptions, path: str, steps: list[dict], delta: float | None = None) -> str:
    rates = options.rates()
    fake_start, fake_end = progress.trend([m["loss_fake"] for m in history])
    student_start, student_end = progress.trend([m["loss_student"] for m in history])
    text = (f"TDM Distill: {len(history)} iterations, K={options.steps}, cfg {options.cfg:g}, LoRA rank {options.rank}, "
            f"learning rates fake score {rates['fake_score']:.3g} / student {rates['student']:.3g}, batch {options.batch_size}.\n"
            f"student vs teacher: {options.steps}-step samples changed by {100 * change:.1f}%; fake-score loss {fake_start:.4g} -> "
            f"{fake_end:.4g}, student loss {student_start:.4g} -> {student_end:.4g} (first vs last tenth)"
            + (f"; LoRA |dW|/|W| = {delta:.2e}" if delta is not None else "") + f".\nLoRA: {path}")
    text += ("\nPer student step on the probe: its point vs the teacher's guided ODE from the same noise (paired, moments), "
             "the fake score's vs the teacher's denoising error, distribution matching vs guidance:\n" + fidelity.fidelity_table(steps))
    worst = fidelity.drifting_step(steps)
    if worst is not None:
        text += f"\nThe gap to the teacher grows most at step {worst} of {len(steps)}."
    grown = progress.diverging({"fake-score": [m["loss_fake"] for m in history]}, learning_rates.LR_WARMUP_STEPS, delta)
    if grown:  # the trainer's rule (tdm_core.progress): the fake-score loss grew several-fold, or the student's LoRA outgrew its weights
        text += f"\nWARNING: the run diverged: {progress.divergence_reasons(grown)}. Lower the learning rates and queue again."
    if change < progress.BARELY_MOVED:
        text += (f"\nWARNING: the student did not learn: its samples moved less than {100 * progress.BARELY_MOVED:.0f}% from the "
                 "teacher's, so this LoRA will do almost nothing. Raise iterations, the learning rates or the batch size.")
    return text


@contextlib.contextmanager
def saved_on_cancel(store: Checkpoints, distiller: Distiller, state: RunState) -> Iterator[None]:
    """Around the two places Cancel can come between iterations: the node's own check and the progress bar's
    update (the server's progress hook raises the interrupt itself: main.py's hook calls
    ``throw_exception_if_processing_interrupted``). The state after the last whole iteration is saved (one file
    write, cheap beside an iteration) before the interrupt goes up to the executor."""
    try:
        yield
    except comfy.model_management.InterruptProcessingException:
        store.save(distiller, state)
        raise


def train(distiller: Distiller, options: DistillOptions, store: Checkpoints, monitor: Monitor, state: RunState) -> float:
    """The iterations from ``state`` on; returns the last probe (how far the student moved)."""
    bar = comfy.utils.ProgressBar(options.iterations)
    if state.iteration:
        bar.update_absolute(state.iteration)
    for number in range(state.iteration + 1, options.iterations + 1):
        with saved_on_cancel(store, distiller, state):
            comfy.model_management.throw_exception_if_processing_interrupted()
        metrics = distiller.iterate()
        check_finite(metrics, number)
        state.history.append(metrics)
        state.iteration = number
        preview = monitor.observe(number, state.probes)
        if store.due(number, options.iterations):
            store.save(distiller, state)
        with saved_on_cancel(store, distiller, state):
            bar.update_absolute(number, options.iterations, preview)
    if not state.probes or state.probes[-1][0] != options.iterations:  # e.g. resumed at the end
        state.probes.append((options.iterations, monitor.measure()[0]))
    return state.probes[-1][1]


def distill(model, positives: list, negative, latent: dict, options: DistillOptions, lora_name: str,
            checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY, low_noise_model=None) -> DistillResult:
    """Distil ``model`` into a K-step student LoRA (with ``low_noise_model``: two experts, one LoRA each,
    ``distill_experts``). Cancel stops between iterations and keeps a checkpoint (``distill_checkpoint``); the
    same inputs queued again resume from it; a finished run deletes it."""
    path = lora_path(lora_name)
    low_path = lora_path(low_noise_suffix(lora_stem(lora_name))) if low_noise_model is not None else ""
    distiller = Distiller(model, positives, negative, latent["samples"].shape, options, low_noise_model)
    fingerprint = run_fingerprint(model, positives, negative, distiller.latent_shape, options, low_noise_model)
    store = Checkpoints(checkpoint_path(path), fingerprint, checkpoint_every)
    try:
        state, note = start_or_resume(distiller, store, options.iterations)
        if note:
            logging.info("TDM Distill: %s", note)
        monitor = Monitor(distiller, model, options.iterations)
        change = train(distiller, options, store, monitor, state)
        steps = monitor.fidelity()
    finally:
        distiller.release()
    students = []
    for expert_model, lora, lora_file in zip((model, low_noise_model), distiller.adapters.lora_states(STUDENT), (path, low_path)):
        info = tdm_info(expert_model, distiller, options.iterations)
        write_lora(lora, lora_file, info)
        student_model = comfy.sd.load_lora_for_models(expert_model, None, lora, 1.0, 0)[0]
        student_model.set_attachments(TDM_INFO_ATTACHMENT, info)  # TDM KSampler / Scheduler grid "auto" read it, as after TDM LoRA Loader
        students.append((student_model, lora))
    distill_checkpoint.remove(store.path)  # finished: the same inputs queued again train afresh
    delta = lora_delta([(lora, expert_model) for expert_model, (_, lora) in zip((model, low_noise_model), students)])
    text = report(state.history, change, options, path + (f" and {low_path} (low-noise expert)" if low_path else ""), steps, delta)
    plot = as_comfy_image(loss_plot(state.history, state.probes))
    (student_model, lora), low = students[0], (students[1] if len(students) > 1 else (None, None))
    return DistillResult(student_model, lora, path, (note + "\n" + text) if note else text, plot, state.history,
                         distiller.adapters.lora_state(FAKE_SCORE), state.probes, low[0], low[1], low_path)
