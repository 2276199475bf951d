"""One TDM Distill node iteration against one ``training.distill`` iteration, side by side in one process.

    python -m benchmarks.node_speed [--rounds 7] [--warmup 2] [--batch-size 8] [--profile-rounds 3] [--output benchmarks/RESULTS_speed.md]

Both distil the shapes benchmark teacher (benchmarks/assets/shapes_teacher) with the same batch, K (4), CFG (3),
rank and prompts: the trainer through ``training.distill.build_parts`` + ``train_step`` (PEFT adapters on the
diffusers UNet), the node through its ``Distiller.iterate`` (nodes/distill.py: two LoRAs as ComfyUI weight
wrappers on the teacher loaded as a ComfyUI MODEL, :mod:`benchmarks.comfy_teacher`). The two alternate round by
round, so the machine's load hits them alike; warm-up iterations are dropped; each iteration is timed in CPU
seconds (``time.process_time``: this process's own work, what the ratio is judged on at one torch thread on a
shared machine) and wall seconds. Then ``--profile-rounds`` more iterations of each under a CPU-time cProfile say where
the time goes (a table in the section; the matching cProfile entries are printed).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import platform
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "benchmarks" / "RESULTS_speed.md"
SECTION_HEADING = "## TDM Distill node vs `training.distill`, one iteration (issue 21)"
TARGET = 1.1  # issue 21: a node iteration costs at most 1.1x a training.distill iteration
CFG = 3.0  # the shapes teacher's benchmark CFG (benchmarks.defaults)
# cProfile entries of each host's own costs: the iteration, conditioning processing, ComfyUI's cond batching and
# casting, the node's LoRA weight wrappers (W + up @ down at each forward), PEFT's LoRA layers, the network,
# autograd and the optimiser steps
HOST_COSTS = (r"iterate|train_step|process_conds|convert_cond|calc_cond_batch|cast_bias_weight|weight_adapter/lora.py|peft/tuners/lora/layer.py.*forward"
              r"|openaimodel.py.*forward|unet_2d_condition.py.*forward|run_backward|clip_and_step|step\)|encode")


def trainer_step(work: Path, batch_size: int, seed: int):
    """``() -> None``: one ``training.distill`` iteration (its ``train_step``) on the shapes teacher."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from benchmarks.shapes_data import all_captions
    from benchmarks.train_text_teacher import DEFAULT_OUTPUT
    from training.config import parse_config, read_prompts
    from training.distill import build_parts, train_step

    prompts_path = work / "prompts.txt"
    prompts_path.write_text("".join(f"{c}\n" for c in all_captions()))
    cfg = parse_config(["--model", str(DEFAULT_OUTPUT), "--prompts", str(prompts_path), "--output", str(work / "lora.safetensors"),
                        "--cfg", str(CFG), "--seed", str(seed), "--batch-size", str(batch_size)])
    AcceleratorState._reset_state(reset_partial_state=True)
    parts, latent_shape = build_parts(cfg, Accelerator(mixed_precision="no", cpu=True))
    prompts = read_prompts(str(prompts_path))
    null = parts.family.null_condition(cfg.batch_size)
    return lambda: train_step(parts, cfg, prompts, null, latent_shape), parts.family


def node_step(family, batch_size: int, seed: int):
    """``() -> None``: one TDM Distill node iteration (``Distiller.iterate``) on the same teacher as a ComfyUI MODEL."""
    from benchmarks import comfy_teacher
    from benchmarks.shapes_data import all_captions
    from benchmarks.train_text_teacher import DEFAULT_OUTPUT

    distill = comfy_teacher.pack_module("distill")
    patcher, _ = comfy_teacher.load_comfy_unet(DEFAULT_OUTPUT / "unet")
    positives, negative = comfy_teacher.conditionings(family, all_captions())
    options = distill.DistillOptions(cfg=CFG, batch_size=batch_size, seed=seed)
    distiller = distill.Distiller(patcher, positives, negative, family.latent_shape(1), options)
    return distiller.iterate, distiller


def timed(step) -> tuple[float, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    step()
    return time.process_time() - cpu, time.perf_counter() - wall


def measure(rounds: int, warmup: int, batch_size: int, profile_rounds: int = 0) -> dict:
    """Timed rounds (no profiler), then ``profile_rounds`` more per host under a CPU-time cProfile (wall time on a
    loaded machine would count the waits for a core), kept apart so profiling does not distort the timings."""
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        trainer, family = trainer_step(Path(tmp), batch_size, 0)
        node, distiller = node_step(family, batch_size, 0)
        steps = {"trainer": trainer, "node": node}
        times = {name: [] for name in steps}
        profilers = {name: cProfile.Profile(time.process_time) for name in steps}
        try:
            for number in range(warmup + rounds):
                for name in (("trainer", "node") if number % 2 == 0 else ("node", "trainer")):
                    cpu_wall = timed(steps[name])
                    if number >= warmup:
                        times[name].append(cpu_wall)
            for _ in range(profile_rounds):
                for name, profiler in profilers.items():
                    profiler.runcall(steps[name])
        finally:
            distiller.release()
    out = {"times": times, "batch_size": batch_size, "rounds": rounds, "warmup": warmup}
    if profile_rounds:
        out["profile_rounds"] = profile_rounds
        out["split"] = {name: cost_split(pstats.Stats(profiler), profile_rounds) for name, profiler in profilers.items()}
        text = io.StringIO()
        for name, profiler in profilers.items():
            text.write(f"==== {name}: cProfile (CPU time) over {profile_rounds} iterations ====\n")
            pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(HOST_COSTS)
        out["profile"] = text.getvalue()
    return out


# where an iteration's CPU time goes, per host: (row, regex over "file:line(function)"); cumulative time of the
# first match (the entry of that kind of work), per iteration
COST_ROWS = {
    "trainer": (("whole iteration", r"training/distill.py:\d+\(train_step\)"),
                ("network forwards (diffusers UNet, LoRA included)", r"unet_2d_condition.py:\d+\(forward\)"),
                ("of which LoRA layers (PEFT lora.Linear.forward, base layer included)", r"peft/tuners/lora/layer.py:\d+\(forward\)"),
                ("backward (autograd engine)", r"_engine_run_backward"),
                ("optimiser (clip + AdamW step)", r"tdm_core/optimiser.py:\d+\(clip_and_step\)"),
                ("conditioning (prompt encoding, cached)", r"training/distill.py:\d+\(encode\)")),
    "node": (("whole iteration", r"nodes/distill.py:\d+\(iterate\)"),
             ("network forwards (ComfyUI calc_cond_batch, LoRA included)", r"comfy/samplers.py:\d+\(calc_cond_batch\)"),
             ("of which weight casting + LoRA wrappers (comfy.ops.cast_bias_weight)", r"comfy/ops.py:\d+\(cast_bias_weight\)"),
             ("of which W + (alpha/r) up @ down per forward (weight_adapter LoraDiff.__call__)", r"weight_adapter/lora.py:\d+\(__call__\)"),
             ("backward (autograd engine)", r"_engine_run_backward"),
             ("optimiser (clip + AdamW step)", r"tdm_core/optimiser.py:\d+\(clip_and_step\)"),
             ("conditioning (ComfyUI process_conds, every iteration)", r"comfy/samplers.py:\d+\(process_conds\)")),
}


def cost_split(stats: pstats.Stats, iterations: int) -> list[tuple[str, float]]:
    """``[(row, CPU s per iteration)]`` of the host's COST_ROWS from a cProfile run of ``iterations`` iterations."""
    import re

    entries = {f"{file}:{line}({func})": data[3] for (file, line, func), data in stats.stats.items()}
    host = "node" if any("nodes/distill.py" in key for key in entries) else "trainer"
    out = []
    for row, pattern in COST_ROWS[host]:
        found = [seconds for key, seconds in entries.items() if re.search(pattern, key)]
        out.append((row, max(found) / iterations if found else 0.0))
    return out


def ratio_interval(node: list[float], trainer: list[float], draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % bootstrap interval of the median of the per-round ratios node / trainer (round i of each host ran
    back to back, so a load spike hits both)."""
    import random

    ratios = [n / t for n, t in zip(node, trainer)]
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(draws))
    return medians[int(0.025 * draws)], medians[int(0.975 * draws) - 1]


def verdict_of(low: float, high: float) -> str:
    if high <= TARGET:
        return "holds"
    if low > TARGET:
        return "missed"
    return f"not decided at this noise (the interval contains {TARGET})"


def section(result: dict, command: str) -> str:
    t = result["times"]
    rows = {name: ([c for c, _ in t[name]], [w for _, w in t[name]]) for name in ("trainer", "node")}
    cpu_ratio = statistics.median(n / r for n, r in zip(rows["node"][0], rows["trainer"][0]))
    wall_ratio = statistics.median(n / r for n, r in zip(rows["node"][1], rows["trainer"][1]))
    low, high = ratio_interval(rows["node"][0], rows["trainer"][0])
    verdict = verdict_of(low, high)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    lines = [SECTION_HEADING, "",
             f"Produced by `{command}` on {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC. CPU only ({platform.processor() or 'x86_64'}, "
             f"1 torch thread, torch {torch.__version__}), on a machine shared with other jobs (load average at the end {load}); the two "
             "alternate round by round in one process and each is judged on its own CPU time (`time.process_time`), wall time beside it.", "",
             f"Model: the shapes benchmark teacher (SD1.5-architecture UNet, benchmarks/assets/shapes_teacher), batch {result['batch_size']}, K=4, "
             f"CFG {CFG:g}, LoRA rank 16 on the same layers, the same prompts; {result['warmup']} warm-up round(s) dropped, median of "
             f"{result['rounds']} iterations each.", "",
             "| host | CPU s / iteration: median (min-max) | wall s / iteration: median (min-max) |", "|---|---:|---:|"]
    for name, label in (("trainer", "`training.distill` (`train_step`: PEFT adapters on the diffusers UNet)"),
                        ("node", "TDM Distill node (`Distiller.iterate`: ComfyUI weight wrappers on the ComfyUI MODEL)")):
        cpu, wall = rows[name]
        lines.append(f"| {label} | {statistics.median(cpu):.3f} ({min(cpu):.3f}-{max(cpu):.3f}) | {statistics.median(wall):.3f} ({min(wall):.3f}-{max(wall):.3f}) |")
    lines += ["", f"Node / trainer, median of the per-round ratios: **{cpu_ratio:.2f}x** CPU time (95 % bootstrap interval "
              f"{low:.2f}-{high:.2f}; wall {wall_ratio:.2f}x); target <= {TARGET}: **{verdict}**.", ""]
    if "split" in result:
        lines += [f"Where the CPU time goes (cProfile with a CPU-time clock, {result['profile_rounds']} more iterations per host after the timed "
                  "ones; profiling slows Python-heavy code most, so compare rows within a host, not the totals with the table above):", "",
                  "| host | part | CPU s / iteration |", "|---|---|---:|"]
        for name in ("trainer", "node"):
            lines += [f"| {name} | {row} | {seconds:.3f} |" for row, seconds in result["split"][name]]
        lines.append("")
    return "\n".join(lines)


def replace_section(old: str, section_text: str) -> str:
    """``old`` with this benchmark's section replaced by ``section_text`` (appended when absent)."""
    heading = section_text.split("\n", 1)[0]
    if heading not in old:
        return old.rstrip("\n") + "\n\n" + section_text
    start = old.index(heading)
    following = old.find("\n## ", start + len(heading))
    rest = "" if following < 0 else old[following:]
    return old[:start] + section_text.rstrip("\n") + "\n" + rest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--profile-rounds", type=int, default=3,
                        help="iterations per host profiled after the timed ones (CPU-time cProfile): where the time goes (0: none)")
    parser.add_argument("--output", type=Path, default=OUTPUT, help="append the section here ('-' : print only)")
    args = parser.parse_args(argv)
    command = "python -m benchmarks.node_speed " + " ".join(argv if argv is not None else sys.argv[1:])
    result = measure(args.rounds, args.warmup, args.batch_size, args.profile_rounds)
    text = section(result, command.strip())
    print(text)
    if "profile" in result:
        print(result["profile"])
    if str(args.output) != "-":
        from tdm_core.atomic import write_text_atomic

        old = args.output.read_text() if args.output.is_file() else ""
        write_text_atomic(args.output, replace_section(old, text))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
