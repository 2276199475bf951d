"""Issue 21, real server: the SD1.5 TDM Distill workflow (``workflows/sd15_tdm_distill.json``) inside a real
ComfyUI 0.3.75 server (``main.py --cpu``), on the slim random-weight SD1.5-architecture test checkpoint
(SD1.5's widths, detected as SD15 by ComfyUI, two UNet levels: the full UNet takes minutes per iteration on
a shared CPU).

Shrunk to a CPU's size (64 px, batch 1, a few iterations, the teacher at 3 steps), the workflow runs to
success: the teacher and student images are saved, the LoRA is written to the server's ``models/loras`` with
its TDM metadata, and no checkpoint is left behind. ``POST /interrupt`` mid-run keeps the checkpoint;
queueing the same prompt again resumes from it, finishes with fewer iterations, equals the uninterrupted
run's LoRA bit for bit and deletes the checkpoint.
"""
from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from tests.helpers.comfy_server import execution_error
from tests.helpers.e2e_server import TEST_SLIM_CHECKPOINT, is_distill_workflow, is_sd15_workflow, load_workflow, shared_e2e_server, workflow_files
from tests.helpers.workflow_api import override_inputs
from tests.test_server_e2e import LATENT_SIZE, small_sd15_prompt

pytestmark = pytest.mark.slow

ITERATIONS = 3
DISTILL_FILES = [p for p in workflow_files() if is_sd15_workflow(load_workflow(p)) and is_distill_workflow(load_workflow(p))]
PLAIN_LORA, RESUMED_LORA = "e2e_distill_plain", "e2e_distill_resumed"
RUN_TIMEOUT_S = 480  # the plain run took 237 s on a 2-core machine at load 6
ONE_PROMPT = "a photo of a red fox in a snowy forest"


@pytest.fixture(scope="module")
def e2e():
    return shared_e2e_server()


@pytest.fixture(scope="module")
def object_info(e2e):
    return e2e.server.get_json("/object_info")


def distill_prompt(workflow: dict, object_info: dict, lora_name: str) -> dict:
    """The workflow on the slim test checkpoint at 64 px, one prompt (the probe and the end's fidelity table
    sample every prompt of the list), TDM Distill at batch 1 for a few iterations, a checkpoint after each."""
    prompt = override_inputs(small_sd15_prompt(workflow, object_info), "CheckpointLoaderSimple", ckpt_name=TEST_SLIM_CHECKPOINT)
    prompt = override_inputs(prompt, "TDMPromptList", text=ONE_PROMPT)
    return override_inputs(prompt, "TDMDistill", iterations=ITERATIONS, batch_size=1, checkpoint_every=1, lora_name=lora_name)


def failure(entry: dict) -> str:
    error = execution_error(entry) or {}
    return f"{error.get('node_type')}: {error.get('exception_message')}\n{''.join(error.get('traceback', [])[-3:])}"


def loras_dir(e2e) -> Path:
    return e2e.base_dir / "models" / "loras"


def shown_texts(entry: dict) -> list[str]:
    """What the prompt's PreviewAny nodes showed (the report)."""
    return [text for output in entry["outputs"].values() for text in output.get("text", [])]


def lora_tensors(path: Path) -> tuple[dict, dict]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def wait_for_file(path: Path, e2e, timeout_s: float = RUN_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < deadline, f"{path.name} did not appear within {timeout_s} s:\n{e2e.server.log_tail()}"
        assert e2e.server.process.poll() is None, e2e.server.log_tail()
        time.sleep(0.1)


@pytest.fixture(scope="module")
def plain_run(e2e, object_info):
    """The uninterrupted run: its history entry and wall time."""
    assert [p.stem for p in DISTILL_FILES] == ["sd15_tdm_distill"]
    start = time.monotonic()
    entry = e2e.server.run_prompt(distill_prompt(load_workflow(DISTILL_FILES[0]), object_info, PLAIN_LORA), timeout_s=RUN_TIMEOUT_S)
    return entry, time.monotonic() - start


def test_distill_workflow_saves_teacher_and_student_images_and_the_lora(e2e, plain_run):
    entry, seconds = plain_run
    assert entry["status"]["status_str"] == "success", failure(entry)
    images = e2e.server.output_files(entry)
    # SaveImage names files <prefix>_<counter>_.png: tdm_sd15_distill_<who>_00001_.png
    assert sorted(re.fullmatch(r"tdm_sd15_distill_(\w+?)_\d+_\.png", p.name).group(1) for p in images) == ["student", "teacher"], images
    for path in images:
        with Image.open(path) as image:
            assert image.size == (LATENT_SIZE, LATENT_SIZE)
    plots = [i for o in entry["outputs"].values() for i in o.get("images", []) if i.get("type") == "temp"]
    assert len(plots) == 1, entry["outputs"]  # the loss plot's PreviewImage
    lora = loras_dir(e2e) / f"{PLAIN_LORA}.safetensors"
    tensors, metadata = lora_tensors(lora)
    assert tensors and all(torch.isfinite(t).all() for t in tensors.values())
    # lora_up starts at zero: nonzero means the student learnt (else the resume test below compares two nothings)
    assert max(float(t.abs().max()) for k, t in tensors.items() if k.endswith("lora_up.weight")) > 0
    assert metadata.get("tdm.num_steps") == "4" and metadata.get("tdm.training_steps") == str(ITERATIONS), metadata
    assert not (loras_dir(e2e) / f"{PLAIN_LORA}.tdmckpt").exists(), "a finished run must delete its checkpoint"
    report = shown_texts(entry)
    assert len(report) == 1 and report[0].startswith(f"TDM Distill: {ITERATIONS} iterations"), report
    assert str(lora) in report[0]
    print(f"\nsd15_tdm_distill, {ITERATIONS} iterations at 64 px batch 1 + teacher 3 steps + student 4 steps: {seconds:.1f} s")


def test_interrupt_keeps_the_checkpoint_and_queueing_again_resumes_to_the_same_lora(e2e, object_info, plain_run):
    prompt = distill_prompt(load_workflow(DISTILL_FILES[0]), object_info, RESUMED_LORA)
    checkpoint = loras_dir(e2e) / f"{RESUMED_LORA}.tdmckpt"
    prompt_id = e2e.server.queue_prompt(prompt)
    wait_for_file(checkpoint, e2e)  # checkpoint_every 1: there after the first iteration
    status, body = e2e.server.request("POST", "/interrupt", {})
    assert status == 200, body
    entry = e2e.server.wait_for_history(prompt_id, timeout_s=RUN_TIMEOUT_S)
    assert entry["status"]["status_str"] == "error"
    assert any(name == "execution_interrupted" for name, _ in entry["status"]["messages"]), entry["status"]
    assert checkpoint.exists(), "Cancel must keep the checkpoint"
    saved_at = torch.load(checkpoint, weights_only=True)["iteration"]
    assert 1 <= saved_at < ITERATIONS, f"the interrupt came too late to test resuming (checkpoint at {saved_at})"
    assert not (loras_dir(e2e) / f"{RESUMED_LORA}.safetensors").exists()

    resumed = e2e.server.run_prompt(prompt, timeout_s=RUN_TIMEOUT_S)
    assert resumed["status"]["status_str"] == "success", failure(resumed)
    report = shown_texts(resumed)[0]
    match = re.search(r"Resumed from checkpoint \S+ at iteration (\d+)\.", report)
    assert match and int(match.group(1)) == saved_at, report
    assert not checkpoint.exists(), "the finished resumed run must delete its checkpoint"
    plain, _ = lora_tensors(loras_dir(e2e) / f"{PLAIN_LORA}.safetensors")
    again, _ = lora_tensors(loras_dir(e2e) / f"{RESUMED_LORA}.safetensors")
    assert plain.keys() == again.keys()
    different = [k for k in plain if not torch.equal(plain[k], again[k])]
    assert not different, f"the resumed LoRA differs from the uninterrupted run's in {len(different)} tensors, e.g. {different[:3]}"
