"""--student-ema: an exponential moving average of the student's LoRA weights (diffusers' ``EMAModel``), the student
a run hands out. Training is unchanged (the optimiser steps the raw weights); the average is what the final LoRA,
the validation grids, the probe and each checkpoint's ``student_ema`` adapter hold. TDM-R1 keeps one; issue 22's
benchmarks measure it (a single checkpoint's distance to the teacher jitters by tens of percent from one checkpoint to
the next, the average of its last ones does not: benchmarks/weight_average.py)."""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

from .models import STUDENT

EMA_ADAPTER = "student_ema"  # a checkpoint's adapters: the average's weights under the student's keys


def new_student_ema(params: list, decay: float) -> Optional[object]:
    """The average of ``params`` (the student's trainable weights) at ``decay`` per student update; None at 0 (off).
    ``EMAModel``'s warm-up ((1 + n) / (10 + n), capped at ``decay``) keeps its first updates close to the weights."""
    if decay <= 0:
        return None
    from diffusers.training_utils import EMAModel

    return EMAModel(params, decay=decay)


@contextlib.contextmanager
def student_ema_applied(parts) -> Iterator[None]:
    """The averaged weights in the student's place for the block, the raw ones back after it (no-op without an average)."""
    ema, params = parts.student_ema, parts.params[STUDENT]
    if ema is None:
        yield
        return
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        ema.restore(params)
