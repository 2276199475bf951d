"""The one real ComfyUI server the slow end-to-end tests share (server and browser tests alike).

Starting ComfyUI and loading the 2 GB checkpoint cost ~20 s, so the first test that asks starts it
and it lives until the pytest process exits (a module-level singleton, because a session fixture
would have to live in the root conftest.py). Everything it serves is set up before start-up, so
the COMBO lists the server validates against already hold every file the tests use.
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from tests.helpers.checkpoints import sd15_checkpoint, sd15_slim_checkpoint, write_kohya_lora
from tests.helpers.comfy_server import PROJECT_ROOT, ComfyServer, prepare_base_dir
from tests.helpers import workflow_builder as names
from tests.helpers.distill_workflows import WAN22_5B_FILES, WAN22_A14B_FILES

WORKFLOWS_DIR = PROJECT_ROOT / "workflows"
TEST_CHECKPOINT = "tdm_test_sd15.safetensors"
TEST_SLIM_CHECKPOINT = "tdm_test_sd15_slim.safetensors"  # for TDM Distill: trains in seconds per iteration
TEST_LORA = "tdm_test_sd15_lora.safetensors"
TRUNCATED_LORA = "tdm_truncated_lora.safetensors"
PICKLE_LORA = "tdm_pickle_with_code.pt"
PICKLE_MARKER = "pickle_code_ran.marker"
TDM_NODE_TYPES = ("TDMScheduler", "TDMSampler", "TDMKSampler", "TDMLoraLoader")


@dataclass
class E2EServer:
    server: ComfyServer
    base_dir: Path

    @property
    def marker_path(self) -> Path:
        return self.base_dir / PICKLE_MARKER


class _CreatesMarkerWhenUnpickled:
    """A pickle payload: unpickling it calls ``open(path, "w")``, i.e. runs code and leaves a file."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def write_pickle_with_code(path: Path, marker: Path) -> Path:
    import torch

    payload = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": _CreatesMarkerWhenUnpickled(str(marker))}
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def write_truncated_copy(source: Path, target: Path, keep_fraction: float = 0.5) -> Path:
    data = source.read_bytes()
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_bytes(data[: int(len(data) * keep_fraction)])
    os.replace(tmp, target)
    return target


def write_test_image(path: Path, size: int = 64) -> Path:
    import numpy as np
    from PIL import Image

    # a smooth colour ramp: a real image, not noise, for the img2img workflow
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    pixels = np.stack([np.tile(ramp, (size, 1)), np.tile(ramp[:, None], (1, size)), np.full((size, size), 128.0)], -1)
    tmp = path.with_name(f".{path.name}.tmp.png")
    Image.fromarray(pixels.astype(np.uint8)).save(tmp)
    os.replace(tmp, path)
    return path


SD15_CHECKPOINTS = (names.SD15_CKPT, names.DREAMSHAPER_CKPT)  # the test checkpoint stands in for both


def write_release_pt(lora: Path, target: Path) -> Path:
    """The released Dreamshaper TDM LoRA's structure: the kohya tensors ``torch.save``d as a .pt, no metadata."""
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(str(lora)), target)
    return target


def populate_base_dir(base_dir: Path) -> None:
    """The test's own checkpoint and LoRA, the same files under the names the SD1.5 workflows use (so
    the browser can queue a workflow as shipped), empty stand-ins for the other architectures' files
    (validation only checks names), the bad LoRA files, and the img2img input image."""
    checkpoints, loras = base_dir / "models" / "checkpoints", base_dir / "models" / "loras"
    checkpoint = sd15_checkpoint()
    for name in (TEST_CHECKPOINT, *SD15_CHECKPOINTS):
        (checkpoints / name).symlink_to(checkpoint)
    (checkpoints / TEST_SLIM_CHECKPOINT).symlink_to(sd15_slim_checkpoint())
    lora = write_kohya_lora(loras / TEST_LORA, rank=4, seed=0)
    shutil.copyfile(lora, loras / names.SD15_LORA)
    write_release_pt(lora, loras / names.DREAMSHAPER_LORA)
    for folder, name in ((checkpoints, names.SDXL_CKPT), (checkpoints, names.SD3_CKPT), (checkpoints, names.SD35_CKPT),
                         (loras, names.SDXL_LORA), (loras, names.SD3_LORA), (loras, names.SD35_LORA)):
        (folder / name).write_bytes(b"")
    for folder, name in (*names.FLUX_FILES, *names.ZIMAGE_FILES, *names.TDMR1_FILES, *names.QWEN_FILES, *names.WAN_FILES, *WAN22_5B_FILES, *WAN22_A14B_FILES):  # ComfyUI's split layout: diffusion model, text encoders, VAE
        (base_dir / "models" / folder).mkdir(parents=True, exist_ok=True)
        (base_dir / "models" / folder / name).write_bytes(b"")
    write_truncated_copy(lora, loras / TRUNCATED_LORA)
    write_pickle_with_code(loras / PICKLE_LORA, base_dir / PICKLE_MARKER)
    write_test_image(base_dir / "input" / names.INPUT_IMAGE)


_shared: Optional[E2EServer] = None


def shared_e2e_server() -> E2EServer:
    global _shared
    if _shared is None or _shared.server.process.poll() is not None:
        base_dir = Path(tempfile.mkdtemp(prefix="tdm-comfy-e2e-"))
        prepare_base_dir(base_dir)
        populate_base_dir(base_dir)
        server = ComfyServer.start(base_dir)
        _shared = E2EServer(server=server, base_dir=base_dir)
        atexit.register(_stop, _shared)
    return _shared


def _stop(e2e: E2EServer) -> None:
    e2e.server.stop()
    shutil.rmtree(e2e.base_dir, ignore_errors=True)


def workflow_files() -> list[Path]:
    return sorted(WORKFLOWS_DIR.glob("*.json"))


def load_workflow(path: Path) -> dict:
    return json.loads(path.read_text())


def checkpoint_names(workflow: dict) -> set[str]:
    return {node["widgets_values"][0] for node in workflow["nodes"] if node["type"] == "CheckpointLoaderSimple"}


def is_sd15_workflow(workflow: dict) -> bool:
    return bool(checkpoint_names(workflow)) and checkpoint_names(workflow) <= set(SD15_CHECKPOINTS)


def is_distill_workflow(workflow: dict) -> bool:
    return any(node["type"] == "TDMDistill" for node in workflow["nodes"])
