"""Checkpoints of a TDM Distill run, so Cancel (or a crash) loses at most ``checkpoint_every`` iterations and
queueing the same graph again resumes.

Where: ``models/loras/<lora_name>.tdmckpt``, one file beside the LoRA it will become. A user finds it where the
LoRA goes, under the same name; it survives a restart of ComfyUI (its temp folder is emptied at start-up); its
extension is none of the model extensions, so it never shows up in a LoRA list. It is written atomically
(``tdm_core.atomic``): a kill leaves the previous checkpoint whole.

What: both adapters' fp32 LoRA masters, both AdamW states, LR schedules, GradScalers (fp16 base), the run's
torch.Generator state, the iteration, the loss history and the probe points, and the run's fingerprint
(``distill_fingerprint``). Loaded with ``torch.load(weights_only=True)``.

Lifetime: a finished run deletes its checkpoint once the LoRA file is written, so queueing the same inputs
again (after ComfyUI's cache let go of the outputs) trains afresh rather than silently resuming a finished run.
A checkpoint whose fingerprint differs (another model, prompts or settings) or that is unreadable is not
resumed: the run starts fresh and says so in its report; its first checkpoint replaces the old file.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import torch

from .core_import import atomic
from .distill_adapters import ROLES

CHECKPOINT_EXTENSION = ".tdmckpt"
FORMAT = 1


@dataclass
class RunState:
    """What the loop carries between iterations besides the distiller."""

    iteration: int = 0
    history: list = field(default_factory=list)  # one metrics dict per iteration
    probes: list = field(default_factory=list)  # [(iteration, how far the student moved)]


def checkpoint_path(lora_file: str) -> str:
    """``<lora file without .safetensors>.tdmckpt``."""
    return os.path.splitext(lora_file)[0] + CHECKPOINT_EXTENSION


def distiller_state(distiller) -> dict:
    return {
        "adapters": {role: [p.detach().float().cpu().clone() for p in distiller.adapters.parameters(role)] for role in ROLES},
        "optimizers": {role: opt.state_dict() for role, opt in distiller.optimizers.items()},
        "schedulers": {role: s.state_dict() for role, s in distiller.schedulers.items()},
        "scalers": {role: s.state_dict() for role, s in distiller.scalers.items()},
        "generator": distiller.generator.get_state(),
    }


def save(path: str, distiller, state: RunState, fingerprint: dict) -> None:
    payload = {"format": FORMAT, "fingerprint": dict(fingerprint), "iteration": state.iteration, "history": list(state.history),
               "probes": [list(p) for p in state.probes], "distiller": distiller_state(distiller)}
    with atomic.atomic_write(path) as temp:
        torch.save(payload, temp)


def check_compatible(distiller, saved: dict) -> None:
    """Checked before anything is changed, so a refused checkpoint leaves the fresh distiller as it was."""
    for role in ROLES:
        params, values = distiller.adapters.parameters(role), saved["adapters"][role]
        if len(params) != len(values) or any(p.shape != v.shape for p, v in zip(params, values)):
            raise ValueError("its LoRA layout does not match this model")
        if len(saved["optimizers"][role]["param_groups"][0]["params"]) != len(params):
            raise ValueError("its optimiser state does not match this model")
    if set(saved["scalers"]) != set(distiller.scalers):
        raise ValueError("it was made under another base precision (loss scaling)")


def restore(distiller, saved: dict) -> None:
    """Put a checkpoint's state into a freshly built, loaded distiller (parameters and optimiser state on the
    device the model loaded to)."""
    check_compatible(distiller, saved)
    with torch.inference_mode(False), torch.no_grad():
        for role in ROLES:
            for p, v in zip(distiller.adapters.parameters(role), saved["adapters"][role]):
                p.copy_(v.to(p.device))
        for role, opt in distiller.optimizers.items():
            opt.load_state_dict(saved["optimizers"][role])
        for role, scheduler in distiller.schedulers.items():
            scheduler.load_state_dict(saved["schedulers"][role])
        for role, scaler in distiller.scalers.items():
            scaler.load_state_dict(saved["scalers"][role])
        distiller.generator.set_state(saved["generator"])


def read(path: str) -> Optional[dict]:
    """The checkpoint at ``path``; None when there is none; raises ValueError when it is unreadable."""
    if not os.path.exists(path):
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, or not a checkpoint
        raise ValueError(f"unreadable ({type(err).__name__})") from None
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise ValueError("not a TDM Distill checkpoint of this version")
    return saved


def differences(saved: dict, fingerprint: dict) -> list[str]:
    old = saved.get("fingerprint", {})
    return [part for part in fingerprint if old.get(part) != fingerprint[part]]


def resume(path: str, distiller, fingerprint: dict, iterations: int) -> tuple[Optional[RunState], str]:
    """``(state, note)``: the saved run's state restored into ``distiller`` when the checkpoint at ``path``
    belongs to this run and stops before ``iterations``, else ``(None, note)`` (start fresh; the note says why,
    empty when there was no checkpoint)."""
    name = os.path.basename(path)
    try:
        saved = read(path)
    except ValueError as err:
        return None, f"Checkpoint {name} is {err}: started fresh (this run's checkpoints replace it)."
    if saved is None:
        return None, ""
    changed = differences(saved, fingerprint)
    if changed:
        return None, (f"Checkpoint {name} was made with a different {', '.join(changed)}: not resumed, started fresh "
                      "(this run's checkpoints replace it; use another lora_name to keep both).")
    if saved["iteration"] >= iterations:
        return None, (f"Checkpoint {name} is at iteration {saved['iteration']}, not before the {iterations} iterations asked: "
                      "started fresh (raise iterations to continue it).")
    try:
        restore(distiller, saved["distiller"])
    except (ValueError, KeyError, RuntimeError) as err:
        return None, f"Checkpoint {name} could not be restored ({err}): started fresh."
    state = RunState(saved["iteration"], list(saved["history"]), [tuple(p) for p in saved["probes"]])
    return state, f"Resumed from checkpoint {name} at iteration {state.iteration}."


def remove(path: str) -> None:
    if os.path.exists(path):
        os.remove(path)


@dataclass
class Checkpoints:
    """The run's checkpoint file and fingerprint; ``every`` iterations (0: only at Cancel)."""

    path: str
    fingerprint: dict
    every: int
    saved_at: int = -1

    def save(self, distiller, state: RunState) -> None:
        if state.iteration > 0 and state.iteration != self.saved_at:
            save(self.path, distiller, state, self.fingerprint)
            self.saved_at = state.iteration

    def due(self, iteration: int, iterations: int) -> bool:
        return self.every > 0 and iteration % self.every == 0 and iteration < iterations


def start_or_resume(distiller, store: Checkpoints, iterations: int) -> tuple[RunState, str]:
    """A fresh state, or the checkpoint's (the model is loaded first, so the optimiser state lands on its device)."""
    if not os.path.exists(store.path):
        return RunState(), ""
    # outside inference mode: tensors loaded inside it could not be updated by the optimisers later
    with torch.inference_mode(False), torch.enable_grad():
        distiller.load()
        state, note = resume(store.path, distiller, store.fingerprint, iterations)
    if state is not None:
        store.saved_at = state.iteration
    return state or RunState(), note
