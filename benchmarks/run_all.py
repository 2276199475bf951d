"""All benchmarks in one command; writes ``benchmarks/RESULTS.md``.

    python -m benchmarks.run_all                 # the full run (tens of minutes on 2 CPU cores)
    python -m benchmarks.run_all --quick ...     # the smoke-test sizes (seconds)

Every finished row is cached in ``<work>/results.json`` and RESULTS.md is rewritten after each
one, so an interrupted run keeps what it finished and a rerun resumes (``--fresh`` starts over).
Rows run in order of importance: quality and ablations at CFG 1, then CFG > 1. Speed and memory are
not measured here: ``python -m benchmarks.speed_table`` writes them, side by side in one run, to
``benchmarks/RESULTS_speed.md``; RESULTS.md points there.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks import metrics, sampling
from benchmarks.demo import TEACHER_DIR, distil, load_teacher
from benchmarks.digits_data import load_digits_split
from tdm_core.atomic import write_text_atomic

ROOT = Path(__file__).resolve().parent.parent
RESULTS_MD = ROOT / "benchmarks" / "RESULTS.md"
WORK = ROOT / "outputs" / "benchmarks"


@dataclass
class Plan:
    num_eval: int = 500  # samples per row and seed
    eval_seeds: tuple = (0, 1)  # sampling seeds (noise); the spread column is over these
    iterations: int = 200  # TDM iterations of every distilled row
    checkpoints: tuple = (50, 100)  # convergence rows, read from the main K=4 run
    batch_size: int = 8
    cfgs: tuple = (1.0, 2.0)
    teacher_steps: tuple = (50, 25, 4, 1)
    ablations: tuple = ("l2", "shared")
    clipped_teacher_steps: tuple = (50, 4)


QUICK = Plan(num_eval=40, eval_seeds=(0, 1), iterations=4, checkpoints=(2,), batch_size=2, cfgs=(1.0, 2.0),
             teacher_steps=(4, 1), ablations=("l2", "shared"))


# --- results cache and the markdown file --------------------------------------------------------
class Results:
    def __init__(self, path: Path, fresh: bool):
        self.path = path
        self.data = {} if fresh or not path.is_file() else json.loads(path.read_text())

    def get(self, key):
        return self.data.get(key)

    def put(self, key, value) -> None:
        self.data[key] = value
        write_text_atomic(self.path, json.dumps(self.data, indent=1))


# --- quality ------------------------------------------------------------------------------------
class Evaluator:
    """Samples rows at fixed seeds and scores them; the teacher's 50-step samples at the same CFG
    and seed are the reference of the "FD to teacher 50" column."""

    def __init__(self, plan: Plan, teacher_dir: Path):
        self.plan, self.teacher_dir = plan, teacher_dir
        self.teacher = load_teacher(teacher_dir)
        self.classifier = metrics.load_classifier()
        self.real_feats, _ = metrics.classifier_outputs(self.classifier, load_digits_split("heldout")[0])
        self.classes = sampling.balanced_classes(plan.num_eval)
        self._reference = {}

    def noise(self, seed: int) -> torch.Tensor:
        return sampling.noise_for(self.teacher, self.plan.num_eval, 1000 + seed)

    def teacher_samples(self, steps: int, cfg: float, noise: torch.Tensor, seed: int) -> torch.Tensor:
        # the 50-step samples are the reference of every row: sample them once per CFG and seed
        if steps != 50:
            return sampling.sample_teacher(self.teacher, steps, self.classes, noise, cfg)
        if (cfg, seed) not in self._reference:
            self._reference[(cfg, seed)] = sampling.sample_teacher(self.teacher, 50, self.classes, noise, cfg)
        return self._reference[(cfg, seed)]

    def reference_feats(self, cfg: float, seed: int) -> torch.Tensor:
        samples = self.teacher_samples(50, cfg, self.noise(seed), seed)
        return metrics.classifier_outputs(self.classifier, samples)[0]

    def score(self, make_samples, cfg: float) -> dict:
        per_seed = []
        for seed in self.plan.eval_seeds:
            samples = make_samples(self.noise(seed), seed)
            per_seed.append(metrics.quality(self.classifier, samples, self.classes, self.real_feats, self.reference_feats(cfg, seed)))
        return summarise(per_seed)

    def teacher_row(self, steps: int, cfg: float, clip_x0: bool = False) -> dict:
        if clip_x0:
            return self.score(lambda noise, seed: sampling.sample_teacher(self.teacher, steps, self.classes, noise, cfg, clip_x0=True), cfg)
        return self.score(lambda noise, seed: self.teacher_samples(steps, cfg, noise, seed), cfg)

    def student_row(self, lora: Path | None, cfg: float, adapter_state=None, rank=None, alpha=None, grid=None) -> dict:
        family = load_teacher(self.teacher_dir)
        if lora is not None:
            grid = sampling.load_student_lora(family, lora).grid
        else:
            sampling.load_student_state(family, adapter_state, rank, alpha)
        return self.score(lambda noise, seed: sampling.sample_student(family, grid, self.classes, noise), cfg)


def summarise(per_seed: list[dict]) -> dict:
    out = {}
    for key in per_seed[0]:
        values = [r[key] for r in per_seed]
        out[key] = statistics.fmean(values)
        out[key + "_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
    out["seeds"] = len(per_seed)
    return out


def distil_row(plan: Plan, teacher_dir: Path, name: str, num_steps: int, cfg: float, extra: list[str], stops: tuple = ()) -> tuple[Path, Path, float]:
    """Distils one row (stopping at ``stops`` along the way so their checkpoints survive);
    returns (LoRA, run folder, seconds)."""
    folder = WORK / f"cfg{cfg:g}" / name
    lora = folder / f"{name}.safetensors"
    start = time.time()
    for stop in [s for s in stops if s < plan.iterations]:
        distil(teacher_dir, lora, num_steps, plan.iterations, plan.batch_size, cfg,
               extra=[*extra, "--stop-at-step", str(stop), "--resume", "--keep-checkpoints", "100"])
    distil(teacher_dir, lora, num_steps, plan.iterations, plan.batch_size, cfg, extra=[*extra, "--resume", "--keep-checkpoints", "100"])
    return lora, folder / f"{name}_run", time.time() - start


def checkpoint_student(run_dir: Path, step: int):
    from training.checkpoint import checkpoint_dir, load_checkpoint

    adapters, _ = load_checkpoint(checkpoint_dir(run_dir, step))
    return adapters["student"]


def quality_rows(plan: Plan, results: Results, evaluator: Evaluator, cfg: float, part: str, log) -> None:
    """part "main": teacher rows, K=4 (with convergence checkpoints) and K=1; part "ablations"."""
    from training.lora_io import read_lora

    if part == "clipped":  # the teacher with diffusers' clip_sample: its best standard DDIM
        for steps in plan.clipped_teacher_steps:
            key = f"q/{cfg:g}/teacher{steps}_clip"
            if results.get(key) is None:
                log(f"teacher DDIM {steps} steps with x0 clipping, CFG {cfg:g}")
                results.put(key, {"name": f"teacher DDIM {steps} steps, x0 clipped", "nfe": steps * (2 if cfg != 1 else 1),
                                  **evaluator.teacher_row(steps, cfg, clip_x0=True)})
        return
    if part == "main":
        for steps in plan.teacher_steps:
            key = f"q/{cfg:g}/teacher{steps}"
            if results.get(key) is None:
                log(f"teacher DDIM {steps} steps, CFG {cfg:g}")
                results.put(key, {"name": f"teacher DDIM {steps} steps", "nfe": steps * (2 if cfg != 1 else 1), **evaluator.teacher_row(steps, cfg)})
        jobs = [("k4", 4, [], plan.checkpoints), ("k1", 1, [], ())]
    else:
        jobs = [(f"k4_{a}", 4, {"l2": ["--distance", "l2"], "shared": ["--interval-mode", "shared"]}[a], ()) for a in plan.ablations]
    labels = {"k4": "TDM K=4 (pseudo-Huber, separate)", "k1": "TDM K=1 (distribution matching only)",
              "k4_l2": "TDM K=4, squared L2", "k4_shared": "TDM K=4, shared intervals"}
    for name, k, extra, stops in jobs:
        key = f"q/{cfg:g}/{name}"
        if results.get(key) is not None:
            continue
        log(f"distilling {name} at CFG {cfg:g} ({plan.iterations} iterations)")
        lora, run_dir, seconds = distil_row(plan, evaluator.teacher_dir, name, k, cfg, extra, stops)
        _, info = read_lora(lora)
        for stop in [s for s in stops if s < plan.iterations]:
            ckey = f"q/{cfg:g}/{name}@{stop}"
            if results.get(ckey) is None:
                state = checkpoint_student(run_dir, stop)
                row = evaluator.student_row(None, cfg, state, info.lora_rank, info.lora_alpha, info.grid)
                results.put(ckey, {"name": f"{labels[name]} after {stop} it.", "nfe": k, **row})
        log(f"evaluating {name} at CFG {cfg:g}")
        row = evaluator.student_row(lora, cfg)
        results.put(key, {"name": f"{labels[name]} after {plan.iterations} it.", "nfe": k, "train_seconds": seconds, **row})


# --- RESULTS.md -----------------------------------------------------------------------------------
def pm(row: dict, key: str, digits: int = 1) -> str:
    return f"{row[key]:.{digits}f} ± {row[key + '_sd']:.{digits}f}"


def quality_table(results: Results, plan: Plan, cfg: float) -> list[str]:
    keys = [f"teacher{s}" for s in plan.teacher_steps] + [f"teacher{s}_clip" for s in plan.clipped_teacher_steps] + ["k4"] + [f"k4@{s}" for s in plan.checkpoints if s < plan.iterations]
    keys += ["k1"] + [f"k4_{a}" for a in plan.ablations]
    lines = [f"### Teacher CFG w = {cfg:g} (students sample at CFG 1, guidance distilled in)", "",
             "| row | NFE | FD to real held-out ↓ | FD to teacher 50 steps ↓ | class accuracy ↑ | precision ↑ | recall ↑ |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    missing = []
    for k in keys:
        row = results.get(f"q/{cfg:g}/{k}")
        if row is None:
            missing.append(k)
            continue
        lines.append(f"| {row['name']} | {row['nfe']} | {pm(row, 'fd_real')} | {pm(row, 'fd_teacher')} | "
                     f"{pm(row, 'accuracy', 3)} | {pm(row, 'precision', 3)} | {pm(row, 'recall', 3)} |")
    if missing:
        lines += ["", f"Not measured (run stopped before them): {', '.join(missing)}."]
    return lines + [""]


def expected_keys(plan: Plan) -> list[str]:
    per_cfg = [f"teacher{s}" for s in plan.teacher_steps] + [f"teacher{s}_clip" for s in plan.clipped_teacher_steps]
    per_cfg += ["k4", "k1"] + [f"k4@{s}" for s in plan.checkpoints if s < plan.iterations] + [f"k4_{a}" for a in plan.ablations]
    keys = [f"q/{c:g}/{k}" for c in plan.cfgs for k in per_cfg]
    return keys


def missing_rows(results: Results, plan: Plan) -> list[str]:
    return [k for k in expected_keys(plan) if results.get(k) is None]


def noise_margin(a: dict, b: dict, key: str) -> float:
    # two standard errors of the difference over sampling seeds
    n = max(1, a.get("seeds", 1))
    return 2 * math.sqrt((a[key + "_sd"] ** 2 + b[key + "_sd"] ** 2) / n)


def compare(a: dict | None, b: dict | None, key: str = "fd_real") -> tuple[str, str]:
    """("a better" | "b better" | "tie within noise", numbers) for lower-is-better ``key``."""
    if a is None or b is None:
        return "not measured", "the run stopped before one of the two rows"
    diff, margin = a[key] - b[key], noise_margin(a, b, key)
    text = f"{a[key]:.1f} vs {b[key]:.1f} (noise margin ±{margin:.1f})"
    if abs(diff) <= margin:
        return "tie within noise", text
    return ("first better" if diff < 0 else "second better"), text


def claims_section(results: Results, plan: Plan) -> list[str]:
    lines = ["## The paper's claims, as measured here", ""]
    for cfg in plan.cfgs:
        q = lambda k: results.get(f"q/{cfg:g}/{k}")  # noqa: E731
        lines.append(f"At teacher CFG w = {cfg:g} (FD to real held-out digits, lower is better):")
        for ref, label in (("teacher50", "50 DDIM steps"), ("teacher25", "25 DDIM steps"), ("teacher50_clip", "50 DDIM steps with x0 clipping")):
            verdict, text = compare(q("k4"), q(ref))
            holds = {"first better": "holds", "tie within noise": "holds (as good, within noise)", "second better": "does not hold"}.get(verdict, verdict)
            lines.append(f"- 4-step TDM student at least as good as the teacher at {label}: **{holds}**; {text}.")
        verdict, text = compare(q("k4"), q("k1"))
        holds = {"first better": "holds", "tie within noise": "not shown (tie within noise)", "second better": "does not hold"}.get(verdict, verdict)
        lines.append(f"- Trajectory matching K=4 (4 NFE) beats distribution matching K=1 (1 NFE): **{holds}**; {text}.")
        verdict, text = compare(q("k4"), q("k4_l2"))
        holds = {"first better": "helps", "tie within noise": "no measurable difference", "second better": "hurts here"}.get(verdict, verdict)
        lines.append(f"- Pseudo-Huber vs squared L2 at K=4: **{holds}**; {text}.")
        verdict, text = compare(q("k4"), q("k4_shared"))
        holds = {"first better": "separate better", "tie within noise": "no measurable difference", "second better": "shared better"}.get(verdict, verdict)
        lines.append(f"- Separate vs shared intervals: **{holds}**; {text}.")
        conv = [(s, q(f"k4@{s}")) for s in plan.checkpoints if s < plan.iterations] + [(plan.iterations, q("k4"))]
        conv = [(s, r) for s, r in conv if r is not None]
        t4 = q("teacher4")
        if conv and t4:
            first_good = next((s for s, r in conv if compare(r, t4)[0] == "first better"), None)
            trend = ", ".join(f"{s} it.: {r['fd_real']:.1f}" for s, r in conv)
            lines.append(f"- Converges in hundreds of iterations, data-free: FD to real by iteration {trend}; "
                         f"teacher at the same 4 steps: {t4['fd_real']:.1f}. "
                         + (f"The student beats the 4-step teacher from {first_good} iterations on." if first_good else
                            "The student does not beat the 4-step teacher within this budget."))
        lines.append("")
    lines.append("- One steps-aware model serving 1 and 4 steps (TDM-unify): see `benchmarks/RESULTS_unify.md` "
                 "(`python -m benchmarks.unify`).")
    return lines + [""]


SPEED_POINTER = (
    "The speed and memory tables moved to [RESULTS_speed.md](RESULTS_speed.md), written by `python -m benchmarks.speed_table`: "
    "the project's iteration, the same forwards and backwards timed alone (the network-bound floor) and the three-full-copies "
    "design, measured side by side in one run on a full-size SD1.5-architecture UNet and the mid-size one, with peak memory "
    "above baseline, the ratios against their targets, the adapter-switch time on SD1.5- and SDXL-size UNets, sampling speed "
    "and scaling. The speed rows this file held before (mid-size UNet: project 6.72 s against three copies 5.26 s per "
    "iteration) were measured before `training.models.use_adapter` became O(1) and before the iteration moved into "
    "`tdm_core.iteration`; they are superseded."
)


def speed_section() -> list[str]:
    return ["## Speed and memory", "", SPEED_POINTER, ""]


def render(results: Results, plan: Plan, command: str, status: str) -> str:
    lines = [
        "# Benchmarks: TDM on the digits teacher",
        "",
        f"Produced by `{command}` ({status}). Machine: {platform.machine()}, {os.cpu_count()} CPU cores shared with other "
        f"jobs, torch {torch.__version__}, 1 torch thread.",
        "",
        "Teacher: `benchmarks/assets/digits_teacher` (regenerate with `python -m benchmarks.train_teacher`): a tiny "
        "class-conditional UNet2DConditionModel on 16x16 upsampled scikit-learn digits, classes through cross-attention, "
        "DDPM eps-prediction with linear betas 1e-4..0.02 (1000 steps), 10% null-class dropout for CFG. "
        "Teacher rows use DDIM (eta 0) on a trailing grid starting at t=999, with CFG in one batched forward "
        "(NFE counts both halves). Students are distilled by `training.distill` "
        f"(rank 16 LoRA, batch {plan.batch_size}, {plan.iterations} iterations, constant learning rates fake 1e-3 / student 2e-4, "
        "AdamW betas (0, 0.95), reference grid T=900) and sample at CFG 1 on their LoRA's grid.",
        "",
        "Metric: a small CNN trained on the digits training split (`benchmarks/assets/digits_classifier.safetensors`, "
        "99.6% held-out accuracy); Frechet distance on its 64-d penultimate features (the FID recipe with a domain "
        f"network) against the {len(load_digits_split('heldout')[1])} held-out real digits and against the teacher's own "
        f"50-step samples at the same CFG and seed; class accuracy of the conditional samples; k-NN (k=3) precision/recall "
        f"(Kynkaanniemi et al.). {plan.num_eval} samples per row and seed (classes balanced), mean ± standard deviation over "
        f"{len(plan.eval_seeds)} sampling seeds; each student is one training run (training-seed spread not measured).",
        "",
        "## Quality",
        "",
    ]
    for cfg in plan.cfgs:
        lines += quality_table(results, plan, cfg)
    lines += claims_section(results, plan)
    lines += speed_section()
    lines += notes(plan)
    return "\n".join(lines) + "\n"


def notes(plan: Plan) -> list[str]:
    return [
        "## Reading these numbers",
        "",
        "- The teacher is small and briefly trained (1000 iterations of batch 64 on a shared CPU). Its plain DDIM "
        "samples often keep residual noise where its x0 prediction at high noise overshoots (see "
        "`benchmarks/digits_demo.png`); the `x0 clipped` rows (diffusers' `clip_sample`, its DDIM default for pixel "
        "models) are its best standard sampler and the fairer baseline. TDM trains the student against the teacher's "
        "x0 predictions at the student's own (intermediate) noise levels, never against the teacher's samples, so a "
        "student can beat this teacher's sampler: read \"student beats teacher\" here as \"beats this teacher's sampler\".",
        "- FD to the teacher's 50-step samples measures how closely a row reproduces the teacher's sampler, including "
        "its artefacts; FD to real digits measures quality. Both are reported, as METHOD.md asks.",
        f"- Convergence is read at {', '.join(str(c) for c in plan.checkpoints)} and {plan.iterations} iterations "
        "(checkpoints of the main K=4 run with a constant learning rate) instead of 100/250/500/1000: the 2-core machine "
        "was shared with other jobs during the run and the full schedule did not fit the time available.",
        "- Every distilled row is one training run; the ± is over sampling seeds only, so differences between "
        "distilled rows smaller than a few FD points should not be trusted.",
        "",
    ]


def run(plan: Plan, output_md: Path, work: Path, fresh: bool, command: str, teacher_dir: Path = TEACHER_DIR,
        only: set | None = None, merge_from: list | None = None) -> Results:
    """Runs the stages (all, or those named in ``only``: main1, ablations1, main2, ablations2, clipped1, clipped2)
    and rewrites ``output_md`` after each; ``merge_from`` adds rows cached by other runs first."""
    global WORK
    WORK = work
    results = Results(work / "results.json", fresh)
    for other in merge_from or []:
        for key, value in json.loads(Path(other).read_text()).items():
            if results.get(key) is None:
                results.put(key, value)
    started = time.time()

    def log(message: str) -> None:
        print(f"[run_all {time.time() - started:6.0f}s] {message}", flush=True)

    def checkpoint(status: str) -> None:
        write_text_atomic(output_md, render(results, plan, command, status))

    evaluator = Evaluator(plan, teacher_dir)
    # most informative first: the clean w=1 table with its ablations, then w>1
    first = plan.cfgs[0]
    stages = [("main1", lambda: quality_rows(plan, results, evaluator, first, "main", log)),
              ("ablations1", lambda: quality_rows(plan, results, evaluator, first, "ablations", log))]
    for n, c in enumerate(plan.cfgs[1:], start=2):
        stages += [(f"main{n}", (lambda c=c: quality_rows(plan, results, evaluator, c, "main", log))),
                   (f"ablations{n}", (lambda c=c: quality_rows(plan, results, evaluator, c, "ablations", log)))]
    stages += [(f"clipped{n}", (lambda c=c: quality_rows(plan, results, evaluator, c, "clipped", log)))
               for n, c in enumerate(plan.cfgs, start=1)]
    stages = [(name, stage) for name, stage in stages if only is None or name in only]
    for name, stage in stages:
        log(f"stage: {name}")
        stage()
        checkpoint(f"in progress: finished up to '{name}'")
    done = "complete" if not missing_rows(results, plan) else "partial: the rows listed as not measured are missing"
    checkpoint(f"{done}; {time.time() - started:.0f} s for the stages not cached")
    log(f"wrote {output_md}")
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (the smoke test)")
    parser.add_argument("--output", type=Path, default=RESULTS_MD)
    parser.add_argument("--work", type=Path, default=WORK, help="LoRAs, checkpoints and the results cache")
    parser.add_argument("--fresh", action="store_true", help="ignore cached rows")
    parser.add_argument("--iterations", type=int, help="TDM iterations per distilled row")
    parser.add_argument("--num-eval", type=int, help="samples per row and seed")
    parser.add_argument("--seeds", type=int, help="number of sampling seeds")
    parser.add_argument("--stages", help="comma list of stages to run: main1, ablations1, main2, ablations2, clipped1, clipped2 (default all; "
                        "speed and memory: python -m benchmarks.speed_table)")
    parser.add_argument("--merge-from", action="append", default=[], help="results.json of another run whose rows to include")
    parser.add_argument("--produced-by", help="how the rows were produced, for the file's header (default: this command)")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else Plan()
    if args.iterations:
        plan.iterations = args.iterations
    if args.num_eval:
        plan.num_eval = args.num_eval
    if args.seeds:
        plan.eval_seeds = tuple(range(args.seeds))
    if plan.num_eval < 20 or len(plan.eval_seeds) < 1 or plan.iterations < 1:
        parser.error("--num-eval must be at least 20, --seeds and --iterations at least 1")
    torch.set_num_threads(1)
    command = " ".join(["python -m benchmarks.run_all", *(sys.argv[1:] if argv is None else argv)])
    only = set(args.stages.split(",")) if args.stages else None
    run(plan, args.output, args.work, args.fresh, args.produced_by or command.strip(), only=only, merge_from=args.merge_from)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
