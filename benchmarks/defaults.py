"""Does a bare ``training.distill`` run distil? The defaults, measured on every benchmark teacher.

    python -m benchmarks.defaults [--teachers digits,shapes,flow] [--seeds 0,1,2] [--iterations 100,250,500,1000]
                                  [--ablations k1,fake_updates_1_huber,shared] [--ablation-seeds 0] [--num-eval 500] [--output benchmarks/RESULTS_defaults.md]
                                  [--host trainer|comfyui]

Each student is one ``python -m training.distill --model T --prompts P --output O --cfg W --seed S`` run
(plus ``--max-train-steps`` = the largest iteration count and checkpointing flags): nothing else is
set, so every other option is its default. The default schedule is constant after a short warm-up,
so the checkpoint at step n of a longer run is the n-step run. Ablations change one flag and run the
default 500 iterations at the seeds of ``--ablation-seeds`` (0 unless given). Rows are cached in ``<work>/results.json``; a rerun only adds what is missing.

``--host comfyui``: the same teachers distilled by the TDM Distill node in process instead (benchmarks.defaults_node,
benchmarks.node_distill), scored by the same evaluator; its rows go into one block under each teacher's section of
the existing results file, the rest of the file untouched.
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from tdm_core.atomic import write_text_atomic
from training.config import DistillConfig

from benchmarks.defaults_eval import summarise

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "outputs" / "benchmarks_defaults"
OUTPUT = ROOT / "benchmarks" / "RESULTS_defaults.md"
DEFAULT_ITERATIONS = DistillConfig().max_train_steps
QUARTER_STUDENT_LR = DistillConfig().student_lr() / 4
ABLATIONS = {"k1": ["--num-steps", "1"], "l2": ["--distance", "l2"], "huber_norm": ["--distance", "huber_norm"], "shared": ["--interval-mode", "shared"],
             "student_lr": ["--student-learning-rate", f"{QUARTER_STUDENT_LR:g}"],
             "fake_velocity": ["--fake-score-weighting", "velocity"], "fake_x0": ["--fake-score-weighting", "x0"],
             "fake_updates_5": ["--fake-score-updates", "5"], "fake_updates_10": ["--fake-score-updates", "10"],
             "huber": ["--distance", "huber"], "fake_updates_1": ["--fake-score-updates", "1"],
             "fresh_rollouts": ["--fake-score-rollouts", "fresh"], "student_ema": ["--student-ema", "0.99"]}
ABLATION_NAMES = {"k1": "K=1 (distribution matching only)", "l2": "squared L2", "huber_norm": "pseudo-Huber of the per-sample norm (the paper's)", "shared": "shared intervals",
                  "student_lr": f"student lr / 4 ({QUARTER_STUDENT_LR:g})",
                  "fake_velocity": "fake score weighted as a velocity MSE (1/σ²)", "fake_x0": "fake score as a plain x0 MSE",
                  "fake_updates_5": "5 fake-score updates per student update", "fake_updates_10": "10 fake-score updates per student update",
                  "huber": "element-wise pseudo-Huber (the reference script's; the default before issue 22)",
                  "fake_updates_1": "1 fake-score update per student update (the method's; the default before issue 22)",
                  "fresh_rollouts": "each fake-score update after the first on a roll-out of new noise",
                  "student_ema": "the student's moving average (decay 0.99 per update) handed out"}
for _first, _second in (("fake_updates_5", "l2"), ("fake_updates_5", "student_lr"), ("fake_updates_1", "huber")):  # two ablations at once
    ABLATIONS[f"{_first}_{_second}"] = ABLATIONS[_first] + ABLATIONS[_second]
    ABLATION_NAMES[f"{_first}_{_second}"] = f"{ABLATION_NAMES[_first]}, {ABLATION_NAMES[_second]}"
ABLATION_NAMES["fake_updates_1_huber"] = "the defaults before issue 22 (1 fake-score update, element-wise pseudo-Huber)"
UNTRAINED = "TDM K=4 before training (the teacher on the student's grid, CFG 1)"


@dataclass(frozen=True)
class Teacher:
    name: str
    cfg: float  # the teacher guidance distilled (the student samples at CFG 1)
    about: str
    extra: tuple = ()  # (row key, column header) of measures this teacher adds to the table (video: temporal ones)
    data_flags: tuple = ()  # the shape of its data where the model cannot tell (video: frames and size), not training choices

    def evaluator(self, num_eval: int, seeds: tuple):
        if self.name == "digits":
            from benchmarks.defaults_eval import DigitsEvaluator

            return DigitsEvaluator(num_eval, seeds, self.cfg)
        if self.name == "video":
            from benchmarks.defaults_eval import VideoEvaluator

            return VideoEvaluator(num_eval, seeds, self.cfg)
        from benchmarks.defaults_eval import ShapesEvaluator

        if self.name == "flow":
            from benchmarks.train_flow_teacher import DEFAULT_OUTPUT

            return ShapesEvaluator(num_eval, seeds, self.cfg, DEFAULT_OUTPUT)
        return ShapesEvaluator(num_eval, seeds, self.cfg)


TEACHERS = {
    "digits": Teacher("digits", 2.0, "class-conditional pixel UNet on 16x16 digits (benchmarks/assets/digits_teacher)"),
    "shapes": Teacher("shapes", 3.0, "text-to-image StableDiffusionPipeline on coloured shapes (benchmarks/assets/shapes_teacher)"),
    "flow": Teacher("flow", 3.0, "Flux-architecture rectified-flow FluxPipeline on coloured shapes, true CFG "
                                 "(benchmarks/assets/flow_teacher)"),
    "video": Teacher("video", 3.0, "Wan-architecture rectified-flow WanPipeline on clips of moving coloured shapes (9 frames), "
                                   "true CFG (benchmarks/assets/video_teacher); accuracy: colour, shape and motion direction all right",
                     extra=(("direction", "direction ↑"), ("track_rms", "track RMS px ↓")),
                     data_flags=("--num-frames", "9", "--resolution", "32")),
}


def distil(teacher: Teacher, evaluator, folder: Path, seed: int, max_steps: int, every: int, extra: list[str]) -> Path:
    """One training.distill run with the defaults; returns its run folder (checkpoints every ``every`` steps)."""
    run_dir = folder / "student_run"
    if (folder / "done").is_file():
        return run_dir
    with _locked(run_dir):  # two benchmark processes on one --work: the second waits for the first's run, then reuses it
        if not (folder / "done").is_file():
            _distil_unlocked(teacher, evaluator, folder, seed, max_steps, every, extra)
    return run_dir


def _distil_unlocked(teacher: Teacher, evaluator, folder: Path, seed: int, max_steps: int, every: int, extra: list[str]) -> None:
    lora = folder / "student.safetensors"
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "training.distill", "--model", str(evaluator.model_dir), "--prompts", str(evaluator.prompts_file(folder)),
           "--output", str(lora), "--cfg", str(teacher.cfg), "--seed", str(seed), "--max-train-steps", str(max_steps),
           "--checkpoint-every", str(every), "--keep-checkpoints", "1000", "--validate-every", str(max_steps), "--resume",
           *teacher.data_flags, *extra]
    started = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"training.distill failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    write_text_atomic(folder / "done", json.dumps({"seconds": time.time() - started, "command": cmd[1:], "stdout_tail": proc.stdout[-2000:]}))


def has_checkpoints(folder: Path, iterations: tuple) -> bool:
    """Whether the run in ``folder`` finished and kept a checkpoint at each of ``iterations``."""
    from training.checkpoint import checkpoint_dir

    return (folder / "done").is_file() and all(checkpoint_dir(folder / "student_run", n).is_dir() for n in iterations)


def checkpoint_student(run_dir: Path, step: int) -> dict:
    """The student a run hands out at ``step``: with --student-ema the average (training.ema), else the weights."""
    from training.checkpoint import checkpoint_dir, load_checkpoint
    from training.ema import EMA_ADAPTER

    adapters, _ = load_checkpoint(checkpoint_dir(run_dir, step))
    return adapters.get(EMA_ADAPTER, adapters["student"])


def untrained_student(adapters: dict) -> dict:
    """The same adapters with every ``lora_B`` at zero (PEFT's initialisation): the student at step 0."""
    return {k: v.new_zeros(v.shape) if "lora_B" in k else v for k, v in adapters.items()}


def measure(teacher: Teacher, evaluator, seeds: tuple, iterations: tuple, ablations: tuple, work: Path, log,
            ablation_iterations: int = DEFAULT_ITERATIONS, ablation_seeds: tuple = (0,)) -> dict:
    return cached_measure(teacher, work, lambda cached: measure_rows(teacher, evaluator, seeds, iterations, ablations, work, log,
                                                                     ablation_iterations, cached, ablation_seeds))


def measure_rows(teacher: Teacher, evaluator, seeds: tuple, iterations: tuple, ablations: tuple, work: Path, log,
                 ablation_iterations: int, cached, ablation_seeds: tuple = (0,)) -> None:
    for steps in (50, 4):
        cached(f"teacher{steps}", lambda: evaluator.teacher_row(steps))
    every = gcd_all(iterations)
    grid = evaluator.student_grid(4)
    for seed in seeds:
        log(f"{teacher.name}: distilling seed {seed}")
        run_dir = distil(teacher, evaluator, work / teacher.name / f"seed{seed}", seed, max(iterations), every, [])
        for n in iterations:
            cached(f"seed{seed}/{n}", lambda: evaluator.student_row(checkpoint_student(run_dir, n), grid))
        cached(f"seed{seed}/summary", lambda: json.loads((run_dir / "summary.json").read_text()))
        # where every student starts: without it, FD to the teacher cannot tell drifting away from a start from
        # failing to reach the teacher (the untrained student samples at CFG 1, the teacher rows at the distilled CFG)
        cached("untrained", lambda: evaluator.student_row(untrained_student(checkpoint_student(run_dir, max(iterations))), grid))
    for name in ablations:
        k = 1 if name == "k1" else 4
        for seed in ablation_seeds:
            log(f"{teacher.name}: ablation {name}, seed {seed}")
            run_dir = distil(teacher, evaluator, work / teacher.name / ablation_folder(name, seed), seed, ablation_iterations,
                             ablation_iterations, ABLATIONS[name])
            cached(ablation_key(name, seed), lambda: evaluator.student_row(checkpoint_student(run_dir, ablation_iterations), evaluator.student_grid(k)))


def ablation_folder(name: str, seed: int) -> str:
    return f"ablation_{name}" if seed == 0 else f"ablation_{name}_seed{seed}"  # seed 0 keeps the one-seed layout


def run_group(folder: str) -> str:
    """The inverse of the run folders' names: ``seed<n>`` -> "defaults", ``ablation_<name>[_seed<n>]`` -> ``<name>``."""
    if re.fullmatch(r"seed\d+", folder):
        return "defaults"
    return re.sub(r"_seed\d+$", "", folder).removeprefix("ablation_")


def ablation_key(name: str, seed: int) -> str:
    return f"ablation/{name}" if seed == 0 else f"ablation/{name}/seed{seed}"


def write_preview(evaluator, run_dir: Path, iterations: tuple, path: Path) -> Path:
    """The teacher at 50 and 4 steps above one training run's student at each checkpoint, same noise."""
    from benchmarks.grid_image import labelled_grid
    from tdm_core.atomic import save_png_atomic

    students = [(f"TDM K=4, {n} it. (CFG 1)", checkpoint_student(run_dir, n)) for n in iterations]
    rows, labels = evaluator.preview(students, evaluator.student_grid(4))
    return save_png_atomic(labelled_grid(rows, labels, scale=3), path)


def gcd_all(values) -> int:
    from math import gcd

    out = 0
    for v in values:
        out = gcd(out, v)
    return out


def fmt(row: dict, key: str) -> str:
    digits = 3 if key in ("accuracy", "direction") else 1
    return f"{row[key]:.{digits}f} ± {row[key + '_sd']:.{digits}f}" if key in row else "-"


def table(teacher: Teacher, cache: dict, seeds: tuple, iterations: tuple, ablations: tuple, ablation_iterations: int,
          ablation_seeds: tuple = (0,)) -> list[str]:
    cols = ("fd_real", "fd_teacher", "accuracy", *(key for key, _ in teacher.extra))
    extra_headers = "".join(f" {header} |" for _, header in teacher.extra)
    lines = [f"### {teacher.name}: {teacher.about}, distilled at CFG {teacher.cfg:g}", "",
             f"| row | NFE | FD to real held-out ↓ | FD to teacher 50 steps ↓ | attribute/class accuracy ↑ |{extra_headers} runs |",
             "|---|---:|---:|---:|---:|" + "---:|" * len(teacher.extra) + "---:|"]
    for steps in (50, 4):
        row = cache[f"teacher{steps}"]
        lines.append(f"| teacher {steps} steps, CFG {teacher.cfg:g} | {2 * steps} | " + " | ".join(fmt(row, c) for c in cols) + " | - |")
    if "untrained" in cache:
        lines.append(f"| {UNTRAINED} | 4 | " + " | ".join(fmt(cache["untrained"], c) for c in cols) + " | - |")
    for n in iterations:
        per_seed = [cache[f"seed{s}/{n}"] for s in seeds if f"seed{s}/{n}" in cache]
        if not per_seed:
            lines.append(f"| TDM K=4, defaults, {n} it. | 4 | not measured |" + " |" * (len(cols) - 1) + " 0 |")
            continue
        row = per_seed[0] if len(per_seed) == 1 else summarise(per_seed)  # one run: its sampling spread, as the ablations
        lines.append(f"| TDM K=4, defaults, {n} it. | 4 | " + " | ".join(fmt(row, c) for c in cols) + f" | {len(per_seed)} |")
    for name in ablations:
        per_seed = [cache[ablation_key(name, s)] for s in ablation_seeds if ablation_key(name, s) in cache]
        nfe = 1 if name == "k1" else 4
        if not per_seed:
            lines.append(f"| {ABLATION_NAMES[name]}, {ablation_iterations} it. | {nfe} | not measured |" + " |" * (len(cols) - 1) + " 0 |")
            continue
        row = per_seed[0] if len(per_seed) == 1 else summarise(per_seed)  # one run: its sampling spread
        lines.append(f"| {ABLATION_NAMES[name]}, {ablation_iterations} it. | {nfe} | " + " | ".join(fmt(row, c) for c in cols) + f" | {len(per_seed)} |")
    if f"preview/{teacher.name}" in cache:
        lines += ["", f"![{teacher.name}: teacher and the seed-{seeds[0]} student at each checkpoint]({cache[f'preview/{teacher.name}']})",
                  "", f"*Rows: the teacher at 50 and 4 DDIM steps (CFG {teacher.cfg:g}), then the training-seed-{seeds[0]} student "
                  "at each checkpoint (CFG 1); same noise and prompt in each column.*"]
    moved = [cache[f"seed{s}/summary"]["probe_change"] for s in seeds if f"seed{s}/summary" in cache]
    if moved:
        lines += ["", f"The run's own final word (`summary.json`): probe samples moved {', '.join(f'{100 * m:.0f}%' for m in moved)} "
                      "from the teacher's 4-step samples."]
    lines += fidelity_goals(cache, seeds, iterations)
    target = cache["teacher50"]["fd_real"]
    at_default = [cache[f"seed{s}/{DEFAULT_ITERATIONS}"]["fd_real"] for s in seeds if f"seed{s}/{DEFAULT_ITERATIONS}" in cache]
    if at_default:
        mean = statistics.fmean(at_default)
        verdict = ("better than it" if mean < target else "within 10 % of it" if mean <= 1.1 * target
                   else "NOT within 10 % of it")
        lines += ["", f"At the default {DEFAULT_ITERATIONS} iterations the 4-step student's FD to real data is {mean:.1f} "
                      f"against {target:.1f} for the teacher's 50-step sampler: {verdict} (teacher at 4 steps: "
                      f"{cache['teacher4']['fd_real']:.1f})."]
    return lines + [""]


# issue 22's goals for the defaults: FD to the teacher's 50 steps at most 2x its own 4 steps' at the default
# iterations, seed spread (std) at most 25 % of the mean, no checkpoint after 250 iterations more than 20 % worse
FIDELITY_RATIO_GOAL, SPREAD_GOAL, STABLE_AFTER, WORSENING_GOAL = 2.0, 0.25, 250, 0.2


def fidelity_goals(cache: dict, seeds: tuple, iterations: tuple) -> list[str]:
    """The defaults' rows held to issue 22's goals, each with the measured number and whether it holds: the mean FD
    to the teacher against the teacher's own 4 steps, its seed spread, each run's checkpoints after 250 iterations
    against its one before (the worst run), and the mean FD to real data against the teacher's 50 steps."""
    def runs(n):
        return {s: cache[f"seed{s}/{n}"] for s in seeds if f"seed{s}/{n}" in cache}

    at_default = [row["fd_teacher"] for row in runs(DEFAULT_ITERATIONS).values()]
    if not at_default:
        return []
    mean, own = statistics.fmean(at_default), cache["teacher4"]["fd_teacher"]
    ratio = mean / own
    verdicts = [f"FD to the teacher's 50 steps {mean:.1f} = {ratio:.2f}x the teacher's own 4 steps' {own:.1f} "
                f"(goal at most {FIDELITY_RATIO_GOAL:g}x): {'holds' if ratio <= FIDELITY_RATIO_GOAL else 'missed'}"]
    if len(at_default) < 2:
        verdicts.append("seed spread: one run, not measured")
    else:
        sd = statistics.stdev(at_default)
        verdicts.append(f"seed spread {100 * sd / mean:.0f} % of the mean over {len(at_default)} runs (goal at most {100 * SPREAD_GOAL:.0f} %): "
                        f"{'holds' if sd <= SPREAD_GOAL * mean else 'missed'}")
    for before, after in ((a, b) for a, b in zip(iterations, iterations[1:]) if a >= STABLE_AFTER):
        first, second = runs(before), runs(after)
        changes = {s: second[s]["fd_teacher"] / first[s]["fd_teacher"] - 1 for s in first if s in second}
        if not changes:
            verdicts.append(f"{after} against {before} iterations: not measured")
            continue
        seed = max(changes, key=changes.get)
        verdicts.append(f"{after} against {before} iterations, worst of {len(changes)} runs (seed {seed}) {100 * changes[seed]:+.0f} % "
                        f"(goal: at most {100 * WORSENING_GOAL:.0f} % worse): {'holds' if changes[seed] <= WORSENING_GOAL else 'missed'}")
    real, target = statistics.fmean(row["fd_real"] for row in runs(DEFAULT_ITERATIONS).values()), cache["teacher50"]["fd_real"]
    verdicts.append(f"FD to real data {real:.1f} against the teacher's 50 steps' {target:.1f} (goal: no worse): "
                    f"{'holds' if real <= target else 'missed'}")
    return ["", f"Issue 22's goals at {DEFAULT_ITERATIONS} iterations: " + "; ".join(verdicts) + "."]


def render(command: str, teachers: list[Teacher], caches: dict, seeds, iterations, ablations, ablation_iterations: int,
           ablation_seeds: tuple = (0,)) -> str:
    d = DistillConfig()
    lines = ["# Benchmarks: `training.distill` with its defaults", "",
             f"Produced by `{command}`. Each student: `python -m training.distill --model T --prompts P --output O --cfg W --seed S` "
             f"with every other option at its default (rank {d.lora_rank}, batch {d.batch_size}, fake-score lr {d.fake_lr():g}, "
             f"student lr {d.student_lr():g}, {d.fake_score_updates} fake-score updates per student update, "
             f"{d.lr_scheduler} after {d.lr_warmup_steps} warm-up steps, {d.distance} distance, "
             f"{d.interval_mode} intervals, K={d.num_steps}); longer runs are checkpointed, and with a constant "
             "schedule their step-n checkpoint is the n-step run. Students sample at CFG 1 on their own grid; the teacher "
             "at the distilled CFG with DDIM (trailing grid from t=999; on a flow teacher DDIM is the Euler step of the flow ODE). "
             "± is the standard deviation over training seeds "
             "(rows with one run: over 2 sampling seeds of that run).", ""]
    for teacher in teachers:
        lines += table(teacher, caches[teacher.name], seeds, iterations, ablations, ablation_iterations, ablation_seeds)
    return "\n".join(lines)


def keep_node_blocks(output: Path, text: str) -> str:
    """The TDM Distill node's blocks of the file being replaced, kept in the new one."""
    from benchmarks.defaults_node import keep_node_blocks as keep

    return keep(output.read_text(), text) if output.is_file() else text


def main_comfyui(parser, command: str, teachers: list[Teacher], seeds: tuple, iterations: tuple, args) -> int:
    """``--host comfyui``: each teacher's node rows (or why there are none) into the existing results file."""
    from benchmarks import defaults_node

    unsupported = [t.name for t in teachers if t.name not in defaults_node.NODE_TEACHERS + tuple(defaults_node.NOT_MEASURED)]
    if unsupported or not seeds:
        parser.error(f"--host comfyui takes --teachers {','.join(defaults_node.NODE_TEACHERS + tuple(defaults_node.NOT_MEASURED))} "
                     f"and at least one seed; got {unsupported or 'no seeds'}")
    text = args.output.read_text() if args.output.is_file() else ""
    for teacher in teachers:
        cache = {}
        if teacher.name in defaults_node.NODE_TEACHERS:
            evaluator = teacher.evaluator(args.num_eval, (0, 1))
            cache = cached_measure(teacher, args.work, lambda c: defaults_node.measure(teacher, evaluator, seeds, iterations, args.work, c,
                                                                                         lambda m: print(f"[defaults] {m}", flush=True)))
        published = defaults_node.published_row(text, teacher.name, max(iterations))
        text = defaults_node.insert_block(text, teacher.name, defaults_node.table(teacher, cache, seeds, iterations, command, published))
        write_text_atomic(args.output, text)
    print(f"wrote {args.output}")
    return 0


@contextmanager
def _locked(path: Path):
    """An exclusive lock beside ``path`` (``<path>.lock``) while the block runs: two benchmark runs sharing a
    --work read, merge and write their results one at a time."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def cached_measure(teacher: Teacher, work: Path, measure_with) -> dict:
    """Run ``measure_with(cached)`` on the teacher's cache file (``cached(key, compute)`` stores each new row at once)."""
    cache_path = work / teacher.name / "results.json"

    def on_disk() -> dict:
        return json.loads(cache_path.read_text()) if cache_path.is_file() else {}

    cache = on_disk()

    def cached(key, compute):
        if key not in cache:  # another run on the same --work may have made the row meanwhile
            cache.update(on_disk())
        if key not in cache:
            value = compute()
            with _locked(cache_path):  # and its rows written meanwhile are kept: read again under the lock, then write
                cache.update(on_disk())
                cache[key] = value
                write_text_atomic(cache_path, json.dumps(cache, indent=1))
        return cache[key]

    measure_with(cached)
    return cache


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teachers", default="digits,shapes,flow")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--iterations", default="100,250,500,1000")
    parser.add_argument("--ablations", default="k1,fake_updates_1_huber,shared", help=f"comma-separated, of: {', '.join(ABLATIONS)}")
    parser.add_argument("--ablation-iterations", type=int, default=DEFAULT_ITERATIONS)
    parser.add_argument("--ablation-seeds", default="0", help="training seeds of each ablation (rows: mean ± std over them)")
    parser.add_argument("--num-eval", type=int, default=500)
    parser.add_argument("--cfg", type=float, default=None,
                        help="distil and score at this teacher CFG instead of each teacher's own (the teacher rows and FD to "
                             "the teacher follow it); use its own --work")
    parser.add_argument("--host", choices=("trainer", "comfyui"), default="trainer",
                        help="who distils: the headless trainer (python -m training.distill, the default) or the TDM Distill "
                             "node's own code on the teacher loaded as a ComfyUI MODEL (rows added under each teacher)")
    parser.add_argument("--cached-only", action="store_true",
                        help="write the tables from the rows already in <work>/<teacher>/results.json: nothing is trained or "
                             "scored (rows not there show as not measured, the runs column counts the seeds that are); the "
                             "preview is drawn when the first seed's run has every checkpoint")
    parser.add_argument("--work", type=Path, default=WORK)
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    names = [n for n in args.teachers.split(",") if n]
    unknown = [n for n in names if n not in TEACHERS]
    if unknown:
        parser.error(f"unknown teachers {unknown}: use {', '.join(TEACHERS)}")
    seeds = tuple(int(s) for s in args.seeds.split(",") if s)  # "" = ablations only (a second process can run them)
    iterations = tuple(sorted(int(s) for s in args.iterations.split(",")))
    ablations = tuple(a for a in args.ablations.split(",") if a)
    ablation_seeds = tuple(dict.fromkeys(int(s) for s in args.ablation_seeds.split(",") if s))  # each seed once
    if ablations and not ablation_seeds:
        parser.error("--ablation-seeds is empty: give at least one training seed for the ablations (e.g. 0)")
    if any(a not in ABLATIONS for a in ablations):
        parser.error(f"--ablations takes {', '.join(ABLATIONS)}")
    if args.cfg is not None and args.cfg < 1:
        parser.error(f"--cfg {args.cfg:g}: a teacher CFG is at least 1 (1: no guidance)")
    command = "python -m benchmarks.defaults " + shlex.join(argv if argv is not None else sys.argv[1:])
    teachers = [TEACHERS[n] if args.cfg is None else replace(TEACHERS[n], cfg=args.cfg) for n in names]
    if args.host == "comfyui":
        return main_comfyui(parser, command.strip(), teachers, seeds, iterations, args)
    caches = {}
    for teacher in teachers:
        evaluator = teacher.evaluator(args.num_eval, (0, 1))
        if args.cached_only:
            caches[teacher.name] = cached_measure(teacher, args.work, lambda cached: None)
        else:
            caches[teacher.name] = measure(teacher, evaluator, seeds, iterations, ablations, args.work,
                                           lambda m: print(f"[defaults] {m}", flush=True), args.ablation_iterations, ablation_seeds)
        if seeds and (not args.cached_only or has_checkpoints(args.work / teacher.name / f"seed{seeds[0]}", iterations)):
            preview = write_preview(evaluator, args.work / teacher.name / f"seed{seeds[0]}" / "student_run", iterations,
                                    args.output.parent / f"{args.output.stem}_{teacher.name}.png")
            caches[teacher.name][f"preview/{teacher.name}"] = preview.name
            if hasattr(evaluator, "write_animation"):  # video teachers: the same rows as an animated WebP
                evaluator.write_animation(preview.with_suffix(".webp"))
        text = render(command.strip(), [t for t in teachers if t.name in caches], caches, seeds, iterations, ablations,
                      args.ablation_iterations, ablation_seeds)
        write_text_atomic(args.output, keep_node_blocks(args.output, text))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
