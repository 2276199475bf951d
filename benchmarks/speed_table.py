"""The speed and memory table, measured side by side in one run; writes ``benchmarks/RESULTS_speed.md``.

    python -m benchmarks.speed_table                    # SD1.5-size and mid-size UNets, switch rows, sampling and scaling
    python -m benchmarks.speed_table --models mid --repeats 2 --no-extras --output /tmp/speed.md

For each model: the baseline (interpreter, torch, diffusers, frozen model loaded) once, then
``--repeats`` rounds of the designs of ``benchmarks.speed`` (project, network floor, three copies),
the order rotated every round so that the machine's load from other jobs hits them alike; each run is a
fresh subprocess with one torch thread. Times are the median (and minimum) over every timed iteration
of every round. Before a run whose memory could exhaust the machine, its need is computed from the
parameter count and compared with the memory available; one that does not fit is not started and its
row says so, with the computed memory. When the project misses a time target, ``torch.profiler`` runs
over one iteration of the project and of the floor and the table shows where the time goes.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from benchmarks import speed
from tdm_core.atomic import write_text_atomic

ROOT = Path(__file__).resolve().parent.parent
RESULTS_MD = ROOT / "benchmarks" / "RESULTS_speed.md"
WORK = ROOT / "outputs" / "benchmarks" / "speed"
MB = 2**20
PHASES = ("forward", "backward", "optimiser", "other")
TARGETS = {"iteration_floor": 1.15, "time_vs_copies": 0.9, "memory_vs_copies": 0.4}
SWITCHES_PER_ITERATION = 8  # use_adapter enters of one project iteration: 4 roll-out, fake update, student, teacher pair, fake
MARGIN_MB = 1500  # left free on the machine by any run started
GUARD_MB = 1000  # a running measurement stops itself below this much available memory

LABELS = {
    "lora": "project: one frozen base + student and fake-score LoRA (rank 16), `training.loop.tdm_iteration`",
    "floor": "network floor: the project's forwards and backwards alone, same LoRA'd network and `use_adapter` switches",
    "reference": "three copies: frozen teacher + fully fine-tuned student and fake score (AdamW each), `tdm_core.iteration.tdm_iteration`",
    "reference_shared": "three-copies operations with the three roles on one trainable copy (timing stand-in; memory not the design's)",
}


def model_specs(sd15_size: int) -> dict:
    targets = speed.family_lora_targets("sd15")
    return {
        "sd15": dict(title=f"SD1.5 UNet (real config `training/configs/sd15/unet/config.json`, random weights), latents 4x{sd15_size}x{sd15_size}",
                     unet_config=speed.unet_config("sd15", sd15_size), lora_target_modules=targets, context_tokens=77, iterations=2),
        "mid": dict(title="mid-size UNet (`benchmarks.speed.MID_UNET_CONFIG`, random weights), latents 4x32x32",
                    unet_config=dict(speed.MID_UNET_CONFIG), lora_target_modules=targets, context_tokens=77, iterations=4),
    }


QUICK_UNET = dict(speed.MID_UNET_CONFIG, block_out_channels=(8, 16, 16), sample_size=8, norm_num_groups=4, attention_head_dim=4)


def folder_for(work: Path, name: str, spec: dict) -> Path:
    """The model folder of ``spec``, written once (in a subprocess) and reused while its spec is unchanged."""
    folder = work / f"{name}_unet"
    stamp = folder / "spec.json"
    wanted = json.dumps({k: spec[k] for k in ("unet_config", "lora_target_modules", "context_tokens")}, sort_keys=True)
    if stamp.is_file() and stamp.read_text() == wanted and (folder / "tdm_family.json").is_file():
        return folder
    speed.write_model_folder_in_subprocess(folder, unet_config=spec["unet_config"], lora_target_modules=spec["lora_target_modules"],
                                           context_tokens=spec["context_tokens"])
    stamp.write_text(wanted)
    return folder


# --- memory needs ----------------------------------------------------------------------------------
def computed_above_mb(config: str, parameters: int, activations_mb: float) -> float:
    """Memory a design needs beyond the loaded frozen model, from its fp32 tensors: ``reference`` two
    trainable copies, two AdamW states of two tensors each and one set of gradients at a time (the
    fake score's are freed before the student's backward) = 7 x P x 4 bytes; ``reference_shared`` one set
    of gradients and one AdamW state = 3 x P x 4 bytes; plus activations."""
    per_copy = parameters * 4 / MB
    return {"reference": 7, "reference_shared": 3}.get(config, 0) * per_copy + activations_mb


def fits(need_mb: float) -> tuple[bool, float | None]:
    available = speed.mem_available_mb()
    return (available is None or need_mb + MARGIN_MB <= available), available


# --- one model's rows --------------------------------------------------------------------------------
def run_model(name: str, spec: dict, args, log, record, out: dict) -> dict:
    """Fills ``out`` (the model's entry of the run's state, written out after every measurement)."""
    folder = folder_for(args.work, name, spec)
    log(f"{name}: baseline")
    base = speed.measure_in_subprocess("baseline", folder, args.batch_size, 4, 0, 0, min_available_mb=GUARD_MB)
    out["baseline"], params = base, base["parameters"]
    designs = ["lora", "floor", "reference", "reference_shared"]
    need = base["rss_loaded_mb"] + computed_above_mb("reference", params, 1024)
    ok, available = fits(need)
    if not ok:  # decided before the first round, so the stand-in runs in every round
        out["skipped"]["reference"] = {"need_mb": need, "available_mb": available}
        designs.remove("reference")
        log(f"{name}: three copies not run: need about {need / 1024:.1f} GB, {available / 1024:.1f} GB available")
    elif name == "sd15" and not args.quick:
        designs.remove("reference_shared")  # the real design fits: no stand-in needed
    activations = 1024.0  # until the project has run
    for round_ in range(args.repeats):
        shift = round_ % len(designs)
        for config in designs[shift:] + designs[:shift]:
            if config in out["skipped"]:
                continue
            need = base["rss_loaded_mb"] + computed_above_mb(config, params, activations)
            ok, available = fits(need)
            if not ok:  # tried again in the next round
                out.setdefault("round_skips", {}).setdefault(config, []).append({"round": round_ + 1, "need_mb": need, "available_mb": available})
                log(f"{name}: {config} not run in round {round_ + 1}: needs about {need / 1024:.1f} GB, {available / 1024:.1f} GB available")
                continue
            log(f"{name}: {config}, round {round_ + 1}/{args.repeats}")
            try:
                result = speed.measure_in_subprocess(config, folder, args.batch_size, 4, args.warmup, args.iterations or spec["iterations"],
                                                     timeout=args.timeout, min_available_mb=GUARD_MB)
            except RuntimeError as err:
                if "memory guard" not in str(err):
                    raise
                out.setdefault("round_skips", {}).setdefault(config, []).append(
                    {"round": round_ + 1, "need_mb": need, "available_mb": speed.mem_available_mb(), "stopped": True})
                log(f"{name}: {config} stopped by the memory guard in round {round_ + 1}")
                continue
            out["runs"].setdefault(config, []).append(result)
            if config in ("lora", "floor") and result.get("above_loaded_mb") is not None:
                activations = result["above_loaded_mb"]
            record()
    return out


def pooled(runs: list[dict]) -> dict:
    """Every timed iteration of every round of one design: median, min and max of the wall and CPU times."""
    times = [t for r in runs for t in r["iteration_seconds"]]
    cpu = [t for r in runs for t in r.get("iteration_cpu_seconds", [])] or times
    above = [r["above_loaded_mb"] for r in runs if r.get("above_loaded_mb") is not None]
    phases = [p for r in runs for p in r.get("iteration_phases", [])]
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "n": len(times), "rounds": len(runs),
            "cpu": statistics.median(cpu), "cpu_min": min(cpu), "cpu_max": max(cpu),
            "phases": {k: statistics.median(p[k] for p in phases) for k in PHASES} if phases else None,
            "above_mb": max(above) if above else None, "peak_mb": max(r["peak_rss_mb"] for r in runs)}


def summarise(model: dict) -> dict:
    """Pooled times and memory per design, and the three target ratios."""
    rows = {config: pooled(runs) for config, runs in model["runs"].items()}
    params = model["baseline"]["parameters"]
    s = {"rows": rows, "parameters": params}
    lora, floor = rows.get("lora"), rows.get("floor")
    copies = rows.get("reference") or rows.get("reference_shared")
    s["copies_source"] = "reference" if "reference" in rows else ("reference_shared" if "reference_shared" in rows else None)
    # time ratios: (of the CPU-time medians, of the wall-time medians)
    if lora and floor:
        s["iteration_floor"] = (lora["cpu"] / floor["cpu"], lora["median"] / floor["median"])
    if lora and copies:
        s["time_vs_copies"] = (lora["cpu"] / copies["cpu"], lora["median"] / copies["median"])
    if lora and lora["above_mb"] is not None:
        # three copies computed: 7 x P x 4 bytes + the activations, taken as the project's memory above
        # baseline less its LoRA weights, gradients and AdamW states (4 x 4 bytes per trainable parameter)
        trainable = model["runs"]["lora"][0].get("trainable_parameters", 0)
        computed = computed_above_mb("reference", params, max(0.0, lora["above_mb"] - 16 * trainable / MB))
        s["reference_computed_above_mb"] = computed
        if "reference" in rows and rows["reference"]["above_mb"]:
            s["memory_vs_copies"] = (lora["above_mb"] / rows["reference"]["above_mb"], "measured")
        else:
            s["memory_vs_copies"] = (lora["above_mb"] / computed, "computed")
    return s


# --- profile ---------------------------------------------------------------------------------------
def profile_rows(folder: Path, args, log, configs=("lora", "floor")) -> dict:
    out = {}
    for config in configs:
        log(f"profile: {config}")
        out[config] = speed.measure_in_subprocess(config, folder, args.batch_size, 4, 1, 1, timeout=args.timeout,
                                                  min_available_mb=GUARD_MB, extra=["--profile"])
    return out


def profile_lines(profiles: dict) -> list[str]:
    lora = {r["name"]: r for r in profiles["lora"]["profile"]}
    floor = {r["name"]: r for r in profiles["floor"]["profile"]}
    names = sorted(set(lora) | set(floor), key=lambda n: -(lora.get(n, {}).get("self_ms", 0) - floor.get(n, {}).get("self_ms", 0)))
    lines = ["| op (torch.profiler, self CPU time) | project ms / it. | floor ms / it. | difference | project calls / it. | floor calls / it. |",
             "|---|---:|---:|---:|---:|---:|"]
    for n in names[:15]:
        a, b = lora.get(n, {}), floor.get(n, {})
        lines.append(f"| `{n}` | {a.get('self_ms', 0):.1f} | {b.get('self_ms', 0):.1f} | {a.get('self_ms', 0) - b.get('self_ms', 0):+.1f} | "
                     f"{a.get('calls', 0):.0f} | {b.get('calls', 0):.0f} |")
    total_a = profiles["lora"]["seconds_per_iteration"]
    total_b = profiles["floor"]["seconds_per_iteration"]
    return [f"One profiled iteration each (profiler on: project {total_a:.2f} s, floor {total_b:.2f} s); the ops whose self time "
            "differs most (ops beyond the 300 largest of a run count as 0 there):", ""] + lines + [""]


# --- extras: sampling and scaling (moved here from RESULTS.md) ---------------------------------------
def run_extras(args, log, mid_folder: Path, record) -> dict:
    from benchmarks.demo import TEACHER_DIR

    out = {"sampling": {}, "scaling_batch": {}, "scaling_k": {}}
    for label, folder in (("digits", TEACHER_DIR), ("mid", mid_folder)):
        log(f"sampling: {label}")
        out["sampling"][label] = speed.measure_in_subprocess("sampling", folder, 16, 4, 0, 2, min_available_mb=GUARD_MB)
        record()
    for batch in (1, 4, 16):
        log(f"scaling: batch {batch}")
        out["scaling_batch"][batch] = speed.measure_in_subprocess("lora", TEACHER_DIR, batch, 4, 1, 3, min_available_mb=GUARD_MB)
        record()
    for k in (1, 2, 4):
        log(f"scaling: K={k}")
        out["scaling_k"][k] = speed.measure_in_subprocess("lora", TEACHER_DIR, 8, k, 1, 3, min_available_mb=GUARD_MB)
        record()
    return out


# --- markdown ------------------------------------------------------------------------------------------
def verdict(value: float, target: float) -> str:
    return "**holds**" if value <= target else "**missed**"


def fmt_s(row: dict) -> str:
    return (f"{row['cpu']:.2f} ({row['cpu_min']:.2f}-{row['cpu_max']:.2f}) | {row['median']:.2f} ({row['min']:.2f}-{row['max']:.2f}) | "
            f"{row['n']} in {row['rounds']}")


def model_lines(name: str, model: dict, s: dict) -> list[str]:
    base = model["baseline"]
    lines = [f"### {model['title']}", "",
             f"{s['parameters'] / 1e6:.0f} M parameters, batch {model['batch_size']}, K=4, CFG 2 (teacher pair in one forward at 2B), "
             f"context 77 tokens, LoRA on the SD1.5 family's targets; baseline (interpreter, torch, diffusers, frozen model loaded "
             f"and resident): {base['rss_loaded_mb']:.0f} MB.", "",
             "| design | CPU s / iteration: median (min-max) | wall s / iteration: median (min-max) | iterations in runs | "
             "peak RSS above baseline (MB) |", "|---|---:|---:|---:|---:|"]
    for config in ("lora", "floor", "reference", "reference_shared"):
        row = s["rows"].get(config)
        if row:
            mem = f"{row['above_mb']:.0f}" if row["above_mb"] is not None else "n/a"
            if config == "reference_shared":
                mem += " (not the design's)"
            lines.append(f"| {LABELS[config]} | {fmt_s(row)} | {mem} |")
        elif config in model["skipped"]:
            sk = model["skipped"][config]
            why = "stopped by the memory guard" if sk.get("stopped") else \
                f"not run: does not fit (needs about {sk['need_mb'] / 1024:.1f} GB, {sk['available_mb'] / 1024:.1f} GB available)"
            computed = s.get("reference_computed_above_mb") if config == "reference" else None
            mem = f"computed {computed:.0f}" if computed else "-"
            lines.append(f"| {LABELS[config]} | {why} | | | {mem} |")
    lines.append("")
    if "reference" in s["rows"] and s.get("reference_computed_above_mb"):
        lines += [f"Three copies' memory as computed (7 x P x 4 bytes + the project's activations, the rule used where they do not fit): "
                  f"{s['reference_computed_above_mb']:.0f} MB; measured {s['rows']['reference']['above_mb']:.0f} MB.", ""]
    lora, copies_mb = s["rows"].get("lora"), 7 * s["parameters"] * 4 / MB
    if lora and lora["above_mb"] is not None and s.get("reference_computed_above_mb"):
        measured = s["rows"].get("reference", {}).get("above_mb")
        total = measured or s["reference_computed_above_mb"]
        lines += [f"Memory: of the three copies' {total:.0f} MB above baseline ({'measured' if measured else 'computed'}), "
                  f"{copies_mb:.0f} MB are the two copies, their AdamW states and one set of gradients (7 x P x 4 bytes) and the "
                  f"rest is activations, which the project needs as well: its own {lora['above_mb']:.0f} MB above baseline are "
                  f"activations plus {16 * model['runs']['lora'][0].get('trainable_parameters', 0) / MB:.0f} MB of LoRA weights, "
                  "gradients and AdamW states. The project's share is therefore about activations / (activations + 7 x P x 4 bytes): "
                  "small where the parameters dominate (full-size UNets), large where activations do.", ""]
    lines += phase_lines(s)
    if "reference" in s["rows"] and "reference_shared" in s["rows"]:
        r, sh = s["rows"]["reference"], s["rows"]["reference_shared"]
        lines += [f"The one-copy stand-in against the real three copies: {sh['cpu'] / r['cpu']:.2f}x the CPU time "
                  f"({sh['median'] / r['median']:.2f}x the wall time), medians.", ""]
    return lines


def phase_lines(s: dict) -> list[str]:
    rows = [(c, s["rows"][c]) for c in ("lora", "floor", "reference", "reference_shared") if s["rows"].get(c) and s["rows"][c]["phases"]]
    if not rows:
        return []
    names = {"lora": "project", "floor": "network floor", "reference": "three copies", "reference_shared": "three-copies stand-in"}
    lines = ["Where the CPU time of an iteration goes (phase timers inside the runs above, medians over their iterations, CPU s): "
             "forward = every network call (roll-out, the fake-score and student steps, teacher pair, fake score), backward = the "
             "two backward passes, optimiser = gradient clip + AdamW step (+ LR schedule), other = the rest of the iteration "
             "(the method's draws and losses in `tdm_core.iteration`, conditions, the logging sync).", "",
             "| design | forward | backward | optimiser | other | total |", "|---|---:|---:|---:|---:|---:|"]
    for config, row in rows:
        p = row["phases"]
        lines.append(f"| {names[config]} | {p['forward']:.2f} | {p['backward']:.2f} | {p['optimiser']:.2f} | {p['other']:.2f} | {row['cpu']:.2f} |")
    lora, floor = s["rows"].get("lora"), s["rows"].get("floor")
    copies = s["rows"].get("reference") or s["rows"].get("reference_shared")
    notes = []
    if lora and floor and lora["phases"] and floor["phases"]:
        lp, fp = lora["phases"], floor["phases"]
        notes.append(f"The project's time beyond its floor ({lora['cpu'] - floor['cpu']:+.2f} s) is its optimiser steps "
                     f"({lp['optimiser']:.2f} s) and the rest of the iteration ({lp['other']:.2f} s), against forwards "
                     f"{lp['forward'] - fp['forward']:+.2f} s and backwards {lp['backward'] - fp['backward']:+.2f} s of difference "
                     "between the two runs of the same calls (load noise).")
    if lora and copies and lora["phases"] and copies["phases"]:
        lp, cp = lora["phases"], copies["phases"]
        notes.append(f"Against three copies: forwards {lp['forward']:.2f} vs {cp['forward']:.2f} s (the project's with LoRA on the targeted "
                     f"layers), backwards {lp['backward']:.2f} vs {cp['backward']:.2f} s (three copies also compute every weight's "
                     f"gradient), optimiser {lp['optimiser']:.2f} vs {cp['optimiser']:.2f} s (AdamW over the LoRA weights vs over "
                     f"every weight, twice).")
    return lines + [""] + ([" ".join(notes), ""] if notes else [])


def target_lines(models: dict, summaries: dict) -> list[str]:
    names = list(models)
    lines = ["| target | " + " | ".join(models[n]["title"].split(" (")[0] for n in names) + " |", "|---|" + "---:|" * len(names)]
    rows = [("iteration_floor", "project / network floor, time <= 1.15"),
            ("time_vs_copies", "project / three copies, time <= 0.9"),
            ("memory_vs_copies", "project / three copies, memory above baseline <= 0.4")]
    for key, label in rows:
        cells = []
        for n in names:
            s = summaries[n]
            if key not in s:
                cells.append("not measured")
                continue
            value, extra = s[key]
            if key == "memory_vs_copies":
                cells.append(f"{value:.2f} {verdict(value, TARGETS[key])}" + (" (three copies computed)" if extra == "computed" else ""))
            else:
                source = " (three copies timed by the one-copy stand-in)" if key == "time_vs_copies" and s["copies_source"] == "reference_shared" else ""
                cells.append(f"{value:.2f} {verdict(value, TARGETS[key])} (wall time: {extra:.2f}){source}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines + [""]


def switch_lines(switch: dict, summaries: dict) -> list[str]:
    lines = ["| UNet (meta device, training/configs) | modules | PEFT LoRA layers (each holds both adapters) | ms per enter+exit: student / fake score / teacher, median (min) | per project iteration (8 enters) |",
             "|---|---:|---:|---:|---:|"]
    for unet, r in switch.items():
        share = ""
        row = summaries.get(unet, {}).get("rows", {}).get("lora")
        if row:
            share = f"; {SWITCHES_PER_ITERATION * r['ms_per_switch'] / 10 / row['median']:.3f} % of the CPU iteration above"
        lines.append(f"| {unet} | {r['modules']} | {r['lora_layers']} | {r['ms_student']:.2f} / {r['ms_fake_score']:.2f} / {r['ms_teacher']:.2f} "
                     f"({r['ms_student_min']:.2f} / {r['ms_fake_score_min']:.2f} / {r['ms_teacher_min']:.2f}) | "
                     f"{SWITCHES_PER_ITERATION * r['ms_per_switch']:.1f} ms{share} |")
    return lines + [""]


def extras_lines(extras: dict) -> list[str]:
    def ratio(a, b):
        return f"{a / b:.2f}x"

    lines = ["## Sampling and scaling", "",
             "Sampling with the tdm_core samplers that the ComfyUI TDM sampler node calls (`nodes/tdm_sampler.py` wraps "
             "`tdm_core.sample_tdm`), on the diffusers UNets, not through a ComfyUI graph; batch 16, best of 2; CPU seconds "
             "(wall seconds in brackets): the digits teacher and the mid-size UNet above (1-token context).", "",
             "| model | TDM 4 steps, CFG 1 | teacher DDIM 25 steps, CFG 2 = 50 evals | speed-up (CPU) | 4 bare calls | TDM sampler overhead (4-step sampling / 4 bare calls, CPU) |",
             "|---|---:|---:|---:|---:|---:|"]

    def both(r, key):
        return f"{r[key + '_cpu']:.3f} ({r[key]:.3f})" if key + "_cpu" in r else f"{r[key]:.3f}"

    def cpu(r, key):
        return r.get(key + "_cpu", r[key])

    for label, r in extras["sampling"].items():
        lines.append(f"| {label} | {both(r, 'tdm4_cfg1')} | {both(r, 'teacher25_cfg2')} | {ratio(cpu(r, 'teacher25_cfg2'), cpu(r, 'tdm4_cfg1'))} | "
                     f"{both(r, 'bare4')} | {cpu(r, 'tdm4_cfg1') / cpu(r, 'bare4'):.3f} |")

    def row(key, r):
        per = r.get("cpu_seconds_per_iteration", r["seconds_per_iteration"])
        return f"| {key} | {per:.3f} ({r['seconds_per_iteration']:.3f}) | {r.get('above_loaded_mb', float('nan')):.0f} |"

    lines += ["", "Scaling of one project iteration on the digits teacher (its own LoRA targets), median of 3 after 1 warm-up, CPU "
              "seconds (wall in brackets):", "",
              "| batch (K=4) | s / iteration | peak RSS above baseline (MB) |", "|---:|---:|---:|"]
    lines += [row(b, r) for b, r in extras["scaling_batch"].items()]
    lines += ["", "| K (batch 8) | s / iteration | peak RSS above baseline (MB) |", "|---:|---:|---:|"]
    lines += [row(k, r) for k, r in extras["scaling_k"].items()]
    return lines + [""]


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    total = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                total = int(line.split()[1]) / 2**20
    except OSError:
        pass
    import torch

    return (f"{cpu}, {os.cpu_count()} cores, {total:.0f} GB memory, no GPU; torch {torch.__version__}; "
            "1 torch thread per measurement; the machine was shared with other jobs")


def render(state: dict) -> str:
    models = {n: m for n, m in state["models"].items() if "baseline" in m}
    summaries = {n: summarise(m) for n, m in models.items()}
    load_end = state.get("load_end")
    lines = ["# Speed and memory of one TDM training iteration", "",
             f"Produced by `{state['command']}` on {state['date']} ({state['status']})"
             + (f", code: {state['code']}" if state.get("code") else "")
             + (f"; this markdown rendered from its raw results by `{state['rendered_by']}`" if state.get("rendered_by") else "")
             + f". Machine: {state['machine']}. "
             f"Load average (1, 5, 15 min) at the start {fmt_load(state['load_start'])}, at the end "
             f"{fmt_load(load_end) if load_end else 'n/a (run in progress)'}. At such a load a one-thread process waits for a core "
             "much of the time, so each run reports its CPU time (`time.process_time`, its own work) beside its wall time; the "
             "targets are judged on the CPU-time ratios, the wall-time ratios are given beside them. The designs were interleaved "
             "round by round so the load hits them alike.", "",
             "Each run is a fresh subprocess (`python -m benchmarks.speed --config ...`): warm-up "
             f"{state['warmup']} iteration(s), then {state['iterations'] or '2 (SD1.5) or 4 (mid-size)'} timed; {state['repeats']} rounds with the design order rotated. "
             "Memory: the subprocess's resident high-water mark (VmHWM), reset once the frozen model is loaded and resident, minus "
             "its resident size at that moment (the baseline).", "",
             "## Targets (issue 10)", ""]
    lines += target_lines(models, summaries)
    for name, model in models.items():
        lines += model_lines(name, model, summaries[name])
        if name in state.get("profiles", {}):
            lines += profile_lines(state["profiles"][name])
    if state.get("switch"):
        lines += ["## Adapter switch (`training.models.use_adapter`)", "",
                  "UNets built on the meta device from the shipped configs with both TDM adapters (rank 16) on the family's LoRA "
                  "targets (`to_q, to_k, to_v, to_out.0, ff.net.0.proj, ff.net.2`), 200 enter+exit each after 5 warm-up:", ""]
        lines += switch_lines(state["switch"], summaries)
    if state.get("extras"):
        lines += extras_lines(state["extras"])
    lines += ["## Not measured here", ""] + [f"- {item}" for item in not_measured(state, summaries)] + [""]
    return "\n".join(lines) + "\n"


def not_measured(state: dict, summaries: dict) -> list[str]:
    items = []
    for name, model in state["models"].items():
        if name not in summaries:
            items.append(f"{model['title'].split(' (')[0]}: not yet measured (run in progress or stopped).")
            continue
        for config, sk in model["skipped"].items():
            if config == "reference":
                computed = summaries[name].get("reference_computed_above_mb")
                items.append(f"{model['title'].split(' (')[0]}: the three-copies design (needs about {sk['need_mb'] / 1024:.1f} GB in all, "
                             f"{sk['available_mb'] / 1024:.1f} GB were available"
                             + (f"; computed {computed / 1024:.1f} GB above baseline" if computed else "")
                             + "); its time is the one-copy stand-in's, its memory the computed one.")
            else:
                items.append(f"{model['title'].split(' (')[0]}: {config} (needs about {sk['need_mb'] / 1024:.1f} GB, "
                             f"{sk['available_mb'] / 1024:.1f} GB were available).")
        for config, skips in model.get("round_skips", {}).items():
            rounds = ", ".join(str(k["round"]) for k in skips)
            items.append(f"{model['title'].split(' (')[0]}: {config} not started in round(s) {rounds}: the machine's other jobs left "
                         f"{min(k['available_mb'] for k in skips) / 1024:.1f} GB available, it needs about {skips[0]['need_mb'] / 1024:.1f} GB "
                         "(its row pools the rounds it ran in).")
    if not state.get("extras"):
        items.append("sampling and scaling rows (run without them).")
    items.append("GPU rows (SD1.5 512x512 batch 4, SDXL 1024x1024 batch 1, bf16, gradient checkpointing): `bash benchmarks/gpu.sh OUTDIR --speed-table` "
                 "on a CUDA machine; no GPU was available for this run.")
    items.append("SDXL-size training iteration on this CPU (only its adapter switch is measured).")
    return items


def code_version() -> str:
    """The commit measured, and the files under training/, tdm_core/ and benchmarks/speed.py that differ from it."""
    import subprocess

    def git(*cmd):
        return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True).stdout

    head = git("rev-parse", "--short", "HEAD").strip() or "unknown"
    changed = [line[3:] for line in git("status", "--porcelain", "--", "training", "tdm_core", "benchmarks/speed.py").splitlines() if line.strip()]
    return f"commit {head}" + (f" with uncommitted changes to {', '.join(changed)}" if changed else "")


def fmt_load(load) -> str:
    return ", ".join(f"{v:.2f}" for v in load)


# --- the GPU snippet (benchmarks/gpu.sh) -------------------------------------------------------------
GPU_MODELS = {  # name -> (UNet config name, latent size, batch): SD1.5 at 512x512 batch 4, SDXL at 1024x1024 batch 1
    "sd15": ("sd15", 64, 4),
    "sdxl": ("sdxl", 128, 1),
}
GPU_DESIGNS = ("lora", "floor", "reference")


def gpu_need_mb(config: str, parameters: int) -> float:
    # beyond the bf16 base: reference = two fp32 copies + two fp32 AdamW states + one set of fp32 gradients
    return {"reference": 7 * 4, "lora": 0, "floor": 0}[config] * parameters / MB


def meta_parameters(unet_config: dict) -> int:
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return sum(p.numel() for p in UNet2DConditionModel(**unet_config).parameters())


def gpu_main(args, log) -> int:
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA device (or --device cpu for a dry run at tiny sizes with --quick)")
    models = {"tiny": ("tiny", 8, 1)} if args.quick else GPU_MODELS
    flags = ["--device", args.device, "--mixed-precision", "bf16", "--gradient-checkpointing", "--threads", "0"]
    state = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else args.device, "torch": torch.__version__,
             "command": args.command, "date": time.strftime("%Y-%m-%d %H:%M"), "models": {}}
    for name, (unet, size, batch) in models.items():
        config = QUICK_UNET if unet == "tiny" else speed.unet_config(unet, size)
        targets = speed.family_lora_targets("sdxl" if unet == "sdxl" else "sd15")
        folder = args.work / f"gpu_{name}_unet"
        if not (folder / "tdm_family.json").is_file():
            log(f"writing {folder}")
            speed.write_model_folder_in_subprocess(folder, unet_config=config, lora_target_modules=targets, context_tokens=77,
                                                   init_device=args.device, save_dtype="bfloat16")
        entry = state["models"][name] = {"batch": batch, "size": size * 8, "runs": {}, "skipped": {}, "parameters": meta_parameters(config)}
        for design in GPU_DESIGNS:
            if args.device.startswith("cuda"):
                free, _ = torch.cuda.mem_get_info()
                need = gpu_need_mb(design, entry["parameters"])
                if need and need * 1.1 > free / MB:
                    entry["skipped"][design] = {"need_mb": need, "free_mb": free / MB}
                    continue
            log(f"gpu {name}: {design}")
            try:
                result = speed.measure_in_subprocess(design, folder, batch, 4, max(2, args.warmup), args.iterations or 5,
                                                     timeout=args.timeout, extra=flags)
            except RuntimeError as err:
                entry["skipped"][design] = {"error": str(err).splitlines()[-1][:300]}
                continue
            entry["runs"][design] = result
        write_text_atomic(args.output, render_gpu(state))
    log(f"wrote {args.output}")
    return 0


def render_gpu(state: dict) -> str:
    lines = [f"GPU rows: `{state['command']}` on {state['device']}, torch {state['torch']}, {state['date']}. bf16 base (three copies: "
             "bf16 teacher, fp32 student and fake score under bf16 autocast), gradient checkpointing, K=4, CFG 2, one fresh process "
             "per design; s / iteration the median of the timed iterations; VRAM from torch.cuda.max_memory_allocated, "
             "reset once the model is loaded (above loaded = peak minus what the loaded model holds).", "",
             "| model | design | s / iteration | peak VRAM (MB) | VRAM above loaded model (MB) |", "|---|---|---:|---:|---:|"]
    for name, m in state["models"].items():
        label = f"{name} {m['size']}x{m['size']} batch {m['batch']}"
        for design in GPU_DESIGNS:
            r = m["runs"].get(design)
            if r:
                lines.append(f"| {label} | {design} | {r['seconds_per_iteration']:.3f} | {r.get('peak_vram_mb', float('nan')):.0f} | "
                             f"{r.get('vram_above_loaded_mb', float('nan')):.0f} |")
            elif design in m["skipped"]:
                sk = m["skipped"][design]
                why = sk.get("error") or f"not run: needs about {sk['need_mb'] / 1024:.0f} GB, {sk['free_mb'] / 1024:.0f} GB free"
                lines.append(f"| {label} | {design} | {why} | | |")
        runs = m["runs"]
        if "lora" in runs and "floor" in runs and "reference" in runs:
            lo, fl, ref = runs["lora"], runs["floor"], runs["reference"]
            mem = ""
            if lo.get("vram_above_loaded_mb") is not None and ref.get("vram_above_loaded_mb"):
                mem = f", VRAM above loaded {lo['vram_above_loaded_mb'] / ref['vram_above_loaded_mb']:.2f}"
            lines.append(f"| {label} | ratios | project / floor {lo['seconds_per_iteration'] / fl['seconds_per_iteration']:.2f}, "
                         f"project / three copies {lo['seconds_per_iteration'] / ref['seconds_per_iteration']:.2f}{mem} | | |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="sd15,mid", help="comma list: sd15, mid")
    parser.add_argument("--sd15-size", type=int, default=16, help="latent size of the SD1.5 UNet runs (the UNet is full size)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of the interleaved designs")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iterations", type=int, help="timed iterations per run (default: 2 for sd15, 4 for mid)")
    parser.add_argument("--no-extras", action="store_true", help="skip the sampling and scaling rows")
    parser.add_argument("--no-switch", action="store_true", help="skip the adapter-switch rows")
    parser.add_argument("--no-profile", action="store_true", help="no profile even when a time target is missed")
    parser.add_argument("--quick", action="store_true", help="a tiny UNet in place of the models (smoke test)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per measurement subprocess")
    parser.add_argument("--gpu", action="store_true", help="the GPU snippet of benchmarks/gpu.sh: SD1.5 512x512 batch 4 and SDXL 1024x1024 "
                        "batch 1, bf16, gradient checkpointing, on --device")
    parser.add_argument("--device", default="cuda", help="with --gpu")
    parser.add_argument("--work", type=Path, default=WORK)
    parser.add_argument("--render-from", type=Path, help="write the markdown from a run's speed_table.json without measuring")
    parser.add_argument("--output", type=Path, default=RESULTS_MD)
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python -m benchmarks.speed_table", *(sys.argv[1:] if argv is None else argv)]).strip()
    started = time.time()

    def log(message: str) -> None:
        print(f"[speed_table {time.time() - started:6.0f}s] {message}", flush=True)

    if args.gpu:
        args.command = command
        return gpu_main(args, log)
    specs = model_specs(args.sd15_size)
    if args.quick:
        specs = {"tiny": dict(title="tiny UNet (smoke test)", unet_config=QUICK_UNET, lora_target_modules=speed.family_lora_targets("sd15"),
                              context_tokens=77, iterations=1)}
    else:
        specs = {n: specs[n] for n in args.models.split(",")}
    if args.render_from:  # the markdown again from a run's raw results (e.g. after a change to this renderer)
        state = json.loads(args.render_from.read_text())
        state["rendered_by"] = command
        write_text_atomic(args.output, render(state))
        log(f"wrote {args.output} from {args.render_from}")
        return 0
    state = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine_line(), "load_start": os.getloadavg(),
             "code": code_version(),
             "status": "in progress", "warmup": args.warmup, "iterations": args.iterations, "repeats": args.repeats,
             "models": {}, "profiles": {}}
    raw = args.work / "speed_table.json"

    def record() -> None:
        write_text_atomic(raw, json.dumps(state, indent=1, default=str))
        write_text_atomic(args.output, render(state))

    if not args.no_switch:
        state["switch"] = {}
        for unet in (("sd15",) if args.quick else ("sd15", "sdxl")):
            log(f"switch: {unet}")
            state["switch"][unet] = speed.measure_in_subprocess("switch", None, 1, 4, 0, 0, extra=["--unet", unet])
    for name, spec in specs.items():
        state["models"][name] = {"title": spec["title"], "batch_size": args.batch_size, "runs": {}, "skipped": {}}
        run_model(name, spec, args, log, record, state["models"][name])
        record()
        s = summarise(state["models"][name])
        missed = [k for k in ("iteration_floor",) if k in s and s[k][0] > TARGETS[k]]
        if missed and not args.no_profile:
            state["profiles"][name] = profile_rows(folder_for(args.work, name, spec), args, log)
            record()
    if not args.no_extras and not args.quick:
        state["extras"] = run_extras(args, log, folder_for(args.work, "mid", model_specs(args.sd15_size)["mid"]), record)
    state["load_end"] = os.getloadavg()
    state["status"] = f"complete; {time.time() - started:.0f} s"
    record()
    log(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
