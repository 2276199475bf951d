"""Steps-aware TDM (TDM-unify) on the digits teacher: one LoRA at 1, 2 and 4 steps against separate
K=1 and K=4 students, and the ablation without the K condition on the fake score. Writes
``benchmarks/RESULTS_unify.md``.

    python -m benchmarks.unify                       # the rows in RESULTS_unify.md (tens of minutes on 2 CPU cores)
    python -m benchmarks.unify --train-only k1,k4    # only distil those rows (run two of these side by side)

Every student is distilled with ``training.distill`` (the CLI's code path, D's demo options, same
iterations, batch and seed); LoRAs are reused when they exist, so a rerun only evaluates.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks import metrics, sampling
from benchmarks.demo import TEACHER_DIR, distil, load_teacher
from benchmarks.digits_data import load_digits_split
from tdm_core.atomic import write_text_atomic

ROOT = Path(__file__).resolve().parent.parent
RESULTS_MD = ROOT / "benchmarks" / "RESULTS_unify.md"
WORK = ROOT / "outputs" / "benchmarks_unify"
K_CHOICES = "1,2,4"
# name -> (K of the distill run, extra training.distill flags)
STUDENTS = {
    "k1": (1, []),
    "k4": (4, []),
    "unify": (4, ["--steps-aware", "--k-choices", K_CHOICES]),
    "unify_no_k_fake": (4, ["--steps-aware", "--k-choices", K_CHOICES, "--no-k-on-fake-score"]),
}
# rows of the table: (label, student name or None for the teacher, sampling steps)
ROWS = [
    ("teacher DDIM", None, 50),
    ("teacher DDIM", None, 4),
    ("teacher DDIM", None, 1),
    ("separate K=1 student", "k1", 1),
    ("separate K=4 student", "k4", 4),
    ("separate K=4 student (off-design)", "k4", 2),
    ("separate K=4 student (off-design)", "k4", 1),
    ("unify {1,2,4}", "unify", 1),
    ("unify {1,2,4}", "unify", 2),
    ("unify {1,2,4}", "unify", 4),
    ("unify, fake score without K (ablation)", "unify_no_k_fake", 1),
    ("unify, fake score without K (ablation)", "unify_no_k_fake", 2),
    ("unify, fake score without K (ablation)", "unify_no_k_fake", 4),
]


def lora_path(work: Path, name: str) -> Path:
    return work / name / f"digits_{name}.safetensors"


def train(work: Path, name: str, iterations: int, batch_size: int, cfg: float, seed: int) -> Path:
    path = lora_path(work, name)
    if not path.is_file():
        num_steps, extra = STUDENTS[name]
        distil(TEACHER_DIR, path, num_steps, iterations, batch_size, cfg, extra=extra, seed=seed)
    return path


def load_student(lora: Path):
    """The teacher with the LoRA as its student adapter (and a unify LoRA's K table); returns (family, info)."""
    from tdm_core.steps_aware import K_EMBEDDING_KEY
    from training.lora_io import kohya_to_adapter, read_lora
    from training.models import STUDENT, add_tdm_adapters, load_adapter_state_dict
    from training.steps_aware import TABLE_STATE_KEY, install_k_embedding

    family = load_teacher(TEACHER_DIR)
    tensors, info = read_lora(lora)
    if K_EMBEDDING_KEY not in tensors:
        sampling.load_student_lora(family, lora)
        return family, info
    add_tdm_adapters(family, info.lora_rank, info.lora_alpha)
    install_k_embedding(family.network, info.k_choices, adapters=(STUDENT,))
    state = kohya_to_adapter(tensors, family.network, family.kohya_prefix, info.lora_rank)
    state[TABLE_STATE_KEY] = tensors[K_EMBEDDING_KEY]
    load_adapter_state_dict(family.network, STUDENT, state)
    return family, info


def student_samples(family, info, steps: int, classes: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    from tdm_core import reference_grid
    from training.steps_aware import num_steps

    grid = info.grid if (info.grid and len(info.grid) == steps) else reference_grid(steps, info.total_steps)
    with num_steps(family.network, steps):  # a no-op for a fixed-K student
        return sampling.sample_student(family, grid, classes, noise)


def evaluate(work: Path, num_eval: int, seeds: list[int], cfg: float, log, names: list[str]) -> list[dict]:
    classifier = metrics.load_classifier()
    real_feats, _ = metrics.classifier_outputs(classifier, load_digits_split("heldout")[0])
    teacher = load_teacher(TEACHER_DIR)
    classes = sampling.balanced_classes(num_eval)
    noises = {s: sampling.noise_for(teacher, num_eval, 1000 + s) for s in seeds}
    reference = {s: metrics.classifier_outputs(classifier, sampling.sample_teacher(teacher, 50, classes, noises[s], cfg))[0] for s in seeds}
    students = {name: load_student(lora_path(work, name)) for name in names}
    rows = []
    for label, name, steps in [r for r in ROWS if r[1] is None or r[1] in names]:
        per_seed = []
        for s in seeds:
            if name is None:
                samples = sampling.sample_teacher(teacher, steps, classes, noises[s], cfg)
            else:
                samples = student_samples(*students[name], steps, classes, noises[s])
            per_seed.append(metrics.quality(classifier, samples, classes, real_feats, reference[s]))
        row = {"label": label, "student": name, "steps": steps}
        for key in per_seed[0]:
            values = [r[key] for r in per_seed]
            row[key], row[key + "_sd"] = statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)
        rows.append(row)
        log(f"{label} @ {steps}: FD real {row['fd_real']:.1f}, FD teacher {row['fd_teacher']:.1f}, acc {row['accuracy']:.3f}")
    return rows


def table(rows: list[dict], cfg: float) -> str:
    lines = ["| model | steps (NFE) | FD to real | FD to teacher 50 | class acc. | precision | recall |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        nfe = r["steps"] * (2 if r["student"] is None and cfg != 1.0 else 1)
        # a Frechet distance is >= 0; the teacher's own reference row comes out as -0.0 in float arithmetic
        lines.append(f"| {r['label']} | {r['steps']} ({nfe}) | {r['fd_real']:.1f} ± {r['fd_real_sd']:.1f} | "
                     f"{max(r['fd_teacher'], 0.0):.1f} ± {r['fd_teacher_sd']:.1f} | {r['accuracy']:.3f} | {r['precision']:.3f} | {r['recall']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--cfg", type=float, default=1.0, help="teacher guidance distilled (1: the clean distillation test)")
    parser.add_argument("--num-eval", type=int, default=500)
    parser.add_argument("--seeds", default="0,1", help="sampling seeds; ± is the spread over them")
    parser.add_argument("--seed", type=int, default=0, help="training seed of every student")
    parser.add_argument("--work", type=Path, default=WORK)
    parser.add_argument("--output", type=Path, default=RESULTS_MD, help="the markdown file (only with evaluation)")
    parser.add_argument("--train-only", default="", help="comma-separated students to distil, then stop: " + ", ".join(STUDENTS))
    parser.add_argument("--students", default=",".join(STUDENTS), help="comma-separated students to distil and evaluate")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.time()

    def log(message: str) -> None:
        print(f"[unify {time.time() - start:5.0f}s] {message}", flush=True)

    names = [n for n in (args.train_only or args.students).split(",") if n]
    unknown = sorted(set(names) - set(STUDENTS))
    if unknown:
        parser.error(f"unknown students {unknown}: use {', '.join(STUDENTS)}")
    for name in names:
        log(f"distilling {name}")
        train(args.work, name, args.iterations, args.batch_size, args.cfg, args.seed)
    if args.train_only:
        return 0
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = evaluate(args.work, args.num_eval, seeds, args.cfg, log, names)
    write_text_atomic(args.work / "results.json", json.dumps(rows, indent=1))
    command = "python -m benchmarks.unify " + " ".join(sys.argv[1:] if argv is None else argv)
    text = (f"# TDM-unify on the digits teacher\n\n`{command.strip()}` ({time.time() - start:.0f} s on this machine; "
            f"{args.iterations} TDM iterations per student, batch {args.batch_size}, teacher CFG {args.cfg:g}, "
            f"{args.num_eval} samples per row and seed, seeds {args.seeds}; ± = spread over the seeds)\n\n"
            f"{table(rows, args.cfg)}\n")
    write_text_atomic(args.output, text)
    log(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
