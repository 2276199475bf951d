"""Speed and memory of TDM training and sampling, each configuration in a fresh subprocess.

Training compares the project's design (one frozen base + ``student`` and ``fake_score`` LoRA
adapters, run through ``training.distill``'s own loop) with the reference design (three full model
copies: frozen teacher, fully fine-tuned student and fake score, each with its own AdamW), on the
same mid-size UNet2DConditionModel and batch. Peak memory is the subprocess's own high-water RSS
(``VmHWM`` of /proc/self/status; ``resource.getrusage``'s max RSS would inherit the parent's
high-water mark across fork + exec on Linux). Both designs pay the same interpreter and torch
baseline, which is measured and reported separately.

    python -m benchmarks.speed --config lora|reference|sampling|baseline [--json OUT]  (one measurement)
"""
from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from tdm_core import reference_grid, rollout_tdm, sample_tdm, x0_eps_from_output
from tdm_core.training import (
    diffuse_u_to_t,
    draw_training_times,
    effective_noise_m,
    fake_score_loss,
    generator_loss,
    generator_normaliser,
    generator_target_x_tilde,
    importance_weight,
    min_snr_weight,
    ode_point,
    teacher_cfg_x0,
)

ROOT = Path(__file__).resolve().parent.parent

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


def peak_rss_mb() -> float:
    """High-water resident memory of this process's address space, in MiB."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # elsewhere: KiB on Linux-likes


def write_model_folder(folder: Path, unet_config: dict, seed: int = 0) -> Path:
    """A teacher folder of the digits kind (tdm_family.json) holding a random UNet of ``unet_config``,
    so ``training.models.load_family`` and ``training.distill`` load it like the real teacher."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    from training.families import digits

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_config)
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(digits.SCHEDULER_CONFIG))
    table = torch.randn(digits.NUM_CLASSES + 1, unet_config["cross_attention_dim"])
    save_file({digits.EMBEDDINGS_KEY: table}, str(folder / digits.EMBEDDINGS_FILE))
    (folder / "tdm_family.json").write_text(json.dumps({"family": "digits"}))
    return folder


def prompts_file(folder: Path) -> Path:
    path = folder / "prompts.txt"
    path.write_text("\n".join(str(c) for c in range(10)) + "\n")
    return path


def time_iterations(step, warmup: int, iterations: int) -> float:
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(iterations):
        step()
    return (time.perf_counter() - start) / iterations


# --- the project's design: training.distill's own parts and iteration ----------------------------
def lora_design_seconds(model_dir: Path, work: Path, batch_size: int, num_steps: int, warmup: int, iterations: int, rank: int = 16) -> float:
    from accelerate import Accelerator

    from training.config import parse_config
    from training.distill import build_parts, draw_prompt_batch
    from training.loop import tdm_iteration

    cfg = parse_config(["--model", str(model_dir), "--prompts", str(prompts_file(work)), "--output", str(work / "x.safetensors"),
                        "--num-steps", str(num_steps), "--batch-size", str(batch_size), "--lora-rank", str(rank),
                        "--cfg", "2", "--learning-rate", "1e-4"])
    parts, latent_shape = build_parts(cfg, Accelerator(mixed_precision="no"))
    family = parts.family
    null_cond = family.null_condition(batch_size)
    prompts = [str(c) for c in range(10)]

    def step():
        cond = family.encode_prompts(draw_prompt_batch(prompts, batch_size, parts.generator))
        tdm_iteration(parts, cond, null_cond, latent_shape)

    return time_iterations(step, warmup, iterations)


# --- the reference design: three full copies, full fine-tune ---------------------------------------
def reference_design_seconds(model_dir: Path, batch_size: int, num_steps: int, warmup: int, iterations: int) -> float:
    """The reference script's structure (teacher, student and fake score as separate full networks,
    student and fake score fully trained with AdamW), built from the same tdm_core kernels."""
    from training.models import load_family

    family = load_family(str(model_dir))
    teacher = family.network
    student, fake = copy.deepcopy(teacher).requires_grad_(True).train(), copy.deepcopy(teacher).requires_grad_(True).train()
    opt_student = torch.optim.AdamW(student.parameters(), lr=1e-5, betas=(0.0, 0.95))
    opt_fake = torch.optim.AdamW(fake.parameters(), lr=1e-5, betas=(0.0, 0.95))
    schedule, pred = family.schedule, family.prediction_type
    grid = reference_grid(num_steps, 900)
    gen = torch.Generator().manual_seed(0)
    shape = family.latent_shape(batch_size)

    def x0_eps(net, x, t, cond):
        a, s = schedule.alpha_sigma(t)
        return x0_eps_from_output(net(x, t.float(), **cond).sample, x, a, s, pred)

    def noised(x0_hat, eps_hat, u, t):
        (a_u, s_u), (a_t, s_t) = schedule.alpha_sigma(u), schedule.alpha_sigma(t)
        n = torch.randn(x0_hat.shape, generator=gen)
        x_t = diffuse_u_to_t(ode_point(x0_hat, eps_hat, a_u, s_u), n, a_u, s_u, a_t, s_t)
        return x_t, importance_weight(effective_noise_m(eps_hat, n, a_u, s_u, a_t, s_t), n) * min_snr_weight(a_t, s_t)

    def step():
        classes = torch.randint(0, 10, (batch_size,), generator=gen)
        cond, null = family.condition_for_classes(classes), family.null_condition(batch_size)
        with torch.no_grad():
            traj = rollout_tdm(lambda x, t: student(x, t.float(), **cond).sample, torch.randn(shape, generator=gen), grid, schedule, pred)
        stacked = torch.stack(traj[:-1])
        # fake-score update
        i, t_i, u, t = draw_training_times(grid, batch_size, "separate", False, 900, gen)
        with torch.no_grad():
            x0_hat, eps_hat = x0_eps(student, stacked[i, torch.arange(batch_size)], t_i, cond)
            x_t, w = noised(x0_hat, eps_hat, u, t)
        loss = fake_score_loss(x0_eps(fake, x_t, t, cond)[0], x0_hat, w)
        opt_fake.zero_grad(set_to_none=True)
        loss.backward()
        opt_fake.step()
        # student update
        i, t_i, u, t = draw_training_times(grid, batch_size, "separate", False, 900, gen)
        x0_hat, eps_hat = x0_eps(student, stacked[i, torch.arange(batch_size)], t_i, cond)
        with torch.no_grad():
            x_t, _ = noised(x0_hat.detach(), eps_hat.detach(), u, t)
            x0_c, _ = x0_eps(teacher, x_t, t, cond)
            x0_u, _ = x0_eps(teacher, x_t, t, null)
            x0_f, _ = x0_eps(fake, x_t, t, cond)
        x_tilde = generator_target_x_tilde(x0_hat, x0_c, x0_u, x0_f, 2.0)
        loss = generator_loss(x0_hat, x_tilde, generator_normaliser(x0_hat, teacher_cfg_x0(x0_c, x0_u, 2.0)), "huber")
        opt_student.zero_grad(set_to_none=True)
        loss.backward()
        opt_student.step()

    return time_iterations(step, warmup, iterations)


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

    def best_of(fn):  # the minimum over repeats is the least disturbed by other processes
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            with torch.no_grad():
                fn()
            times.append(time.perf_counter() - start)
        return min(times)

    with torch.no_grad():
        bare_calls()  # warm-up
    return {
        "tdm4_cfg1": best_of(lambda: sample_tdm(student, noise, grid, family.schedule, family.prediction_type)),
        "teacher25_cfg2": best_of(lambda: sample_tdm(teacher, noise, teacher_grid(25), family.schedule, family.prediction_type)),
        "bare4": best_of(bare_calls),
    }


def measure(config: str, model_dir: Path, batch_size: int, num_steps: int, warmup: int, iterations: int) -> dict:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as work:
        if config == "lora":
            result = {"seconds_per_iteration": lora_design_seconds(model_dir, Path(work), batch_size, num_steps, warmup, iterations)}
        elif config == "reference":
            result = {"seconds_per_iteration": reference_design_seconds(model_dir, batch_size, num_steps, warmup, iterations)}
        elif config == "sampling":
            result = sampling_seconds(model_dir, batch_size, iterations)
        elif config == "baseline":  # the same imports and the frozen model loaded, nothing trained
            from training.models import load_family

            load_family(str(model_dir))
            result = {}
        else:
            raise ValueError(f"unknown config {config!r}: use lora, reference, sampling or baseline")
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def measure_in_subprocess(config: str, model_dir: Path, batch_size: int, num_steps: int, warmup: int, iterations: int,
                          timeout: float = 1800) -> dict:
    """Runs :func:`measure` in a fresh interpreter so that its max RSS is its own."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        out = Path(handle.name)
    cmd = [sys.executable, "-m", "benchmarks.speed", "--config", config, "--model", str(model_dir), "--batch-size", str(batch_size),
           "--num-steps", str(num_steps), "--warmup", str(warmup), "--iterations", str(iterations), "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark subprocess {config} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(out.read_text())
    out.unlink()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, choices=["lora", "reference", "sampling", "baseline"])
    parser.add_argument("--model", type=Path, required=True, help="a digits-kind model folder (see write_model_folder)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--num-steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write the result here (else print it)")
    args = parser.parse_args(argv)
    result = measure(args.config, args.model, args.batch_size, args.num_steps, args.warmup, args.iterations)
    text = json.dumps(result)
    if args.json:
        args.json.write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
