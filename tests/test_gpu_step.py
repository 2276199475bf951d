"""benchmarks.gpu_step, the real-size GPU step of benchmarks/gpu.sh: its stand-in text embeddings have the
shapes the real text encoders give (from the shipped encoder configs), and the harness runs the trainer's own
parts end to end on shrunk configs on CPU, so a lent GPU's few minutes are not spent finding a typo."""
from __future__ import annotations

import json

import pytest

from benchmarks import gpu_step

CONFIGS = gpu_step.CONFIGS


def encoder_config(arch: str, part: str) -> dict:
    return json.loads((CONFIGS / arch / part / "config.json").read_text())


@pytest.mark.parametrize("arch", ["sd15", "sdxl", "flux"])
def test_stand_in_embeddings_have_the_real_encoders_shapes(arch):
    network = gpu_step.load_config(arch, gpu_step.network_folder(arch), tiny=False)
    shapes = gpu_step.text_shapes(arch, network, tiny=False)
    if arch == "flux":  # T5-XXL at Flux.1-dev's 512 tokens, CLIP-L's pooled projection
        assert shapes == {"encoder_hidden_states": (512, encoder_config("flux", "text_encoder_2")["d_model"]),
                          "pooled_projections": (encoder_config("flux", "text_encoder")["projection_dim"],)}
    elif arch == "sdxl":  # CLIP-L and bigG hidden states side by side, bigG's pooled projection
        width = encoder_config("sdxl", "text_encoder")["hidden_size"] + encoder_config("sdxl", "text_encoder_2")["hidden_size"]
        assert shapes == {"encoder_hidden_states": (77, width), "text_embeds": (encoder_config("sdxl", "text_encoder_2")["projection_dim"],)}
    else:
        assert shapes == {"encoder_hidden_states": (77, encoder_config("sd15", "text_encoder")["hidden_size"])}


@pytest.mark.slow
def test_harness_times_the_trainers_iteration_on_shrunk_configs(tmp_path):
    output = tmp_path / "gpu_step.md"
    code = gpu_step.main(["--tiny", "--device", "cpu", "--arch", "sd15,sdxl,flux", "--iterations", "1",
                          "--work", str(tmp_path / "work"), "--output", str(output)])
    assert code == 0
    rows = [line for line in output.read_text().splitlines() if line.startswith(("| sd15", "| sdxl", "| flux"))]
    assert len(rows) == 3 and all("failed" not in row for row in rows)
    assert gpu_step.main(["--tiny", "--device", "cpu", "--arch", "sd3", "--output", str(output)]) == 2  # named, refused
