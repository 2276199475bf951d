"""When does a student drift from its teacher? The per-step moment gap over a run, from its log.

    python -m benchmarks.fidelity_trace outputs/issue22b/flow [--at 100,200,300,400,500] [--measure moment_gap]

Reads every ``<folder>/<run>/student_run/log.jsonl`` that ``benchmarks.defaults`` left (one folder per
teacher), groups a run's seeds (``ablation_X``, ``ablation_X_seed1``, ... and ``seed0``, ``seed1``, ... as
"defaults") and prints, per group and logged step, the mean over its seeds of the probe's per-step measure
(``tdm_core.fidelity``: the student's point after each trajectory step against the teacher's guided ODE).
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from statistics import mean


def group_name(run: str) -> str:
    if re.fullmatch(r"seed\d+", run):
        return "defaults"
    return re.sub(r"_seed\d+$", "", run).removeprefix("ablation_")


def read_runs(folder: Path) -> dict[str, list[dict]]:
    """Group -> one {logged step: per-step fidelity list} per seed."""
    groups: dict[str, list[dict]] = {}
    for log in sorted(folder.glob("*/student_run/log.jsonl")):
        rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        fidelity = {row["step"]: row["fidelity"] for row in rows if row.get("fidelity")}
        if fidelity:
            groups.setdefault(group_name(log.parent.parent.name), []).append(fidelity)
    return groups


def trace_table(groups: dict[str, list[dict]], at: list[int], measure: str) -> str:
    first = next(iter(groups.values()))[0]
    times = [entry["t"] for entry in first[max(first)]]
    lines = ["| run | seeds | iteration | " + " | ".join(f"step {k + 1} (t={t})" for k, t in enumerate(times)) + " |",
             "|---|---:|---:|" + "---:|" * len(times)]
    for name, runs in sorted(groups.items()):
        for step in at:
            if not all(step in run for run in runs):
                continue
            per_step = [mean(run[step][k][measure] for run in runs) for k in range(len(runs[0][step]))]
            lines.append(f"| {name} | {len(runs)} | {step} | " + " | ".join(f"{v:.3f}" for v in per_step) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="one teacher's folder under benchmarks.defaults' --work")
    parser.add_argument("--at", default="100,200,300,400,500", help="logged steps to show")
    parser.add_argument("--measure", default="moment_gap", help="paired_gap, moment_gap, fake_score_error, teacher_error or dm_to_cfg")
    args = parser.parse_args(argv)
    groups = read_runs(args.folder)
    if not groups:
        parser.error(f"no student_run/log.jsonl with fidelity under {args.folder}: give one teacher's folder of a benchmarks.defaults --work")
    print(trace_table(groups, [int(s) for s in args.at.split(",")], args.measure))


if __name__ == "__main__":
    main()
