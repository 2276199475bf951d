"""The prompt-embedding cache (issue 20, defect 4): cached conditions live in host memory, never on the model's
device, and reach that device one batch at a time.

On a CPU-only machine the model's device is the host's, so the placement test puts the family on the "meta"
device (its text encoders stay on the CPU, as ``offload_text_encoders`` leaves them): every byte the cache keeps
must be on the CPU and every batch on ``meta``. With ``TDM_TEST_DEVICE=cuda`` the family loads on the GPU and
the test also measures ``torch.cuda.memory_allocated`` around caching the prompts.
"""
from __future__ import annotations

import os

import pytest
import torch

from tests.helpers.tiny_cogvideox import save_tiny_cogvideox
from tests.helpers.tiny_models import save_tiny_pipeline
from tests.helpers.tiny_qwen import save_tiny_qwen_pipeline
from tests.helpers.tiny_wan import save_tiny_wan_pipeline
from tests.helpers.tiny_zimage import save_tiny_zimage

torch.set_num_threads(1)
DEVICE = torch.device(os.environ.get("TDM_TEST_DEVICE", "cpu"))
PROMPTS = [f"prompt number {i}: a {colour} {thing}" for i, (colour, thing) in
           enumerate((c, t) for c in ("red", "blue", "green", "gold") for t in ("cat", "dog", "house", "tree"))]

SAVERS = {  # each family whose prompts reach the network through PipelineFamily.encode_prompts' cache
    "sd15": lambda folder: save_tiny_pipeline("sd15", folder),
    "sdxl": lambda folder: save_tiny_pipeline("sdxl", folder),  # pooled embeddings and time ids too
    "sd3": lambda folder: save_tiny_pipeline("sd3", folder),
    "pixart": lambda folder: save_tiny_pipeline("pixart", folder),
    "flux": lambda folder: save_tiny_pipeline("flux", folder),
    "wan": save_tiny_wan_pipeline,
    "cogvideox": save_tiny_cogvideox,
    "qwen_image": save_tiny_qwen_pipeline,  # the cache keeps each prompt's valid tokens only
    "z_image": save_tiny_zimage,  # the same, as a list of per-prompt lengths
}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def cached_tensors(cache) -> list[torch.Tensor]:
    """Every tensor the family's prompt cache holds (an entry is a dict of tensors, or one tensor)."""
    entries = [cache[prompt] for prompt in cache]
    return [t for entry in entries for t in (entry.values() if isinstance(entry, dict) else [entry])]


def bytes_on(tensors, device: torch.device) -> int:
    return sum(t.untyped_storage().nbytes() for t in tensors if t.device == device)


@pytest.mark.parametrize("name", list(SAVERS))
def test_cached_conditions_stay_in_host_memory_and_each_batch_reaches_the_models_device(name, tmp_path):
    from training.models import load_family

    family = load_family(str(SAVERS[name](tmp_path / name)), device=DEVICE)
    if DEVICE.type == "cpu":
        family.device = torch.device("meta")  # the network's device; the text encoders stay on the CPU
    family.encode_prompts([""])  # what every run caches first (the CFG condition), and any lazy allocation
    allocated = torch.cuda.memory_allocated() if DEVICE.type == "cuda" else 0
    batches = [family.encode_prompts(PROMPTS[start : start + 4]) for start in range(0, len(PROMPTS), 4)]
    assert all(t.device == family.device for batch in batches for t in batch.values())
    one_batch = sum(t.nbytes for t in batches[0].values())
    del batches

    tensors = cached_tensors(family.prompt_cache)
    assert len(family.prompt_cache) == len(PROMPTS) + 1
    assert bytes_on(tensors, family.device) == 0, "cached conditions on the model's device"
    assert all(t.device.type == "cpu" and t.is_pinned() == torch.cuda.is_available() for t in tensors)
    # each entry owns its bytes: no view keeps the encoder's whole batch (or its padding) alive
    assert bytes_on(tensors, torch.device("cpu")) == sum(t.nbytes for t in tensors)
    if DEVICE.type == "cuda":  # 16 prompts cached on the GPU would add 4x one batch of 4
        assert torch.cuda.memory_allocated() - allocated < one_batch

