"""ComfyUI conditionings for the TDM Distill node: one batch conditioning whose row ``b`` holds the
prompt drawn for row ``b``, processed by ComfyUI's own ``process_conds`` (so ``model.extra_conds`` turns it
into what ``apply_model`` takes, exactly as when sampling)."""
from __future__ import annotations

import torch

import comfy.sampler_helpers
import comfy.samplers


def single_entry(conditioning, index: int):
    """The one ``[tensor, extras]`` entry of the ``index``-th prompt's conditioning."""
    if not isinstance(conditioning, list) or not conditioning:
        raise ValueError(f"positive conditioning {index} is empty or not a CONDITIONING: connect a CLIPTextEncode output")
    if len(conditioning) != 1:
        raise ValueError(f"positive conditioning {index} has {len(conditioning)} entries (combined or area conditionings): "
                         "TDM Distill takes one CLIPTextEncode conditioning per prompt; give each prompt on its own")
    return conditioning[0]


def batch_conditioning(conditionings: list, rows: list[int]) -> list:
    """One conditioning for a batch: row ``b`` is prompt ``rows[b]`` (tensors stacked along the batch; other
    extras must agree across the prompts)."""
    entries = [single_entry(conditionings[i], i) for i in rows]
    shapes = {tuple(e[0].shape[1:]) for e in entries}
    if len(shapes) > 1:
        raise ValueError(f"the prompts' conditionings have different shapes {sorted(shapes)} (a prompt longer than 75 tokens "
                         "encodes to more tokens): shorten the long prompts so every prompt encodes to the same length")
    extras = {key: batch_extra(key, [e[1].get(key) for e in entries]) for key in entries[0][1]}
    return [[torch.cat([e[0] for e in entries]), extras]]


def batch_extra(key: str, values: list):
    """One conditioning extra for the batch from the rows' values: shared when every row has the same one
    (ComfyUI repeats a batch-1 tensor or list of tensors, e.g. one I2V image or edit reference, to the batch);
    tensors per prompt (pooled text, each prompt's own image latent) stacked along the batch, lists of tensors
    (``reference_latents``) stacked entry by entry; any other setting must agree across the prompts."""
    first = values[0]
    if all(v is first for v in values):
        return first
    if isinstance(first, torch.Tensor) and all(isinstance(v, torch.Tensor) for v in values):
        return torch.cat(values)
    if isinstance(first, (list, tuple)) and all(isinstance(v, type(first)) and len(v) == len(first) for v in values) \
            and all(isinstance(t, torch.Tensor) for v in values for t in v):
        return type(first)(batch_extra(key, list(column)) for column in zip(*values))
    if not any(isinstance(v, torch.Tensor) for v in values) and all(v == first for v in values):
        return first
    raise ValueError(f"the prompts' conditionings differ in {key!r}: TDM Distill batches prompts whose settings agree")


def processed_conds(patcher, conditionings: dict, latent: torch.Tensor, seed: int) -> dict:
    """``{"positive": ..., "negative": ...}`` ComfyUI conditionings -> the processed conds ``calc_cond_batch``
    takes (areas resolved, ``model.extra_conds`` applied) for latents shaped like ``latent``."""
    conds = {name: comfy.sampler_helpers.convert_cond(c) for name, c in conditionings.items() if c is not None}
    return comfy.samplers.process_conds(patcher.model, latent, conds, latent.device, latent_image=latent, seed=seed)
