"""Checkpoints of a distillation run, written so that a crash never loses the last good one.

A checkpoint is a folder ``<run_dir>/checkpoints/step-00000010`` holding ``adapters.tdmckpt``
(both LoRA adapters, safetensors format) and ``training_state.tdmstate`` (torch.save: optimisers,
LR schedules, every process's RNG states, the step). The extensions are the project's own because
the run folder sits next to ``--output``, often inside ComfyUI's ``models/loras``, and ComfyUI lists
every ``.safetensors``/``.pt`` file there as a LoRA.

A checkpoint is written into a hidden temporary folder and renamed into place with ``os.replace``
once complete; older checkpoints are pruned only after that, so a kill at any moment leaves the
previous checkpoint whole.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from .config import ConfigError
from .loop import ADAPTERS, LoopParts

CHECKPOINTS = "checkpoints"
ADAPTERS_FILE = "adapters.tdmckpt"
STATE_FILE = "training_state.tdmstate"
PREFIX = "step-"
TEMP_PREFIX = ".tmp-"
# test hook: sleep this many seconds in the middle of writing the checkpoint of step N ("N:seconds")
PAUSE_ENV = "TDM_TEST_PAUSE_IN_CHECKPOINT"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"{PREFIX}{step:08d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of interrupted writes are not listed)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def remove_interrupted_writes(run_dir: Path) -> None:
    root = Path(run_dir) / CHECKPOINTS
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(TEMP_PREFIX):
                shutil.rmtree(p, ignore_errors=True)


def flatten_adapters(adapters: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {f"{name}/{key}": t.detach().cpu().contiguous() for name, sd in adapters.items() for key, t in sd.items()}


def unflatten_adapters(flat: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    adapters: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in flat.items():
        name, param = key.split("/", 1)
        adapters.setdefault(name, {})[param] = t
    return adapters


def save_checkpoint(run_dir: Path, step: int, adapters: dict, state: dict, keep: int = 2) -> Path:
    """Write checkpoint ``step`` atomically, then prune all but the newest ``keep``."""
    final = checkpoint_dir(run_dir, step)
    temp = final.with_name(TEMP_PREFIX + final.name)
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir(parents=True)
    save_file(flatten_adapters(adapters), str(temp / ADAPTERS_FILE))
    _pause_for_tests(step)
    torch.save({**state, "step": step}, temp / STATE_FILE)
    _fsync_folder(temp)
    if final.exists():  # the same step saved again (e.g. a resumed run that stopped at once)
        old = final.with_name(TEMP_PREFIX + "old-" + final.name)
        os.replace(final, old)
        os.replace(temp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(temp, final)
    for stale in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def load_checkpoint(path: Path) -> tuple[dict, dict]:
    """``(adapters, state)`` of a checkpoint folder."""
    path = Path(path)
    try:
        adapters = unflatten_adapters(load_file(str(path / ADAPTERS_FILE)))
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as err:
        raise ValueError(f"checkpoint {path} is unreadable ({err}): delete it to resume from the one before") from err
    return adapters, state


def _fsync_folder(folder: Path) -> None:
    # the rename must not reach the disk before the files' contents do
    for f in folder.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def _pause_for_tests(step: int) -> None:
    wanted = os.environ.get(PAUSE_ENV)
    if wanted:
        at_step, seconds = wanted.split(":")
        if int(at_step) == step:
            time.sleep(float(seconds))


# --- the run's state: what a checkpoint holds and how a run resumes from it ---------------------
def training_state(parts: LoopParts) -> tuple[dict, dict]:
    """``(adapters, state)`` of a checkpoint; RNG states come from every process."""
    from accelerate.utils import gather_object

    from .models import adapter_state_dict

    adapters = {name: adapter_state_dict(parts.family.network, name) for name in ADAPTERS}
    rng = gather_object([{"generator": parts.generator.get_state(), "torch": torch.get_rng_state()}])
    state = {
        "optimizers": {name: parts.optimizers[name].state_dict() for name in ADAPTERS},
        "schedulers": {name: parts.schedulers[name].state_dict() for name in ADAPTERS},
        "rng": rng,
        "num_processes": parts.accelerator.num_processes,
    }
    if parts.scalers:  # fp16 loss scales, one per optimiser
        state["grad_scalers"] = {name: scaler.state_dict() for name, scaler in parts.scalers.items()}
    return adapters, state


def restore_state(parts: LoopParts, checkpoint: Path) -> int:
    from .models import load_adapter_state_dict

    adapters, state = load_checkpoint(checkpoint)
    accelerator = parts.accelerator
    if state["num_processes"] != accelerator.num_processes:
        raise ConfigError(f"checkpoint {checkpoint} was written by {state['num_processes']} processes: resume with as many")
    for name in ADAPTERS:
        load_adapter_state_dict(parts.family.network, name, {k: v.to(accelerator.device) for k, v in adapters[name].items()})
        parts.optimizers[name].load_state_dict(state["optimizers"][name])
        parts.schedulers[name].load_state_dict(state["schedulers"][name])
    for name, scaler in parts.scalers.items():
        if name in state.get("grad_scalers", {}):
            scaler.load_state_dict(state["grad_scalers"][name])
    rng = state["rng"][accelerator.process_index]
    parts.generator.set_state(rng["generator"])
    torch.set_rng_state(rng["torch"])
    return int(state["step"])


def adapters_digest(parts: LoopParts) -> str:
    """sha256 of both adapters, the same on every process when data parallel works."""
    digest = hashlib.sha256()
    for name in ADAPTERS:
        for p in parts.params[name]:
            digest.update(p.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def check_processes_agree(parts: LoopParts) -> str:
    # collective: a silent divergence of data-parallel processes would make the checkpoint a lie
    from accelerate.utils import gather_object

    digests = gather_object([adapters_digest(parts)])
    if len(set(digests)) != 1:
        raise RuntimeError(f"data-parallel processes hold different adapters ({digests}): report this as a bug")
    return digests[0]


def write_checkpoint(parts: LoopParts, run_dir: Path, step: int, keep: int) -> None:
    """Collective: every process takes part; the main process writes."""
    check_processes_agree(parts)
    adapters, state = training_state(parts)
    if parts.accelerator.is_main_process:
        save_checkpoint(run_dir, step, adapters, state, keep=keep)
    parts.accelerator.wait_for_everyone()
