"""Steps-aware TDM (TDM-unify) on the trainer's network: one K-embedding table per TDM adapter.

``install_k_embedding(network, k_choices)`` registers a module ``tdm_k_embedding`` on the network
holding a zero-initialised table ``E`` of shape ``(MAX_K, width)`` (rows K = 1..8, whatever the trained
choices, so validation and samplers may ask for any K the nodes offer) for the student and one for the fake
score (separate networks in the paper, so separate tables), and a forward hook on the network's
timestep embedding that adds ``E[K]`` of the adapter currently active (the teacher, adapters off, gets
nothing). The loop sets K per batch with :func:`set_num_steps`.

The tables' parameter names contain ``.<adapter>.`` and ``.lora_``, so ``training.models``'s
``adapter_parameters`` / ``adapter_state_dict`` / ``load_adapter_state_dict`` treat each table as part
of its adapter: its optimiser, checkpoints, resume and the data-parallel digest carry it unchanged.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from tdm_core.steps_aware import K_EMBEDDING_KEY, MAX_K, add_k_embedding, draw_num_steps, grid_for_num_steps, new_k_table, parse_k_choices

from .errors import TrainingInputError
from .models import STUDENT, TDM_ADAPTERS

MODULE_NAME = "tdm_k_embedding"
TABLE_NAME = "lora_k_table"  # the ".lora_" marker makes training.models count it as adapter weight
TABLE_STATE_KEY = f"{MODULE_NAME}.tables.{TABLE_NAME}"  # an adapter's table in training.models.adapter_state_dict
# where each network class computes its timestep embedding (the output E[K] is added to)
TIME_EMBEDDING_MODULES = {
    "UNet2DConditionModel": "time_embedding",  # SD1.5, SDXL, the digits teacher
    "SD3Transformer2DModel": "time_text_embed",  # timestep + pooled text embedding, summed
}


class _KTable(nn.Module):
    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.lora_k_table = nn.Parameter(table)


class KEmbeddings(nn.Module):
    """The tables of the conditioned adapters, and the K of the current batch."""

    def __init__(self, adapters: Sequence[str], k_choices: Sequence[int], width: int, device=None, dtype=torch.float32):
        super().__init__()
        self.k_choices = list(k_choices)
        # rows of K never drawn stay at zero: such a K runs unconditioned
        self.tables = nn.ModuleDict({name: _KTable(new_k_table(MAX_K, width, dtype, device)) for name in adapters})
        self.num_steps: Optional[int] = None
        self.hook = None

    def table(self, adapter: str) -> Optional[torch.Tensor]:
        return self.tables[adapter].lora_k_table if adapter in self.tables else None


def time_embedding_module(network: nn.Module) -> nn.Module:
    kind = type(network).__name__
    if kind not in TIME_EMBEDDING_MODULES:
        raise TrainingInputError(
            f"steps-aware TDM does not know where {kind} computes its timestep embedding: "
            f"use a {' or '.join(sorted(TIME_EMBEDDING_MODULES))} model, or train without --steps-aware"
        )
    return network.get_submodule(TIME_EMBEDDING_MODULES[kind])


def _embedding_width(network: nn.Module) -> int:
    # the last linear layer of the timestep-embedding MLP gives the width E's rows must have
    linears = [m for m in time_embedding_module(network).modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features


def _first_tuner_layer(network: nn.Module):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return next((m for m in network.modules() if isinstance(m, BaseTunerLayer)), None)


def k_embedding_of(network: nn.Module) -> Optional[KEmbeddings]:
    module = getattr(network, MODULE_NAME, None)
    return module if isinstance(module, KEmbeddings) else None


def install_k_embedding(network: nn.Module, k_choices, adapters: Sequence[str] = TDM_ADAPTERS) -> KEmbeddings:
    """Condition ``adapters`` (default: student and fake score) on K. ``adapters=("student",)`` is the
    ablation of METHOD.md: a fake score shared across K without the condition."""
    if k_embedding_of(network) is not None:
        raise TrainingInputError("this network already carries a K-embedding: install it once")
    choices = parse_k_choices(k_choices)
    module = time_embedding_module(network)
    reference = next(module.parameters())
    k_module = KEmbeddings(adapters, choices, _embedding_width(network), reference.device)
    setattr(network, MODULE_NAME, k_module)
    for param in k_module.parameters():
        param.requires_grad_(True)
    # every PEFT layer switches together (training.models.use_adapter), so one layer tells the active
    # adapter; found once here, as walking the whole network on every forward is slow on big models
    probe = _first_tuner_layer(network)

    def add_condition(_module, _inputs, output):
        active = None if probe is None or probe.disable_adapters else probe.active_adapters[0]
        table = k_module.table(active or "")
        if table is None:  # the teacher, or an adapter trained without the K condition
            return output
        if k_module.num_steps is None:
            raise RuntimeError("steps-aware network called before set_num_steps(network, K): set the batch's K first")
        return add_k_embedding(output, k_module.num_steps, table)

    k_module.hook = module.register_forward_hook(add_condition)
    return k_module


def remove_k_embedding(network: nn.Module) -> None:
    k_module = k_embedding_of(network)
    if k_module is None:
        return
    k_module.hook.remove()
    delattr(network, MODULE_NAME)


def set_num_steps(network: nn.Module, k: int) -> None:
    k_module = k_embedding_of(network)
    if k_module is None:
        raise RuntimeError("set_num_steps on a network without a K-embedding: call install_k_embedding first")
    if k not in range(1, MAX_K + 1):
        raise ValueError(f"K={k} is outside the K-embedding's rows 1..{MAX_K}")
    k_module.num_steps = int(k)


@contextlib.contextmanager
def num_steps(network: nn.Module, k: int) -> Iterator[None]:
    """Run ``network`` as a K-step model (e.g. validation at 1, 2 and 4 steps), restoring the batch's K."""
    k_module = k_embedding_of(network)
    if k_module is None:
        yield
        return
    previous = k_module.num_steps
    set_num_steps(network, k)
    try:
        yield
    finally:
        k_module.num_steps = previous


def begin_batch(parts, k_choices: Sequence[int]) -> int:
    """Draw this batch's K from the run's generator (checkpointed: resumes reproduce it), set the
    student's trajectory grid to the K-step grid and the network's K condition. Returns K."""
    k = draw_num_steps(k_choices, parts.generator)
    parts.grid = grid_for_num_steps(k, parts.total_steps)
    set_num_steps(parts.family.network, k)
    return k


def k_embedding_tensors(network: nn.Module, adapter: str = STUDENT) -> dict[str, torch.Tensor]:
    """``{K_EMBEDDING_KEY: E}`` of ``adapter`` for the exported LoRA file; empty without a K-embedding."""
    k_module = k_embedding_of(network)
    table = k_module.table(adapter) if k_module is not None else None
    return {} if table is None else {K_EMBEDDING_KEY: table.detach().float().cpu().clone()}


def without_k_table(adapter_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An adapter state (training.models.adapter_state_dict) with only its LoRA weights, for LoRA layouts."""
    return {k: v for k, v in adapter_state.items() if k != TABLE_STATE_KEY}


def load_k_table(network: nn.Module, table: torch.Tensor, adapter: str = STUDENT) -> None:
    """Put a LoRA file's K table (``K_EMBEDDING_KEY``) on ``adapter`` of a network with a K-embedding."""
    k_module = k_embedding_of(network)
    target = k_module.table(adapter) if k_module is not None else None
    if target is None:
        raise TrainingInputError(f"the network has no K table for {adapter!r}: call install_k_embedding first")
    if tuple(table.shape) != tuple(target.shape):
        raise TrainingInputError(f"K table of shape {tuple(table.shape)} does not fit this network's {tuple(target.shape)}: load a LoRA trained on the same architecture")
    with torch.no_grad():
        target.copy_(table.to(target))


def k_choices_of(network: nn.Module) -> list[int]:
    k_module = k_embedding_of(network)
    return list(k_module.k_choices) if k_module is not None else []
