"""The trainer's side of one TDM iteration: ``tdm_core.iteration`` over PEFT-backed denoisers.

The student and the fake score are two LoRA adapters on one frozen base; the teacher is the base
with adapters off (``training.models.use_adapter``, O(1) per switch). This module supplies the three
denoisers (for any row slice of the batch: gradient accumulation runs the network calls in chunks of
``micro_batch`` rows), the backward of each chunk's loss under its own adapter, the optimiser steps (data
parallel averaging, clipping, fp16 loss scaling) and the metrics; the method itself (roll-out, draws,
losses, chunking) lives in ``tdm_core.iteration``. Under FSDP2
(``training.sharding``) the same steps run on the sharded parameters.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from tdm_core.iteration import DEFAULT_FAKE_SCORE_ROLLOUTS, DEFAULT_FAKE_SCORE_UPDATES, DEFAULT_FAKE_SCORE_WEIGHTING, TDMDenoisers, TDMSettings, TDMUpdates, randn_on, tdm_iteration as core_iteration
from tdm_core.optimiser import clip_and_step

from .errors import NonFiniteLoss
from .families.base import cat_conditions, select_condition
from .models import FAKE_SCORE, STUDENT, use_adapter
from .precision import Precision
from .sharding import replicated

@dataclass
class LoopParts:
    """What one iteration needs; built once by ``training.distill``."""

    family: object  # a training.families.base.ModelFamily
    accelerator: object  # accelerate.Accelerator (mixed_precision "no": training.precision owns it)
    precision: Precision
    grid: list[int]
    total_steps: int
    cfg_scale: float
    distance: str
    huber_c: Optional[float]
    interval_mode: str
    randmid: bool
    max_grad_norm: float
    generator: torch.Generator  # every random draw of the run; its state is checkpointed
    fake_score_weighting: str = DEFAULT_FAKE_SCORE_WEIGHTING  # tdm_core.training.fake_score_weight
    fake_score_updates: int = DEFAULT_FAKE_SCORE_UPDATES  # tdm_core.iteration.TDMSettings.fake_score_updates
    fake_score_rollouts: str = DEFAULT_FAKE_SCORE_ROLLOUTS  # tdm_core.iteration.TDMSettings.fake_score_rollouts
    batch_cfg: bool = True  # teacher cond + uncond in one forward at 2B (False: two at B, less memory)
    params: dict = field(default_factory=dict)  # adapter name -> list of its trainable parameters
    optimizers: dict = field(default_factory=dict)  # adapter name -> (accelerate-wrapped) optimiser
    schedulers: dict = field(default_factory=dict)  # adapter name -> LR scheduler
    scalers: dict = field(default_factory=dict)  # adapter name -> fp16 GradScaler (empty otherwise)
    sharding: Optional[object] = None  # training.sharding.Sharding under FSDP2, None for data parallelism
    student_ema: Optional[object] = None  # training.ema: the average of the student's weights (--student-ema), None when off
    micro_batch: Optional[int] = None  # rows per network call (--batch-size); None: the whole batch at once

    def settings(self) -> TDMSettings:
        # the grid may change per batch (steps-aware), so the settings are made per iteration
        return TDMSettings(grid=tuple(self.grid), prediction_type=self.family.prediction_type, total_steps=self.total_steps,
                           cfg_scale=self.cfg_scale, distance=self.distance, huber_c=self.huber_c,
                           interval_mode=self.interval_mode, randmid=self.randmid, fake_score_weighting=self.fake_score_weighting,
                           fake_score_updates=self.fake_score_updates, fake_score_rollouts=self.fake_score_rollouts)


def network_output(parts: LoopParts, adapter: Optional[str], x_t: Tensor, t: Tensor, cond: dict) -> Tensor:
    """The base's output with one adapter on (``None``: adapters off, the teacher), in float32."""
    with use_adapter(parts.family.network, adapter), parts.precision.autocast():
        return parts.family.denoise(x_t, t, cond).float()


def denoisers(parts: LoopParts, cond: dict, null_cond: dict) -> TDMDenoisers:
    """Student, fake score and teacher of ``tdm_core.iteration`` for one batch of conditions."""

    def teacher(x_t: Tensor, t: Tensor):
        if parts.cfg_scale == 1.0:  # no guidance: no unconditional pass
            return network_output(parts, None, x_t, t, cond), None
        if parts.batch_cfg:
            both = network_output(parts, None, torch.cat([x_t, x_t]), torch.cat([t, t]), cat_conditions([cond, null_cond]))
            return both.chunk(2)
        return network_output(parts, None, x_t, t, cond), network_output(parts, None, x_t, t, null_cond)

    return TDMDenoisers(
        student=lambda x_t, t: network_output(parts, STUDENT, x_t, t, cond),
        fake_score=lambda x_t, t: network_output(parts, FAKE_SCORE, x_t, t, cond),
        teacher=teacher,
    )


def draw_noise(parts: LoopParts, shape) -> Tensor:
    return randn_on(shape, parts.generator, parts.accelerator.device)


def backward(parts: LoopParts, adapter: str, loss: Tensor) -> None:
    """Back-propagate ``loss`` (through the adapter's fp16 loss scaler) with ``adapter`` active, the one
    whose loss it is: with gradient checkpointing the blocks are recomputed during backward with whatever
    adapter is active then, which would otherwise train the other adapter (issue 20, defect 1). The
    steps-aware K condition (training.steps_aware) follows the active adapter in the recomputation too."""
    scaler = parts.scalers.get(adapter)
    with use_adapter(parts.family.network, adapter):
        parts.accelerator.backward(scaler.scale(loss) if scaler is not None else loss)


def step(parts: LoopParts, adapter: str) -> Tensor:
    """Average the adapter's gradients over processes, clip, step its own optimiser and schedule (through
    its own loss scaler in fp16). Returns the gradient norm before clipping, as a tensor (no host sync)."""
    scaler, optimizer = parts.scalers.get(adapter), parts.optimizers[adapter]
    if parts.sharding is None:  # FSDP2 has reduce-scattered the gradients already
        average_gradients(parts.accelerator, parts.params[adapter])
    # the loss scaler keys its state by the optimiser it unscaled: the torch optimiser inside accelerate's wrapper
    grad_norm = clip_and_step(parts.params[adapter], optimizer.optimizer if scaler is not None else optimizer,
                              parts.schedulers[adapter], parts.max_grad_norm, scaler)
    return replicated(grad_norm)  # FSDP2: the global norm comes as a DTensor


def optimiser_step(parts: LoopParts, adapter: str, loss: Tensor) -> Tensor:
    """One whole-batch loss: backward, then step."""
    backward(parts, adapter, loss)
    return step(parts, adapter)


def average_gradients(accelerator, params: list[Tensor]) -> None:
    # data parallel without DDP: the base is shared by two adapters that train in turns, so a DDP
    # wrapper would see half its parameters unused every backward; one all-reduce per step instead
    if accelerator.num_processes == 1:
        return
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        return
    flat = accelerator.reduce(torch.cat([p.grad.reshape(-1) for p in with_grad]), reduction="mean")
    for p, g in zip(with_grad, flat.split([p.numel() for p in with_grad])):
        p.grad.copy_(g.view_as(p.grad))


def checked_metrics(accelerator, fake_loss: Tensor, student_loss: Tensor, fake_norm: Tensor, student_norm: Tensor) -> list[Optional[float]]:
    """The iteration's one host sync: both losses averaged over processes (one collective) and both
    gradient norms; every process stops together on a NaN/inf loss."""
    losses = accelerator.reduce(torch.stack([fake_loss.detach().float(), student_loss.detach().float()]), reduction="mean")
    norms = [n.detach().float().to(losses.device) for n in (fake_norm, student_norm)]
    values = torch.cat([losses, torch.stack(norms)]).tolist()
    for name, value in zip(("fake-score", "student"), values[:2]):
        if not math.isfinite(value):
            raise NonFiniteLoss(f"{name} loss became {value}: lower --learning-rate / --student-learning-rate (or use --mixed-precision no) "
                                "and --resume from the last good checkpoint, which is kept")
    return values[:2] + [None if math.isnan(v) else v for v in values[2:]]


def denoisers_for_rows(parts: LoopParts, cond: dict, null_cond: dict):
    """The denoisers of a row slice of the batch: the conditions of those rows (``null_cond``: at least as
    many rows as the largest slice, all alike)."""

    null_rows = next(iter(null_cond.values())).shape[0] if null_cond else 0

    def for_rows(rows: slice) -> TDMDenoisers:
        if null_cond and rows.stop - rows.start > null_rows:
            raise ValueError(f"the unconditional condition has {null_rows} rows and a chunk needs {rows.stop - rows.start}: "
                             "make it with family.null_condition(--batch-size)")
        return denoisers(parts, select_condition(cond, rows), select_condition(null_cond, slice(0, rows.stop - rows.start)))

    return for_rows


def tdm_iteration(parts: LoopParts, cond: dict, null_cond: dict, latent_shape) -> dict:
    """METHOD.md steps 1-8 (``tdm_core.iteration``) on one batch of ``latent_shape[0]`` rows, the network
    calls in chunks of ``parts.micro_batch`` rows: roll-out, the fake-score update (``fake_score_updates`` of them,
    the metrics keep the last one's), one student update. Returns metrics."""
    norms = {}

    def step_adapter(adapter: str) -> None:
        norms[adapter] = step(parts, adapter)

    updates = TDMUpdates(backward=lambda adapter, loss: backward(parts, adapter, loss), step=step_adapter)
    noise = draw_noise(parts, latent_shape)
    losses = core_iteration(denoisers_for_rows(parts, cond, null_cond), parts.family.schedule, parts.settings(), noise,
                            parts.generator, updates, parts.micro_batch)
    fake_value, student_value, fake_norm, student_norm = checked_metrics(parts.accelerator, losses.fake_score, losses.student,
                                                                         norms[FAKE_SCORE], norms[STUDENT])
    return {
        "loss_fake": fake_value,
        "loss_student": student_value,
        "grad_norm_fake": fake_norm,
        "grad_norm_student": student_norm,
        "lr_fake": parts.schedulers[FAKE_SCORE].get_last_lr()[0],
        "lr_student": parts.schedulers[STUDENT].get_last_lr()[0],
    }
