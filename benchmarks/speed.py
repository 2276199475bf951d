"""Speed and memory of TDM training and sampling, each measurement in a fresh subprocess.

Training designs, all on the same UNet2DConditionModel, batch and K (``--config``):

- ``lora``: the project as it trains: ``training.distill.build_parts`` (one frozen base with the
  ``student`` and ``fake_score`` LoRA adapters, the trainer's defaults but one fake-score update per iteration) and
  ``training.loop.tdm_iteration``.
- ``floor``: the network work of one ``lora`` iteration timed alone on the same LoRA'd network, switched
  with ``use_adapter`` as the loop does (``training.loop.network_output``), without the method's
  bookkeeping or the optimiser steps: K no-grad roll-out forwards at B, fake-score forward + backward
  at B, student forward + backward at B, the teacher's CFG pair as one no-grad forward at 2B and the
  fake score's no-grad forward at B. The network-bound floor of an iteration.
- ``reference``: the reference script's design: a frozen teacher plus fully fine-tuned student and fake
  score copies, each with its own AdamW, running the same ``tdm_core.iteration.tdm_iteration`` with
  three plain networks as its denoisers.
- ``reference_shared``: the reference's operations with the three roles played by ONE trainable copy
  and one AdamW stepped twice per iteration: the same forwards, full backwards, gradient clipping and
  AdamW steps over every parameter, in about half the memory. A timing stand-in for ``reference`` on a
  model whose three copies do not fit this machine; its memory is not the reference's.
- ``baseline``: the imports and the frozen model loaded, nothing trained.

``switch`` times ``training.models.use_adapter`` enter+exit on SD1.5- and SDXL-size UNets built on
the meta device from ``training/configs`` (no weights) with their family's LoRA targets;
``components`` times each kind of network call of both designs alone (where the time goes);
``sampling`` times the tdm_core samplers.

Memory: the subprocess's own resident high-water mark (``VmHWM`` of /proc/self/status;
``resource.getrusage``'s max RSS would inherit the parent's across fork + exec on Linux). When the
model has loaded, the resident size is recorded and the high-water mark reset (``/proc/self/clear_refs``),
so ``above_loaded_mb`` is what the design needs beyond interpreter + torch + the frozen model, without
the loader's transient copies. On CUDA the same with ``torch.cuda.max_memory_allocated``.

Model folders are of the digits kind (``write_model_folder``) and load through the benchmark family
``tdm_benchmark_unet`` (registered below), a digits family that can carry the SD families' LoRA targets,
a 77-token context and SDXL's added conditions (``benchmark_family.json`` in the folder).

    python -m benchmarks.speed --config lora|floor|reference|reference_shared|baseline|sampling --model FOLDER [--json OUT]
    python -m benchmarks.speed --config switch --unet sd15|sdxl
    python -m benchmarks.speed_table      # the side-by-side table, benchmarks/RESULTS_speed.md
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from tdm_core import reference_grid, sample_tdm

ROOT = Path(__file__).resolve().parent.parent
CONFIGS_DIR = ROOT / "training" / "configs"
TRAINING_CONFIGS = ("lora", "floor", "reference", "reference_shared")
CONFIGS = (*TRAINING_CONFIGS, "baseline", "sampling", "switch", "components")
BENCH_FAMILY = "tdm_benchmark_unet"
BENCH_FILE = "benchmark_family.json"
CFG_SCALE = 2.0
REFERENCE_LR = 2e-5  # the reference script's full fine-tune rate (any rate costs the same)

# a mid-size SD-like UNet that fits this 2-core CPU machine (4-channel 32x32 "latents")
MID_UNET_CONFIG = dict(
    sample_size=32,
    in_channels=4,
    out_channels=4,
    block_out_channels=(64, 128, 128),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=1,
    cross_attention_dim=64,
    attention_head_dim=16,
    norm_num_groups=16,
)


def unet_config(name: str, sample_size: int | None = None) -> dict:
    """The real UNet config of the ``sd15`` or ``sdxl`` family (``training/configs``), optionally with
    another ``sample_size`` (the default latent size only: the architecture is the same)."""
    config = {k: v for k, v in json.loads((CONFIGS_DIR / name / "unet" / "config.json").read_text()).items() if not k.startswith("_")}
    if sample_size is not None:
        config["sample_size"] = sample_size
    return config


def family_lora_targets(name: str) -> list[str]:
    """The LoRA target modules ``training.distill`` uses for the ``sd15`` / ``sdxl`` family."""
    from training.families.sd15 import SD15Family
    from training.families.sdxl import SDXLFamily

    return list({"sd15": SD15Family, "sdxl": SDXLFamily}[name].lora_target_modules)


# --- memory ----------------------------------------------------------------------------------------
def _status_mb(field: str) -> float | None:
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0  # kB
    return None


def peak_rss_mb() -> float:
    """High-water resident memory of this process (since the last reset, see mark_loaded), in MiB."""
    value = _status_mb("VmHWM")
    return value if value is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def mem_available_mb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


MEMORY: dict = {}  # filled by mark_loaded in the measuring process


def mark_loaded(network: torch.nn.Module | None = None) -> None:
    """Called once the frozen model is loaded: records the resident size and restarts the high-water mark.

    The loaded weights may still be pages of the mapped safetensors file that no forward has touched yet
    (not resident): reading every parameter once makes them part of the baseline, as they are of every
    design's first iteration."""
    if MEMORY:
        return
    if network is not None:
        with torch.no_grad():
            for param in network.parameters():
                if param.device.type == "cpu":
                    param.sum()
    MEMORY["peak_before_load_mb"] = peak_rss_mb()
    MEMORY["rss_loaded_mb"] = _status_mb("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: VmHWM := VmRSS
        MEMORY["hwm_reset"] = True
    except OSError:
        MEMORY["hwm_reset"] = False
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        MEMORY["vram_loaded_mb"] = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()


def memory_report() -> dict:
    peak = peak_rss_mb()
    out = {"peak_rss_mb": max(peak, MEMORY.get("peak_before_load_mb", 0.0))}  # the process's whole life
    if MEMORY.get("hwm_reset") and MEMORY.get("rss_loaded_mb") is not None:
        out.update(rss_loaded_mb=MEMORY["rss_loaded_mb"], peak_after_load_mb=peak, above_loaded_mb=peak - MEMORY["rss_loaded_mb"])
    if "vram_loaded_mb" in MEMORY:
        vram_peak = torch.cuda.max_memory_allocated() / 2**20
        out.update(vram_loaded_mb=MEMORY["vram_loaded_mb"], peak_vram_mb=vram_peak, vram_above_loaded_mb=vram_peak - MEMORY["vram_loaded_mb"])
    return out


def start_memory_guard(min_available_mb: float) -> None:
    """Ends this process (exit 3) if the machine's available memory falls below ``min_available_mb``:
    a measurement must not push a shared machine into swapping or the OOM killer."""
    if mem_available_mb() is None or min_available_mb <= 0:
        return

    def watch():
        while True:
            available = mem_available_mb()
            if available is not None and available < min_available_mb:
                sys.stderr.write(f"memory guard: only {available:.0f} MB available (limit {min_available_mb:.0f} MB): stopping\n")
                sys.stderr.flush()
                os._exit(3)
            time.sleep(0.1)

    threading.Thread(target=watch, daemon=True).start()


# --- model folders and the benchmark family --------------------------------------------------------
def write_model_folder(folder: Path, unet_config: dict, seed: int = 0, lora_target_modules: list[str] | None = None,
                       context_tokens: int = 1, init_device: str = "cpu", save_dtype: str = "float32") -> Path:
    """A teacher folder of the digits kind (tdm_family.json) holding a random UNet of ``unet_config``,
    so ``training.models.load_family`` and ``training.distill`` load it like the real teacher.

    ``lora_target_modules`` and ``context_tokens`` (the length of the cross-attention context; SD's text
    encoders give 77) go to ``benchmark_family.json``, read by the benchmark family only. ``init_device``
    and ``save_dtype`` ("bfloat16") make large random UNets quicker to write on a GPU machine."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    from training.families import digits

    torch.manual_seed(seed)
    with torch.device(init_device):
        unet = UNet2DConditionModel(**unet_config)
    unet.to(getattr(torch, save_dtype)).save_pretrained(folder / "unet", safe_serialization=True)
    del unet
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(digits.SCHEDULER_CONFIG))
    table = torch.randn(digits.NUM_CLASSES + 1, unet_config["cross_attention_dim"])
    save_file({digits.EMBEDDINGS_KEY: table}, str(folder / digits.EMBEDDINGS_FILE))
    (folder / BENCH_FILE).write_text(json.dumps({"lora_target_modules": lora_target_modules, "context_tokens": context_tokens}))
    (folder / "tdm_family.json").write_text(json.dumps({"family": "digits"}))
    return folder


def write_model_folder_in_subprocess(folder: Path, timeout: float = 3600, **kwargs) -> Path:
    """:func:`write_model_folder` in a fresh interpreter, so a large UNet's memory goes back to the
    machine before the measurements start (the calling process would keep it)."""
    code = ("import json, sys; from pathlib import Path; from benchmarks.speed import write_model_folder; "
            "a = json.loads(sys.argv[1]); write_model_folder(Path(a.pop('folder')), **a)")
    args = json.dumps({"folder": str(folder), **kwargs})
    proc = subprocess.run([sys.executable, "-c", code, args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"writing the model folder {folder} failed:\n{proc.stderr[-3000:]}")
    return folder


def _bench_family_class():
    from training.families.digits import DigitsFamily

    class BenchmarkUNetFamily(DigitsFamily):
        """The digits family with the benchmark's choices: LoRA targets, context length and (for the
        SDXL UNet) the added text-time conditions, and ``denoise_with`` for networks other than its own."""

        def configure(self, settings: dict):
            if settings.get("lora_target_modules"):
                self.lora_target_modules = list(settings["lora_target_modules"])
            self.context_tokens = int(settings.get("context_tokens") or 1)
            config = self.network.config
            self.added_time = getattr(config, "addition_embed_type", None) == "text_time"
            if self.added_time:
                self.pooled_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
            return self

        def condition_for_classes(self, classes):
            cond = super().condition_for_classes(classes)
            if self.context_tokens > 1:
                cond["encoder_hidden_states"] = cond["encoder_hidden_states"].repeat(1, self.context_tokens, 1)
            if self.added_time:
                batch, size = classes.shape[0], 8 * self.network.config.sample_size
                cond["text_embeds"] = cond["encoder_hidden_states"].new_ones(batch, self.pooled_dim)
                cond["time_ids"] = torch.tensor([[size, size, 0, 0, size, size]], device=self.device, dtype=self.dtype).expand(batch, 6)
            return cond

        def denoise_with(self, network, x_t, t, cond):
            dtype = next(network.parameters()).dtype
            t = torch.as_tensor(t, device=x_t.device).to(torch.float32).reshape(-1).expand(x_t.shape[0])
            extra = {}
            if self.added_time:
                extra["added_cond_kwargs"] = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
            return network(x_t.to(dtype), t, encoder_hidden_states=cond["encoder_hidden_states"], **extra).sample

        def denoise(self, x_t, t, cond):
            return self.denoise_with(self.network, x_t, t, cond)

    return BenchmarkUNetFamily


def load_bench_family(model_path, device="cpu", dtype=torch.float32, config_path=None):
    """Loader of the ``tdm_benchmark_unet`` family (any digits-kind folder); marks the model as loaded."""
    from training.families.digits import load_digits_family

    family = load_digits_family(model_path, device=device, dtype=dtype)
    settings_file = Path(model_path) / BENCH_FILE
    settings = json.loads(settings_file.read_text()) if settings_file.is_file() else {}
    bench = _bench_family_class()(family.network, family.class_embeddings, family.schedule, source_path=family.source_path)
    bench.configure(settings)
    mark_loaded(bench.network)
    return bench


def _register() -> None:
    from training.models import register_family

    register_family(BENCH_FAMILY, load_bench_family)


_register()


# --- where an iteration's CPU time goes ---------------------------------------------------------------
PHASES: dict = {}  # phase -> CPU seconds in the current iteration (forward, backward, optimiser)


def add_phase(name: str, fn):
    """``fn`` with its CPU time added to ``PHASES[name]`` (a process_time pair per call: microseconds)."""
    def timed(*args, **kwargs):
        start = time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            PHASES[name] = PHASES.get(name, 0.0) + time.process_time() - start

    return timed


def instrument_project(parts) -> None:
    """Phase timers around the project's network calls and optimiser steps (``training.loop.network_output``
    and ``training.loop.step``, looked up by name at each call) and its backward passes (the accelerator's)."""
    import training.loop as loop

    loop.network_output = add_phase("forward", loop.network_output)
    loop.step = add_phase("optimiser", loop.step)
    parts.accelerator.backward = add_phase("backward", parts.accelerator.backward)


def phase_split(phases: dict, total: float) -> dict:
    """forward / backward / optimiser (clip, AdamW, schedule) / other (everything else: the method's
    draws and losses, conditions, metrics) CPU seconds of one iteration."""
    out = {name: phases.get(name, 0.0) for name in ("forward", "backward", "optimiser")}
    out["other"] = total - sum(out.values())
    return out


def prompts_file(folder: Path) -> Path:
    path = folder / "prompts.txt"
    path.write_text("\n".join(str(c) for c in range(10)) + "\n")
    return path


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_iterations(step, warmup: int, iterations: int, device="cpu", profile: bool = False):
    """Per-iteration wall times, CPU times and CPU phases (:func:`phase_split`) of ``step`` after ``warmup``
    untimed calls (and, with ``profile``, the profiler's op table over the timed calls). The CPU time (``time.process_time``) of a one-thread
    process is its own work: on a machine shared with other jobs its wall time also counts the time it
    waited for a core."""
    for _ in range(warmup):
        step()
    _sync(device)
    times, cpu_times, phases, table = [], [], [], None
    profiler = None
    if profile:
        from torch.profiler import ProfilerActivity, profile as torch_profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.device(device).type == "cuda" else [])
        profiler = torch_profile(activities=activities)
        profiler.__enter__()
    try:
        for _ in range(iterations):
            PHASES.clear()
            start, cpu_start = time.perf_counter(), time.process_time()
            step()
            _sync(device)
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
            phases.append(phase_split(PHASES, cpu_times[-1]))
    finally:
        if profiler is not None:
            profiler.__exit__(None, None, None)
    if profiler is not None:
        table = [{"name": e.key, "self_ms": e.self_cpu_time_total / 1000.0 / iterations, "total_ms": e.cpu_time_total / 1000.0 / iterations,
                  "calls": e.count / iterations} for e in profiler.key_averages()]
        table.sort(key=lambda r: -r["self_ms"])
        table = table[:300]
    return times, cpu_times, phases, table


# --- the project's design: training.distill's own parts and iteration ----------------------------
def project_config(model_dir: Path, work: Path, batch_size: int, num_steps: int, mixed_precision: str = "no",
                   gradient_checkpointing: bool = False):
    """``training.distill``'s configuration for the benchmark: its defaults, except the model (through
    the benchmark family), K, the batch and CFG 2 that every design here shares, and one fake-score update per
    iteration: the method's iteration, which the floor and the reference design count (the default since
    issue 22, 5, adds four fake-score forward + backward passes to every design alike)."""
    from training.config import parse_config

    argv = ["--model", str(model_dir), "--family", BENCH_FAMILY, "--prompts", str(prompts_file(work)),
            "--output", str(work / "x.safetensors"), "--num-steps", str(num_steps), "--batch-size", str(batch_size),
            "--cfg", str(CFG_SCALE), "--mixed-precision", mixed_precision, "--fake-score-updates", "1"]
    if gradient_checkpointing:
        argv.append("--gradient-checkpointing")
    return parse_config(argv)


def project_parts(model_dir: Path, work: Path, batch_size: int, num_steps: int, device: str, mixed_precision: str, gradient_checkpointing: bool):
    from accelerate import Accelerator

    from training.distill import build_parts

    cfg = project_config(model_dir, work, batch_size, num_steps, mixed_precision, gradient_checkpointing)
    return build_parts(cfg, Accelerator(mixed_precision="no", cpu=torch.device(device).type == "cpu"))


def lora_step(parts, latent_shape, batch_size: int):
    from training.distill import draw_prompt_batch
    from training.loop import tdm_iteration

    family = parts.family
    null_cond = family.null_condition(batch_size)
    prompts = [str(c) for c in range(10)]

    def step():
        cond = family.encode_prompts(draw_prompt_batch(prompts, batch_size, parts.generator))
        tdm_iteration(parts, cond, null_cond, latent_shape)

    return step


# --- the network-bound floor of one project iteration --------------------------------------------
def floor_step(parts, latent_shape, num_steps: int):
    """The forwards and backwards of one ``lora`` iteration (K=num_steps, CFG pair batched) and nothing
    else, through ``training.loop.network_output`` (use_adapter switches, autocast) on the same network."""
    from training import loop
    from training.families.base import cat_conditions
    from training.models import FAKE_SCORE, STUDENT

    network_output = loop.network_output  # as instrumented
    family, device = parts.family, parts.accelerator.device
    batch = latent_shape[0]
    classes = torch.arange(batch) % 10
    cond, null_cond = family.condition_for_classes(classes), family.null_condition(batch)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(latent_shape, generator=gen).to(device)
    t = torch.full((batch,), 500.0, dtype=torch.float64, device=device)
    x2, t2, cond2 = torch.cat([x, x]), torch.cat([t, t]), cat_conditions([cond, null_cond])

    @functools.partial(add_phase, "backward")
    def backward_and_clear(out, adapter):
        out.square().mean().backward()
        for p in parts.params[adapter]:
            p.grad = None

    def step():
        with torch.no_grad():
            for _ in range(num_steps):  # the roll-out
                network_output(parts, STUDENT, x, t, cond)
        backward_and_clear(network_output(parts, FAKE_SCORE, x, t, cond), FAKE_SCORE)  # fake-score update
        out = network_output(parts, STUDENT, x, t, cond)  # the student step with gradient
        with torch.no_grad():
            network_output(parts, None, x2, t2, cond2)  # teacher cond + uncond at 2B
            network_output(parts, FAKE_SCORE, x, t, cond)  # fake score at the student's noised point
        backward_and_clear(out, STUDENT)

    return step


# --- the reference design: three full copies, full fine-tune ---------------------------------------
def reference_step(model_dir: Path, work: Path, batch_size: int, num_steps: int, device: str, mixed_precision: str,
                   gradient_checkpointing: bool, shared: bool = False):
    """The reference script's structure (frozen teacher, student and fake score as full networks,
    fully trained with AdamW, gradients clipped as the project clips) running ``tdm_core.iteration``.
    With ``shared``, one trainable copy plays all three roles (see the module docstring)."""
    from tdm_core.iteration import FAKE_SCORE, STUDENT, TDMDenoisers, TDMSettings, TDMUpdates, randn_on, tdm_iteration
    from training.distill import draw_prompt_batch, resolved_huber_c
    from training.families.base import cat_conditions
    from training.models import load_family
    from training.precision import Precision

    cfg = project_config(model_dir, work, batch_size, num_steps, mixed_precision, gradient_checkpointing)
    precision = Precision(mixed_precision, torch.device(device).type)
    family = load_family(str(model_dir), family=BENCH_FAMILY, device=device, dtype=precision.weight_dtype)
    teacher = family.network
    if shared:  # the teacher itself becomes the trainable copy (fp32 master weights under mixed precision)
        student = fake = teacher.float().requires_grad_(True).train()
        teacher = student
    else:
        student = copy.deepcopy(teacher).float().requires_grad_(True).train()
        fake = copy.deepcopy(teacher).float().requires_grad_(True).train()
    if gradient_checkpointing:
        for net in {id(student): student, id(fake): fake}.values():
            net.enable_gradient_checkpointing()

    def adamw(net):
        return torch.optim.AdamW(net.parameters(), lr=REFERENCE_LR, betas=(0.0, 0.95), weight_decay=cfg.weight_decay)

    opt_student = adamw(student)
    opt_fake = opt_student if shared else adamw(fake)
    latent_shape = family.latent_shape(batch_size)
    settings = TDMSettings(grid=tuple(cfg.trajectory_grid()), prediction_type=family.prediction_type, total_steps=cfg.total_steps,
                           cfg_scale=cfg.cfg, distance=cfg.distance, huber_c=resolved_huber_c(cfg, latent_shape),
                           interval_mode=cfg.interval_mode, randmid=cfg.randmid, fake_score_updates=cfg.fake_score_updates)
    gen = torch.Generator().manual_seed(cfg.seed)
    prompts = [str(c) for c in range(10)]
    null_cond = family.null_condition(batch_size)

    @functools.partial(add_phase, "forward")
    def run(net, x_t, t, cond):
        with precision.autocast():
            return family.denoise_with(net, x_t, t, cond).float()

    backward = add_phase("backward", lambda loss: loss.backward())

    @functools.partial(add_phase, "optimiser")
    def clip_and_step(net, opt):
        torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)

    trained = {FAKE_SCORE: (fake, opt_fake), STUDENT: (student, opt_student)}
    updates = TDMUpdates(backward=lambda role, loss: backward(loss), step=lambda role: clip_and_step(*trained[role]))

    def step():
        cond = family.encode_prompts(draw_prompt_batch(prompts, batch_size, gen))

        def teacher_pair(x_t, t):
            both = run(teacher, torch.cat([x_t, x_t]), torch.cat([t, t]), cat_conditions([cond, null_cond]))
            return both.chunk(2)

        denoisers = TDMDenoisers(student=lambda x_t, t: run(student, x_t, t, cond), fake_score=lambda x_t, t: run(fake, x_t, t, cond),
                                 teacher=teacher_pair)
        noise = randn_on(latent_shape, gen, device)
        losses = tdm_iteration(denoisers, family.schedule, settings, noise, gen, updates)
        torch.stack([losses.fake_score, losses.student]).tolist()  # the one host sync, for logging

    return step


# --- where the time goes: the network calls of both designs, one by one -----------------------------
def component_seconds(model_dir: Path, batch_size: int, repeats: int, device: str = "cpu") -> dict:
    """Median wall and CPU seconds of each kind of network call the two designs make, on one network
    carrying both adapters (``add_tdm_adapters``, the family's targets), the kinds interleaved in every
    repeat so that the machine's load hits them alike. "plain" calls run with the adapters off, which is
    the base network's computation plus PEFT's pass-through (the three copies' calls); the plain backward
    computes the gradient of every base weight, followed by the gradient clip and one AdamW step over
    them; "lora" calls run with the student on, its backward for the LoRA weights only.
    Peak memory: the model, its gradients and one AdamW state (about 4 x P x 4 bytes)."""
    from training.families.base import cat_conditions
    from training.models import STUDENT, add_tdm_adapters, adapter_parameters, load_family, use_adapter

    family = load_family(str(model_dir), family=BENCH_FAMILY, device=device)
    net = family.network
    base = list(net.parameters())
    add_tdm_adapters(family, 16, 16.0)
    lora = adapter_parameters(net, STUDENT)
    shape = family.latent_shape(batch_size)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
    t = torch.full((batch_size,), 500.0, device=device)
    cond = family.condition_for_classes(torch.arange(batch_size) % 10)
    x2, t2, cond2 = torch.cat([x, x]), torch.cat([t, t]), cat_conditions([cond, family.null_condition(batch_size)])
    optimizer = torch.optim.AdamW(base, lr=REFERENCE_LR, betas=(0.0, 0.95))

    def forward(adapter, xx, tt, cc):
        with use_adapter(net, adapter), torch.no_grad():
            family.denoise(xx, tt, cc)

    def forward_backward(adapter):
        with use_adapter(net, adapter):
            family.denoise(x, t, cond).square().mean().backward()

    def full_backward():
        for p in base:
            p.requires_grad_(True)
        forward_backward(None)

    def adamw_step():
        torch.nn.utils.clip_grad_norm_(base, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for p in base:
            p.requires_grad_(False)

    def lora_backward():
        forward_backward(STUDENT)
        for p in lora:
            p.grad = None

    kinds = [("plain_forward", lambda: forward(None, x, t, cond)), ("plain_forward_2b", lambda: forward(None, x2, t2, cond2)),
             ("plain_forward_backward", full_backward), ("adamw_step_all_parameters", adamw_step),
             ("lora_forward", lambda: forward(STUDENT, x, t, cond)), ("lora_forward_backward", lora_backward)]
    wall, cpu = {k: [] for k, _ in kinds}, {k: [] for k, _ in kinds}
    for repeat in range(repeats + 1):  # the first is the warm-up
        for name, fn in kinds:
            _sync(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            fn()
            _sync(device)
            if repeat:
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - cpu_start)
    out = {name: statistics.median(v) for name, v in wall.items()}
    out.update({f"{name}_cpu": statistics.median(v) for name, v in cpu.items()})
    out["parameters"] = sum(p.numel() for p in base)
    return out


# --- adapter switching ------------------------------------------------------------------------------
def switch_timings(unet: str, repeats: int = 200, rank: int = 16) -> dict:
    """ms per ``use_adapter`` enter+exit on the ``unet`` ("sd15" / "sdxl") UNet, built on the meta
    device from training/configs, with that family's LoRA targets (as ``add_tdm_adapters`` puts them)."""
    from types import SimpleNamespace

    from diffusers import UNet2DConditionModel

    from training.models import FAKE_SCORE, STUDENT, _switch_of, add_tdm_adapters, use_adapter

    with torch.device("meta"):
        network = UNet2DConditionModel(**unet_config(unet))
    targets = family_lora_targets(unet)
    add_tdm_adapters(SimpleNamespace(network=network, name=unet, lora_target_modules=targets), rank, float(rank))
    result = {"unet": unet, "modules": sum(1 for _ in network.modules()), "lora_layers": len(_switch_of(network).layers),
              "parameters": sum(p.numel() for p in network.parameters()), "lora_target_modules": targets}
    for name in (STUDENT, FAKE_SCORE, None):
        for _ in range(5):  # warm-up
            with use_adapter(network, name):
                pass
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            with use_adapter(network, name):
                pass
            times.append(time.perf_counter() - start)
        result[f"ms_{name or 'teacher'}"] = 1000 * statistics.median(times)
        result[f"ms_{name or 'teacher'}_min"] = 1000 * min(times)
    result["ms_per_switch"] = statistics.median([result["ms_student"], result["ms_fake_score"], result["ms_teacher"]])
    return result


# --- sampling speed -----------------------------------------------------------------------------
def sampling_seconds(model_dir: Path, batch_size: int, repeats: int) -> dict:
    """Wall time of TDM 4 steps at CFG 1, the teacher's 25 DDIM steps at CFG 2 (50 network
    evaluations), 4 bare network calls, and a 4-step tdm_core sampling (its overhead over the calls)."""
    from benchmarks.sampling import guided_denoiser, teacher_grid
    from training.models import load_family

    family = load_family(str(model_dir))
    classes = torch.arange(batch_size) % 10
    noise = torch.randn(family.latent_shape(batch_size), generator=torch.Generator().manual_seed(0))
    grid = reference_grid(4, 900)
    student = guided_denoiser(family, classes, 1.0)
    teacher = guided_denoiser(family, classes, 2.0)
    cond = family.condition_for_classes(classes)
    t = torch.full((batch_size,), 500.0, dtype=torch.float64)

    def bare_calls():
        for step_t in grid:
            family.denoise(noise, torch.full_like(t, float(step_t)), cond)

    def best_of(fn):  # the minimum over repeats is the least disturbed by other processes; wall and CPU time
        times = []
        for _ in range(repeats):
            start, cpu_start = time.perf_counter(), time.process_time()
            with torch.no_grad():
                fn()
            times.append((time.perf_counter() - start, time.process_time() - cpu_start))
        return min(w for w, _ in times), min(c for _, c in times)

    with torch.no_grad():
        bare_calls()  # warm-up
    out = {}
    for name, fn in (("tdm4_cfg1", lambda: sample_tdm(student, noise, grid, family.schedule, family.prediction_type)),
                     ("teacher25_cfg2", lambda: sample_tdm(teacher, noise, teacher_grid(25), family.schedule, family.prediction_type)),
                     ("bare4", bare_calls)):
        out[name], out[f"{name}_cpu"] = best_of(fn)
    return out


def measure(config: str, model_dir: Path | None, batch_size: int, num_steps: int, warmup: int, iterations: int,
            device: str = "cpu", mixed_precision: str = "no", gradient_checkpointing: bool = False, profile: bool = False,
            unet: str = "sd15", threads: int | None = 1) -> dict:
    if threads:
        torch.set_num_threads(threads)
    if config == "switch":
        return {**switch_timings(unet), **memory_report()}
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        result: dict = {"config": config, "batch_size": batch_size, "num_steps": num_steps, "device": device,
                        "mixed_precision": mixed_precision, "gradient_checkpointing": gradient_checkpointing, "threads": torch.get_num_threads()}
        if config in TRAINING_CONFIGS:
            if config in ("lora", "floor"):
                parts, latent_shape = project_parts(model_dir, work, batch_size, num_steps, device, mixed_precision, gradient_checkpointing)
                instrument_project(parts)
                step = lora_step(parts, latent_shape, batch_size) if config == "lora" else floor_step(parts, latent_shape, num_steps)
                network = parts.family.network
            else:
                step = reference_step(model_dir, work, batch_size, num_steps, device, mixed_precision, gradient_checkpointing,
                                      shared=config == "reference_shared")
                network = None
            times, cpu_times, phases, table = time_iterations(step, warmup, iterations, device, profile)
            result.update(iteration_seconds=times, seconds_per_iteration=statistics.median(times), min_seconds=min(times),
                          iteration_cpu_seconds=cpu_times, cpu_seconds_per_iteration=statistics.median(cpu_times), iteration_phases=phases)
            if table is not None:
                result["profile"] = table
            if network is not None:
                result["trainable_parameters"] = sum(p.numel() for p in network.parameters() if p.requires_grad)
        elif config == "sampling":
            result.update(sampling_seconds(model_dir, batch_size, iterations))
        elif config == "components":
            result.update(component_seconds(model_dir, batch_size, max(1, iterations), device))
        elif config == "baseline":  # the same imports and the frozen model loaded, nothing trained
            from training.models import load_family

            network = load_family(str(model_dir), family=BENCH_FAMILY, device=device).network
            result["parameters"] = sum(p.numel() for p in network.parameters())
        else:
            raise ValueError(f"unknown config {config!r}: use one of {', '.join(CONFIGS)}")
    result.update(memory_report())
    return result


def measure_in_subprocess(config: str, model_dir: Path | None, batch_size: int, num_steps: int, warmup: int, iterations: int,
                          timeout: float = 1800, min_available_mb: float = 0, extra: list[str] | None = None) -> dict:
    """Runs :func:`measure` in a fresh interpreter so that its memory numbers are its own.
    ``min_available_mb``: the subprocess stops itself (RuntimeError here) if the machine's available
    memory falls below it."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        out = Path(handle.name)
    cmd = [sys.executable, "-m", "benchmarks.speed", "--config", config, "--batch-size", str(batch_size),
           "--num-steps", str(num_steps), "--warmup", str(warmup), "--iterations", str(iterations), "--json", str(out),
           "--min-available-mb", str(min_available_mb), *(extra or [])]
    if model_dir is not None:
        cmd += ["--model", str(model_dir)]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"benchmark subprocess {config} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())
    finally:
        out.unlink(missing_ok=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, choices=CONFIGS)
    parser.add_argument("--model", type=Path, help="a digits-kind model folder (see write_model_folder); not for --config switch")
    parser.add_argument("--unet", default="sd15", choices=["sd15", "sdxl"], help="--config switch: which UNet")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--num-steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--profile", action="store_true", help="torch.profiler op table over the timed iterations")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--min-available-mb", type=float, default=0, help="stop if the machine's available memory falls below this")
    parser.add_argument("--json", type=Path, help="write the result here (else print it)")
    args = parser.parse_args(argv)
    if args.config != "switch" and args.model is None:
        parser.error(f"--config {args.config} needs --model")
    if args.model is not None and not args.model.exists():
        parser.error(f"model folder {args.model} does not exist")
    start_memory_guard(args.min_available_mb)
    result = measure(args.config, args.model, args.batch_size, args.num_steps, args.warmup, args.iterations, args.device,
                     args.mixed_precision, args.gradient_checkpointing, args.profile, args.unet, args.threads or None)
    text = json.dumps(result)
    if args.json:
        args.json.write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
