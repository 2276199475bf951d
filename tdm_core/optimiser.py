"""One update of one model (METHOD.md step 8), the same for both distillers (``training.loop``, the TDM Distill
node): under fp16 its gradients are unscaled first, then clipped, then its optimiser steps (through its loss
scaler in fp16, which skips a step with inf/NaN gradients and adapts its scale), its gradients are cleared and
its learning-rate schedule advances."""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import Tensor


def clip_and_step(params: Iterable[Tensor], optimizer, scheduler, max_grad_norm: float,
                  scaler: Optional["torch.amp.GradScaler"] = None) -> Tensor:
    """Returns the gradient norm before clipping, as a tensor (no host sync)."""
    params = list(params)
    if scaler is not None:
        scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return grad_norm
