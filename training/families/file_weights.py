"""Building a diffusers network from a converted checkpoint state dict: on the meta device, then the file's tensors
assigned in place (a 12-20 B transformer never exists twice in memory); and the checkpoint prefix some files keep.
Shared by the ComfyUI-file loaders."""
from __future__ import annotations

import torch

from training.errors import TrainingInputError

CHECKPOINT_PREFIX = "model.diffusion_model."  # a diffusion model's keys inside a checkpoint; some single-model exports keep it


def strip_checkpoint_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with :data:`CHECKPOINT_PREFIX` taken off the keys that carry it."""
    return {k[len(CHECKPOINT_PREFIX):] if k.startswith(CHECKPOINT_PREFIX) else k: v for k, v in state.items()}


def network_from_state(model_class, config: dict, state: dict[str, torch.Tensor], file_name: str, what: str, fix: str,
                       dtype=torch.float32):
    """``model_class`` built from ``config`` with the weights of ``state`` (diffusers names); a file that lacks some gets
    a clear error naming the kind (``what``) and the fix. Parameters start on the meta device; plain tensors the
    model makes itself (rope tables) stay real (accelerate's ``init_empty_weights``)."""
    from accelerate import init_empty_weights


    with init_empty_weights():
        model = model_class.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    missing = sorted(set(model.state_dict()) - set(state))
    if missing:
        raise TrainingInputError(f"{file_name} lacks {len(missing)} {what} weights (e.g. {missing[:3]}): {fix}")
    model.load_state_dict({k: state[k] for k in model.state_dict()}, assign=True)
    return model.to(dtype).eval()
