"""The committed flow teacher is a real FluxPipeline folder (a Flux-architecture rectified flow, true CFG) that the
trainer loads as its flux family, plain diffusers runs, and that draws what the prompt asks."""
from __future__ import annotations

import pytest
import torch

from benchmarks.train_flow_teacher import DEFAULT_OUTPUT as TEACHER_DIR
from benchmarks.train_flow_teacher import build_teacher
from benchmarks.train_flow_teacher import main as train_flow_teacher_main
from tests.helpers.teacher_builds import assert_deterministic_build, prompt_adherence
from training.models import load_family


@pytest.fixture(scope="module")
def teacher():
    torch.set_num_threads(1)
    return load_family(str(TEACHER_DIR))


def test_committed_folder_is_a_small_flux_pipeline_with_true_cfg(teacher):
    assert teacher.name == "flux" and teacher.prediction_type == "flow"
    assert not teacher.network.config.guidance_embeds  # trained without guidance distillation: true CFG
    assert teacher.apply_guidance(3.0) == 3.0
    assert teacher.resolution == 32 and teacher.latent_shape(2) == (2, 4, 8, 8)  # 16 Flux tokens
    assert teacher.schedule.shift == pytest.approx(1.583, abs=1e-3)  # Flux.1-dev's dynamic shift for 16 tokens
    assert 1e6 < sum(p.numel() for p in teacher.network.parameters()) < 3e6
    assert sum(p.stat().st_size for p in TEACHER_DIR.rglob("*") if p.is_file()) < 8 * 1024 * 1024


def test_plain_diffusers_runs_the_folder():
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(TEACHER_DIR), local_files_only=True, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle on the left", num_inference_steps=3, height=32, width=32, output_type="pt",
                 max_sequence_length=16, generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()


def test_teacher_draws_what_the_prompt_asks_and_not_without_the_text(teacher):
    assert prompt_adherence(teacher, cfg=3.0) > 0.7  # 50 Euler steps of the flow ODE; the committed teacher: 0.9
    assert prompt_adherence(teacher, cfg=1.0, with_text=False) < 0.2


def test_bad_flags_are_clear_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_flow_teacher_main(["--output", str(tmp_path / "missing" / "teacher"), "--no-check"])
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_flow_teacher_main(["--output", str(tmp_path / "teacher"), "--check-only"])
    assert "model_index.json" in capsys.readouterr().err


@pytest.mark.slow
def test_build_is_deterministic_and_loads(tmp_path):
    assert_deterministic_build(lambda out: build_teacher(out, iterations=3, batch_size=4, seed=5, log=lambda *_: None), tmp_path, "flux")
