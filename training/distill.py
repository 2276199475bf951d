"""``python -m training.distill``: data-free TDM distillation of a teacher into a few-step LoRA.

Single process: ``python -m training.distill --model M --prompts P.txt --output L.safetensors``.
Data parallel: ``accelerate launch --multi_gpu --num_processes N -m training.distill ...`` (same flags;
on a machine without CUDA the processes form a gloo group on CPU). Sharded (FSDP2, ``training.sharding``):
``accelerate launch --config_file training/configs/accelerate_fsdp2.yaml -m training.distill ...``.
Exit codes: 0 done, 2 bad input (nothing written), 3 NaN/inf loss (last good checkpoint kept).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from tdm_core.grids import check_grid
from tdm_core.iteration import draw_prompt_rows
from tdm_core.learning_rates import ADAMW_BETAS
from tdm_core.metadata import TDMInfo
from tdm_core.training import pseudo_huber_c_for

from .checkpoint import check_processes_agree, latest_checkpoint, remove_interrupted_writes, restore_state, write_checkpoint
from .config import DistillConfig, parse_config, read_prompts
from .errors import EXIT_BAD_INPUT, EXIT_NON_FINITE, EXIT_OK, ConfigError, NonFiniteLoss, TrainingInputError
from .ema import new_student_ema, student_ema_applied
from .loop import LoopParts, tdm_iteration
from .models import FAKE_SCORE, STUDENT, TDM_ADAPTERS
from .precision import Precision, save_dtype

# test hook: sleep this many seconds after the LoRA's temporary file is complete, before the rename
PAUSE_LORA_ENV = "TDM_TEST_PAUSE_IN_LORA_WRITE"
STAGING_SUFFIX = ".tdm-export"


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_config(argv)
        return run(cfg)
    except (ConfigError, TrainingInputError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except NonFiniteLoss as err:
        print(f"error: training stopped: {err}", file=sys.stderr)
        return EXIT_NON_FINITE


def resolved_huber_c(cfg: DistillConfig, latent_shape) -> float | None:
    # the c the loss really uses, for the LoRA metadata (METHOD.md step 7 defaults)
    if cfg.distance == "l2":
        return None
    if cfg.huber_c is not None:
        return cfg.huber_c
    return 1e-3 if cfg.distance == "huber" else pseudo_huber_c_for(torch.empty((1, *latent_shape[1:])))


def load_teacher(cfg: DistillConfig, accelerator, precision: Precision, device=None):
    from .models import add_tdm_adapters, load_family

    device = accelerator.device if device is None else device
    family = load_family(cfg.model, None if cfg.family == "auto" else cfg.family, device=device,
                         dtype=precision.weight_dtype, config_path=cfg.model_config)
    grid = cfg.trajectory_grid()
    try:
        check_grid(grid, family.num_timesteps)
    except ValueError as err:
        raise ConfigError(f"--grid does not fit this model: {err}") from err
    if cfg.total_steps > family.num_timesteps:
        raise ConfigError(f"--total-steps {cfg.total_steps} exceeds the model's {family.num_timesteps} timesteps")
    torch.manual_seed(cfg.seed)  # the LoRA initialisation is identical on every process
    add_tdm_adapters(family, cfg.lora_rank, cfg.alpha())
    if cfg.gradient_checkpointing:
        if not hasattr(family.network, "enable_gradient_checkpointing"):
            raise ConfigError(f"the {family.name} network has no gradient checkpointing: drop --gradient-checkpointing")
        family.network.enable_gradient_checkpointing()
    return family, grid


def build_optimisers(cfg: DistillConfig, params: dict, accelerator):
    from diffusers.optimization import get_scheduler

    if cfg.use_8bit_adam:
        import bitsandbytes as bnb

        adamw = bnb.optim.AdamW8bit
    else:
        adamw = torch.optim.AdamW
    rates = {FAKE_SCORE: cfg.fake_lr(), STUDENT: cfg.student_lr()}
    optimizers, schedulers = {}, {}
    for name in TDM_ADAPTERS:
        # METHOD.md step 8: AdamW betas (0, 0.95), student lr = fake lr / 5; rates and schedule: training.config
        optimizer = adamw(params[name], lr=rates[name], betas=ADAMW_BETAS, weight_decay=cfg.weight_decay)
        extra = {"num_cycles": cfg.lr_num_cycles} if cfg.lr_scheduler == "cosine_with_restarts" else {}
        # a scheduler steps once per update: the fake score's decay spans its updates over the whole run, and its
        # warm-up counts its own updates (--fake-score-updates N: N per iteration)
        updates_per_iteration = cfg.fake_score_updates if name == FAKE_SCORE else 1
        schedulers[name] = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                         num_training_steps=cfg.max_train_steps * updates_per_iteration, **extra)
        optimizers[name] = accelerator.prepare_optimizer(optimizer)
    return optimizers, schedulers


def export_lora(parts: LoopParts, cfg: DistillConfig, step: int, latent_shape, network=None) -> Path:
    """The final student LoRA (kohya layout, TDM metadata) via training.lora_io, renamed into place
    only when complete so a kill never leaves a half-written file at ``--output``. ``network``: the
    student gathered from its shards (``training.sharding.consolidated``) under FSDP2."""
    from .lora_io import export_student_lora
    from .sharding import WithNetwork

    family, grid = parts.family, cfg.trajectory_grid()  # steps-aware: the grid of the largest K
    if network is not None:
        family = WithNetwork(family, network)
    info = TDMInfo(
        num_steps=len(grid), grid=grid, total_steps=cfg.total_steps, num_timesteps=family.num_timesteps,
        prediction_type=family.prediction_type, base_family=family.name, teacher_cfg=cfg.cfg, distance=cfg.distance,
        huber_c=resolved_huber_c(cfg, latent_shape), recommended_strength=1.0, training_steps=step,
        k_choices=cfg.k_choice_list() if cfg.steps_aware else [],
        flow_shift=float(family.schedule.shift) if getattr(family.schedule, "kind", "") == "flow" else None,
    )
    output = Path(cfg.output)
    # a private folder beside the output (same file system, so the rename is atomic)
    staging = output.with_name(f".{output.name}.{os.getpid()}{STAGING_SUFFIX}")
    shutil.rmtree(staging, ignore_errors=True)
    staged = export_student_lora(family, staging / output.name, info, dtype=save_dtype(cfg.save_precision, cfg.mixed_precision))
    if cfg.steps_aware:
        add_k_table(staged, student_k_table(family.network))
    if os.environ.get(PAUSE_LORA_ENV):
        time.sleep(float(os.environ[PAUSE_LORA_ENV]))
    os.replace(staged, output)
    shutil.rmtree(staging, ignore_errors=True)
    return output


def student_k_table(network) -> dict:
    """``{K_EMBEDDING_KEY: E}`` of the student (training.steps_aware), from the network or from its
    gathered adapter (FSDP2)."""
    from .sharding import ConsolidatedNetwork
    from .steps_aware import TABLE_STATE_KEY, k_embedding_tensors

    if isinstance(network, ConsolidatedNetwork):
        from tdm_core.steps_aware import K_EMBEDDING_KEY

        from .models import adapter_state_dict

        table = adapter_state_dict(network, STUDENT).get(TABLE_STATE_KEY)
        return {} if table is None else {K_EMBEDDING_KEY: table.detach().float().cpu().clone()}
    return k_embedding_tensors(network, STUDENT)


def add_k_table(lora_path: Path, k_table: dict) -> None:
    """Steps-aware: the student's K table (``student_k_table``) goes into the LoRA file under its own
    key (tdm_core.steps_aware.K_EMBEDDING_KEY), and nowhere else."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from .lora_io import save_safetensors_atomic
    from .steps_aware import TABLE_STATE_KEY

    with safe_open(str(lora_path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = {k: v for k, v in load_file(str(lora_path)).items() if not k.endswith(TABLE_STATE_KEY)}
    save_safetensors_atomic({**tensors, **k_table}, lora_path, metadata)


def remove_interrupted_exports(output: Path) -> None:
    for stale in output.parent.glob(f".{output.name}.*{STAGING_SUFFIX}"):
        shutil.rmtree(stale, ignore_errors=True)


class RunLog:
    """log.jsonl (always) and TensorBoard (when installed), main process only."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.path, self.enabled, self.tensorboard = run_dir / "log.jsonl", enabled, None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:  # tensorboard is optional
                pass

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.tensorboard is not None:
            for key, value in scalars(metrics).items():
                self.tensorboard.add_scalar(key, value, step)


def scalars(metrics: dict) -> dict:
    """The metrics as TensorBoard scalars: the per-step fidelity list becomes ``fidelity/step<i>/<measure>``."""
    flat = {}
    for key, value in metrics.items():
        if isinstance(value, list):
            for i, entry in enumerate(value, start=1):
                flat.update({f"{key}/step{i}/{name}": v for name, v in entry.items() if name != "t" and v is not None})
        elif value is not None:
            flat[key] = value
    return flat


def draw_prompt_batch(prompts: list[str], batch_size: int, generator: torch.Generator) -> list[str]:
    return [prompts[i] for i in draw_prompt_rows(len(prompts), batch_size, generator)]


def encode(family, prompts: list[str]) -> dict:
    # a family refuses prompts it cannot condition on (e.g. digits wants "0".."9") with a ValueError
    try:
        return family.encode_prompts(prompts)
    except ValueError as err:
        raise ConfigError(f"the {family.name} model cannot use a prompt of --prompts: {err}") from err


def validate_now(parts: LoopParts, cfg: DistillConfig, prompts: list[str], step: int, fidelity: Optional[list] = None,
                 probed_at: Optional[int] = None) -> None:
    """The main process writes the grid and, beside it as text, the probe's latest per-step fidelity; under FSDP2
    every process samples it (forwards are collective)."""
    from tdm_core.fidelity import fidelity_table
    from tdm_core.atomic import atomic_write, save_png_atomic
    from .validation import grid_image, validation_columns

    main = parts.accelerator.is_main_process
    if main or parts.sharding is not None:
        chosen = prompts[: cfg.validation_prompts]
        family = parts.family
        with parts.precision.autocast():  # the base may be in half precision
            columns = validation_columns(family, encode(family, chosen), family.null_condition(len(chosen)), len(chosen),
                                         cfg.resolution, parts.accelerator.device, parts.grid, cfg.total_steps, parts.cfg_scale,
                                         cfg.teacher_validation_steps)
        if main:
            path = cfg.run_dir() / "validation" / f"step-{step:08d}.png"
            save_png_atomic(grid_image(columns), path)
            if fidelity:
                with atomic_write(path.with_suffix(".txt")) as temp:
                    temp.write_text(f"{path.name}: columns are the teacher, then the student at 1, 2, 4 steps.\n"
                                    f"Per student step vs the teacher's ODE, on the probe at step {probed_at}:\n"
                                    + fidelity_table(fidelity) + "\n")
    parts.accelerator.wait_for_everyone()


def set_num_frames(family, num_frames) -> None:
    """A video family's frame count (its own default when None); refused on image families."""
    if hasattr(family, "set_num_frames"):
        family.set_num_frames(num_frames)
    elif num_frames is not None:
        raise ConfigError(f"--num-frames {num_frames} is for video models; {family.name} makes images: drop --num-frames")


def build_parts(cfg: DistillConfig, accelerator) -> tuple[LoopParts, tuple[int, ...]]:
    """Teacher with both adapters (sharded under FSDP2), optimisers, schedules and the run's generator;
    the latent shape."""
    from .models import adapter_parameters
    from .sharding import fsdp_plugin, load_device, place_family, shard_network

    plugin = fsdp_plugin(cfg)
    if plugin is not None and accelerator.num_processes == 1:
        accelerator.print("FSDP2 with one process has nothing to shard: training without it")
        plugin = None
    precision = Precision(cfg.mixed_precision, accelerator.device.type)
    family, grid = load_teacher(cfg, accelerator, precision, load_device(accelerator, plugin))
    try:
        set_num_frames(family, cfg.num_frames)  # video families: before the latent shape, which has the frames
        latent_shape = family.latent_shape(cfg.batch_size, cfg.resolution)
        family.set_resolution(cfg.resolution)  # Flux: the shift of this image size
        cfg_scale = family.apply_guidance(cfg.cfg)  # Flux.1-dev: --cfg is the guidance input, no CFG pass
    except ValueError as err:
        raise ConfigError(str(err)) from err
    if cfg.steps_aware:  # before collecting parameters: each K table trains with its adapter
        from .steps_aware import install_k_embedding

        install_k_embedding(family.network, cfg.k_choice_list(), (STUDENT, FAKE_SCORE) if cfg.k_on_fake_score else (STUDENT,))
    sharding = None
    if plugin is not None:  # the optimisers are built over the sharded parameters
        sharding = shard_network(family.network, accelerator, plugin, TDM_ADAPTERS)
        place_family(family, accelerator.device)
    params = {name: adapter_parameters(family.network, name) for name in TDM_ADAPTERS}
    optimizers, schedulers = build_optimisers(cfg, params, accelerator)
    scalers = {name: precision.new_scaler() for name in TDM_ADAPTERS} if cfg.mixed_precision == "fp16" else {}
    parts = LoopParts(
        family=family, accelerator=accelerator, precision=precision, grid=grid, batch_cfg=cfg.batch_cfg, scalers=scalers, total_steps=cfg.total_steps, cfg_scale=cfg_scale,
        distance=cfg.distance, huber_c=resolved_huber_c(cfg, latent_shape), interval_mode=cfg.interval_mode,
        randmid=cfg.randmid, fake_score_weighting=cfg.fake_score_weighting, fake_score_updates=cfg.fake_score_updates, fake_score_rollouts=cfg.fake_score_rollouts, max_grad_norm=cfg.max_grad_norm, micro_batch=cfg.batch_size,
        # each process draws its own prompts, noise and times; the seed makes every draw reproducible
        generator=torch.Generator().manual_seed(cfg.seed + 7919 * accelerator.process_index),
        params=params, optimizers=optimizers, schedulers=schedulers, sharding=sharding,
        student_ema=new_student_ema(params[STUDENT], cfg.student_ema),
    )
    return parts, latent_shape


def cpu_only_distributed() -> bool:
    # `accelerate launch --multi_gpu` / torchrun on a machine without CUDA: accelerate only forms the
    # (gloo) process group of CPU processes when told cpu=True, else every process trains alone
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def start_run(cfg: DistillConfig, accelerator) -> tuple[LoopParts, tuple[int, ...], int]:
    """Everything set up, resumed from the latest checkpoint when asked; returns the start step."""
    parts, latent_shape = build_parts(cfg, accelerator)
    run_dir = cfg.run_dir()
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_interrupted_writes(run_dir)
        remove_interrupted_exports(Path(cfg.output))
    accelerator.wait_for_everyone()
    checkpoint = latest_checkpoint(run_dir) if cfg.resume else None
    if checkpoint is not None:
        step = restore_state(parts, checkpoint)
        accelerator.print(f"resumed from {checkpoint} at step {step}")
        return parts, latent_shape, step
    if cfg.resume:
        accelerator.print(f"no checkpoint in {run_dir / 'checkpoints'}: starting a new run")
    return parts, latent_shape, 0


def new_probe(parts: LoopParts, cfg: DistillConfig, prompts: list[str], latent_shape):
    """The fixed probe of training.progress (main process only: it only reports; under FSDP2 on every
    process, as its forwards are collective)."""
    from .progress import PROBE_SIZE, Probe

    if not parts.accelerator.is_main_process and parts.sharding is None:
        return None
    chosen = prompts[:PROBE_SIZE]
    return Probe.build(parts, encode(parts.family, chosen), parts.family.null_condition(len(chosen)), latent_shape, cfg.trajectory_grid())


def measure_movement(parts: LoopParts, probe) -> dict:
    """The probe on the student the run hands out (with --student-ema, the average)."""
    with student_ema_applied(parts):
        if parts.sharding is None:
            return probe.measure(parts)
        from .sharding import lora_delta

        return {"probe_change": probe.change(parts), "lora_delta": lora_delta(parts, STUDENT), "fidelity": probe.fidelity(parts)}


def train_step(parts: LoopParts, cfg: DistillConfig, prompts: list[str], null_cond: dict, latent_shape) -> dict:
    """One update of each adapter on a batch of --batch-size x --gradient-accumulation-steps prompts: its K
    (steps-aware), prompts, noise and times drawn as one batch, its network calls in chunks of --batch-size
    rows (``parts.micro_batch``), so accumulation gives the step of the whole batch. Returns the metrics."""
    from .sharding import share_num_steps
    from .steps_aware import begin_batch

    if cfg.steps_aware:  # this batch's K, its grid and the network's K condition
        k = begin_batch(parts, cfg.k_choice_list())
        if parts.sharding is not None:
            share_num_steps(parts, k)
    rows = cfg.batch_size * cfg.gradient_accumulation_steps
    cond = encode(parts.family, draw_prompt_batch(prompts, rows, parts.generator))
    return tdm_iteration(parts, cond, null_cond, (rows, *latent_shape[1:]))


def precompute_embeddings(family, cfg: DistillConfig, prompts: list[str]) -> None:
    """--precompute-embeddings: every prompt encoded once into the family's cache, then the text encoders offloaded
    (before the probe runs the teacher, so their memory is free by then)."""
    if cfg.precompute_embeddings:
        for start in range(0, len(prompts), 32):
            encode(family, prompts[start : start + 32])
        family.null_condition(1)  # the empty prompt too (CFG's), on the accelerator like the others
        if hasattr(family, "offload_text_encoders"):  # every embedding is cached: free the GPU memory
            family.offload_text_encoders()


def train(parts: LoopParts, cfg: DistillConfig, prompts: list[str], latent_shape, step: int, probe) -> int:
    """Student updates from ``step`` to --stop-at-step or --max-train-steps; returns the last step. ``probe``
    (``new_probe``; None on the processes that do not measure) is measured every --probe-every steps."""
    from tqdm.auto import tqdm

    from .progress import LossWatch

    family, accelerator = parts.family, parts.accelerator
    null_cond = family.null_condition(cfg.batch_size)
    log = RunLog(cfg.run_dir(), accelerator.is_main_process)
    movement, probed_at, watch = {}, None, LossWatch(max(0, cfg.lr_warmup_steps - step))  # a resumed run's warm-up is behind it
    stop_at = min(cfg.max_train_steps, cfg.stop_at_step or cfg.max_train_steps)
    bar = tqdm(total=cfg.max_train_steps, initial=step, disable=not accelerator.is_main_process, desc="TDM", unit="step")
    saved_at = step
    while step < stop_at:
        metrics = train_step(parts, cfg, prompts, null_cond, latent_shape)
        if parts.student_ema is not None:
            parts.student_ema.step(parts.params[STUDENT])
        step += 1
        if probe is not None and cfg.probe_every and (step % cfg.probe_every == 0 or step == stop_at):
            movement, probed_at = measure_movement(parts, probe), step
            metrics = {**metrics, **movement}
        log.write(step, metrics)
        bar.update(1)
        bar.set_postfix(**watch.postfix(metrics, movement))
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            write_checkpoint(parts, cfg.run_dir(), step, cfg.keep_checkpoints)
            saved_at = step
        if cfg.validate_every and step % cfg.validate_every == 0:
            with student_ema_applied(parts):
                validate_now(parts, cfg, prompts, step, movement.get("fidelity"), probed_at)
    bar.close()
    if saved_at != step:
        write_checkpoint(parts, cfg.run_dir(), step, cfg.keep_checkpoints)
    return step


def run(cfg: DistillConfig) -> int:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    prompts = read_prompts(cfg.prompts)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # main() may run several times in one Python process (tests, notebooks) with other settings
        AcceleratorState._reset_state(reset_partial_state=True)
    # mixed precision is training.precision's (per-optimiser fp16 scalers), so accelerate's stays off
    # gradient accumulation is the loop's (training.loop: the batch evaluated in chunks), not accelerate's
    accelerator = Accelerator(mixed_precision="no", cpu=cpu_only_distributed())
    parts, latent_shape, step = start_run(cfg, accelerator)
    precompute_embeddings(parts.family, cfg, prompts)
    probe = new_probe(parts, cfg, prompts, latent_shape)  # the teacher's probe samples and ODE, built once
    step = train(parts, cfg, prompts, latent_shape, step, probe)
    if step < cfg.max_train_steps:
        accelerator.print(f"stopped at step {step} of {cfg.max_train_steps}: continue with --resume")
        return EXIT_OK
    digest = check_processes_agree(parts)
    if parts.sharding is None:
        accelerator.print(f"adapters identical on {accelerator.num_processes} process(es): sha256 {digest}")
    else:
        accelerator.print(f"adapters gathered from {accelerator.num_processes} FSDP2 shards: sha256 {digest}")
    student = None
    if parts.sharding is not None:
        from .sharding import consolidated

        student = consolidated(parts, STUDENT)  # collective; the whole adapter on the main process
    if accelerator.is_main_process:
        with student_ema_applied(parts):
            accelerator.print(f"wrote {export_lora(parts, cfg, step, latent_shape, student)}")
    report_movement(parts, cfg, probe)
    accelerator.wait_for_everyone()
    return EXIT_OK


def report_movement(parts: LoopParts, cfg: DistillConfig, probe) -> None:
    """The run's final word (training.progress): how far the student moved, the loss trends, and a
    warning naming the flags to change when it barely moved or diverged; also written to summary.json."""
    from tdm_core.atomic import atomic_write
    from .progress import final_word

    if probe is None:  # a data-parallel process other than the main one
        return
    movement = measure_movement(parts, probe)
    if not parts.accelerator.is_main_process:  # FSDP2: took part in the probe's forwards
        return
    log_path = cfg.run_dir() / "log.jsonl"
    entries = [json.loads(line) for line in log_path.read_text().splitlines()] if log_path.is_file() else []
    text, barely, diverged = final_word(movement, [e["loss_fake"] for e in entries], [e["loss_student"] for e in entries], cfg)
    print(text, file=sys.stderr if barely or diverged else sys.stdout)
    summary = {**movement, "barely_moved": barely, "diverged": diverged, "steps": cfg.max_train_steps, "message": text}
    with atomic_write(cfg.run_dir() / "summary.json") as temp:
        temp.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
