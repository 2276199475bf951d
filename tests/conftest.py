"""Shared fixtures: in-process ComfyUI (CPU, one thread) and the TDM pack loaded like ComfyUI loads it."""
from __future__ import annotations

import pytest
import torch

from tests.helpers import comfy_inprocess


@pytest.fixture(scope="session")
def comfy():
    """ComfyUI's modules imported in-process on the CPU."""
    torch.set_num_threads(1)
    comfy_inprocess.setup_comfy()
    import comfy.model_management

    return comfy


@pytest.fixture(scope="session")
def pack(comfy):
    """The pack's ``nodes`` package, imported as ComfyUI would import the custom node folder."""
    return comfy_inprocess.load_pack()


@pytest.fixture(scope="session")
def tiny_model(comfy):
    """``tiny_model(kind)``: a cached tiny ComfyUI MODEL (sd15_eps, sd15_v, sd3_flow, flux)."""
    cache = {}

    def get(kind: str):
        if kind not in cache:
            cache[kind] = comfy_inprocess.build_model(kind, seed=len(cache) + 11)
        return cache[kind]

    return get


@pytest.fixture
def lora_folder(comfy, tmp_path):
    """An empty ``models/loras`` folder that ComfyUI's folder_paths lists."""
    folder = tmp_path / "loras"
    folder.mkdir()
    comfy_inprocess.set_lora_folder(folder)
    return folder
