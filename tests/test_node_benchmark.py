"""benchmarks.defaults --host comfyui and benchmarks.node_speed (issue 21): the shapes teacher as a ComfyUI MODEL
computes the diffusers teacher's function, the node's run writes its checkpoints, its LoRA converted to the
trainer's PEFT keys samples (diffusers) what ComfyUI samples with the LoRA loaded by ComfyUI's loader, the
results block lands under its teacher and survives a headless rewrite, and the speed comparison runs. The same
for the flow teacher as a ComfyUI Flux MODEL (benchmarks/comfy_flux_teacher.py; measured x0 difference 5e-7, sampling
paths 4e-7), its fused-qkv LoRA split onto the trainer's PEFT q/k/v modules.

Tolerances (fp32, CPU): x0 of the ComfyUI MODEL vs the diffusers UNet 1e-4 of the largest |x0| (measured 2e-6;
ComfyUI feeds x_t / a and sigma, the UNet sees t +- 1e-4 after ComfyUI's sigma -> t interpolation); 4-step
latents of the two sampling paths 1e-4 of the largest latent (measured ~2e-7 .. 1e-6)."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from benchmarks import comfy_teacher, defaults_node, node_distill

X0_RTOL = 1e-4
LATENT_RTOL = 1e-4


@pytest.fixture(scope="module")
def shapes(comfy, pack):
    from benchmarks.shapes_data import all_captions
    from benchmarks.train_text_teacher import DEFAULT_OUTPUT
    from training.models import load_family

    torch.set_num_threads(1)
    family = load_family(str(DEFAULT_OUTPUT))
    # what node_distill reads off an evaluator: the family, the scored prompts, the teacher folder
    return SimpleNamespace(family=family, prompts=all_captions(), model_dir=DEFAULT_OUTPUT, captions=all_captions,
                           prompts_file=lambda folder: _prompts_file(folder, all_captions()))


def _prompts_file(folder: Path, captions: list[str]) -> Path:
    path = folder / "prompts.txt"
    path.write_text("".join(f"{c}\n" for c in captions))
    return path


def test_the_comfyui_teacher_is_the_diffusers_teacher(shapes):
    patcher, _ = comfy_teacher.load_comfy_unet(Path(shapes.model_dir) / "unet")
    error = comfy_teacher.max_output_difference(patcher, shapes.family, shapes.prompts[:4])
    assert error < X0_RTOL, f"ComfyUI MODEL vs diffusers teacher x0: {error:.2e} of the largest |x0|"
    # ComfyUI's UNet as it comes (32 GroupNorm groups) is another function: the group count is what makes it the teacher
    comfy_teacher.set_group_norm_groups_(patcher.model.diffusion_model, 32)
    assert comfy_teacher.max_output_difference(patcher, shapes.family, shapes.prompts[:4]) > 0.1


@pytest.fixture(scope="module")
def node_run(shapes, tmp_path_factory):
    folder = tmp_path_factory.mktemp("node") / "node_seed0"
    return node_distill.distil(shapes, 3.0, folder, 0, (1, 2), log=lambda m: None)


def test_the_node_run_keeps_each_checkpoint_and_is_not_rerun(node_run, shapes):
    summary = json.loads((node_run / "summary.json").read_text())
    assert len(summary["history"]) == 2 and "batch_size=8" in summary["options"] and "cfg=3.0" in summary["options"]
    first, second = node_distill.student_lora(node_run, 1), node_distill.student_lora(node_run, 2)
    assert set(first) == set(second) and any(k.endswith(".lora_up.weight") for k in first)
    # the warm-up gives the first update learning rate 0; the second moves the student
    assert all(first[k].abs().max() == 0 for k in first if k.endswith(".lora_up.weight"))
    assert any(second[k].abs().max() > 0 for k in second if k.endswith(".lora_up.weight"))
    before = (node_run / "summary.json").stat().st_mtime_ns
    assert node_distill.distil(shapes, 3.0, node_run, 0, (1, 2), log=lambda m: None) == node_run
    assert (node_run / "summary.json").stat().st_mtime_ns == before


def moved_lora(lora: dict, seed: int = 3) -> dict:
    """The run's LoRA with every up matrix randomised, so the student is far from the teacher."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * 0.05 if k.endswith(".lora_up.weight") else v for k, v in lora.items()}


def test_the_evaluator_samples_the_node_student(node_run, shapes):
    from benchmarks.defaults_eval import _default_rank_alpha

    lora = moved_lora(node_distill.student_lora(node_run, 2))
    _, to_ldm = comfy_teacher.load_comfy_unet(Path(shapes.model_dir) / "unet")
    adapter = comfy_teacher.peft_state_from_comfy_lora(lora, to_ldm, _default_rank_alpha()[1])
    assert len(adapter) == len(lora) // 3 * 2  # every module's down and up, alphas folded in
    check = node_distill.sampling_paths_difference(shapes, lora, adapter, [899, 674, 449, 224], num=4)
    assert check["vs_teacher"] > 100 * LATENT_RTOL, f"the LoRA did not change the ComfyUI samples: {check}"
    assert check["vs_diffusers_student"] < LATENT_RTOL, f"ComfyUI and the evaluator sample different students: {check}"


@pytest.fixture(scope="module")
def flow(comfy, pack):
    from benchmarks.shapes_data import all_captions
    from benchmarks.train_flow_teacher import DEFAULT_OUTPUT
    from training.models import load_family

    torch.set_num_threads(1)
    family = load_family(str(DEFAULT_OUTPUT))
    return SimpleNamespace(family=family, prompts=all_captions(), model_dir=DEFAULT_OUTPUT, captions=all_captions,
                           prompts_file=lambda folder: _prompts_file(folder, all_captions()))


def test_the_comfyui_flux_teacher_is_the_diffusers_flow_teacher(flow):
    from benchmarks import comfy_flux_teacher

    distill = comfy_teacher.pack_module("distill")
    patcher, _ = comfy_teacher.load_teacher(flow.family, Path(flow.model_dir))
    assert type(patcher.model.diffusion_model).__name__ == "Flux"
    error = comfy_teacher.max_output_difference(patcher, flow.family, flow.prompts[:4])
    assert error < X0_RTOL, f"ComfyUI Flux MODEL vs diffusers flow teacher x0: {error:.2e} of the largest |x0|"
    # the node trains on the teacher's 4-channel latent (Flux's own latent format would widen it to 16 channels)
    assert distill.sampled_latent_shape(patcher, flow.family.latent_shape(1)) == flow.family.latent_shape(1)
    # the schedule matters: FluxSchnell's stock shift 1 instead of the trainer's exp(mu) is another teacher
    unshifted, _ = comfy_flux_teacher.load_comfy_flux(Path(flow.model_dir), 1.0)
    assert comfy_teacher.max_output_difference(unshifted, flow.family, flow.prompts[:4]) > 0.01


@pytest.fixture(scope="module")
def flow_node_run(flow, tmp_path_factory):
    folder = tmp_path_factory.mktemp("flow_node") / "node_seed0"
    return node_distill.distil(flow, 3.0, folder, 0, (2,), log=lambda m: None)


def test_the_evaluator_samples_the_node_flux_student(flow_node_run, flow):
    from benchmarks import comfy_flux_teacher
    from benchmarks.defaults_eval import _default_rank_alpha

    lora = moved_lora(node_distill.student_lora(flow_node_run, 2))
    _, to_peft = comfy_teacher.load_teacher(flow.family, Path(flow.model_dir))
    adapter = to_peft(lora, _default_rank_alpha()[1])
    targets = comfy_flux_teacher.peft_shapes_of(Path(flow.model_dir) / "transformer", flow.family.lora_target_modules)
    assert {k.rsplit(".lora_", 1)[0] for k in adapter} == set(targets)  # every module the trainer adapts, nothing else
    assert adapter["proj_out.lora_B.weight"].abs().max() > 0  # the final layer: both hosts adapt it (tdm_core.lora_targets)
    check = node_distill.sampling_paths_difference(flow, lora, adapter, [899, 674, 449, 224], num=4)
    assert check["vs_teacher"] > 100 * LATENT_RTOL, f"the LoRA did not change the ComfyUI samples: {check}"
    assert check["vs_diffusers_student"] < LATENT_RTOL, f"ComfyUI and the evaluator sample different students: {check}"


SECTIONS = "# T\n\nintro\n\n### shapes: x\n\n| a |\n\ntext\n\n### flow: y\n\n| b |\n"
HEADLESS_ROW = "| TDM K=4, defaults, 500 it. | 4 | {} ± 11.6 | {} ± 44.1 | 0.976 ± 0.004 | 3 |"


def test_the_published_headless_row_is_read_from_its_teacher_section():
    text = SECTIONS.replace("| a |", HEADLESS_ROW.format("86.8", "70.6")).replace("| b |", HEADLESS_ROW.format("111.2", "175.6"))
    assert defaults_node.published_row(text, "shapes", 500) == {"fd_real": 86.8, "fd_teacher": 70.6, "runs": 3}
    assert defaults_node.published_row(text, "flow", 500) == {"fd_real": 111.2, "fd_teacher": 175.6, "runs": 3}
    assert defaults_node.published_row(text, "shapes", 250) == {}


def test_the_node_block_goes_under_its_teacher_and_survives_a_headless_rewrite():
    block = ["<!-- comfyui-node:shapes -->", "#### shapes: node", "rows 1", "<!-- /comfyui-node:shapes -->"]
    text = defaults_node.insert_block(SECTIONS, "shapes", block)
    assert text.index("rows 1") > text.index("text") and text.index("rows 1") < text.index("### flow")
    again = defaults_node.insert_block(text, "shapes", [*block[:2], "rows 2", block[-1]])
    assert "rows 1" not in again and again.count("comfyui-node:shapes -->") == 2 and again.index("rows 2") < again.index("### flow")
    rewritten = defaults_node.keep_node_blocks(again, SECTIONS.replace("| a |", "| a2 |"))
    assert "| a2 |" in rewritten and "rows 2" in rewritten and rewritten.index("rows 2") < rewritten.index("### flow")


def test_the_speed_verdict_needs_the_whole_interval_on_one_side_of_the_target():
    from benchmarks import node_speed

    close = node_speed.ratio_interval([1.0, 1.2, 1.05, 1.15, 0.95], [1.0] * 5)
    assert close[0] < node_speed.TARGET < close[1] and node_speed.verdict_of(*close).startswith("not decided")
    assert node_speed.verdict_of(*node_speed.ratio_interval([0.9, 0.95, 1.0, 0.92], [1.0] * 4)) == "holds"
    assert node_speed.verdict_of(*node_speed.ratio_interval([1.3, 1.4, 1.35], [1.0] * 3)) == "missed"


def test_the_speed_comparison_times_both_hosts():
    from benchmarks import node_speed

    result = node_speed.measure(rounds=1, warmup=0, batch_size=2, profile_rounds=1)
    assert all(len(result["times"][name]) == 1 and result["times"][name][0][0] > 0 for name in ("trainer", "node"))
    text = node_speed.section(result, "python -m benchmarks.node_speed --rounds 1")
    assert "Node / trainer, median of the per-round ratios: **" in text and "`python -m benchmarks.node_speed --rounds 1`" in text
    # every part of the profile table was found in the profile (a renamed function would read 0)
    assert all(seconds > 0 for name in ("trainer", "node") for _, seconds in result["split"][name]), result["split"]
    # a rerun replaces its own section, other sections stay
    once = node_speed.replace_section("# S\n\n## other\n\nx\n", text)
    twice = node_speed.replace_section(once + "\n## after\n\ny\n", text.replace("**", "__"))
    assert twice.count(node_speed.SECTION_HEADING) == 1 and "__" in twice and "## other" in twice and "## after" in twice


@pytest.mark.slow
def test_defaults_host_comfyui_writes_node_rows(tmp_path):
    from benchmarks import defaults

    output = tmp_path / "R.md"
    output.write_text(SECTIONS)
    argv = ["--host", "comfyui", "--teachers", "shapes,flow", "--seeds", "0", "--iterations", "1,2", "--num-eval", "20",
            "--work", str(tmp_path / "work"), "--output", str(output)]
    assert defaults.main(argv) == 0
    text = output.read_text()
    assert "python -m benchmarks.defaults --host comfyui --teachers shapes,flow" in text
    for teacher in ("shapes", "flow"):
        block = text[text.index(f"<!-- comfyui-node:{teacher} -->"):text.index(f"<!-- /comfyui-node:{teacher} -->")]
        for needle in ("| TDM Distill node (ComfyUI), defaults, batch 8, 1 it. | 4 |", "| TDM Distill node (ComfyUI), defaults, batch 8, 2 it. | 4 |",
                       "Sampling check:"):
            assert needle in block, (teacher, needle)
        rows = [line for line in block.split("\n") if line.startswith("| TDM Distill node")]
        assert len(rows) == 2 and all(" ± " in row and "not measured" not in row for row in rows), rows
    assert "benchmarks/comfy_flux_teacher.py" in text[text.index("<!-- comfyui-node:flow -->"):]
    assert text.index("<!-- /comfyui-node:shapes -->") < text.index("### flow") < text.index("<!-- comfyui-node:flow -->")
