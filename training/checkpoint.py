"""Checkpoints of a distillation run, written so that a crash never loses the last good one.

A checkpoint is a folder ``<run_dir>/checkpoints/step-00000010`` holding ``adapters.tdmckpt``
(both LoRA adapters, safetensors format) and ``training_state.tdmstate`` (torch.save: optimisers,
LR schedules, every process's RNG states, the step). An FSDP2 run (``training.sharding``) writes
``shards/`` instead of ``adapters.tdmckpt`` (adapters and optimiser states, one file per process,
torch.distributed.checkpoint) and keeps the rest in ``training_state.tdmstate``. The extensions are the project's own because
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
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from tdm_core.training import DEFAULT_DISTANCE, DEFAULT_FAKE_SCORE_UPDATES

from .errors import ConfigError
from .loop import LoopParts
from .ema import EMA_ADAPTER, student_ema_applied
from .models import STUDENT, TDM_ADAPTERS

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
    temp = fresh_temp_dir(run_dir, step)
    save_file(flatten_adapters(adapters), str(temp / ADAPTERS_FILE))
    return commit_checkpoint(temp, run_dir, step, state, keep)


def temp_dir(run_dir: Path, step: int) -> Path:
    """The hidden folder checkpoint ``step`` is written into before :func:`commit_checkpoint`."""
    final = checkpoint_dir(run_dir, step)
    return final.with_name(TEMP_PREFIX + final.name)


def fresh_temp_dir(run_dir: Path, step: int) -> Path:
    temp = temp_dir(run_dir, step)
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir(parents=True)
    return temp


def commit_checkpoint(temp: Path, run_dir: Path, step: int, state: dict, keep: int) -> Path:
    """The state file into ``temp``, everything synced, ``temp`` renamed into place, older ones pruned."""
    final = checkpoint_dir(run_dir, step)
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
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def _pause_for_tests(step: int) -> None:
    wanted = os.environ.get(PAUSE_ENV)
    if wanted:
        at_step, seconds = wanted.split(":")
        if int(at_step) == step:
            time.sleep(float(seconds))


# --- the run's state: what a checkpoint holds and how a run resumes from it ---------------------
# what a resumed run must compute as the run it continues did (the defaults of two changed in issue 22)
METHOD_FLAGS = {"distance": "--distance", "huber_c": "--huber-c", "fake_score_updates": "--fake-score-updates", "fake_score_rollouts": "--fake-score-rollouts",
                "fake_score_weighting": "--fake-score-weighting", "interval_mode": "--interval-mode", "randmid": "--randmid"}
BEFORE_ISSUE_22 = {"distance": "huber", "fake_score_updates": 1}  # the defaults of checkpoints that record no method
RECORDED_LATER = {"fake_score_rollouts": "shared"}  # method flags added after checkpoints began recording it: what ran then


def method_of(parts: LoopParts) -> dict:
    settings = parts.settings()
    return {name: getattr(settings, name) for name in METHOD_FLAGS}


def _flag(name: str, value) -> str:
    if isinstance(value, bool):
        return METHOD_FLAGS[name] if value else f"no {METHOD_FLAGS[name]}"
    return f"{METHOD_FLAGS[name]} {'none' if value is None else value}"


def check_method(saved: dict | None, parts: LoopParts, checkpoint: Path) -> None:
    """A run resumes only with the method its checkpoint was written with: a ConfigError names each flag that differs."""
    now = method_of(parts)
    if saved is None:  # written before checkpoints recorded it: then the defaults were these
        differ = {name: value for name, value in BEFORE_ISSUE_22.items() if now[name] != value}
        if differ:
            print(f"warning: checkpoint {checkpoint} records no method; if its run used the defaults of its time, resume it with "
                  + " ".join(f"{METHOD_FLAGS[name]} {value}" for name, value in differ.items())
                  + f" (the defaults since issue 22 are --distance {DEFAULT_DISTANCE} --fake-score-updates {DEFAULT_FAKE_SCORE_UPDATES})",
                  file=sys.stderr)
        return
    saved = {**RECORDED_LATER, **saved}
    differ = {name: value for name, value in saved.items() if name in now and now[name] != value}
    if differ:
        wanted = ", ".join(_flag(name, value) for name, value in differ.items())
        got = ", ".join(_flag(name, now[name]) for name in differ)
        raise ConfigError(f"checkpoint {checkpoint} was written with {wanted}, this run has {got}: resume with the run's own "
                          "flags, or delete the run folder's checkpoints to start over with the new ones")


def run_state(parts: LoopParts) -> dict:
    """What every checkpoint holds beside adapters and optimisers: LR schedules, the RNG states of every
    process (collective), the process count and the fp16 loss scales."""
    from accelerate.utils import gather_object

    rng = gather_object([{"generator": parts.generator.get_state(), "torch": torch.get_rng_state()}])
    state = {
        "schedulers": {name: parts.schedulers[name].state_dict() for name in TDM_ADAPTERS},
        "rng": rng,
        "num_processes": parts.accelerator.num_processes,
        "method": method_of(parts),
    }
    if parts.scalers:  # fp16 loss scales, one per optimiser
        state["grad_scalers"] = {name: scaler.state_dict() for name, scaler in parts.scalers.items()}
    return state


def training_state(parts: LoopParts) -> tuple[dict, dict]:
    """``(adapters, state)`` of a data-parallel checkpoint; RNG states come from every process."""
    from .models import adapter_state_dict

    adapters = {name: adapter_state_dict(parts.family.network, name) for name in TDM_ADAPTERS}
    state = {**run_state(parts), "optimizers": {name: parts.optimizers[name].state_dict() for name in TDM_ADAPTERS}}
    if parts.student_ema is not None:  # the average: its state to resume, its weights for whoever reads the checkpoint
        state[EMA_ADAPTER] = parts.student_ema.state_dict()
        with student_ema_applied(parts):
            adapters[EMA_ADAPTER] = adapter_state_dict(parts.family.network, STUDENT)
    return adapters, state


def restore_state(parts: LoopParts, checkpoint: Path) -> int:
    from . import sharding
    from .models import load_adapter_state_dict

    accelerator = parts.accelerator
    sharded = sharding.has_shards(checkpoint)
    if sharded != (parts.sharding is not None):
        written, wanted = ("an FSDP2", "the FSDP2 accelerate config") if sharded else ("a data-parallel", "a launch without FSDP")
        raise ConfigError(f"checkpoint {checkpoint} was written by {written} run: resume it with {wanted} "
                          f"({sharding.FSDP_CONFIG_HINT}), or delete the run folder's checkpoints to start over")
    if sharded:
        try:
            state = torch.load(Path(checkpoint) / STATE_FILE, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError) as err:
            raise ValueError(f"checkpoint {checkpoint} is unreadable ({err}): delete it to resume from the one before") from err
    else:
        adapters, state = load_checkpoint(checkpoint)
    if state["num_processes"] != accelerator.num_processes:
        raise ConfigError(f"checkpoint {checkpoint} was written by {state['num_processes']} processes: resume with as many")
    check_method(state.get("method"), parts, checkpoint)
    if sharded:
        sharding.load_shards(parts, checkpoint)
    for name in TDM_ADAPTERS:
        if not sharded:
            load_adapter_state_dict(parts.family.network, name, {k: v.to(accelerator.device) for k, v in adapters[name].items()})
            parts.optimizers[name].load_state_dict(state["optimizers"][name])
        parts.schedulers[name].load_state_dict(state["schedulers"][name])
    for name, scaler in parts.scalers.items():
        if name in state.get("grad_scalers", {}):
            scaler.load_state_dict(state["grad_scalers"][name])
    restore_student_ema(parts, state.get(EMA_ADAPTER), checkpoint)
    rng = state["rng"][accelerator.process_index]
    parts.generator.set_state(rng["generator"])
    torch.set_rng_state(rng["torch"])
    return int(state["step"])


def restore_student_ema(parts: LoopParts, saved: Optional[dict], checkpoint: Path) -> None:
    """The average of --student-ema resumes with the run, at the decay it was written with (ConfigError otherwise)."""
    ema = parts.student_ema
    written = None if saved is None else saved["decay"]
    wanted = None if ema is None else ema.decay
    if written != wanted:
        def flag(decay):
            return "no --student-ema" if decay is None else f"--student-ema {decay:g}"
        raise ConfigError(f"checkpoint {checkpoint} was written with {flag(written)}, this run has {flag(wanted)}: resume with the "
                          "run's own flags, or delete the run folder's checkpoints to start over with the new ones")
    if ema is not None:
        ema.load_state_dict(saved)
        ema.to(device=parts.accelerator.device)


def adapters_digest(parts: LoopParts) -> str:
    """sha256 of both adapters, the same on every process when data parallel works. Under FSDP2 each
    shard has one owner, so the digest is of the gathered tensors (collective) and agrees by
    construction; it is still the run's fingerprint that the log prints."""
    from .sharding import full_tensors

    digest = hashlib.sha256()
    for name in TDM_ADAPTERS:
        tensors = (t for _, t in full_tensors(parts.sharding, name)) if parts.sharding is not None else parts.params[name]
        for p in tensors:
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
    """Collective: every process takes part; the main process writes (under FSDP2 every process
    writes its shards into the main process's temporary folder, then the main process commits it)."""
    check_processes_agree(parts)
    accelerator = parts.accelerator
    if parts.sharding is not None:
        from .sharding import save_shards

        temp = temp_dir(run_dir, step)
        if accelerator.is_main_process:
            fresh_temp_dir(run_dir, step)
        accelerator.wait_for_everyone()
        save_shards(parts, temp)
        state = run_state(parts)
        if accelerator.is_main_process:
            commit_checkpoint(temp, run_dir, step, state, keep)
    else:
        adapters, state = training_state(parts)
        if accelerator.is_main_process:
            save_checkpoint(run_dir, step, adapters, state, keep=keep)
    accelerator.wait_for_everyone()
