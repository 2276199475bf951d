"""Is a checkpoint's jitter noise that averaging removes? The student averaged over its last checkpoints, scored.

    python -m benchmarks.weight_average --teachers flow [--seeds 0,1,2] [--at 250,500,1000] [--window 200]
                                        [--work outputs/issue22_new] [--num-eval 500]

Reads the runs ``benchmarks.defaults`` left in ``<work>/<teacher>/seed<s>`` (checkpoints every 50 steps, all kept)
and, at each iteration n of ``--at``, averages the student adapter's parameters over the checkpoints in
(n - window, n], as a student EMA (TDM-R1's) or a tail average would hold them, then scores that student with the
same evaluator and sampling seeds as the single checkpoint at n (its row in the same ``results.json``). Nothing is
trained. Rows are cached in ``<work>/<teacher>/results.json`` under ``average<window>/seed<s>/<n>`` (give the
``--num-eval`` the single rows were scored with: the key does not hold it). On a ``--student-ema`` run the
checkpoints' averages are what is averaged (``benchmarks.defaults.checkpoint_student``). Prints, per
teacher, FD to the teacher's 50 steps of the single checkpoint and of the average, per seed, then issue 22's
goals (ratio to the teacher's own 4 steps, seed spread, worsening after 250 iterations) for both.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from statistics import mean, stdev

import torch

from benchmarks.defaults import (DEFAULT_ITERATIONS, FIDELITY_RATIO_GOAL, SPREAD_GOAL, STABLE_AFTER, TEACHERS, WORK, WORSENING_GOAL,
                                 cached_measure, checkpoint_student)


def averaged_student(run_dir: Path, at: int, window: int) -> tuple[dict, list[int]]:
    """The mean of the student adapter's tensors over the checkpoints of ``run_dir`` in (at - window, at], and their steps."""
    from training.checkpoint import list_checkpoints

    steps = sorted(int(path.name.split("-")[-1]) for path in list_checkpoints(run_dir))
    chosen = [s for s in steps if at - window < s <= at]
    if at not in chosen:
        raise SystemExit(f"{run_dir} has no checkpoint at step {at}: run benchmarks.defaults with these iterations first")
    states = [checkpoint_student(run_dir, s) for s in chosen]
    return {key: torch.stack([state[key].float() for state in states]).mean(0) for key in states[0]}, chosen


def worst_worsening(per_seed: dict[int, dict[int, float]], at: list[int]) -> tuple[float, str]:
    """The largest rise of FD from one iteration of ``at`` (from STABLE_AFTER on) to the next, over the seeds, and where."""
    worst, where = float("-inf"), "-"
    for seed, values in per_seed.items():
        for before, after in zip(at, at[1:]):
            if before >= STABLE_AFTER and before in values and after in values:
                rise = values[after] / values[before] - 1
                if rise > worst:
                    worst, where = rise, f"seed {seed}, {before} to {after}"
    return worst, where


def goals_text(name: str, per_seed: dict[int, dict[int, float]], at: list[int], teacher4: float, real500: list[float] = ()) -> str:
    """One line of issue 22's measures (benchmarks.defaults.fidelity_goals's) for ``per_seed`` ({seed: {iteration: FD}});
    ``real500``: the runs' FD to real data at DEFAULT_ITERATIONS."""
    at_default = [values[DEFAULT_ITERATIONS] for values in per_seed.values() if DEFAULT_ITERATIONS in values]
    text = f"{name}:"
    if at_default:
        m = mean(at_default)
        spread = (stdev(at_default) if len(at_default) > 1 else 0.0) / m
        text += f" at {DEFAULT_ITERATIONS} it. {m:.1f} ({m / teacher4:.2f}x the teacher's own 4 steps), spread {spread:.0%}"
    if real500:
        text += f", FD to real data {mean(real500):.1f}"
    worst, where = worst_worsening(per_seed, at)
    if worst > float("-inf"):
        text += f"; worst change after {STABLE_AFTER} it. {worst:+.0%} ({where})"
    return text


def measure_teacher(teacher, seeds: list[int], at: list[int], window: int, work: Path, num_eval: int) -> list[str]:
    evaluator = teacher.evaluator(num_eval, (0, 1))
    rows: dict[str, dict[int, dict[int, float]]] = {"single": {}, "average": {}}
    real500: dict[str, list[float]] = {"single": [], "average": []}

    made = cached_measure(teacher, work, lambda cached: None)  # the single checkpoints' rows: benchmarks.defaults's, never made here
    missing = [f"seed{seed}/{n}" for seed in seeds for n in at if f"seed{seed}/{n}" not in made] + [k for k in ("teacher4", "teacher50") if k not in made]
    if missing:
        raise SystemExit(f"{work}/{teacher.name}/results.json has no rows {', '.join(missing)}: run benchmarks.defaults with these "
                         "seeds and iterations first")

    def measure_with(cached):
        for seed in seeds:
            run_dir = work / teacher.name / f"seed{seed}" / "student_run"
            for n in at:
                single = made[f"seed{seed}/{n}"]

                def score():
                    state, steps = averaged_student(run_dir, n, window)
                    print(f"[weight_average] {teacher.name} seed {seed} at {n}: mean of checkpoints {steps}", flush=True)
                    return {**evaluator.student_row(state, evaluator.student_grid(4)), "checkpoints": steps}

                averaged = cached(f"average{window}/seed{seed}/{n}", score)
                for kind, row in (("single", single), ("average", averaged)):
                    rows[kind].setdefault(seed, {})[n] = row["fd_teacher"]
                    if n == DEFAULT_ITERATIONS:
                        real500[kind].append(row["fd_real"])

    cache = cached_measure(teacher, work, measure_with)
    teacher4 = cache["teacher4"]["fd_teacher"]
    lines = [f"### {teacher.name}: FD to the teacher's 50 steps, each checkpoint alone and averaged over (n - {window}, n]", "",
             "| seed | " + " | ".join(f"{n} it.: alone | averaged" for n in at) + " |",
             "|---:|" + "---:|---:|" * len(at)]
    for seed in seeds:
        cells = [f"{rows['single'][seed][n]:.1f} | {rows['average'][seed][n]:.1f}" for n in at]
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    lines += ["", f"The teacher's own 4 steps: {teacher4:.1f}; its 50 steps' FD to real data {cache['teacher50']['fd_real']:.1f}. "
                  f"Issue 22's goals: at most {FIDELITY_RATIO_GOAL:g}x the former at {DEFAULT_ITERATIONS} it., spread at most "
                  f"{100 * SPREAD_GOAL:.0f} %, no change after {STABLE_AFTER} it. worse than +{100 * WORSENING_GOAL:.0f} %, "
                  "FD to real data no worse than the latter.", "",
              "- " + goals_text("each checkpoint alone", rows["single"], at, teacher4, real500["single"]),
              "- " + goals_text(f"averaged over (n - {window}, n]", rows["average"], at, teacher4, real500["average"]), ""]
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teachers", default="flow")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--at", default="250,500,1000", help="iterations to score (each must have a checkpoint and a defaults row)")
    parser.add_argument("--window", type=int, default=200, help="steps of checkpoints averaged, ending at each iteration")
    parser.add_argument("--work", type=Path, default=WORK)
    parser.add_argument("--num-eval", type=int, default=500, help="as the defaults rows were scored (video: 200)")
    args = parser.parse_args(argv)
    unknown = [n for n in args.teachers.split(",") if n not in TEACHERS]
    if unknown:
        parser.error(f"unknown teachers {unknown}: use {', '.join(TEACHERS)}")
    if args.window < 1:
        parser.error(f"--window {args.window} must be at least 1 step")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    at = sorted(int(s) for s in args.at.split(",") if s)
    lines = []
    for name in args.teachers.split(","):
        lines += measure_teacher(TEACHERS[name], seeds, at, args.window, args.work, args.num_eval)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
