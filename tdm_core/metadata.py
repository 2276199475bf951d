"""The TDM metadata a distilled LoRA carries in its safetensors header (strings only).

Written by ``training.distill``, read by the ComfyUI LoRA loader to pick steps, grid and strength.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Optional

PREFIX = "tdm."


@dataclass
class TDMInfo:
    method: str = "tdm"
    num_steps: int = 4  # K, the student's sampling steps
    grid: list[float] = field(default_factory=list)  # t_0 .. t_{K-1} (integers, but for the flow DPM-Solver preset)
    total_steps: int = 900  # T of the reference grid rule
    num_timesteps: int = 1000  # length of the model's discrete schedule
    prediction_type: str = "epsilon"
    base_family: str = ""  # sd15, sdxl, pixart, sd3, digits
    base_hash: str = ""  # sha256 of the teacher file(s)
    teacher_cfg: float = 1.0
    distance: str = "l2"
    huber_c: Optional[float] = None
    lora_rank: int = 0
    lora_alpha: float = 0.0
    recommended_strength: float = 1.0
    training_steps: int = 0
    k_choices: list[int] = field(default_factory=list)  # steps-aware (TDM-unify) models only
    flow_shift: Optional[float] = None  # flow models: the shift trained at (Flux: that of the training resolution)
    solver: str = "tdm"  # how to sample it: "tdm" (the student's own step) or "dpmpp_2m" (the released SD1.5/SD3 LoRAs)
    release: str = ""  # a released TDM weight this file is (tdm_core.releases), "" for the trainer's own LoRAs

    def to_safetensors_metadata(self) -> dict[str, str]:
        return {PREFIX + k: json.dumps(v) for k, v in asdict(self).items()}

    @classmethod
    def from_safetensors_metadata(cls, metadata: Optional[dict[str, str]]) -> Optional["TDMInfo"]:
        """``None`` when the file carries no TDM metadata (e.g. a plain LoRA)."""
        metadata = metadata or {}
        if PREFIX + "method" not in metadata:
            return None
        known = {f.name for f in fields(cls)}
        values = {}
        for key, raw in metadata.items():
            name = key[len(PREFIX):]
            if key.startswith(PREFIX) and name in known:
                try:
                    values[name] = json.loads(raw)
                except json.JSONDecodeError as err:
                    raise ValueError(f"LoRA metadata {key}={raw!r} is not valid JSON: re-export the LoRA with training.distill") from err
                expected = _expected_kind(name)
                if not _fits(values[name], expected):
                    raise ValueError(f"LoRA metadata {key}={raw!r} should be {expected}: re-export the LoRA with training.distill")
        return cls(**values)


_DEFAULTS = TDMInfo()  # the kind of every field, for checking what a file says


FRACTIONAL_FIELDS = ("grid",)  # a grid may be fractional: diffusers' flow DPM-Solver visits 749.25 (grids.dpmsolver_flow_grid)


def _expected_kind(name: str) -> str:
    default = getattr(_DEFAULTS, name)
    # a field's JSON kind follows its default (huber_c: None = "use the distance's default c")
    if default is None:
        return "a number or null"
    if isinstance(default, list):
        return "a list of numbers" if name in FRACTIONAL_FIELDS else "a list of integers"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(type(default), "valid JSON")


def _fits(value, expected: str) -> bool:
    # a wrong kind (e.g. num_steps "four") would otherwise fail far away, inside a sampler
    is_int = isinstance(value, int) and not isinstance(value, bool)
    is_number = is_int or isinstance(value, float)
    return {
        "a number or null": value is None or is_number,
        "a list of integers": isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value),
        "a list of numbers": isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value),
        "an integer": is_int,
        "a number": is_number,
        "a string": isinstance(value, str),
        "true or false": isinstance(value, bool),
        "valid JSON": True,
    }[expected]
