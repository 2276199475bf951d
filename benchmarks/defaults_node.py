"""The ``--host comfyui`` rows of ``benchmarks.defaults``: the TDM Distill node (:mod:`benchmarks.node_distill`)
scored by the headless rows' evaluator, written as one block under the teacher's section of the results file
(the rest of the file is left as it is; a headless rerun keeps the block, see :func:`keep_node_blocks`)."""
from __future__ import annotations

import re
import statistics
from pathlib import Path

NODE_TEACHERS = ("shapes", "flow")  # SD1.5-architecture UNet and Flux-architecture (FluxSchnell-style) teachers
NOT_MEASURED: dict = {}  # teacher -> why the node cannot distil it yet (written as the block instead of rows)
LOADERS = {"shapes": "benchmarks/comfy_teacher.py", "flow": "benchmarks/comfy_flux_teacher.py"}  # how each becomes a ComfyUI MODEL
NOTES = {"flow": (  # what differs between the two students by construction, stated beside the numbers (not measured as a cause)
    "The two students are not the same LoRA on Flux: the node adapts ComfyUI's fused linears (one rank-16 LoRA on each "
    "`img_attn.qkv`, `txt_attn.qkv` and single-block `linear1`, so q, k, v (and the MLP input) share one down matrix), 21 "
    "modules and 190,720 LoRA parameters; `training.distill` adapts the diffusers modules (separate rank-16 LoRAs on q, k, v, "
    "`proj_mlp`), 35 modules and 219,392 parameters; both adapt the final layer (`final_layer.linear` / `proj_out`). Before the "
    "node adapted the final layer too, its 500 it. rows were FD to real 124.3 ± 5.5 and to the teacher 189.5 ± 80.1 (3 seeds; "
    "ratios 1.12 and 1.08). The node's student is exactly representable in the trainer's PEFT layout (the conversion the "
    "evaluator uses, checked above), not the reverse")}
COLUMNS = ("fd_real", "fd_teacher", "accuracy")
TOLERANCE = 0.10  # the goal: node FD within 10 % of the headless trainer's
NODE_TITLE = "TDM Distill node (ComfyUI)"
NODE_ROW_LABEL = NODE_TITLE + ", defaults, batch 8"


def block_markers(teacher: str) -> tuple[str, str]:
    return f"<!-- comfyui-node:{teacher} -->", f"<!-- /comfyui-node:{teacher} -->"


def measure(teacher, evaluator, seeds: tuple, iterations: tuple, work: Path, cached, log) -> None:
    """Node runs (one per seed, checkpoints at ``iterations``) scored into the cache as ``node/seed<s>/<n>``,
    and the check that the evaluator's sampler is the node's student (``node/sampling_check``)."""
    from benchmarks import node_distill

    grid = evaluator.student_grid(4)
    for seed in seeds:
        log(f"{teacher.name}: TDM Distill node, seed {seed}")
        folder = node_distill.distil(evaluator, teacher.cfg, work / teacher.name / f"node_seed{seed}", seed, iterations, log)
        for n in iterations:
            cached(f"node/seed{seed}/{n}", lambda: evaluator.student_row(node_distill.adapter_state(folder, n, evaluator), grid))
        cached(f"node/seed{seed}/summary", lambda: node_distill.run_summary(folder))
    first = work / teacher.name / f"node_seed{seeds[0]}"
    cached("node/sampling_check", lambda: node_distill.sampling_paths_difference(
        evaluator, node_distill.student_lora(first, max(iterations)), node_distill.adapter_state(first, max(iterations), evaluator), grid))


def fmt(row: dict, key: str) -> str:
    digits = 3 if key == "accuracy" else 1
    return f"{row[key]:.{digits}f} ± {row[key + '_sd']:.{digits}f}"


def mean_of(cache: dict, prefix: str, seeds: tuple, n: int, key: str):
    values = [cache[f"{prefix}seed{s}/{n}"][key] for s in seeds if f"{prefix}seed{s}/{n}" in cache]
    return (statistics.fmean(values), len(values)) if values else (None, 0)


def spread_of(cache: dict, prefix: str, seeds: tuple, n: int, key: str) -> float:
    """Standard deviation over the seeds' runs (0 for one run)."""
    values = [cache[f"{prefix}seed{s}/{n}"][key] for s in seeds if f"{prefix}seed{s}/{n}" in cache]
    return statistics.stdev(values) if len(values) > 1 else 0.0


def published_row(text: str, teacher: str, n: int) -> dict:
    """The headless ``TDM K=4, defaults, <n> it.`` row of ``teacher``'s table in the results file: ``{fd_real, fd_teacher, runs}``."""
    section = re.search(rf"^### {re.escape(teacher)}:.*?(?=^### |\Z)", text, flags=re.M | re.S)
    row = section and re.search(rf"^\| TDM K=4, defaults, {n} it\. \| 4 \| ([\d.]+) ± [\d.]+ \| ([\d.]+) ± [\d.]+ \| [^|]+ \| (\d+) \|$",
                                section.group(0), flags=re.M)
    return {"fd_real": float(row.group(1)), "fd_teacher": float(row.group(2)), "runs": int(row.group(3))} if row else {}


def runs_text(runs: int) -> str:
    return f"{runs} run" + ("" if runs == 1 else "s")


def ratio_line(name: str, n: int, node: float, runs: int, headless: float, headless_runs: int, which: str) -> str:
    ratio = node / headless
    verdict = "within 10 %" if ratio <= 1 + TOLERANCE else "NOT within 10 %"
    return (f"- {name} at {n} it.: node {node:.1f} ({runs_text(runs)}) vs `training.distill` {headless:.1f} ({runs_text(headless_runs)}, {which}): "
            f"ratio {ratio:.2f}, {verdict} (lower is better)")


def comparison(cache: dict, seeds: tuple, n: int, published: dict) -> list[str]:
    """Node against headless at ``n`` iterations: the headless rows published above and the headless runs in the same
    cache (made beside the node's, same code and evaluator)."""
    lines = []
    for key, name in (("fd_real", "FD to real data"), ("fd_teacher", "FD to the teacher")):
        node, runs = mean_of(cache, "node/", seeds, n, key)
        if node is None:
            continue
        if published:
            lines.append(ratio_line(name, n, node, runs, published[key], published["runs"], "the table above"))
        headless, headless_runs = mean_of(cache, "", seeds, n, key)
        if headless is not None:
            lines.append(ratio_line(name, n, node, runs, headless, headless_runs, "rerun beside it on this code")
                         + f"; seed spread (std): node {spread_of(cache, 'node/', seeds, n, key):.1f}, "
                         f"`training.distill` {spread_of(cache, '', seeds, n, key):.1f}")
    return lines


def table(teacher, cache: dict, seeds: tuple, iterations: tuple, command: str, published: dict | None = None) -> list[str]:
    from benchmarks.defaults_eval import summarise

    start, end = block_markers(teacher.name)
    lines = [start, f"#### {teacher.name}: {NODE_TITLE}", ""]
    if teacher.name in NOT_MEASURED:
        return lines + [f"{NOT_MEASURED[teacher.name]}.", "", end]
    lines += [f"Produced by `{command}`: the teacher loaded as a ComfyUI MODEL ({LOADERS.get(teacher.name, 'benchmarks/comfy_teacher.py')}), distilled in process by "
              "the node's `Distiller` (nodes/distill.py) with `DistillOptions` defaults except batch 8 (the trainer's) and the CFG above; "
              "one run per seed, its student LoRA kept at each checkpoint; scored by the same evaluator and sampler as the rows above.", "",
              "| row | NFE | FD to real held-out ↓ | FD to teacher 50 steps ↓ | attribute/class accuracy ↑ | runs |",
              "|---|---:|---:|---:|---:|---:|"]
    for n in iterations:
        per_seed = [cache[f"node/seed{s}/{n}"] for s in seeds if f"node/seed{s}/{n}" in cache]
        if not per_seed:
            lines.append(f"| {NODE_ROW_LABEL}, {n} it. | 4 | not measured | | | 0 |")
            continue
        row = summarise(per_seed)
        lines.append(f"| {NODE_ROW_LABEL}, {n} it. | 4 | " + " | ".join(fmt(row, c) for c in COLUMNS) + f" | {row['runs']} |")
    headless = any(f"seed{s}/{n}" in cache for s in seeds for n in iterations)
    for n in iterations:  # the headless runs made beside the node's, if any
        per_seed = [cache[f"seed{s}/{n}"] for s in seeds if f"seed{s}/{n}" in cache]
        if per_seed:
            row = summarise(per_seed)
            lines.append(f"| `training.distill` rerun beside it, {n} it. | 4 | " + " | ".join(fmt(row, c) for c in COLUMNS) + f" | {row['runs']} |")
    lines.append("")
    if headless:
        lines += ["The `training.distill` rerun rows are the headless runs in the same `--work` cache, made by the same command "
                  "without `--host comfyui` (run before it, on the same code and evaluator); `--host comfyui` alone does not make them.", ""]
    moved = [cache[f"node/seed{s}/summary"]["probe_change"] for s in seeds if f"node/seed{s}/summary" in cache]
    if moved:
        lines += [f"The node's own probe: samples moved {', '.join(f'{100 * m:.0f}%' for m in moved)} from the teacher's 4-step samples.", ""]
    if "node/sampling_check" in cache:
        check = cache["node/sampling_check"]
        lines += [f"Sampling check: the seed-{seeds[0]} student at {max(iterations)} it., loaded on the ComfyUI MODEL by ComfyUI's LoRA loader "
                  "and sampled through ComfyUI, against the evaluator's diffusers student (its LoRA converted to PEFT keys), 16 prompts, same "
                  f"noise: largest latent difference {check['vs_diffusers_student']:.1e} of the largest latent (the student against the "
                  f"teacher on the same path: {check['vs_teacher']:.1e}).", ""]
    if teacher.name in NOTES:
        lines += [f"{NOTES[teacher.name]}.", ""]
    compared = comparison(cache, seeds, max(iterations), published or {})
    return lines + (compared + [""] if compared else []) + [end]


def insert_block(text: str, teacher: str, block: list[str]) -> str:
    """``text`` with the teacher's node block replaced, or put at the end of the teacher's section."""
    start, end = block_markers(teacher)
    body = "\n".join(block)
    if start in text:
        return re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: body, text, flags=re.S)
    heading = re.search(rf"^### {re.escape(teacher)}:.*$", text, flags=re.M)
    if heading is None:
        return text.rstrip("\n") + "\n\n" + body + "\n"
    following = re.search(r"^### ", text[heading.end():], flags=re.M)
    at = heading.end() + following.start() if following else len(text)
    return text[:at].rstrip("\n") + "\n\n" + body + "\n\n" + text[at:].lstrip("\n")


def node_blocks(text: str) -> dict:
    """``{teacher: block text}`` of the node blocks in a results file."""
    found = re.finditer(r"<!-- comfyui-node:(\w+) -->.*?<!-- /comfyui-node:\1 -->", text, flags=re.S)
    return {m.group(1): m.group(0) for m in found}


def keep_node_blocks(old: str, new: str) -> str:
    """A headless rerun's table ``new`` with the node blocks of the file it replaces (``old``) kept."""
    for teacher, block in node_blocks(old).items():
        new = insert_block(new, teacher, block.split("\n"))
    return new
