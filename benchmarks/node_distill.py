"""``benchmarks.defaults --host comfyui``: the benchmark teacher loaded as a ComfyUI MODEL
(:mod:`benchmarks.comfy_teacher`) and distilled by the TDM Distill node's own code, in process.

The run is the node's ``Distiller`` (``nodes/distill.py``: what ``nodes/distill_run.distill`` loops over) with
``DistillOptions`` at its defaults except ``batch_size`` = 8 (the trainer's; the node's default is 4) and ``cfg``
= the teacher's benchmark CFG; the iteration loop is driven here instead of by ``distill()`` so the student's
LoRA (``adapters.lora_state``, exactly what ``distill()`` writes) is kept at each checkpoint of one run (the
node writes only its final LoRA; with the constant schedule after warm-up, step n of a longer run is the
n-step run, as for the trainer's checkpoints). Same prompts file as the trainer's run, prompts encoded by
the teacher's own text encoder (:func:`benchmarks.comfy_teacher.conditionings`).

Scoring: the node's LoRA (ComfyUI keys) becomes the trainer's PEFT adapter state
(:func:`benchmarks.comfy_teacher.peft_state_from_comfy_lora`) and goes through the evaluator the headless rows
use, same sampler, noise and prompts. :func:`sampling_paths_difference` checks that this measures the node's
student: the teacher MODEL with the node's LoRA applied by ComfyUI (``comfy.sd.load_lora_for_models``, what
LoraLoader and the node's MODEL output do) sampled through ComfyUI against the diffusers student, one batch.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from benchmarks import comfy_teacher
from tdm_core.atomic import write_text_atomic

BATCH_SIZE = 8  # the trainer's default (training.config); the node's own default is 4


def node_options(cfg: float, seed: int, iterations: int):
    distill = comfy_teacher.pack_module("distill")
    return distill.DistillOptions(iterations=iterations, cfg=cfg, batch_size=BATCH_SIZE, seed=seed)


def distil(evaluator, cfg: float, folder: Path, seed: int, checkpoints: tuple, log=print) -> Path:
    """One node run of ``max(checkpoints)`` iterations; the student LoRA at each checkpoint goes to
    ``folder/student_<n>.safetensors`` and the run's record to ``folder/summary.json``. Returns ``folder``."""
    from tdm_core.lora_files import write_lora_file
    from training.config import read_prompts  # the trainer's own reading of the prompts file

    if (folder / "summary.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    distill = comfy_teacher.pack_module("distill")
    patcher, _ = comfy_teacher.load_teacher(evaluator.family, Path(evaluator.model_dir))
    positives, negative = comfy_teacher.teacher_conditionings(evaluator.family, read_prompts(str(evaluator.prompts_file(folder))))
    options = node_options(cfg, seed, max(checkpoints))
    distiller = distill.Distiller(patcher, positives, negative, evaluator.family.latent_shape(1), options)
    history, started = [], time.time()
    try:
        for number in range(1, options.iterations + 1):
            history.append(distiller.iterate())
            if number in checkpoints:
                write_lora_file(distiller.adapters.lora_state(distill.STUDENT), folder / f"student_{number}.safetensors")
            if number % 25 == 0 or number == options.iterations:
                log(f"node seed {seed}: iteration {number}/{options.iterations}, {time.time() - started:.0f} s, "
                    f"losses {history[-1]['loss_fake']:.4g} / {history[-1]['loss_student']:.4g}")
        # the node's own "how far the student moved" (nodes/distill_monitor: the probe's K-step samples vs the teacher's)
        change = comfy_teacher.pack_module("distill_monitor").Monitor(distiller, patcher, options.iterations).measure()[0]
    finally:
        distiller.release()
    summary = {"probe_change": change, "seconds": time.time() - started, "options": repr(options), "history": history}
    write_text_atomic(folder / "summary.json", json.dumps(summary))
    return folder


def run_summary(folder: Path) -> dict:
    """The run's probe change and wall time (its per-iteration losses stay in ``summary.json``)."""
    summary = json.loads((folder / "summary.json").read_text())
    return {"probe_change": summary["probe_change"], "seconds": summary["seconds"]}


def student_lora(folder: Path, step: int) -> dict:
    from tdm_core.lora_files import read_lora_file

    return read_lora_file(str(folder / f"student_{step}.safetensors"))[0]


def adapter_state(folder: Path, step: int, evaluator) -> dict:
    """The step-``step`` node student as the trainer's PEFT adapter state (the evaluator's input)."""
    from benchmarks.defaults_eval import _default_rank_alpha

    _, to_peft = comfy_teacher.load_teacher(evaluator.family, Path(evaluator.model_dir))
    return to_peft(student_lora(folder, step), _default_rank_alpha()[1])


@torch.no_grad()
def comfy_student_latents(patcher, lora: dict, positives: list, noise: torch.Tensor, grid: list[int]) -> torch.Tensor:
    """K-step latents of ``patcher`` with ``lora`` applied by ComfyUI's LoRA loader, the model called through
    ComfyUI's ``calc_cond_batch`` (the node's ``model_x0``), on the TDM sampler at CFG 1."""
    import comfy.model_management
    import comfy.sd

    from tdm_core import sample_tdm

    conditions, model, schedules = (comfy_teacher.pack_module(n) for n in ("distill_conditions", "distill_model", "distill_schedule"))
    student = comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0)[0]
    comfy.model_management.load_models_gpu([student], force_full_load=True)
    student.pre_run()
    schedule = schedules.schedule_of(student)
    batch = conditions.batch_conditioning(positives, list(range(len(positives))))
    conds = conditions.processed_conds(student, {"positive": batch}, torch.zeros_like(noise), 0)
    denoise = lambda x_t, t: model.model_x0(student, schedule, [conds["positive"]], x_t, t)[0]  # noqa: E731
    try:
        return sample_tdm(denoise, noise, grid, schedule.schedule, schedules.PREDICTION_TYPE)
    finally:
        comfy.model_management.unload_all_models()


@torch.no_grad()
def sampling_paths_difference(evaluator, lora: dict, adapter: dict, grid: list[int], num: int = 16) -> dict:
    """The node's student sampled in ComfyUI (``lora`` loaded by ComfyUI's LoRA loader) against the evaluator's
    diffusers student (``adapter``) and, for scale, against the teacher sampled the same way in ComfyUI (no
    LoRA): largest |latent difference| / largest |latent|, same noise and prompts."""
    from benchmarks.defaults_eval import _default_rank_alpha
    from benchmarks.sampling import load_student_state
    from benchmarks.text_sampling import noise_for, prompt_denoiser
    from tdm_core import sample_tdm
    from training.models import STUDENT, use_adapter

    family = evaluator.family
    prompts = evaluator.prompts[:num]
    noise = noise_for(family, num, 1000)
    patcher, _ = comfy_teacher.load_teacher(family, Path(evaluator.model_dir))
    positives, _ = comfy_teacher.teacher_conditionings(family, prompts)
    ours = comfy_student_latents(patcher, lora, positives, noise, grid)
    teacher = comfy_student_latents(patcher, {}, positives, noise, grid)
    rank, alpha = _default_rank_alpha()
    load_student_state(family, adapter, rank, alpha)
    with use_adapter(family.network, STUDENT):
        theirs = sample_tdm(prompt_denoiser(family, prompts, 1.0), noise, grid, family.schedule, family.prediction_type)
    scale = theirs.abs().max()
    return {"vs_diffusers_student": float((ours - theirs).abs().max() / scale), "vs_teacher": float((ours - teacher).abs().max() / scale)}
