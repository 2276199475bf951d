"""The README's main-job command: distil the committed digits teacher with ``training.distill``
(the trainer real models use), draw a labelled comparison grid and print a short quality table.

    bash scripts/demo.sh            # = bootstrap, then: .venv/bin/python -m benchmarks.demo

Writes ``outputs/demo/digits_grid.png`` (rows: teacher DDIM 50 steps, teacher 4 steps, TDM
student 4 steps, TDM student 1 step; same seeds and classes), the two LoRAs, and prints the table.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from benchmarks import metrics, sampling
from benchmarks.digits_data import load_digits_split
from benchmarks.grid_image import labelled_grid
from tdm_core.atomic import save_png_atomic

ROOT = Path(__file__).resolve().parent.parent
TEACHER_DIR = ROOT / "benchmarks" / "assets" / "digits_teacher"
DEFAULT_OUTPUT = ROOT / "outputs" / "demo"
PROMPTS = [str(c) for c in range(10)]

# The trainer's own defaults (rank 16, lr 1e-3 / 2e-4, constant after 10 warm-up steps): the demo shows
# what a bare `training.distill` run gives. The schedule does not depend on --max-train-steps, so a run
# cut at N iterations equals a run of N iterations (the benchmarks' convergence rows rely on it).
DISTILL_OPTIONS = ["--validate-every", "0"]


def write_prompts(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "digit_prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def distil(teacher: Path, output: Path, num_steps: int, iterations: int, batch_size: int, cfg: float,
           extra: list[str] | None = None, seed: int = 0) -> Path:
    """One ``training.distill`` run (in-process, same code path as the CLI); returns the LoRA path."""
    from training import distill

    argv = [
        "--model", str(teacher), "--prompts", str(write_prompts(output.parent)), "--output", str(output),
        "--num-steps", str(num_steps), "--max-train-steps", str(iterations), "--batch-size", str(batch_size),
        "--cfg", str(cfg), "--seed", str(seed), "--checkpoint-every", "0", *DISTILL_OPTIONS, *(extra or []),
    ]
    code = distill.main(argv)
    if code != 0:
        raise SystemExit(f"training.distill failed with exit code {code} (arguments: {' '.join(argv)})")
    return output


def load_teacher(teacher: Path = TEACHER_DIR):
    from training.models import load_family

    if not (teacher / "tdm_family.json").is_file():
        raise SystemExit(f"no digits teacher at {teacher}: regenerate it with `python -m benchmarks.train_teacher`")
    return load_family(str(teacher))


def quality_rows(named_samples: list[tuple[str, torch.Tensor]], classes: torch.Tensor, reference: torch.Tensor) -> list[dict]:
    """Metrics of every sample set against held-out real digits and the ``reference`` samples."""
    classifier = metrics.load_classifier()
    real_feats, _ = metrics.classifier_outputs(classifier, load_digits_split("heldout")[0])
    ref_feats, _ = metrics.classifier_outputs(classifier, reference)
    return [{"name": name, **metrics.quality(classifier, s, classes, real_feats, ref_feats)} for name, s in named_samples]


def format_table(rows: list[dict], nfe: dict[str, int]) -> str:
    lines = ["| sampler | NFE | FD to real | FD to teacher 50 | class acc. | precision | recall |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['name']} | {nfe[r['name']]} | {r['fd_real']:.1f} | {r['fd_teacher']:.1f} | "
                     f"{r['accuracy']:.3f} | {r['precision']:.3f} | {r['recall']:.3f} |")
    return "\n".join(lines)


def run_demo(output: Path, iterations: int, k1_iterations: int, batch_size: int, cfg: float, num_eval: int,
             seed: int = 0, teacher_dir: Path = TEACHER_DIR) -> dict:
    start = time.time()
    print(f"[demo] distilling {teacher_dir.name} with training.distill: K=4 for {iterations} iterations, "
          f"then K=1 for {k1_iterations}, batch {batch_size}, teacher CFG {cfg}", flush=True)
    lora4 = distil(teacher_dir, output / "digits_tdm_k4.safetensors", 4, iterations, batch_size, cfg, seed=seed)
    lora1 = distil(teacher_dir, output / "digits_tdm_k1.safetensors", 1, k1_iterations, batch_size, cfg, seed=seed)
    teacher = load_teacher(teacher_dir)
    student4, student1 = load_teacher(teacher_dir), load_teacher(teacher_dir)
    grid4 = sampling.load_student_lora(student4, lora4).grid
    grid1 = sampling.load_student_lora(student1, lora1).grid

    def all_rows(classes, noise):
        return [
            ("teacher DDIM 50 steps", sampling.sample_teacher(teacher, 50, classes, noise, cfg)),
            ("teacher DDIM 4 steps", sampling.sample_teacher(teacher, 4, classes, noise, cfg)),
            ("TDM student 4 steps", sampling.sample_student(student4, grid4, classes, noise)),
            ("TDM student 1 step", sampling.sample_student(student1, grid1, classes, noise)),
        ]

    print(f"[demo] sampling the grid and {num_eval} evaluation samples per row", flush=True)
    classes = torch.arange(20) % 10
    rows = all_rows(classes, sampling.noise_for(teacher, classes.shape[0], seed + 1))
    image = labelled_grid([(f"{name} (CFG {cfg if 'teacher' in name else 1})", teacher.decode(s)) for name, s in rows],
                          [str(int(c)) for c in classes])
    grid_path = save_png_atomic(image, output / "digits_grid.png")
    eval_classes = sampling.balanced_classes(num_eval)
    eval_rows = all_rows(eval_classes, sampling.noise_for(teacher, num_eval, seed + 2))
    table = quality_rows(eval_rows, eval_classes, eval_rows[0][1])
    nfe = {"teacher DDIM 50 steps": 50 * (2 if cfg != 1 else 1), "teacher DDIM 4 steps": 4 * (2 if cfg != 1 else 1),
           "TDM student 4 steps": 4, "TDM student 1 step": 1}
    text = format_table(table, nfe)
    print(f"\nDigits, teacher CFG {cfg}, {num_eval} samples per row (classifier-feature Frechet distance, "
          f"lower is better; class accuracy of the digits classifier):\n{text}\n")
    print(f"[demo] grid: {grid_path}  LoRAs: {lora4}, {lora1}  ({time.time() - start:.0f} s)")
    return {"grid": grid_path, "table": table, "loras": (lora4, lora1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--iterations", type=int, default=200, help="TDM iterations of the K=4 student")
    parser.add_argument("--k1-iterations", type=int, default=150, help="TDM iterations of the K=1 student")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--cfg", type=float, default=2.0, help="teacher guidance distilled into the students")
    parser.add_argument("--num-eval", type=int, default=300, help="samples per row of the quality table")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    if min(args.iterations, args.k1_iterations, args.batch_size, args.num_eval) < 1:
        parser.error("--iterations, --k1-iterations, --batch-size and --num-eval must be at least 1")
    if args.num_eval < 20:
        parser.error("--num-eval must be at least 20 (a Frechet distance needs many samples)")
    torch.set_num_threads(args.threads)
    run_demo(args.output, args.iterations, args.k1_iterations, args.batch_size, args.cfg, args.num_eval, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
