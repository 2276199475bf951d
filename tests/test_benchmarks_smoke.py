"""The benchmark and demo code paths run end to end at tiny sizes, and the metrics are right."""
from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
from PIL import Image

from benchmarks import metrics, run_all, speed
from benchmarks.demo import TEACHER_DIR, run_demo
from benchmarks.digits_data import load_digits_split
from benchmarks.train_teacher import main as train_teacher_main
from training.models import load_family


def test_frechet_distance_matches_the_gaussian_formula():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(20000, 3, generator=gen, dtype=torch.float64)
    b = a * 2.0 + torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    # N(0, I) vs N(m, 4I): |m|^2 + 3 * (1 + 4 - 2 * 2) = 1 + 3
    assert metrics.frechet_distance(a, b) == pytest.approx(4.0, rel=0.03)
    assert metrics.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_precision_recall_see_missing_modes():
    gen = torch.Generator().manual_seed(0)
    real = torch.cat([torch.randn(200, 2, generator=gen), torch.randn(200, 2, generator=gen) + 20])
    one_mode = torch.randn(400, 2, generator=gen)
    precision, recall = metrics.precision_recall(real, one_mode)
    assert precision > 0.9 and 0.3 < recall < 0.7  # every fake is realistic, half the real modes are missed
    assert metrics.precision_recall(real, real) == (1.0, 1.0)


def test_classifier_is_cached_and_recognises_held_out_digits():
    model = metrics.load_classifier(train_if_missing=False)
    images, labels = load_digits_split("heldout")
    _, predicted = metrics.classifier_outputs(model, images)
    assert metrics.class_accuracy(predicted, labels) > 0.95
    # held-out and training digits are close in feature space, noise is not
    train_feats, _ = metrics.classifier_outputs(model, load_digits_split("train")[0])
    held_feats, _ = metrics.classifier_outputs(model, images)
    noise_feats, _ = metrics.classifier_outputs(model, torch.rand(540, 1, 16, 16) * 2 - 1)
    assert metrics.frechet_distance(held_feats, train_feats) * 10 < metrics.frechet_distance(noise_feats, train_feats)


def test_train_teacher_command_writes_a_loadable_teacher(tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "teacher"
    assert train_teacher_main(["--output", str(out), "--iterations", "2", "--batch-size", "4"]) == 0
    family = load_family(str(out))
    assert family.name == "digits"
    assert json.loads((out / "tdm_family.json").read_text()) == {"family": "digits"}
    with pytest.raises(SystemExit):
        train_teacher_main(["--output", str(out), "--iterations", "0"])


@pytest.mark.slow
def test_demo_distils_through_training_distill_and_writes_the_grid(tmp_path, capsys):
    torch.set_num_threads(1)
    result = run_demo(tmp_path, iterations=2, k1_iterations=2, batch_size=2, cfg=2.0, num_eval=20)
    image = Image.open(result["grid"])
    assert image.size[1] > 4 * 16 * 4  # four rows of 16x16 digits upscaled 4x
    for lora in result["loras"]:
        assert lora.is_file() and (lora.parent / f"{lora.stem}_run" / "log.jsonl").is_file()  # training.distill's own log
    names = [r["name"] for r in result["table"]]
    assert names == ["teacher DDIM 50 steps", "teacher DDIM 4 steps", "TDM student 4 steps", "TDM student 1 step"]
    assert result["table"][0]["fd_teacher"] == pytest.approx(0.0, abs=1e-3)  # the reference row against itself
    assert "| TDM student 4 steps | 4 |" in capsys.readouterr().out


@pytest.mark.slow
def test_run_all_quick_writes_both_tables(tmp_path):
    torch.set_num_threads(1)
    plan = dataclasses.replace(run_all.QUICK, num_eval=20, eval_seeds=(0,), iterations=2, checkpoints=(1,), cfgs=(1.0,),
                               teacher_steps=(1,), ablations=("l2",), scaling_batches=(1,), scaling_ks=(1,), sampling_models=("mid",))
    md = tmp_path / "RESULTS.md"
    results = run_all.run(plan, md, tmp_path / "work", fresh=True, command="smoke")
    text = md.read_text()
    assert "Produced by `smoke` (complete" in text
    for needle in ("teacher DDIM 1 steps", "TDM K=4 (pseudo-Huber, separate) after 1 it.", "TDM K=1", "squared L2",
                   "three full copies", "TDM sampler overhead", "| batch (K=4) |", "The paper's claims"):
        assert needle in text, needle
    lora, ref = results.get("speed/train/lora"), results.get("speed/train/reference")
    # three full copies with two AdamW states cost more memory than one base with two adapters
    assert ref["peak_rss_mb"] > lora["peak_rss_mb"]
    # a rerun resumes from the cache without recomputing
    again = run_all.run(plan, md, tmp_path / "work", fresh=False, command="smoke")
    assert again.data == results.data
    assert re.search(r"\| TDM K=4 \(pseudo-Huber, separate\) after 2 it\. \| 4 \| [0-9.]+ ± [0-9.]+", text)


def test_speed_subprocess_reports_memory_and_time(tmp_path):
    model = speed.write_model_folder(tmp_path / "m", dict(speed.MID_UNET_CONFIG, block_out_channels=(8, 16, 16), sample_size=8,
                                                           norm_num_groups=4, attention_head_dim=4))
    result = speed.measure_in_subprocess("lora", model, 1, 1, 0, 1)
    baseline = speed.measure_in_subprocess("baseline", model, 1, 1, 0, 1)
    assert 0 < result["seconds_per_iteration"] < 300
    # training (adapters, optimiser states, activations) needs memory beyond the loaded model
    assert result["peak_rss_mb"] > baseline["peak_rss_mb"] > 100
    with pytest.raises(RuntimeError, match="failed"):
        speed.measure_in_subprocess("lora", tmp_path / "missing", 1, 1, 0, 1)
