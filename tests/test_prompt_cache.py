"""The prompt-embedding cache (issue 20, defect 4): cached conditions live in host memory, never on the model's
device, and reach that device one batch at a time; ``--precompute-embeddings`` trains exactly what the run
without it trains.

On a CPU-only machine the model's device is the host's, so the placement test puts the family on the "meta"
device (its text encoders stay on the CPU, as ``offload_text_encoders`` leaves them): every byte the cache keeps
must be on the CPU and every batch on ``meta``. With ``TDM_TEST_DEVICE=cuda`` the family loads on the GPU and
the test also measures ``torch.cuda.memory_allocated`` around caching the prompts.
"""
from __future__ import annotations

import os
from pathlib import Path

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


# --- --precompute-embeddings trains what the run without it trains ------------------------------------------
# prompts of different lengths, more of them than a batch: precomputing encodes them 32 at a time up front,
# the plain run encodes each batch's new prompts when first drawn, in another order and other groupings
RUN_PROMPTS = "a red cat\na blue dog wearing a tall hat in the rain\nthe sea at night\na tree\nfive gold rings on a table\n"
RUNS = {  # family -> the tiny folder and the options its run needs
    "sd15": (lambda folder: save_tiny_pipeline("sd15", folder), ()),
    "flux": (lambda folder: save_tiny_pipeline("flux", folder), ("--resolution", "32", "--cfg", "3.5")),
    "qwen_image": (save_tiny_qwen_pipeline, ("--resolution", "32")),
}


def trained_adapters(folder: Path, run_root: Path, *extra) -> dict[str, dict[str, torch.Tensor]]:
    """Both adapters (student and fake score) after 3 steps of a tiny run from seed 0."""
    from training.checkpoint import list_checkpoints, load_checkpoint
    from training.distill import EXIT_OK, main

    run_root.mkdir()
    prompts = run_root / "prompts.txt"
    prompts.write_text(RUN_PROMPTS)
    output = run_root / "tdm.safetensors"
    argv = ["--model", str(folder), "--prompts", str(prompts), "--output", str(output), "--lora-rank", "4", "--batch-size", "2",
            "--max-train-steps", "3", "--validate-every", "0", "--probe-every", "0", "--seed", "0", *extra]
    assert main(argv) == EXIT_OK
    return load_checkpoint(list_checkpoints(run_root / "tdm_run")[-1])[0]


# What may differ is fp32 rounding: the plain run and the precomputing one encode a prompt in batches of other
# sizes. SD1.5 (CLIP pads to 77) and Flux (T5 to max_sequence_length) come out bit-identical on the CPU;
# Qwen-Image's encoder attends over each batch's own padded length, so its rows differ by 1 ulp (<= 2.4e-7 on
# values ~3) and the adapters by <= 7e-8 after 3 steps. Broken on purpose, the largest difference was 8.5e-4
# (Flux) and 1.6e-3 (SD1.5) with a precomputed batch caching its neighbour's row, 1.1e-5 to 3e-5 with the
# precomputed entries rounded to bf16 (an AdamW step moves a weight by about the learning rate, 2e-3 / 4e-4).
# 1e-6: 14x above the rounding seen, 10x below the smallest break seen.
ATOL = 1e-6


def largest_difference(a: dict[str, dict[str, torch.Tensor]], b: dict[str, dict[str, torch.Tensor]]) -> tuple[float, str]:
    return max((float((a[adapter][key] - b[adapter][key]).abs().max()), f"{adapter}: {key}") for adapter in a for key in a[adapter])


@pytest.mark.parametrize("name", list(RUNS))
def test_precomputed_embeddings_train_what_the_plain_run_trains(name, tmp_path):
    save, options = RUNS[name]
    folder = save(tmp_path / name)
    plain = trained_adapters(folder, tmp_path / "plain", *options)
    precomputed = trained_adapters(folder, tmp_path / "precomputed", *options, "--precompute-embeddings")
    assert plain.keys() == precomputed.keys() == {"student", "fake_score"}
    for adapter, weights in plain.items():
        assert weights.keys() == precomputed[adapter].keys()
        assert any("lora_B" in k and v.abs().max() > 10 * ATOL for k, v in weights.items()), f"{adapter} did not train"
    difference, where = largest_difference(plain, precomputed)
    assert difference <= ATOL, f"--precompute-embeddings trained something else: {difference:.3g} at {where}"
