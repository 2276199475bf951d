"""Two-expert models (Wan 2.2 A14B: a high-noise and a low-noise transformer that hand over at a boundary sigma)
for the TDM Distill node.

Each expert carries its own student and fake-score LoRAs; one ``AdapterSwitch`` drives both, so the student,
the fake score and the teacher are each one denoiser over the whole noise range. Every call is routed per row
by the row's sigma, as ComfyUI's two-model workflows route whole steps: sigma >= boundary goes to the
high-noise expert, below to the low-noise one. So each expert's student learns the steps on its side of the
boundary with that expert as teacher, and the fake score of each side tracks the student there.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .core_import import iteration
from .distill_adapters import TDMAdapters
from .distill_schedule import ComfySchedule, schedule_of

# ComfyUI's Wan 2.2 A14B templates switch experts at these sigmas (text-to-video, image-to-video)
WAN22_T2V_BOUNDARY = 0.875
WAN22_I2V_BOUNDARY = 0.9


@dataclass
class Expert:
    patcher: object  # the clone of the expert's MODEL the adapters are on
    adapters: TDMAdapters


class JointAdapters:
    """The experts' adapters as one: one switch, every expert's parameters per role (one optimiser per role
    steps the whole student, clipped as one network)."""

    def __init__(self, experts: list[Expert]):
        self.experts = experts
        self.switch = experts[0].adapters.switch
        if any(e.adapters.switch is not self.switch for e in experts):
            raise ValueError("the experts' adapters must share one switch")

    def parameters(self, role: str) -> list[torch.nn.Parameter]:
        return [p for e in self.experts for p in e.adapters.parameters(role)]

    def lora_state(self, role: str) -> dict:
        """The first expert's LoRA (the only one of a single model)."""
        return self.experts[0].adapters.lora_state(role)

    def lora_states(self, role: str) -> list[dict]:
        return [e.adapters.lora_state(role) for e in self.experts]


def check_experts(high, low, boundary: float) -> None:
    """Both experts must sample on one schedule and be one architecture; the boundary is a sigma in (0, 1)."""
    if not 0.0 < boundary < 1.0:
        raise ValueError(f"boundary {boundary} must be a sigma between 0 and 1: Wan 2.2 A14B uses {WAN22_T2V_BOUNDARY} "
                         f"(text-to-video) or {WAN22_I2V_BOUNDARY} (image-to-video)")
    if type(high.model.diffusion_model) is not type(low.model.diffusion_model):
        raise ValueError(f"model ({type(high.model.diffusion_model).__name__}) and low_noise_model "
                         f"({type(low.model.diffusion_model).__name__}) are different architectures: connect the two experts "
                         "of one model (e.g. Wan 2.2 A14B high-noise and low-noise)")
    high_schedule, low_schedule = schedule_of(high), schedule_of(low)
    if not high_schedule.flow:
        raise ValueError("a low_noise_model is for flow models with two experts (Wan 2.2 A14B); this model is not a flow model")
    if high_schedule.schedule != low_schedule.schedule:
        raise ValueError(f"the two experts sample with different schedules ({high_schedule.schedule} vs {low_schedule.schedule}): "
                         "give both the same ModelSamplingSD3 shift, as ComfyUI's Wan 2.2 A14B templates do")


def expert_of_rows(schedule: ComfySchedule, t: torch.Tensor, boundary: float) -> torch.Tensor:
    """0 (high-noise expert) where sigma(t) >= boundary, else 1, per row."""
    return (schedule.comfy_sigma(t).cpu() < boundary).long()


ExpertDenoisers = Callable[[int, list], iteration.TDMDenoisers]  # (expert index, batch positions) -> its denoisers


def routed_denoisers(denoisers_of: ExpertDenoisers, schedule: ComfySchedule, boundary: float) -> iteration.TDMDenoisers:
    """Student, fake score and teacher whose every call sends each row to the expert that owns its sigma.
    ``denoisers_of(e, positions)``: expert ``e``'s denoisers for the batch rows at ``positions``."""
    cache: dict = {}

    def of(expert: int, positions: list) -> iteration.TDMDenoisers:
        key = (expert, tuple(positions))
        if key not in cache:
            cache[key] = denoisers_of(expert, positions)
        return cache[key]

    def route(pick: Callable[[iteration.TDMDenoisers], Callable], x_t: torch.Tensor, t: torch.Tensor):
        experts = expert_of_rows(schedule, t, boundary)
        order, outputs = [], []
        for expert in (0, 1):
            positions = torch.nonzero(experts == expert).flatten().tolist()
            if positions:
                index = torch.tensor(positions, device=x_t.device)
                outputs.append(pick(of(expert, positions))(x_t[index], t[index.to(t.device)]))
                order += positions
        inverse = torch.argsort(torch.tensor(order)).to(x_t.device)
        if isinstance(outputs[0], tuple):  # the teacher: (cond, uncond or None)
            conds = torch.cat([o[0] for o in outputs])[inverse]
            unconds = None if outputs[0][1] is None else torch.cat([o[1] for o in outputs])[inverse]
            return conds, unconds
        return torch.cat(outputs)[inverse]

    return iteration.TDMDenoisers(
        student=lambda x_t, t: route(lambda d: d.student, x_t, t),
        fake_score=lambda x_t, t: route(lambda d: d.fake_score, x_t, t),
        teacher=lambda x_t, t: route(lambda d: d.teacher, x_t, t),
    )


def low_noise_suffix(lora_name: str) -> str:
    """The low-noise expert's LoRA name beside the high-noise one's."""
    return f"{lora_name}_low_noise"
