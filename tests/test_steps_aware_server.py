"""The unify workflow in a real ComfyUI server: a steps-aware LoRA (random LoRA weights + K table for the
random SD1.5 test checkpoint) sampled at 1 and 4 steps through ``workflows/tdm_unify_1_and_4_steps.json``."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from tdm_core.metadata import TDMInfo
from tdm_core.steps_aware import K_EMBEDDING_KEY, MAX_K
from tests.helpers.checkpoints import write_kohya_lora
from tests.helpers.comfy_server import execution_error
from tests.helpers.e2e_server import TEST_CHECKPOINT, WORKFLOWS_DIR, load_workflow, shared_e2e_server
from tests.helpers.workflow_api import override_inputs, ui_to_api

pytestmark = pytest.mark.slow

WORKFLOW = "tdm_unify_1_and_4_steps.json"
SD15_TIME_EMBED_WIDTH = 1280  # 4 x 320 model channels


def write_unify_lora(folder, name: str, width: int = SD15_TIME_EMBED_WIDTH) -> None:
    """Random kohya LoRA weights for the test checkpoint plus a random K table of ``width``."""
    from safetensors.torch import load_file, save_file

    info = TDMInfo(num_steps=4, grid=[], base_family="sd15", lora_rank=4, lora_alpha=4.0, k_choices=[1, 2, 4])
    weights = write_kohya_lora(folder / f".{name}.weights", rank=4, seed=3, tdm_info=info)
    table = torch.randn(MAX_K, width, generator=torch.Generator().manual_seed(5))
    tmp = folder / f".{name}.tmp"
    save_file({**load_file(str(weights)), K_EMBEDDING_KEY: table.half()}, str(tmp), metadata=info.to_safetensors_metadata())
    weights.unlink()
    tmp.rename(folder / name)


def unify_prompt(object_info: dict, lora_name: str) -> dict:
    prompt = ui_to_api(load_workflow(WORKFLOWS_DIR / WORKFLOW), object_info)
    prompt = override_inputs(prompt, "CheckpointLoaderSimple", ckpt_name=TEST_CHECKPOINT)
    prompt = override_inputs(prompt, "TDMLoraLoader", lora_name=lora_name)
    return override_inputs(prompt, "EmptyLatentImage", width=64, height=64)


def test_unify_workflow_runs_with_a_steps_aware_lora_and_refuses_a_foreign_table():
    e2e = shared_e2e_server()
    loras = e2e.base_dir / "models" / "loras"
    write_unify_lora(loras, "tdm_test_unify_lora.safetensors")
    write_unify_lora(loras, "tdm_test_unify_sdxl_width.safetensors", width=1536)  # an SDXL-width table
    object_info = e2e.server.get_json("/object_info")

    entry = e2e.server.run_prompt(unify_prompt(object_info, "tdm_test_unify_lora.safetensors"))
    assert entry["status"]["status_str"] == "success", execution_error(entry)
    names = sorted(path.name for path in e2e.server.output_files(entry))
    assert [n.split("_0")[0] for n in names] == ["tdm_unify_1step", "tdm_unify_4step"]
    for path in e2e.server.output_files(entry):
        with Image.open(path) as image:
            assert image.size == (64, 64)
    assert "K-embedding for K in [1, 2, 4] installed" in (e2e.base_dir / "comfyui.log").read_text()

    entry = e2e.server.run_prompt(unify_prompt(object_info, "tdm_test_unify_sdxl_width.safetensors"))
    error = execution_error(entry)
    assert entry["status"]["status_str"] == "error" and error["node_type"] == "TDMLoraLoader"
    assert "K-embedding has width 1536 but this model's timestep embedding has width 1280" in error["exception_message"]
