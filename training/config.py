"""Options of ``python -m training.distill``: one dataclass, a YAML/TOML config file, CLI flags.

Precedence: dataclass defaults < config file < command-line flags. Every check here is cheap and
runs before any model is loaded, so bad input fails in a second with a message naming the fix.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional

from tdm_core.grids import parse_grid, reference_grid
from tdm_core.learning_rates import FAKE_TO_STUDENT_LR, LR_PER_SQRT_RANK_OVER_ALPHA, LR_WARMUP_STEPS, default_fake_score_lr, default_student_lr
from tdm_core.steps_aware import parse_k_choices
from tdm_core.training import DEFAULT_DISTANCE, DEFAULT_FAKE_SCORE_ROLLOUTS, DEFAULT_FAKE_SCORE_UPDATES, FAKE_SCORE_ROLLOUTS, DEFAULT_FAKE_SCORE_WEIGHTING, DISTANCES, FAKE_SCORE_WEIGHTINGS, INTERVAL_MODES

from .errors import ConfigError
from .precision import SAVE_DTYPES, WEIGHT_DTYPES

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (ComfyUI supports it): tomli, the same parser, is the train extra's dependency there
    import tomli as tomllib

# default learning rates and their warm-up: tdm_core.learning_rates (shared with the TDM Distill node)
MAX_STUDENT_STEPS = 8  # TDM students are few-step samplers; the grid rule is tested for 1..8
MIXED_PRECISION = tuple(WEIGHT_DTYPES)
SAVE_PRECISION = ("auto", *SAVE_DTYPES)
LR_SCHEDULERS = ("cosine_with_restarts", "cosine", "constant", "constant_with_warmup", "linear")


def _opt(default, help: str, **extra):
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class DistillConfig:
    model: str = _opt("", "teacher: a diffusers model folder or a single-file .safetensors checkpoint (required)")
    family: str = _opt("auto", "model family: auto (detect from the model), sd15, sdxl, pixart, sd3, flux, z_image, qwen_image, wan, digits")
    model_config: Optional[str] = _opt(None, "config folder/file for a single-file checkpoint (no hub access at run time)")
    prompts: str = _opt("", "prompt file: .txt (one prompt per line) or .jsonl (a 'prompt' field per line) (required)")
    output: str = _opt("", "the final LoRA, a .safetensors file (may point into ComfyUI's models/loras) (required)")
    output_dir: Optional[str] = _opt(None, "checkpoints, log.jsonl and validation grids; default: <output without .safetensors>_run next to --output")
    num_steps: int = _opt(4, f"K, the student's sampling steps (1..{MAX_STUDENT_STEPS})")
    grid: Optional[str] = _opt(None, "explicit trajectory timesteps t_0 > .. > t_{K-1}, e.g. '999,856,665,399' (overrides the reference grid; K = its length)")
    total_steps: int = _opt(900, "T of the reference grid t_i = T - 1 - i * (T // K) (900 as in the reference README)")
    max_train_steps: int = _opt(500, "number of student updates (each after --fake-score-updates fake-score updates)")
    batch_size: int = _opt(8, "prompts per process per iteration (short of memory: lower it and raise --gradient-accumulation-steps, the product is what counts)")
    gradient_accumulation_steps: int = _opt(1, "N: each step trains on batch-size x N prompts, run in N chunks of batch-size (the same step as one batch of that size; the networks' activations are those of batch-size, the latents and prompt conditions of the whole batch)")
    cfg: float = _opt(2.0, "teacher classifier-free guidance scale w distilled into the student (METHOD.md default 2; the README run used 4.5)")
    distance: str = _opt(DEFAULT_DISTANCE, "student distance: l2 (squared, as TDM-R1; the default: issue 22's benchmarks), huber (element-wise, reference script) or huber_norm (per-sample norm, paper)")
    huber_c: Optional[float] = _opt(None, "pseudo-Huber c; default 1e-3 for huber, 0.00054*sqrt(dim) for huber_norm")
    interval_mode: str = _opt("separate", "diffusion-time intervals: separate (per step, no overlap) or shared ([u, T-10])")
    fake_score_weighting: str = _opt(DEFAULT_FAKE_SCORE_WEIGHTING, "weight of the fake score's x0 loss over noise levels: min_snr (min(SNR, 5), the reference), "
                                     "velocity (1/sigma^2: a plain velocity MSE on flow models, as TDM-R1) or x0 (1); an ablation of issue 22")
    fake_score_updates: int = _opt(DEFAULT_FAKE_SCORE_UPDATES, "fake-score updates per student update, each on new noise levels of the same roll-out (with the default --fake-score-rollouts shared) "
                                   "(1: the method; 5, the default: DMD2's two time-scale rule, closer to the teacher in issue 22's benchmarks). The fake score's learning-rate "
                                   "warm-up counts its own updates, its decay spans the run; the logged loss_fake and grad_norm_fake are its last update's")
    fake_score_rollouts: str = _opt(DEFAULT_FAKE_SCORE_ROLLOUTS, "what the fake-score updates after the first train on: shared (the default: the iteration's one "
                                    "roll-out, new noise levels each) or fresh (each a new roll-out of the student from new noise, as DMD2 generates new samples; "
                                    "costs one roll-out of K student calls per extra update); an ablation of issue 22")
    student_ema: float = _opt(0.0, "decay per student update of an exponential moving average of the student's LoRA (diffusers' EMAModel), "
                              "the student the run hands out: final LoRA, validation grids, probe and each checkpoint's student_ema "
                              "adapter; training itself is unchanged. 0 (the default): off; e.g. 0.99. EMAModel's warm-up, min((1 + n) / (10 + n), decay), "
                              "keeps the decay lower early on: at 0.99 the average spans about the last 55 updates at update 500, the last 100 "
                              "from about update 900 (issue 22: a single checkpoint's distance to the teacher jitters, the average of the last ones less)")
    randmid: bool = _opt(False, "draw the ODE point u uniformly in [t_{i+1}, t_i - 20] instead of u = t_{i+1}")
    steps_aware: bool = _opt(False, "TDM-unify: draw K per batch from --k-choices; student and fake score learn a K-embedding (one LoRA for several step counts)")
    k_choices: str = _opt("1,2,4", "step counts K drawn per batch with --steps-aware")
    k_on_fake_score: bool = _opt(True, "with --steps-aware, condition the fake score on K too (--no-k-on-fake-score: the paper's biased ablation)")
    lora_rank: int = _opt(16, "rank of the student and fake-score LoRA adapters")
    lora_alpha: Optional[float] = _opt(None, "LoRA alpha; default: equal to the rank (scale 1)")
    learning_rate: Optional[float] = _opt(None, f"fake-score learning rate (AdamW betas 0, 0.95); default: {LR_PER_SQRT_RANK_OVER_ALPHA:g} * sqrt(rank) / alpha, which keeps the LoRA's relative step the same at any rank and alpha ({LR_PER_SQRT_RANK_OVER_ALPHA * 4 / 16:g} at rank = alpha = 16)")
    student_learning_rate: Optional[float] = _opt(None, f"student learning rate; default: the fake-score rate / {FAKE_TO_STUDENT_LR}")
    weight_decay: float = _opt(0.0, "AdamW weight decay of both optimisers")
    max_grad_norm: float = _opt(1.0, "gradient-norm clip of both optimisers")
    lr_scheduler: str = _opt("constant_with_warmup", f"learning-rate schedule of both adapters: {', '.join(LR_SCHEDULERS)}")
    lr_warmup_steps: int = _opt(LR_WARMUP_STEPS, "warm-up steps of the learning-rate schedule")
    lr_num_cycles: int = _opt(1, "restarts of cosine_with_restarts")
    resolution: Optional[int] = _opt(None, "image size in pixels (the family maps it to its latent size); default: the model's native size")
    num_frames: Optional[int] = _opt(None, "video families (Wan, CogVideoX): frames per sample, 4k + 1 (e.g. 33, 49, 81); default: the model's own; an error on image families")
    mixed_precision: str = _opt("no", "mixed precision: no, fp16 or bf16 (the frozen base in that dtype, the LoRA weights and optimiser state in fp32, forwards under autocast)")
    save_precision: str = _opt("auto", "dtype of the exported LoRA: auto (that of --mixed-precision), fp32, fp16 or bf16")
    batch_cfg: bool = _opt(True, "run the teacher's conditional and unconditional passes as one batch (--no-batch-cfg: two passes, less memory)")
    gradient_checkpointing: bool = _opt(False, "trade compute for memory in the base network")
    use_8bit_adam: bool = _opt(False, "bitsandbytes 8-bit AdamW (needs bitsandbytes installed)")
    seed: int = _opt(0, "seed of every random draw (noise, prompts, times, LoRA init): runs are reproducible on CPU")
    checkpoint_every: int = _opt(100, "write a checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = _opt(2, "how many recent checkpoints to keep (at least 1)")
    validate_every: int = _opt(100, "write a validation grid PNG every N steps (0: never)")
    probe_every: int = _opt(25, "measure how far the student moved from the teacher every N steps (0: only at the end); logged as probe_change and lora_delta")
    validation_prompts: int = _opt(4, "number of prompts (from the top of the prompt file) in the validation grid")
    teacher_validation_steps: int = _opt(25, "DPM-Solver++ steps of the teacher column of the validation grid")
    stop_at_step: Optional[int] = _opt(None, "checkpoint and stop at this step of the max-train-steps schedule (split a run into sessions; continue with --resume)")
    resume: bool = _opt(False, "continue from the latest checkpoint in output_dir (starts fresh when there is none)")
    precompute_embeddings: bool = _opt(False, "encode every prompt once before training, then move the text encoders off the GPU (otherwise each prompt is encoded on first use and cached)")
    config: Optional[str] = _opt(None, "YAML (.yaml/.yml) or TOML (.toml) file of these options; flags given on the command line win")

    # --- derived, filled by validate() ---
    def fake_lr(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        return default_fake_score_lr(self.lora_rank, self.alpha())

    def student_lr(self) -> float:
        return default_student_lr(self.fake_lr()) if self.student_learning_rate is None else self.student_learning_rate

    def alpha(self) -> float:
        return float(self.lora_rank if self.lora_alpha is None else self.lora_alpha)

    def trajectory_grid(self) -> list[int]:
        return parse_grid(self.grid) if self.grid else reference_grid(self.num_steps, self.total_steps)

    def k_choice_list(self) -> list[int]:
        return parse_k_choices(self.k_choices)

    def run_dir(self) -> Path:
        if self.output_dir:
            return Path(self.output_dir)
        out = Path(self.output)
        return out.with_name(out.stem + "_run")


OPTION_NAMES = {f.name for f in fields(DistillConfig)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.distill",
        description="Data-free TDM distillation: writes a few-step LoRA (kohya layout, TDM metadata) that ComfyUI loads.",
        argument_default=argparse.SUPPRESS,  # so we can tell given flags from defaults (flags override the config file)
    )
    for f in fields(DistillConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata["help"] if f.default == "" else f"{f.metadata['help']} (default: {f.default})"
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            parser.add_argument(flag, type=_parser_type(f), metavar=f.name.upper(), help=help_text)
    return parser


def _parser_type(f):
    kind = str(f.type)
    if "int" in kind:
        return int
    if "float" in kind:
        return float
    return str


def read_config_file(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file {path} does not exist: check the --config path")
    try:
        if file.suffix == ".toml":
            values = tomllib.loads(file.read_text())
        elif file.suffix in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(file.read_text()) or {}
        else:
            raise ConfigError(f"config file {path} must end in .yaml, .yml or .toml")
    except ConfigError:
        raise
    except Exception as err:  # a parse error of either format
        raise ConfigError(f"config file {path} could not be parsed ({err}): fix its syntax") from err
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option: value")
    options = {k.replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(options) - OPTION_NAMES - {"config"})
    if unknown:
        raise ConfigError(f"config file {path} has unknown options {unknown}: see --help for the option names")
    return options


def parse_config(argv: Optional[list[str]] = None) -> DistillConfig:
    """Defaults, then the config file, then the flags; validated."""
    flags = vars(build_parser().parse_args(argv))
    values = read_config_file(flags["config"]) if flags.get("config") else {}
    values.update(flags)
    return validate(DistillConfig(**values))


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: DistillConfig) -> DistillConfig:
    """Every input check that needs no model; raises ConfigError with the fix."""
    _check(bool(cfg.model), "no teacher model given: pass --model PATH (a diffusers folder or a .safetensors file)")
    _check(os.path.exists(cfg.model), f"model {cfg.model} does not exist: check the --model path")
    _check(os.access(cfg.model, os.R_OK), f"model {cfg.model} is not readable: check its permissions")
    _check(bool(cfg.output), "no output given: pass --output FILE.safetensors")
    _check(cfg.output.endswith(".safetensors"), f"--output {cfg.output} must end in .safetensors")
    _check(not os.path.isdir(cfg.output), f"--output {cfg.output} is a folder: give a file name ending in .safetensors")
    _check(1 <= cfg.total_steps <= 1000, f"--total-steps {cfg.total_steps} is outside 1..1000: the reference uses 900")
    if cfg.grid:
        try:
            grid = parse_grid(cfg.grid)
        except ValueError as err:
            raise ConfigError(f"--grid is invalid: {err}") from err
        _check(1 <= len(grid) <= MAX_STUDENT_STEPS, f"--grid has {len(grid)} timesteps: a TDM student takes 1..{MAX_STUDENT_STEPS}")
        cfg.num_steps = len(grid)
    _check(1 <= cfg.num_steps <= MAX_STUDENT_STEPS, f"--num-steps K={cfg.num_steps} is outside 1..{MAX_STUDENT_STEPS}: pick K between 1 and {MAX_STUDENT_STEPS} (4 is usual)")
    _check(cfg.grid is not None or cfg.total_steps // cfg.num_steps >= 30, f"--total-steps {cfg.total_steps} is too small for K={cfg.num_steps}: each step needs at least 30 timesteps for its training interval")
    if cfg.steps_aware:
        try:
            choices = parse_k_choices(cfg.k_choices)
        except ValueError as err:
            raise ConfigError(f"--k-choices: {err}") from err
        _check(cfg.grid is None, "--grid and --steps-aware exclude each other: the steps-aware grid follows each batch's K")
        _check(choices[-1] <= MAX_STUDENT_STEPS, f"--k-choices {choices} must stay within 1..{MAX_STUDENT_STEPS}")
        _check(cfg.total_steps // choices[-1] >= 30, f"--total-steps {cfg.total_steps} is too small for K={choices[-1]}: each step needs at least 30 timesteps")
        cfg.num_steps = choices[-1]  # the largest K is the file's default step count
    _check(cfg.max_train_steps >= 1, f"--max-train-steps {cfg.max_train_steps} must be at least 1")
    _check(cfg.batch_size >= 1, f"--batch-size {cfg.batch_size} must be at least 1")
    _check(cfg.gradient_accumulation_steps >= 1, f"--gradient-accumulation-steps {cfg.gradient_accumulation_steps} must be at least 1")
    _check(cfg.cfg >= 1.0, f"--cfg {cfg.cfg} must be at least 1 (1 = no guidance)")
    _check(cfg.distance in DISTANCES, f"unknown --distance {cfg.distance!r}: use one of {', '.join(DISTANCES)}")
    _check(cfg.huber_c is None or cfg.huber_c > 0, f"--huber-c {cfg.huber_c} must be positive")
    _check(cfg.huber_c is None or cfg.distance != "l2", f"--huber-c {cfg.huber_c} has no effect with --distance l2 (the default): "
           "add --distance huber or huber_norm, or drop --huber-c")
    _check(cfg.fake_score_weighting in FAKE_SCORE_WEIGHTINGS,
           f"unknown --fake-score-weighting {cfg.fake_score_weighting!r}: use one of {', '.join(FAKE_SCORE_WEIGHTINGS)}")
    _check(cfg.fake_score_updates >= 1, f"--fake-score-updates {cfg.fake_score_updates} must be at least 1")
    _check(0 <= cfg.student_ema < 1, f"--student-ema {cfg.student_ema:g} must be at least 0 (off) and below 1 (e.g. 0.99)")
    _check(cfg.fake_score_rollouts in FAKE_SCORE_ROLLOUTS,
           f"unknown --fake-score-rollouts {cfg.fake_score_rollouts!r}: use one of {', '.join(FAKE_SCORE_ROLLOUTS)}")
    _check(cfg.fake_score_rollouts == "shared" or cfg.fake_score_updates > 1,
           f"--fake-score-rollouts {cfg.fake_score_rollouts} has no effect with --fake-score-updates {cfg.fake_score_updates}: "
           "fresh roll-outs are for the updates after the first; raise --fake-score-updates or leave the flag out")
    _check(cfg.interval_mode in INTERVAL_MODES, f"unknown --interval-mode {cfg.interval_mode!r}: use separate or shared")
    _check(cfg.lora_rank >= 1, f"--lora-rank {cfg.lora_rank} must be at least 1")
    _check(cfg.lora_alpha is None or cfg.lora_alpha > 0, f"--lora-alpha {cfg.lora_alpha} must be positive")
    _check(cfg.learning_rate is None or cfg.learning_rate > 0, f"--learning-rate {cfg.learning_rate} must be positive")
    _check(cfg.student_learning_rate is None or cfg.student_learning_rate > 0, f"--student-learning-rate {cfg.student_learning_rate} must be positive")
    _check(cfg.max_grad_norm > 0, f"--max-grad-norm {cfg.max_grad_norm} must be positive")
    _check(cfg.lr_scheduler in LR_SCHEDULERS, f"unknown --lr-scheduler {cfg.lr_scheduler!r}: use one of {', '.join(LR_SCHEDULERS)}")
    _check(cfg.resolution is None or (cfg.resolution >= 8 and cfg.resolution % 8 == 0), f"--resolution {cfg.resolution} must be a positive multiple of 8")
    _check(cfg.num_frames is None or cfg.num_frames >= 1, f"--num-frames {cfg.num_frames} must be at least 1 (video families take 4k + 1, e.g. 49)")
    _check(cfg.mixed_precision in MIXED_PRECISION, f"unknown --mixed-precision {cfg.mixed_precision!r}: use no, fp16 or bf16")
    _check(cfg.save_precision in SAVE_PRECISION, f"unknown --save-precision {cfg.save_precision!r}: use {', '.join(SAVE_PRECISION)}")
    _check(cfg.checkpoint_every >= 0 and cfg.validate_every >= 0 and cfg.probe_every >= 0,
           "--checkpoint-every, --validate-every and --probe-every must be 0 (off) or positive")
    _check(cfg.stop_at_step is None or cfg.stop_at_step >= 1, f"--stop-at-step {cfg.stop_at_step} must be at least 1")
    _check(cfg.keep_checkpoints >= 1, f"--keep-checkpoints {cfg.keep_checkpoints} must be at least 1")
    _check(cfg.validation_prompts >= 1 and cfg.teacher_validation_steps >= 1, "--validation-prompts and --teacher-validation-steps must be at least 1")
    if cfg.use_8bit_adam:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as err:
            raise ConfigError("--use-8bit-adam needs bitsandbytes: pip install bitsandbytes, or drop the flag") from err
    read_prompts(cfg.prompts)  # fails here, before any model loads
    return cfg


def read_prompts(path: str) -> list[str]:
    """Prompts of a .txt (one a line) or .jsonl ({"prompt": ...} a line) file; blank lines skipped."""
    _check(bool(path), "no prompt file given: pass --prompts FILE (.txt one prompt per line, or .jsonl)")
    file = Path(path)
    _check(file.is_file(), f"prompt file {path} does not exist: check the --prompts path")
    try:
        lines = [line.strip() for line in file.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"prompt file {path} could not be read as UTF-8 text ({err})") from err
    lines = [line for line in lines if line]
    if file.suffix == ".jsonl":
        lines = [_jsonl_prompt(path, n, line) for n, line in enumerate(lines, 1)]
    _check(bool(lines), f"prompt file {path} is empty: write one prompt per line (.txt) or {{\"prompt\": ...}} per line (.jsonl)")
    return lines


def _jsonl_prompt(path: str, line_no: int, line: str) -> str:
    try:
        prompt = json.loads(line)["prompt"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ConfigError(f"{path} line {line_no} is not a JSON object with a \"prompt\" field: write {{\"prompt\": \"...\"}}") from err
    _check(isinstance(prompt, str), f"{path} line {line_no}: \"prompt\" must be a string")
    return prompt
