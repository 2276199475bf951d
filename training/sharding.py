"""FSDP2 for ``training.distill``: the frozen base sharded across processes, both LoRA adapters trained.

Chosen by the accelerate config, not by a trainer flag: ``accelerate launch --config_file
training/configs/accelerate_fsdp2.yaml -m training.distill ...`` (``distributed_type: FSDP``,
``fsdp_version: 2``) exports ``ACCELERATE_USE_FSDP=true`` and the ``FSDP_*`` settings, which
:func:`fsdp_plugin` reads through accelerate's own ``FullyShardedDataParallelPlugin``.

The network, with both adapters already injected (and the steps-aware K tables installed), is
sharded by torch's ``fully_shard``: one FSDP unit per block that accelerate's wrap policy picks
(``TRANSFORMER_BASED_WRAP``: the network's ``_no_split_modules``, e.g. diffusers' BasicTransformerBlock
and ResnetBlock2D, or ``fsdp_transformer_layer_cls_to_wrap``), bottom-up, then the root. PEFT's LoRA
layers live inside those blocks, so each unit holds its frozen weights and both adapters' LoRA
weights; every forward all-gathers a unit's parameters whatever adapter is active (the switch only
sets flags on the PEFT layers, ``training.models.use_adapter``). FSDP2 checks a uniform dtype over
the *trainable* parameters of a unit only, so a bf16/fp16 base with fp32 LoRA weights shards as is.

Why not ``accelerator.prepare(network, optimizers...)``? accelerate 1.15 allows one model per
``prepare`` under FSDP2 (``Accelerator.prepare`` raises "Only one model is supported when using
FSDP2"), the model together with its optimisers ("a model and optimizer must be passed together"),
and ``prepare_model`` alone raises for FSDP2. One network carrying both adapters, with both
optimisers in one call, would satisfy that. But accelerate only enters its FSDP path on an
accelerator: ``AcceleratorState`` sets ``DistributedType.FSDP`` only when the process group is one of
GPUs/NPUs/XPUs/HPUs..., never for ``MULTI_CPU`` (state.py), so on a CPU machine ``prepare`` would wrap
the network in DDP instead and the sharded path could not run, or be tested, here. So this module calls
``fully_shard`` itself, with accelerate's wrap policy (``fsdp2_prepare_auto_wrap_policy``) and the
plugin's ``reshard_after_forward`` / ``cpu_offload``, on CPU (gloo) and GPU (NCCL) alike; the
Accelerator still forms the process group and does the collectives of the metrics.

What changes against data parallelism (``training.loop``): FSDP reduce-scatters the gradients, so
``average_gradients`` is skipped; ``clip_grad_norm_`` over DTensor gradients returns the global norm as
a DTensor (made a plain tensor here); plain ``torch.amp.GradScaler`` is safe, as DTensor all-reduces
its found-inf flag over the mesh. Checkpoints are sharded (``torch.distributed.checkpoint``, one file
per process under ``<checkpoint>/shards``; resharding on load is DCP's, but the RNG states are per
process, so resume with as many processes). The final LoRA is gathered tensor by tensor and written
by the main process in the same format as a data-parallel run's.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .errors import ConfigError

FSDP_ENV = "ACCELERATE_USE_FSDP"
SHARDS_DIR = "shards"  # inside a checkpoint folder: torch.distributed.checkpoint's files (.distcp, .metadata)
FSDP_CONFIG_HINT = "training/configs/accelerate_fsdp2.yaml"


def fsdp_requested() -> bool:
    return os.environ.get(FSDP_ENV, "false").lower() == "true"


def fsdp_plugin(cfg):
    """accelerate's FSDP settings of this launch (from the FSDP_* environment ``accelerate launch``
    exports), or None for plain data parallelism; refuses settings the trainer does not support."""
    if not fsdp_requested():
        return None
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        raise ConfigError(f"the accelerate config asks for FSDP version {plugin.fsdp_version}: set fsdp_version: 2 (see {FSDP_CONFIG_HINT})")
    if plugin.activation_checkpointing:
        raise ConfigError("fsdp_activation_checkpointing is not supported: set it to false and pass --gradient-checkpointing")
    if plugin.cpu_ram_efficient_loading:
        raise ConfigError("fsdp_cpu_ram_efficient_loading applies to transformers models only: set it to false")
    if plugin.mixed_precision_policy is not None:
        raise ConfigError("the FSDP mixed-precision policy is not used: drop it from fsdp_config and pass --mixed-precision (training.precision)")
    if cfg.use_8bit_adam:
        raise ConfigError("--use-8bit-adam does not run on FSDP2's sharded (DTensor) parameters: drop it, or launch without FSDP")
    if cfg.student_ema:
        raise ConfigError(f"--student-ema {cfg.student_ema:g} is not supported with FSDP2 yet: drop it, or launch without FSDP")
    return plugin


def load_device(accelerator, plugin) -> torch.device:
    """Where the teacher loads: on the CPU when sharding (fully_shard then moves one unit at a time to the
    accelerator and keeps its shard there, so no GPU ever holds the whole base), else the accelerator."""
    return torch.device("cpu") if plugin is not None else accelerator.device


def place_family(family, device: torch.device) -> None:
    """After sharding: the parts of a family other than its network (text encoders, VAE) to ``device``.
    A no-op when the teacher was loaded there already (CPU runs)."""
    device = torch.device(device)
    pipeline = getattr(family, "pipeline", None)
    if pipeline is not None:
        for module in pipeline.components.values():
            if isinstance(module, nn.Module) and module is not family.network:
                module.to(device)
    for attr in ("device", "text_device"):  # pipeline families keep these as plain attributes
        if attr in vars(family):
            setattr(family, attr, device)


@dataclass
class Sharding:
    """The sharded network's FSDP units and its adapter parameters, taken right after sharding (the
    sharded DTensors the optimisers own: ``named_parameters()`` shows unsharded tensors while a unit is
    gathered)."""

    mesh: object
    units: list = field(default_factory=list)  # every FSDPModule, bottom-up, the root last
    named: dict = field(default_factory=dict)  # adapter name -> {parameter name: sharded parameter}

    def settle(self) -> None:
        """Every unit back to its sharded parameters (a root that keeps its parameters gathered after a
        forward, as FSDP2 does by default, would otherwise show unsharded ones)."""
        for unit in self.units:
            unit.reshard()


def shard_network(network: nn.Module, accelerator, plugin, adapters) -> Sharding:
    """``fully_shard`` every block accelerate's wrap policy picks (bottom-up), then the root."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from accelerate.utils.other import get_module_children_bottom_up
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    from .models import adapter_parameters

    mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
    options = {"mesh": mesh, "offload_policy": plugin.cpu_offload}
    policy = fsdp2_prepare_auto_wrap_policy(plugin, network)
    units = []
    if policy is not None:
        for module in get_module_children_bottom_up(network)[:-1]:
            if policy(module) and not isinstance(module, FSDPModule):
                units.append(fully_shard(module, reshard_after_forward=plugin.reshard_after_forward, **options))
    # the root as accelerate shards it: FSDP2's default keeps the root gathered from forward to backward
    units.append(fully_shard(network, **options))
    if not any(is_sharded(p) for p in network.parameters()):
        raise RuntimeError("fully_shard left no sharded parameter: report this as a bug")
    named = {}
    for name in adapters:
        wanted = {id(p) for p in adapter_parameters(network, name)}
        named[name] = {n: p for n, p in network.named_parameters() if id(p) in wanted}
    return Sharding(mesh=mesh, units=units, named=named)


def is_sharded(tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def replicated(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A DTensor result (e.g. clip_grad_norm_'s global norm) as a plain tensor, the same on every process."""
    return tensor.full_tensor() if tensor is not None and is_sharded(tensor) else tensor


def full_tensors(sharding: Sharding, adapter: str):
    """``(name, whole tensor)`` of each parameter of ``adapter``, gathered one at a time (collective:
    every process iterates to the end)."""
    sharding.settle()
    for name, param in sharding.named[adapter].items():
        yield name, replicated(param.detach())


class ConsolidatedNetwork:
    """What ``training.models.adapter_state_dict`` and ``training.lora_io.export_student_lora`` read of a
    network (``named_parameters``, ``peft_config``), holding one adapter's gathered LoRA weights."""

    def __init__(self, network: nn.Module, tensors: dict[str, torch.Tensor]):
        self.peft_config = network.peft_config
        self._tensors = tensors

    def named_parameters(self):
        return iter(self._tensors.items())


class WithNetwork:
    """A model family whose ``network`` is replaced (by a :class:`ConsolidatedNetwork` for the export)."""

    def __init__(self, family, network):
        self._family, self.network = family, network

    def __getattr__(self, name):
        return getattr(self._family, name)


def consolidated(parts, adapter: str) -> Optional[ConsolidatedNetwork]:
    """Collective: ``adapter``'s whole LoRA weights on the main process (None elsewhere)."""
    main = parts.accelerator.is_main_process
    tensors = {}
    for name, tensor in full_tensors(parts.sharding, adapter):
        if main:
            tensors[name] = tensor.cpu()
    return ConsolidatedNetwork(parts.family.network, tensors) if main else None


def share_num_steps(parts, k: int) -> int:
    """Steps-aware under FSDP2: every process runs the main process's K of this batch. Each process
    still draws its own (so every generator stays where a data-parallel run leaves it), but a roll-out
    of K forwards must be the same on all processes, as every forward gathers parameters collectively.
    Each sample's K keeps its distribution; the processes' batches of one step now share it."""
    from accelerate.utils import broadcast_object_list

    from tdm_core.steps_aware import grid_for_num_steps

    from .steps_aware import set_num_steps

    shared = int(broadcast_object_list([int(k)], from_process=0)[0])
    if shared != k:
        parts.grid = grid_for_num_steps(shared, parts.total_steps)
        set_num_steps(parts.family.network, shared)
    return shared


def lora_delta(parts, adapter: str) -> float:
    """Collective; ``training.progress.lora_delta`` on the sharded network: ``||delta W|| / ||W||`` over
    the layers ``adapter`` adapts, one FSDP unit gathered at a time (peft's ``get_delta_weight``)."""
    from peft.tuners.lora import LoraLayer
    from torch.distributed.fsdp import FSDPModule

    sharding = parts.sharding
    sharding.settle()
    delta_sq = base_sq = 0.0
    with torch.no_grad():
        for unit in sharding.units:
            owned = []  # the LoRA layers whose parameters this unit holds (no other unit in between)
            stack = [unit]
            while stack:
                module = stack.pop()
                if isinstance(module, LoraLayer) and adapter in module.lora_A:
                    owned.append(module)
                stack.extend(child for child in module.children() if not isinstance(child, FSDPModule))
            if not owned:
                continue
            unit.unshard()
            for layer in owned:
                delta_sq += float(layer.get_delta_weight(adapter).float().pow(2).sum())
                base_sq += float(layer.get_base_layer().weight.float().pow(2).sum())
            unit.reshard()
    return (delta_sq / base_sq) ** 0.5 if base_sq > 0 else 0.0


# --- checkpoints ---------------------------------------------------------------------------------
def _sharded_state(parts) -> dict:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    parts.sharding.settle()
    network, adapters = parts.family.network, parts.sharding.named  # the adapters shard_network was given
    return {
        "adapters": {name: dict(adapters[name]) for name in adapters},
        "optimizers": {name: get_optimizer_state_dict(network, parts.optimizers[name].optimizer) for name in adapters},
    }


def save_shards(parts, folder: Path) -> None:
    """Collective: both adapters and both optimisers' states, each process writing its own shards."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_sharded_state(parts), checkpoint_id=str(Path(folder) / SHARDS_DIR))


def load_shards(parts, folder: Path) -> None:
    """Collective: the counterpart of :func:`save_shards`, in place into the sharded parameters."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    state = _sharded_state(parts)  # the layout to fill (fresh optimisers get zero states to overwrite)
    dcp.load(state, checkpoint_id=str(Path(folder) / SHARDS_DIR))
    for name in state["optimizers"]:
        set_optimizer_state_dict(parts.family.network, parts.optimizers[name].optimizer, state["optimizers"][name])


def has_shards(folder: Path) -> bool:
    return (Path(folder) / SHARDS_DIR).is_dir()
