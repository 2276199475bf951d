"""The benchmark and demo code paths run end to end at tiny sizes, and the metrics are right."""
from __future__ import annotations

import json
import re

import pytest
import torch
from PIL import Image

from benchmarks import metrics, speed
from benchmarks.demo import TEACHER_DIR, run_demo
from benchmarks.digits_data import load_digits_split
from benchmarks.train_teacher import main as train_teacher_main
from training.families import digits as digits_family
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


def test_train_teacher_command_writes_a_loadable_teacher_and_checks_it(tmp_path, capsys):
    torch.set_num_threads(1)
    out = tmp_path / "teacher"
    assert train_teacher_main(["--output", str(out), "--iterations", "2", "--batch-size", "4", "--check-samples", "20"]) == 0
    family = load_family(str(out))
    assert family.name == "digits"
    assert json.loads((out / "tdm_family.json").read_text()) == {"family": "digits"}
    # the schedule the family defines is the one written and loaded
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text()) == digits_family.SCHEDULER_CONFIG
    assert torch.equal(family.schedule.alphas_cumprod, digits_family.schedule_from_config(digits_family.SCHEDULER_CONFIG).alphas_cumprod)
    printed = capsys.readouterr().out
    for name in ("DDIM 50 steps ", "DDIM 50 steps, x0 clipped", "DDIM 4 steps"):
        assert re.search(rf"\[check\] {re.escape(name)}\s+FD +[0-9.]+ +class accuracy [01]\.[0-9]{{3}}", printed), name
    for bad in (["--iterations", "0"], ["--check-samples", "5"], ["--ema-decay", "1"], ["--check-only", "--no-check"]):
        with pytest.raises(SystemExit):
            train_teacher_main(["--output", str(out), *bad])
    with pytest.raises(SystemExit):
        train_teacher_main(["--output", str(tmp_path / "none"), "--check-only"])


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


def test_speed_subprocess_reports_memory_and_time(tmp_path):
    model = speed.write_model_folder(tmp_path / "m", dict(speed.MID_UNET_CONFIG, block_out_channels=(8, 16, 16), sample_size=8,
                                                           norm_num_groups=4, attention_head_dim=4))
    result = speed.measure_in_subprocess("lora", model, 1, 1, 0, 1)
    baseline = speed.measure_in_subprocess("baseline", model, 1, 1, 0, 1)
    assert 0 < result["seconds_per_iteration"] < 300 and len(result["iteration_seconds"]) == 1
    # training (adapters, optimiser states, activations) needs memory beyond the loaded model
    assert result["peak_rss_mb"] > baseline["peak_rss_mb"] > 100
    assert result["above_loaded_mb"] > 1 and abs(baseline["above_loaded_mb"]) < 5  # the baseline adds nothing to itself
    # both processes load the same model the same way: the same baseline within allocator noise
    assert result["rss_loaded_mb"] == pytest.approx(baseline["rss_loaded_mb"], rel=0.05)
    with pytest.raises(RuntimeError, match="failed"):
        speed.measure_in_subprocess("lora", tmp_path / "missing", 1, 1, 0, 1)


SPEED_UNET = dict(speed.MID_UNET_CONFIG, block_out_channels=(32, 64, 64), sample_size=8, norm_num_groups=8, attention_head_dim=8)


def test_speed_designs_run_in_subprocesses_with_comparable_numbers(tmp_path):
    """floor / reference / lora / switch (and the stand-in, baseline, components) at tiny sizes: every design
    reports per-iteration times and memory above the same baseline; the memory follows the design (no timing
    thresholds: speed targets live in benchmarks/RESULTS_speed.md)."""
    from concurrent.futures import ThreadPoolExecutor

    model = speed.write_model_folder(tmp_path / "m", SPEED_UNET, lora_target_modules=speed.family_lora_targets("sd15"), context_tokens=3)
    configs = ("baseline", "lora", "floor", "reference", "reference_shared", "components")
    with ThreadPoolExecutor(2) as pool:  # each is its own process; two at a time
        jobs = {c: pool.submit(speed.measure_in_subprocess, c, model, 2, 2, 1, 2) for c in configs}
        jobs["switch"] = pool.submit(speed.measure_in_subprocess, "switch", None, 1, 4, 0, 0, extra=["--unet", "sd15"])
        r = {c: job.result() for c, job in jobs.items()}
    params = r["baseline"]["parameters"]
    per_copy_mb = params * 4 / 2**20
    for c in speed.TRAINING_CONFIGS:
        assert len(r[c]["iteration_seconds"]) == 2 and all(0 < t < 300 for t in r[c]["iteration_seconds"]), c
        assert r[c]["min_seconds"] <= r[c]["seconds_per_iteration"]
        assert r[c]["rss_loaded_mb"] == pytest.approx(r["baseline"]["rss_loaded_mb"], rel=0.05), c
        assert r[c]["above_loaded_mb"] > 0, c
        for phases, cpu in zip(r[c]["iteration_phases"], r[c]["iteration_cpu_seconds"]):  # they split each iteration
            assert phases["forward"] > 0 and phases["backward"] > 0 and sum(phases.values()) == pytest.approx(cpu), c
            assert (phases["optimiser"] > 0) == (c != "floor"), c  # the floor has no optimiser step
    # the project and its floor run the same LoRA'd network: both adapters on the SD1.5 family's targets
    assert r["lora"]["trainable_parameters"] == r["floor"]["trainable_parameters"] > 0
    # three copies hold two more fp32 copies, two AdamW states and a gradient set beyond the frozen model (7 x P x 4
    # bytes, resident); the one-copy stand-in a gradient set and one AdamW state (3 x P x 4); the project far less
    assert r["reference"]["above_loaded_mb"] > 0.9 * 7 * per_copy_mb
    assert r["reference_shared"]["above_loaded_mb"] > 0.9 * 3 * per_copy_mb
    assert r["lora"]["above_loaded_mb"] < r["reference"]["above_loaded_mb"] - 3 * per_copy_mb
    c = r["components"]
    assert c["parameters"] == params
    assert all(c[k] > 0 for k in ("plain_forward", "plain_forward_backward", "adamw_step_all_parameters", "lora_forward",
                                  "lora_forward_backward", "plain_forward_2b"))
    s = r["switch"]  # the SD1.5-size UNet on the meta device, both adapters on every attention / feed-forward projection
    assert s["parameters"] > 8e8 and s["modules"] > 2000 and s["lora_layers"] == 160
    assert all(s[f"ms_{n}"] > 0 for n in ("student", "fake_score", "teacher"))


@pytest.mark.slow
def test_speed_table_quick_writes_the_targets_and_says_what_was_not_measured(tmp_path):
    from benchmarks import speed_table

    md = tmp_path / "RESULTS_speed.md"
    assert speed_table.main(["--quick", "--repeats", "1", "--no-profile", "--work", str(tmp_path / "w"), "--output", str(md)]) == 0
    text = md.read_text()
    assert "Produced by `python -m benchmarks.speed_table --quick" in text and "(complete;" in text
    assert "Load average (1, 5, 15 min) at the start" in text and "n/a (run in progress)" not in text
    for needle in ("project / network floor, time <= 1.15", "project / three copies, time <= 0.9",
                   "project / three copies, memory above baseline <= 0.4", "network floor", "three copies",
                   "Where the CPU time of an iteration goes", "Adapter switch", "## Not measured here", "gpu.sh"):
        assert needle in text, needle
    assert re.search(r"\| project / network floor, time <= 1.15 \| [0-9.]+ \*\*(holds|missed)\*\*", text)
