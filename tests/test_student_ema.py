"""--student-ema on whole ``training.distill`` runs of the tiny SD1.5 teacher: training is the plain path's, bit for
bit; the LoRA it writes and each checkpoint's ``student_ema`` adapter are the moving average of the raw student's
weights, computed here by hand from the plain run's checkpoints with diffusers' EMAModel rule (warm-up
(1 + n) / (10 + n) capped at the decay); resume keeps the average; another decay on resume is refused."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.distill_runs import distill_args, tiny_teacher
from training.checkpoint import list_checkpoints, load_checkpoint
from training.distill import EXIT_OK, main
from training.ema import EMA_ADAPTER
from training.lora_io import adapter_to_kohya

STEPS, DECAY = 4, 0.2  # the cap binds from the 3rd update on (EMAModel's warm-up: 3/12 > 0.2), so the decay given is the one used


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    torch.set_num_threads(1)
    return tiny_teacher(tmp_path_factory.mktemp("student_ema"))


def run(teacher, output, *extra) -> list[dict]:
    """The run's checkpoints' adapters, one per step."""
    common = ("--num-steps", 2, "--max-train-steps", STEPS, "--checkpoint-every", 1, "--keep-checkpoints", 10, "--probe-every", 0)
    assert main(distill_args(teacher, output, *common, *extra)) == EXIT_OK
    return [load_checkpoint(path)[0] for path in list_checkpoints(output.with_name(output.stem + "_run"))]


def ema_by_hand(raw_per_step: list[dict], decay: float) -> dict:
    average = None
    for n, raw in enumerate(raw_per_step, start=1):
        d = min((1 + (n - 1)) / (10 + (n - 1)), decay) if n > 1 else 0.0  # EMAModel.get_decay(n): 0 at its first update
        if average is None:
            average = {k: v.clone() for k, v in raw.items()}
        else:
            for k in average:
                average[k].sub_((1 - d) * (average[k] - raw[k]))
    return average


@pytest.fixture(scope="module")
def plain_and_ema(teacher, tmp_path_factory):
    folder = tmp_path_factory.mktemp("runs")
    return (run(teacher, folder / "plain.safetensors"), run(teacher, folder / "ema.safetensors", "--student-ema", DECAY), folder)


def test_the_average_leaves_training_alone_and_is_what_the_run_hands_out(plain_and_ema):
    plain, ema, folder = plain_and_ema
    assert len(plain) == len(ema) == STEPS
    for step in range(STEPS):  # the optimiser steps the raw weights exactly as without the average
        for name in ("student", "fake_score"):
            assert plain[step][name].keys() == ema[step][name].keys()
            assert all(torch.equal(plain[step][name][k], ema[step][name][k]) for k in plain[step][name]), (step, name)
        assert EMA_ADAPTER not in plain[step]
    expected = ema_by_hand([p["student"] for p in plain], DECAY)
    for k in expected:
        torch.testing.assert_close(ema[-1][EMA_ADAPTER][k], expected[k], rtol=0, atol=1e-7)
    lag = max(float((expected[k] - plain[-1]["student"][k]).abs().max()) for k in expected)
    travelled = max(float((plain[-1]["student"][k] - plain[0]["student"][k]).abs().max()) for k in expected)
    assert lag > 0.1 * travelled and lag > 100 * 1e-7, f"the average lags the last weights by {lag:.2g} only (they moved {travelled:.2g}): " \
                                        "the test would not see it missing"
    written = load_file(str(folder / "ema.safetensors"))
    want = adapter_to_kohya(ema[-1][EMA_ADAPTER], "lora_unet", 4.0)
    assert written.keys() == want.keys() and all(torch.equal(written[k], want[k]) for k in want)
    plain_lora = load_file(str(folder / "plain.safetensors"))
    assert any(not torch.equal(plain_lora[k], written[k]) for k in want), "the written LoRA is the raw student's"
    summaries = [json.loads((folder / f"{n}_run" / "summary.json").read_text()) for n in ("plain", "ema")]
    assert summaries[0]["probe_change"] != summaries[1]["probe_change"], "the final probe did not measure the average"


def test_resume_keeps_the_average_and_refuses_another_decay(plain_and_ema, teacher, tmp_path, capsys):
    _plain, ema, _folder = plain_and_ema
    split = tmp_path / "split.safetensors"
    common = ("--num-steps", 2, "--max-train-steps", STEPS, "--checkpoint-every", 1, "--keep-checkpoints", 10, "--probe-every", 0)
    assert main(distill_args(teacher, split, *common, "--student-ema", DECAY, "--stop-at-step", 2)) == EXIT_OK
    assert main(distill_args(teacher, split, *common, "--student-ema", 0.5, "--resume")) != EXIT_OK
    assert "was written with --student-ema 0.2, this run has --student-ema 0.5" in capsys.readouterr().err
    assert main(distill_args(teacher, split, *common, "--resume")) != EXIT_OK
    assert "this run has no --student-ema" in capsys.readouterr().err
    assert main(distill_args(teacher, split, *common, "--student-ema", DECAY, "--resume")) == EXIT_OK
    resumed = load_checkpoint(list_checkpoints(tmp_path / "split_run")[-1])[0]
    for k in ema[-1][EMA_ADAPTER]:
        torch.testing.assert_close(resumed[EMA_ADAPTER][k], ema[-1][EMA_ADAPTER][k], rtol=0, atol=1e-7)
