"""When does a student drift from its teacher? The probe's per-step fidelity over a run, from its log.

    python -m benchmarks.fidelity_trace outputs/issue22b/flow [--at 100,200,300,400,500] [--measure moment_gap]

Reads every ``<folder>/<run>/student_run/log.jsonl`` that ``benchmarks.defaults`` left (one folder per
teacher), groups a run's training seeds (``ablation_X``, ``ablation_X_seed1``, ... and ``seed0``, ``seed1``, ...
as "defaults") and prints, per group and training iteration, the mean over the seeds that logged it of one
per-sampler-step measure of the probe (``tdm_core.fidelity``). Unfinished runs (no ``done`` file) are marked.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from statistics import mean

from benchmarks.defaults import run_group
from tdm_core.fidelity import FIDELITY_MEASURES


def fidelity_by_iteration(log: Path) -> dict[int, list]:
    """{training iteration: per-sampler-step fidelity list}; a resumed or restarted run's log holds the aborted
    attempt too, so rows from iteration n on are dropped whenever the log starts again at n."""
    by_iteration: dict[int, list] = {}
    last = 0
    for line in log.read_text().splitlines():
        row = json.loads(line) if line.strip() else {}
        if "step" not in row:
            continue
        if row["step"] <= last:  # the log starts again: drop the aborted attempt from here on
            by_iteration = {n: f for n, f in by_iteration.items() if n < row["step"]}
        last = row["step"]
        if row.get("fidelity"):
            by_iteration[row["step"]] = row["fidelity"]
    return by_iteration


def read_runs(folder: Path) -> dict[str, list[dict]]:
    """Group -> one entry per training seed: {"name", "finished", "fidelity": {iteration: per-step list}}."""
    groups: dict[str, list[dict]] = {}
    for log in sorted(folder.glob("*/student_run/log.jsonl")):
        run = log.parent.parent
        fidelity = fidelity_by_iteration(log)
        if fidelity:
            groups.setdefault(run_group(run.name), []).append(
                {"name": run.name, "finished": (run / "done").is_file(), "fidelity": fidelity})
    return groups


def _cell(values: list) -> str:
    values = [v for v in values if v is not None]  # dm_to_cfg is None at CFG 1
    return f"{mean(values):.3f}" if values else "-"


def trace_table(groups: dict[str, list[dict]], at: list[int], measure: str) -> tuple[str, list[str]]:
    """The table (one row per group and iteration; each row names its own grid) and what was left out."""
    lines = ["| run | seeds | iteration | per sampler step i (t_i): " + measure + " |", "|---|---:|---:|---|"]
    missing = []
    for name, seed_logs in sorted(groups.items()):
        for iteration in at:
            logged = [s["fidelity"][iteration] for s in seed_logs if iteration in s["fidelity"]]
            missing += [f"{s['name']}: no probe at iteration {iteration}" for s in seed_logs if iteration not in s["fidelity"]]
            if not logged or len({len(steps) for steps in logged}) != 1:
                continue
            cells = [f"{k + 1} ({logged[0][k]['t']}): {_cell([steps[k][measure] for steps in logged])}" for k in range(len(logged[0]))]
            unfinished = sum(not s["finished"] for s in seed_logs if iteration in s["fidelity"])
            seeds = f"{len(logged)}" + (f" ({unfinished} unfinished)" if unfinished else "")
            lines.append(f"| {name} | {seeds} | {iteration} | " + ", ".join(cells) + " |")
    return "\n".join(lines), missing


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="one teacher's folder under benchmarks.defaults' --work")
    parser.add_argument("--at", default="100,200,300,400,500",
                        help="training iterations to show: multiples of the run's --probe-every (25) and its last")
    parser.add_argument("--measure", default="moment_gap", choices=FIDELITY_MEASURES, help="one of tdm_core.fidelity's measures")
    args = parser.parse_args(argv)
    try:
        at = [int(n) for n in args.at.split(",")]
    except ValueError:
        parser.error(f"--at {args.at!r}: give training iterations separated by commas, e.g. 100,250,500")
    groups = read_runs(args.folder)
    if not groups:
        parser.error(f"no student_run/log.jsonl with fidelity under {args.folder}: give one teacher's folder of a benchmarks.defaults --work")
    table, missing = trace_table(groups, at, args.measure)
    if len(table.splitlines()) == 2:
        parser.error(f"no run logged a probe at iterations {args.at}: use multiples of --probe-every (25)")
    print(table)
    for line in missing:
        print(f"left out: {line}", file=sys.stderr)


if __name__ == "__main__":
    main()
