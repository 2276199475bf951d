"""The student and the fake score as two LoRA adapters on a ComfyUI MODEL, switched in O(1).

ComfyUI's own mechanism carries them: every target layer gets one weight wrapper
(``ModelPatcher.add_weight_wrapper``, as the stock ``TrainLoraNode`` does) that holds one
``comfy.weight_adapter.lora.LoraDiff`` per role and adds the active one's ``(alpha / rank) up @ down`` to
the layer's weight at each forward; with no role active (the teacher) the weight passes unchanged.
Switching is one attribute write. The LoRA masters are float32 whatever the base's dtype.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from comfy.weight_adapter.lora import LoraDiff

from .core_import import iteration, lora_targets

STUDENT, FAKE_SCORE = iteration.STUDENT, iteration.FAKE_SCORE
ROLES = iteration.ROLES
DIFFUSION_PREFIX = "diffusion_model."  # module names of the MODEL's BaseModel: what LoraLoader maps


class AdapterSwitch:
    """Which adapter the wrapped layers add: ``STUDENT``, ``FAKE_SCORE`` or ``None`` (the teacher)."""

    def __init__(self):
        self.role: Optional[str] = None

    @contextlib.contextmanager
    def use(self, role: Optional[str]) -> Iterator[None]:
        if role is not None and role not in ROLES:
            raise ValueError(f"unknown adapter {role!r}: use one of {ROLES} or None for the teacher")
        saved, self.role = self.role, role
        try:
            yield
        finally:
            self.role = saved


class SwitchedLora(torch.nn.Module):
    """One layer's weight wrapper: the base weight plus the active role's LoRA."""

    def __init__(self, switch: AdapterSwitch, loras: dict):
        super().__init__()
        self.switch = switch
        self.loras = torch.nn.ModuleDict(loras)

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        role = self.switch.role
        return weight if role is None else self.loras[role](weight)

    def move_to(self, device) -> int:  # ModelPatcher moves weight functions with their layer
        self.to(device)
        return sum(p.numel() * p.element_size() for p in self.parameters())


def new_lora(weight: torch.Tensor, rank: int, alpha: float, generator: torch.Generator) -> LoraDiff:
    """A float32 LoRA that starts at zero change, initialised as PEFT (and the trainer) do: down
    Kaiming-uniform (a = sqrt 5), up zero."""
    out_dim, in_dim = weight.shape[0], weight.shape[1:].numel()
    bound = 1.0 / math.sqrt(in_dim)  # kaiming_uniform_(a=sqrt(5)) on a (rank, in_dim) matrix
    down = (torch.rand(rank, in_dim, generator=generator, dtype=torch.float32) * 2 - 1) * bound
    up = torch.zeros(out_dim, rank, dtype=torch.float32)
    lora = LoraDiff((up, down, float(alpha), None, None, None)).to(weight.device)
    lora.requires_grad_(True)
    lora.alpha.requires_grad_(False)
    return lora


@dataclass
class TDMAdapters:
    """The two adapters on one ModelPatcher: ``layers`` maps a module name of the MODEL's BaseModel
    (``diffusion_model.<ldm path>``) to its wrapper."""

    switch: AdapterSwitch
    layers: dict
    rank: int
    alpha: float

    def parameters(self, role: str) -> list[torch.nn.Parameter]:
        """The trainable LoRA weights of ``role`` (what its optimiser owns)."""
        return [p for wrapper in self.layers.values() for n, p in wrapper.loras[role].named_parameters() if n != "alpha"]

    def lora_state(self, role: str) -> dict:
        """``role``'s LoRA as stock ``TrainLoraNode`` gives its LORA_MODEL (and ``SaveLoRA`` writes it):
        ``<module>.lora_up.weight``, ``<module>.lora_down.weight``, ``<module>.alpha``, detached copies."""
        state = {}
        for name, wrapper in self.layers.items():
            lora = wrapper.loras[role]
            state[f"{name}.lora_up.weight"] = lora.lora_up.weight.detach().float().cpu().clone()
            state[f"{name}.lora_down.weight"] = lora.lora_down.weight.detach().float().cpu().clone()
            state[f"{name}.alpha"] = torch.tensor(float(self.alpha))
        return state


def lora_delta(students: list) -> float:
    """``||dW|| / ||W||`` over every layer the student LoRAs adapt, ``students`` being ``(lora_state, model)`` pairs
    (TrainLoraNode's layout; the ModelPatcher it adapts): the measure ``training.progress.lora_delta`` takes of the
    trainer's student, for ``tdm_core.progress.diverging``. Base weights as stored (a scaled-fp8 weight without its
    scale)."""
    delta_sq = base_sq = 0.0
    with torch.no_grad():
        for lora, model in students:
            for key, up in lora.items():
                if not key.endswith(".lora_up.weight"):
                    continue
                name = key.removesuffix(".lora_up.weight")
                down = lora[f"{name}.lora_down.weight"].float()
                delta = float(lora[f"{name}.alpha"]) / down.shape[0] * (up.float() @ down.flatten(1))
                delta_sq += float(delta.pow(2).sum())
                base_sq += float(model.model.get_submodule(name).weight.float().pow(2).sum())
    return (delta_sq / base_sq) ** 0.5 if base_sq > 0 else 0.0


def target_layers(patcher, targets) -> dict:
    """``{module name: module}`` of the diffusion model's layers the adapters go on (ComfyUI's cast layers,
    which run weight wrappers)."""
    found = {name: module for name, module in patcher.model.named_modules()
             if name.startswith(DIFFUSION_PREFIX) and hasattr(module, "weight_function") and getattr(module, "weight", None) is not None
             and module.weight.ndim >= 2 and lora_targets.is_target(name, targets)}
    if not found:
        raise ValueError(f"the model has no layer named like {', '.join(targets)}: TDM Distill cannot place its LoRAs on this architecture yet")
    return found


def targets_of(patcher) -> tuple:
    """The block layers to adapt on this MODEL's architecture (tdm_core.lora_targets' rule, by the class of its
    ``diffusion_model``)."""
    return lora_targets.comfy_block_targets(type(patcher.model.diffusion_model).__name__)


def add_tdm_adapters(patcher, rank: int, alpha: float, seed: int, targets=None, switch: Optional[AdapterSwitch] = None) -> TDMAdapters:
    """Put the student and fake-score LoRAs (both zero change: both start as the teacher) on ``patcher``,
    a clone the caller owns; returns them with the switch set to the teacher. ``targets``: the layer names
    to adapt, by default those of the MODEL's architecture; ``switch``: one shared with another model's
    adapters (two experts), else a new one."""
    if rank < 1:
        raise ValueError(f"LoRA rank {rank} must be at least 1: use e.g. 16")
    targets = targets_of(patcher) if targets is None else targets
    generator = torch.Generator().manual_seed(seed)
    switch, layers = switch or AdapterSwitch(), {}
    for name, module in sorted(target_layers(patcher, targets).items()):
        wrapper = SwitchedLora(switch, {role: new_lora(module.weight, rank, alpha, generator) for role in ROLES})
        patcher.add_weight_wrapper(f"{name}.weight", wrapper)
        layers[name] = wrapper
    return TDMAdapters(switch, layers, rank, float(alpha))
