"""``training.distill --steps-aware`` on a tiny real SD1.5 folder: K drawn per batch, the student's K table
exported with the LoRA and its K choices in the metadata, resume equal to a straight run, two-process data
parallel (slow); bad K choices fail before any model loads."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tdm_core.steps_aware import K_EMBEDDING_KEY, MAX_K
from tests.helpers.distill_runs import distill_args, tiny_teacher
from tests.helpers.tiny_models import save_tiny_pipeline
from training.checkpoint import list_checkpoints, load_checkpoint
from training.distill import EXIT_BAD_INPUT, EXIT_OK, main
from training.lora_io import read_lora
from training.steps_aware import TABLE_STATE_KEY

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    torch.set_num_threads(1)
    return tiny_teacher(tmp_path_factory.mktemp("steps_aware_run"))


def args(teacher, output: Path, *extra) -> list[str]:
    return distill_args(teacher, output, "--steps-aware", "--k-choices", "1,2,4", "--learning-rate", "1e-2", *extra)


def test_run_exports_the_student_k_table_and_k_choices(teacher, tmp_path):
    output = tmp_path / "unify.safetensors"
    assert main(args(teacher, output, "--max-train-steps", 3, "--checkpoint-every", 0, "--validate-every", 3)) == EXIT_OK
    tensors, info = read_lora(output)
    # the file's default K is the largest choice, with its reference grid; every K samples its reference grid
    assert (info.k_choices, info.grid, info.num_steps, info.total_steps) == ([1, 2, 4], [899, 674, 449, 224], 4, 900)
    table = tensors[K_EMBEDDING_KEY]
    assert table.shape == (MAX_K, 32 * 4)  # rows K = 1..8, the tiny UNet's time-embedding width
    adapters, _ = load_checkpoint(list_checkpoints(tmp_path / "unify_run")[-1])
    assert torch.equal(table, adapters["student"][TABLE_STATE_KEY])
    assert not torch.equal(adapters["student"][TABLE_STATE_KEY], adapters["fake_score"][TABLE_STATE_KEY])
    trained_rows = table.abs().sum(dim=1) > 0
    assert trained_rows[[0, 1, 3]].any() and not trained_rows[[2, 4, 5, 6, 7]].any()  # only drawn K move
    assert all(k.startswith("lora_unet_") for k in tensors if k != K_EMBEDDING_KEY)
    assert (tmp_path / "unify_run" / "validation" / "step-00000003.png").is_file()  # validation at K = 1, 2, 4


def test_ablation_leaves_the_fake_score_unconditioned(teacher, tmp_path):
    output = tmp_path / "ablation.safetensors"
    assert main(args(teacher, output, "--max-train-steps", 2, "--checkpoint-every", 0, "--no-k-on-fake-score")) == EXIT_OK
    adapters, _ = load_checkpoint(list_checkpoints(tmp_path / "ablation_run")[-1])
    assert TABLE_STATE_KEY in adapters["student"] and TABLE_STATE_KEY not in adapters["fake_score"]
    assert K_EMBEDDING_KEY in load_file(str(output))


@pytest.mark.slow  # builds and trains a tiny SD3: about 25 s on a shared CPU
def test_sd3_transformer_exports_its_table_beside_the_diffusers_layout(tmp_path):
    """SD3's LoRA is written in diffusers' (PEFT) layout; the K table goes under its own key, not among them."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\n")
    model = save_tiny_pipeline("sd3", tmp_path / "sd3")
    output = tmp_path / "sd3_unify.safetensors"
    argv = ["--model", str(model), "--prompts", str(prompts), "--output", str(output), "--lora-rank", "4", "--batch-size", "1",
            "--validate-every", "0", "--steps-aware", "--k-choices", "1,4", "--max-train-steps", "1", "--checkpoint-every", "0"]
    assert main(argv) == EXIT_OK
    tensors, info = read_lora(output)
    assert info.k_choices == [1, 4] and tensors[K_EMBEDDING_KEY].shape[0] == MAX_K
    assert not [k for k in tensors if "tdm_k_embedding" in k and k != K_EMBEDDING_KEY]


@pytest.mark.slow  # two short runs and a resumed one: about 20 s
def test_resume_gives_the_same_unify_lora_as_a_straight_run(teacher, tmp_path):
    straight, split = tmp_path / "straight.safetensors", tmp_path / "split.safetensors"
    common = ("--max-train-steps", 4, "--checkpoint-every", 1)
    assert main(args(teacher, straight, *common)) == EXIT_OK
    assert main(args(teacher, split, *common, "--stop-at-step", 2)) == EXIT_OK
    assert main(args(teacher, split, *common, "--resume")) == EXIT_OK
    a, b = load_file(str(straight)), load_file(str(split))
    assert a.keys() == b.keys() and K_EMBEDDING_KEY in a
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-7)
    assert a[K_EMBEDDING_KEY].abs().sum() > 0, "the K table never moved"


@pytest.mark.parametrize("extra, message", [
    (("--k-choices", "1,x"), "--k-choices: K choices '1,x' are not integers"),
    (("--k-choices", "0,4"), "between 1 and 8"),
    (("--grid", "999,500"), "--grid and --steps-aware exclude each other"),
    (("--total-steps", 200, "--k-choices", "1,8"), "--total-steps 200 is too small for K=8"),
])
def test_bad_steps_aware_options_fail_before_loading(teacher, tmp_path, capsys, extra, message):
    output = tmp_path / "bad.safetensors"
    assert main(args(teacher, output, "--max-train-steps", 1, *extra)) == EXIT_BAD_INPUT
    assert message in capsys.readouterr().err
    assert not output.exists() and not (tmp_path / "bad_run").exists()


@pytest.mark.slow
def test_two_process_data_parallel_steps_aware(teacher, tmp_path):
    output = tmp_path / "unify.safetensors"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = launcher + ["-m", "training.distill", *args(teacher, output, "--max-train-steps", 3, "--checkpoint-every", 2)]
    process = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = process.stdout + process.stderr
    assert process.returncode == 0, out
    assert "adapters identical on 2 process(es)" in out, out  # the K tables are in the compared digest
    adapters, state = load_checkpoint(list_checkpoints(tmp_path / "unify_run")[-1])
    assert state["step"] == 3 and len(state["rng"]) == 2
    assert torch.equal(load_file(str(output))[K_EMBEDDING_KEY], adapters["student"][TABLE_STATE_KEY])
