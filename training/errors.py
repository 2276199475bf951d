"""The trainer's errors, in one place. Each is caught once, in ``training.distill.main``, which prints its
message (no traceback) and exits with the code of its kind; every message names the problem and the fix."""
from __future__ import annotations

EXIT_OK, EXIT_BAD_INPUT, EXIT_NON_FINITE = 0, 2, 3  # the command lines' exit codes: done, bad input, NaN/inf loss


class TrainingInputError(ValueError):
    """A model, file or folder the trainer cannot use (``training.models``, ``training.families``)."""


class ConfigError(ValueError):
    """A bad option or input file (``training.config``), or one that does not fit the model or the launch."""


class NonFiniteLoss(RuntimeError):
    """A NaN/inf loss: the run stops and keeps its last good checkpoint."""
