"""Backward through ComfyUI's DiTs that add their residuals in place.

ComfyUI's Flux-style blocks (Flux.1, Flux.2, HunyuanVideo: ``comfy.ldm.flux.layers``) normalise the residual
stream and then add to that same tensor in place (``img += ...``, ``x += ...``): fine for sampling, but a
LayerNorm keeps its input for backward, and autograd refuses a saved tensor that was modified since
("one of the variables needed for gradient computation has been modified by an inplace operation"). While the
TDM Distill node trains, every LayerNorm of the diffusion model gets its own copy of its input (a forward
pre-hook, only when autograd records): the same values, so outputs are unchanged, and the in-place add no
longer touches what backward reads. Under gradient checkpointing a block is recomputed from its inputs during
backward, so a block must not add into its own inputs either: each checkpointed block runs on copies of its
tensor inputs, made inside the checkpoint. ComfyUI's code is left as it is.
"""
from __future__ import annotations

import torch


def _copy_input(_module, args):
    # on grad mode alone (not requires_grad, which an in-place add changes): a checkpointed block must save the
    # same tensors when it is recomputed as in its forward
    if not torch.is_grad_enabled() or not args or not isinstance(args[0], torch.Tensor):
        return None
    return (args[0].clone(), *args[1:])


def protect_norm_inputs(diffusion_model: torch.nn.Module) -> list:
    """Install the copies on every LayerNorm of ``diffusion_model``; returns the hook handles to remove."""
    return [module.register_forward_pre_hook(_copy_input) for module in diffusion_model.modules()
            if isinstance(module, torch.nn.LayerNorm)]


def remove_hooks(handles: list) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()


def _copies(value):
    return value.clone() if isinstance(value, torch.Tensor) and value.is_floating_point() else value


def copy_block_inputs(module: torch.nn.Module) -> None:
    """Make ``module`` run on copies of its tensor inputs (call before ComfyUI's checkpoint ``patch``, which
    then recomputes from the untouched originals); ``restore_block_inputs`` undoes it."""
    plain = module.forward

    def forward_on_copies(*args, **kwargs):
        return plain(*[_copies(a) for a in args], **{k: _copies(v) for k, v in kwargs.items()})

    module.tdm_plain_forward = plain
    module.forward = forward_on_copies


def restore_block_inputs(module: torch.nn.Module) -> None:
    if hasattr(module, "tdm_plain_forward"):
        module.forward = module.tdm_plain_forward
        del module.tdm_plain_forward
