"""Issue 3, test group 3: the pack inside a real ComfyUI 0.3.75 server (``main.py --cpu``).

A random-weight SD1.5-architecture checkpoint (cached per machine) and a random kohya TDM LoRA run
through every SD1.5 workflow in ``workflows/`` (the TDM Distill ones run in ``test_server_distill.py``); the SDXL and SD3 workflows pass ``/prompt``
validation; bad inputs get a validation or execution error and the server goes on serving.
"""
from __future__ import annotations

import itertools
import json

import pytest
from PIL import Image

from tests.helpers.comfy_server import execution_error
from tests.helpers.e2e_server import (
    PICKLE_LORA, TDM_NODE_TYPES, TEST_CHECKPOINT, TEST_LORA, TRUNCATED_LORA, is_distill_workflow, is_sd15_workflow, load_workflow,
    shared_e2e_server, workflow_files,
)
from tests.helpers.workflow_api import nodes_of_type, override_inputs, ui_to_api
from tests.helpers.workflow_builder import DREAMSHAPER_LORA

pytestmark = pytest.mark.slow

LATENT_SIZE = 64
# loader -> how many of its first widgets are model file names
MODEL_FILE_LOADERS = {"CheckpointLoaderSimple": 1, "TDMLoraLoader": 1, "UNETLoader": 1, "CLIPLoader": 1, "DualCLIPLoader": 2, "VAELoader": 1}
TEACHER_TEST_STEPS = 3
# a TDM Distill workflow trains for minutes even when shrunk: test_server_distill.py runs it, with few iterations
SD15_FILES = [p for p in workflow_files() if is_sd15_workflow(load_workflow(p)) and not is_distill_workflow(load_workflow(p))]
OTHER_FILES = [p for p in workflow_files() if not is_sd15_workflow(load_workflow(p))]


@pytest.fixture(scope="module")
def e2e():
    return shared_e2e_server()


@pytest.fixture(scope="module")
def object_info(e2e):
    return e2e.server.get_json("/object_info")


def small_sd15_prompt(workflow: dict, object_info: dict) -> dict:
    """The workflow in API format on the test's checkpoint and LoRA, with 64x64 latents."""
    prompt = ui_to_api(workflow, object_info)
    prompt = override_inputs(prompt, "CheckpointLoaderSimple", ckpt_name=TEST_CHECKPOINT)
    if nodes_of_type(prompt, "TDMLoraLoader") and not uses_release(prompt):
        prompt = override_inputs(prompt, "TDMLoraLoader", lora_name=TEST_LORA)
    if nodes_of_type(prompt, "EmptyLatentImage"):
        prompt = override_inputs(prompt, "EmptyLatentImage", width=LATENT_SIZE, height=LATENT_SIZE)
    if nodes_of_type(prompt, "KSampler"):
        # the teacher's 25 steps at CFG 7 are 50 UNet calls: too slow on a shared CPU, and the
        # graph is exercised just as well by a few
        prompt = override_inputs(prompt, "KSampler", steps=TEACHER_TEST_STEPS)
    return prompt


def uses_release(prompt: dict) -> bool:
    """Workflows of a released LoRA keep its file: the server holds one with the release's structure."""
    return any(node["inputs"]["lora_name"] == DREAMSHAPER_LORA for node in nodes_of_type(prompt, "TDMLoraLoader"))


@pytest.fixture(scope="module")
def quick_prompt(object_info):
    """A known-good one-step prompt, run after every bad input to show the server still serves."""
    prompt = small_sd15_prompt(load_workflow(workflow_path("sd15_tdm_ksampler")), object_info)
    return override_inputs(prompt, "TDMKSampler", steps=1)


def workflow_path(name: str):
    return next(p for p in workflow_files() if p.stem == name)


_fresh_seeds = itertools.count(1000)


def assert_server_still_serves(e2e, prompt: dict) -> None:
    # a new seed each time: ComfyUI serves an unchanged prompt from its cache without running it
    prompt = override_inputs(prompt, "TDMKSampler", seed=next(_fresh_seeds))
    entry = e2e.server.run_prompt(prompt)
    assert entry["status"]["status_str"] == "success", execution_error(entry)
    images = e2e.server.output_files(entry)
    assert images and all(path.is_file() for path in images)


def node_id_of(prompt: dict, class_type: str) -> str:
    return next(node_id for node_id, node in prompt.items() if node["class_type"] == class_type)


# --- the nodes on the server ---------------------------------------------------------------
def test_tdm_nodes_are_registered_with_tooltips_and_descriptions(object_info):
    expected_inputs = {
        "TDMScheduler": {"model", "steps", "grid", "custom_timesteps", "denoise"},
        "TDMSampler": {"solver", "gamma", "noise_start"},
        "TDMKSampler": {"model", "seed", "steps", "grid", "cfg", "positive", "negative", "latent_image", "denoise"},
        "TDMLoraLoader": {"model", "clip", "lora_name", "strength_model", "use_recommended_strength", "strength_clip"},
    }
    for node_type in TDM_NODE_TYPES:
        info = object_info[node_type]
        inputs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        assert set(inputs) == expected_inputs[node_type], node_type
        assert info["description"].strip(), f"{node_type} has no DESCRIPTION"
        missing = [name for name, spec in inputs.items() if not (len(spec) > 1 and spec[1].get("tooltip"))]
        assert not missing, f"{node_type} inputs without tooltip: {missing}"
    assert object_info["TDMScheduler"]["output"] == ["SIGMAS"]
    assert object_info["TDMSampler"]["output"] == ["SAMPLER"]
    assert object_info["TDMKSampler"]["output"] == ["LATENT"]
    assert object_info["TDMLoraLoader"]["output"][0] == "MODEL"
    steps = object_info["TDMScheduler"]["input"]["required"]["steps"][1]
    assert (steps["min"], steps["max"], steps["default"]) == (1, 8, 4)
    # the LoRA list is the server's models/loras folder, read through folder_paths
    lora_choices = object_info["TDMLoraLoader"]["input"]["required"]["lora_name"][1]["options"]
    assert TEST_LORA in lora_choices and PICKLE_LORA in lora_choices


def test_committed_workflows_are_what_the_builder_makes_on_this_server(object_info):
    # the JSON users drag in is regenerated from the live node schemas (python -m tests.helpers.workflow_builder):
    # a node input added or changed without regenerating shifts widgets_values and breaks the file in the frontend
    from tests.helpers.workflow_builder import WORKFLOWS_DIR, all_workflows

    stale = [name for name, build in all_workflows().items()
             if json.loads((WORKFLOWS_DIR / f"{name}.json").read_text()) != json.loads(json.dumps(build(object_info)))]
    assert not stale, f"regenerate with `python -m tests.helpers.workflow_builder`: {stale}"


def test_workflows_are_served_to_the_template_browser(e2e):
    templates = e2e.server.get_json("/api/workflow_templates")
    pack_templates = next(v for k, v in templates.items() if k == "comfyui-tdm")
    assert sorted(pack_templates) == sorted(p.stem for p in workflow_files())
    assert len(pack_templates) >= 6
    for path in workflow_files():
        served = e2e.server.get_json(f"/api/workflow_templates/comfyui-tdm/{path.name}")
        assert served == json.loads(path.read_text())


def test_every_workflow_names_its_model_files_in_a_note():
    for path in workflow_files():
        workflow = load_workflow(path)
        notes = " ".join(n["widgets_values"][0] for n in workflow["nodes"] if n["type"] in ("Note", "MarkdownNote"))
        for node in workflow["nodes"]:
            if node["type"] in MODEL_FILE_LOADERS:  # every file name a loader widget holds
                for name in node["widgets_values"][:MODEL_FILE_LOADERS[node["type"]]]:
                    assert name in notes, f"{path.name}: {name} not in a note"
        assert any(n["type"] in ("SaveImage", "SaveAnimatedWEBP", "SaveVideo") for n in workflow["nodes"]), path.name  # Wan: a video


TITLE_BAR = 30  # the frontend draws a node's title above its pos


def overlapping_nodes(workflow: dict) -> list[tuple[str, str]]:
    boxes = [(n.get("title", n["type"]), n["pos"][0], n["pos"][1] - TITLE_BAR, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
             for n in workflow["nodes"]]
    return [(a[0], b[0]) for i, a in enumerate(boxes) for b in boxes[i + 1:] if a[1] < b[3] and b[1] < a[3] and a[2] < b[4] and b[2] < a[4]]


def test_distill_workflows_have_no_overlapping_nodes():
    # the frontend keeps the sizes the builder writes; the README shows the SD1.5 one
    for path in workflow_files():
        if is_distill_workflow(load_workflow(path)):
            assert overlapping_nodes(load_workflow(path)) == [], path.name


# --- the workflows run -----------------------------------------------------------------------
@pytest.mark.parametrize("path", SD15_FILES, ids=lambda p: p.stem)
def test_sd15_workflow_runs_and_writes_images(e2e, object_info, path):
    workflow = load_workflow(path)
    prompt = small_sd15_prompt(workflow, object_info)
    entry = e2e.server.run_prompt(prompt)
    assert entry["status"]["status_str"] == "success", execution_error(entry)
    images = e2e.server.output_files(entry)
    save_nodes = [n for n in workflow["nodes"] if n["type"] == "SaveImage"]
    assert len(images) == len(save_nodes) >= 1
    for image_path in images:
        with Image.open(image_path) as image:
            assert image.size == (LATENT_SIZE, LATENT_SIZE)
    if uses_release(prompt):  # the loader recognised the .pt and says what it applied (PreviewAny shows it)
        shown = [o["text"][0] for o in entry["outputs"].values() if "text" in o]
        assert shown and shown[0].startswith("TDM Dreamshaper-v7 LoRA (SD1.5): strength 1, dpmpp_2m at timesteps [801, 601, 401, 201]"), shown


def test_sd15_workflows_cover_the_four_shapes():
    assert {p.stem for p in SD15_FILES} >= {"sd15_tdm_ksampler", "sd15_tdm_sampler_custom", "sd15_teacher_vs_tdm", "sd15_img2img"}


@pytest.mark.parametrize("path", OTHER_FILES, ids=lambda p: p.stem)
def test_other_architecture_workflow_passes_validation(e2e, object_info, quick_prompt, path):
    # the server holds empty files under the expected names: validation checks names, loading fails
    prompt = ui_to_api(load_workflow(path), object_info)
    status, body = e2e.server.post_prompt(prompt)
    assert status == 200, body
    assert body["node_errors"] == {}
    entry = e2e.server.wait_for_history(body["prompt_id"])
    assert entry["status"]["status_str"] == "error"
    assert execution_error(entry)["node_type"] in {"CheckpointLoaderSimple", "UNETLoader", "DualCLIPLoader", "CLIPLoader", "VAELoader"}
    assert_server_still_serves(e2e, quick_prompt)


# --- bad inputs ------------------------------------------------------------------------------
@pytest.mark.parametrize("node_type", ["TDMKSampler", "TDMScheduler"])
def test_zero_steps_is_rejected_by_validation(e2e, object_info, quick_prompt, node_type):
    workflow = "sd15_tdm_ksampler" if node_type == "TDMKSampler" else "sd15_tdm_sampler_custom"
    prompt = small_sd15_prompt(load_workflow(workflow_path(workflow)), object_info)
    prompt = override_inputs(prompt, node_type, steps=0)
    status, body = e2e.server.post_prompt(prompt)
    assert status == 400
    errors = body["node_errors"][node_id_of(prompt, node_type)]["errors"]
    assert [(e["type"], e["extra_info"]["input_name"]) for e in errors] == [("value_smaller_than_min", "steps")]
    assert_server_still_serves(e2e, quick_prompt)


# ComfyUI 0.3.75 checks V1 COMBO values itself (value_not_in_list) but not those of V3 Combo inputs,
# which a V3 node checks in its validate_inputs (custom_validation_failed): either way a 400
NAME_REJECTIONS = {"value_not_in_list", "custom_validation_failed"}


@pytest.mark.parametrize("lora_name", ["no_such_lora.safetensors", "../checkpoints/" + TEST_CHECKPOINT,
                                       "../loras/" + TEST_LORA, "../../../../etc/passwd", "/etc/passwd"])
def test_lora_name_outside_the_list_is_rejected(e2e, quick_prompt, lora_name):
    prompt = override_inputs(quick_prompt, "TDMLoraLoader", lora_name=lora_name)
    status, body = e2e.server.post_prompt(prompt)
    assert status == 400, f"{lora_name!r} was accepted by /prompt: {body}"
    errors = body["node_errors"][node_id_of(prompt, "TDMLoraLoader")]["errors"]
    assert len(errors) == 1 and errors[0]["type"] in NAME_REJECTIONS, errors
    assert "lora_name" in json.dumps(errors[0]) or lora_name in json.dumps(errors[0])
    assert_server_still_serves(e2e, quick_prompt)


@pytest.mark.parametrize("ckpt_name", ["../loras/" + TEST_LORA, "../../../../etc/passwd"])
def test_checkpoint_name_with_parent_folder_is_rejected(e2e, quick_prompt, ckpt_name):
    prompt = override_inputs(quick_prompt, "CheckpointLoaderSimple", ckpt_name=ckpt_name)
    status, body = e2e.server.post_prompt(prompt)
    assert status == 400
    errors = body["node_errors"][node_id_of(prompt, "CheckpointLoaderSimple")]["errors"]
    assert [e["type"] for e in errors] == ["value_not_in_list"]


def test_truncated_lora_file_is_a_clear_execution_error(e2e, quick_prompt):
    prompt = override_inputs(quick_prompt, "TDMLoraLoader", lora_name=TRUNCATED_LORA)
    entry = e2e.server.run_prompt(prompt)
    assert entry["status"]["status_str"] == "error"
    error = execution_error(entry)
    assert error["node_type"] == "TDMLoraLoader"
    message = error["exception_message"]
    assert TRUNCATED_LORA in message, message  # names the file, so the user knows which one to replace
    assert "Traceback" not in message
    assert_server_still_serves(e2e, quick_prompt)


def test_pickle_with_code_is_refused_without_running_it(e2e, quick_prompt):
    assert not e2e.marker_path.exists()
    prompt = override_inputs(quick_prompt, "TDMLoraLoader", lora_name=PICKLE_LORA)
    entry = e2e.server.run_prompt(prompt)
    assert entry["status"]["status_str"] == "error"
    error = execution_error(entry)
    assert error["node_type"] == "TDMLoraLoader"
    assert PICKLE_LORA in error["exception_message"], error["exception_message"]
    assert not e2e.marker_path.exists(), "unpickling the .pt ran its code: the loader must load weights only"
    assert_server_still_serves(e2e, quick_prompt)
