"""Whole runs of ``training.distill`` on a tiny real SD1.5 folder: outputs, resume equivalence,
NaN handling; killed writes (SIGKILL) and 2-process data parallel run as subprocesses (slow)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.helpers.distill_runs import distill_args, tiny_teacher
from training.checkpoint import ADAPTERS_FILE, PAUSE_ENV, list_checkpoints, load_checkpoint
from training.distill import EXIT_NON_FINITE, EXIT_OK, PAUSE_LORA_ENV, main
from training.lora_io import adapter_to_kohya, read_lora
from training.progress import BARELY_MOVED

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    torch.set_num_threads(1)
    return tiny_teacher(tmp_path_factory.mktemp("distill_run"))


def args(teacher, output: Path, *extra) -> list[str]:
    return distill_args(teacher, output, "--num-steps", "2", *extra)


def lora_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def test_run_writes_lora_with_metadata_log_checkpoints_and_validation_grid(teacher, tmp_path):
    output = tmp_path / "models" / "loras" / "tdm.safetensors"
    argv = args(teacher, output, "--max-train-steps", 3, "--checkpoint-every", 1, "--keep-checkpoints", 2,
                "--validate-every", 3, "--validation-prompts", 2, "--cfg", 3.0, "--distance", "huber_norm")
    assert main(argv) == EXIT_OK
    tensors, info = read_lora(output)
    assert tensors and all(k.startswith("lora_unet_") for k in tensors)
    assert (info.method, info.base_family, info.num_steps, info.grid, info.total_steps) == ("tdm", "sd15", 2, [899, 449], 900)
    assert (info.teacher_cfg, info.distance, info.lora_rank, info.training_steps) == (3.0, "huber_norm", 4, 3)
    assert info.huber_c == pytest.approx(0.00054 * (4 * 8 * 8) ** 0.5)  # paper c for the 4x8x8 latent
    assert len(info.base_hash) == 64 and info.recommended_strength == 1.0
    run_dir = tmp_path / "models" / "loras" / "tdm_run"
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(entry["loss_fake"])) and entry["grad_norm_student"] > 0 for entry in log)
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-00000002", "step-00000003"]
    grid = Image.open(run_dir / "validation" / "step-00000003.png")
    assert grid.size == (4 * 16, 2 * 16)  # teacher + student at 1, 2, 4 steps, one row per prompt
    table = (run_dir / "validation" / "step-00000003.txt").read_text()  # beside it, the probe's per-step fidelity
    assert "step-00000003.png" in table and len([line for line in table.splitlines() if line.strip()[:1].isdigit()]) == 2
    assert not list(output.parent.glob(".*")), "temporary files left beside the LoRA"
    # ComfyUI lists every file with these extensions under models/loras as a LoRA (folder_paths.py)
    model_files = [p for p in output.parent.rglob("*") if p.suffix in {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}]
    assert model_files == [output], "the run folder puts files into ComfyUI's LoRA list"


def test_exported_lora_is_the_final_student_adapter(teacher, tmp_path):
    output = tmp_path / "tdm.safetensors"
    assert main(args(teacher, output, "--max-train-steps", 2, "--checkpoint-every", 0)) == EXIT_OK
    adapters, state = load_checkpoint(list_checkpoints(tmp_path / "tdm_run")[-1])
    assert state["step"] == 2
    expected = adapter_to_kohya(adapters["student"], "lora_unet", 4.0)
    assert lora_tensors(output).keys() == expected.keys()
    assert all(torch.equal(lora_tensors(output)[k], expected[k]) for k in expected)


@pytest.mark.parametrize("mode", ["plain", "steps_aware"])
def test_resume_gives_the_same_lora_as_a_straight_run(mode, teacher, tmp_path):
    straight, split = tmp_path / "straight.safetensors", tmp_path / "split.safetensors"
    common = ("--max-train-steps", 4, "--checkpoint-every", 1, "--randmid")
    common += ("--steps-aware", "--k-choices", "1,2,4") if mode == "steps_aware" else ()
    assert main(args(teacher, straight, *common)) == EXIT_OK
    assert main(args(teacher, split, *common, "--stop-at-step", 2)) == EXIT_OK
    assert not split.exists(), "a stopped run must not export"
    assert main(args(teacher, split, *common, "--resume")) == EXIT_OK
    a, b = lora_tensors(straight), lora_tensors(split)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-7)
    assert any(t.abs().sum() > 0 for k, t in a.items() if "lora_up" in k), "the student never moved"
    log = [json.loads(line)["step"] for line in (tmp_path / "split_run" / "log.jsonl").read_text().splitlines()]
    assert log == [1, 2, 3, 4]


def test_a_run_resumes_only_with_the_method_its_checkpoint_was_written_with(teacher, tmp_path, capsys):
    """--resume with another --distance or --fake-score-updates (say, a run begun before issue 22 changed both
    defaults) would go on computing something else: refused, naming the run's own flags."""
    import torch as _torch

    from training.checkpoint import STATE_FILE

    output = tmp_path / "tdm.safetensors"
    common = ("--max-train-steps", 3, "--checkpoint-every", 1)
    assert main(args(teacher, output, *common, "--distance", "huber", "--fake-score-updates", 1, "--stop-at-step", 1)) == EXIT_OK
    assert main(args(teacher, output, *common, "--resume")) != EXIT_OK
    err = capsys.readouterr().err
    assert ("was written with --distance huber, --huber-c 0.001, --fake-score-updates 1, this run has --distance l2, --huber-c none, "
            "--fake-score-updates 5: resume with the run's own flags") in err, err
    assert len(list_checkpoints(tmp_path / "tdm_run")) == 1, "the refused resume wrote a checkpoint"
    # a checkpoint written before checkpoints recorded the method: a warning naming the flags of the old defaults
    state_file = list_checkpoints(tmp_path / "tdm_run")[-1] / STATE_FILE
    state = _torch.load(state_file, weights_only=True)
    del state["method"]
    _torch.save(state, state_file)
    assert main(args(teacher, output, *common, "--resume")) == EXIT_OK
    assert "resume it with --distance huber --fake-score-updates 1" in capsys.readouterr().err


def test_a_checkpoint_from_before_a_method_flag_existed_resumes_only_with_what_ran_then(teacher, tmp_path, capsys):
    """A checkpoint that records the method but not --fake-score-rollouts (written before the flag existed) ran the
    shared roll-out: resuming it with fresh roll-outs is refused, with shared it resumes."""
    import torch as _torch

    from training.checkpoint import STATE_FILE

    output = tmp_path / "tdm.safetensors"
    common = ("--max-train-steps", 2, "--checkpoint-every", 1, "--fake-score-updates", 2)
    assert main(args(teacher, output, *common, "--stop-at-step", 1)) == EXIT_OK
    state_file = list_checkpoints(tmp_path / "tdm_run")[-1] / STATE_FILE
    state = _torch.load(state_file, weights_only=True)
    del state["method"]["fake_score_rollouts"]
    _torch.save(state, state_file)
    assert main(args(teacher, output, *common, "--fake-score-rollouts", "fresh", "--resume")) != EXIT_OK
    assert "was written with --fake-score-rollouts shared, this run has --fake-score-rollouts fresh" in capsys.readouterr().err
    assert main(args(teacher, output, *common, "--resume")) == EXIT_OK


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(teacher, tmp_path, capsys):
    output = tmp_path / "tdm.safetensors"
    # an absurd student learning rate blows the student up in the first update: step 2 is not finite
    code = main(args(teacher, output, "--max-train-steps", 6, "--checkpoint-every", 1, "--student-learning-rate", 1e30))
    assert code == EXIT_NON_FINITE
    assert "loss became" in capsys.readouterr().err
    assert not output.exists()
    checkpoints = list_checkpoints(tmp_path / "tdm_run")
    assert checkpoints and len(checkpoints) < 6
    adapters, state = load_checkpoint(checkpoints[-1])
    log = [json.loads(line) for line in (tmp_path / "tdm_run" / "log.jsonl").read_text().splitlines()]
    assert state["step"] == log[-1]["step"]  # the last logged (finite) step is the last checkpoint


def spawn(argv: list[str], env_extra: dict, launcher: list[str] | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env_extra}
    command = (launcher or [sys.executable]) + ["-m", "training.distill", *argv]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def kill_when(process: subprocess.Popen, ready, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not ready():
        assert process.poll() is None, f"the run ended before the write began:\n{process.stdout.read()}"
        assert time.time() < deadline, "the write never began"
        time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    process.wait()


@pytest.mark.slow
def test_sigkill_during_checkpoint_and_lora_writes_keeps_previous_files(teacher, tmp_path):
    output = tmp_path / "tdm.safetensors"
    run_dir = tmp_path / "tdm_run"
    common = args(teacher, output, "--max-train-steps", 4, "--checkpoint-every", 2)
    # 1. killed while writing the step-4 checkpoint: step 2 stays whole, resume finishes the run
    process = spawn(common, {PAUSE_ENV: "4:120"})
    kill_when(process, lambda: (run_dir / "checkpoints" / ".tmp-step-00000004" / ADAPTERS_FILE).exists())
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-00000002"]
    assert load_checkpoint(list_checkpoints(run_dir)[0])[1]["step"] == 2
    assert not output.exists()
    assert main(common + ["--resume"]) == EXIT_OK
    first = output.read_bytes()
    assert not (run_dir / "checkpoints" / ".tmp-step-00000004").exists()
    # 2. killed while writing a later LoRA: the previous LoRA file is untouched, resume writes the new one
    longer = args(teacher, output, "--max-train-steps", 6, "--checkpoint-every", 2, "--resume")
    process = spawn(longer, {PAUSE_LORA_ENV: "120"})
    kill_when(process, lambda: any(p.is_dir() and any(p.iterdir()) for p in tmp_path.glob(".tdm.safetensors.*")))
    assert output.read_bytes() == first
    assert main(longer) == EXIT_OK
    assert read_lora(output)[1].training_steps == 6
    assert not list(tmp_path.glob(".tdm.safetensors.*")), "the interrupted export was not cleaned up"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["plain", "steps_aware"])
def test_two_process_data_parallel_keeps_ranks_identical(mode, teacher, tmp_path):
    output = tmp_path / "tdm.safetensors"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no"]
    extra = ("--steps-aware", "--k-choices", "1,4") if mode == "steps_aware" else ()
    process = spawn(args(teacher, output, "--max-train-steps", 3, "--checkpoint-every", 2, *extra), {}, launcher)
    out, _ = process.communicate(timeout=600)
    assert process.returncode == 0, out
    assert "adapters identical on 2 process(es)" in out, out
    adapters, state = load_checkpoint(list_checkpoints(tmp_path / "tdm_run")[-1])
    assert state["step"] == 3 and len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["generator"], state["rng"][1]["generator"]), "ranks drew the same samples"
    expected = adapter_to_kohya(adapters["student"], "lora_unet", 4.0)
    saved = lora_tensors(output)
    if mode == "steps_aware":  # the K table rides beside the LoRA weights, equal to rank 0's too
        from tdm_core.steps_aware import K_EMBEDDING_KEY
        from training.steps_aware import TABLE_STATE_KEY

        assert torch.equal(saved.pop(K_EMBEDDING_KEY), adapters["student"][TABLE_STATE_KEY])
    assert saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k]) for k in saved)


OPTION_RUNS = {  # options the other tests leave at their defaults
    "accumulation": ("--gradient-accumulation-steps", 2),
    "bf16": ("--mixed-precision", "bf16", "--validate-every", 2),
    "shared_randmid_huber": ("--interval-mode", "shared", "--randmid", "--distance", "huber", "--fake-score-updates", 1, "--cfg", 1.0),
    "explicit_grid_precomputed": ("--grid", "999,856,665,399", "--precompute-embeddings", "--lr-scheduler", "constant"),
    "gradient_checkpointing": ("--gradient-checkpointing",),
}


@pytest.mark.parametrize("case", list(OPTION_RUNS))
def test_option_runs_finish_with_finite_losses(case, teacher, tmp_path):
    output = tmp_path / "tdm.safetensors"
    assert main(args(teacher, output, "--max-train-steps", 2, *OPTION_RUNS[case])) == EXIT_OK
    log = [json.loads(line) for line in (tmp_path / "tdm_run" / "log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [1, 2]
    assert all(torch.isfinite(torch.tensor([e["loss_fake"], e["loss_student"], e["grad_norm_student"]])).all() for e in log)
    tensors, info = read_lora(output)
    assert any(t.abs().sum() > 0 for k, t in tensors.items() if "lora_up" in k)
    if case == "explicit_grid_precomputed":
        assert info.grid == [999, 856, 665, 399] and info.num_steps == 4
    if case == "shared_randmid_huber":  # the distance before issue 22, with its c in the file's metadata
        assert info.distance == "huber" and info.huber_c == pytest.approx(1e-3) and info.teacher_cfg == 1.0
    else:
        assert info.distance == "l2" and info.huber_c is None



@pytest.fixture(scope="module")
def digits_teacher(tmp_path_factory):
    # the digits demo family (pixel space, class prompts) with random weights: same code path as the demo
    from benchmarks.train_teacher import save_teacher
    from training.families import digits

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("digits") / "teacher"
    save_teacher(folder, digits.build_unet(), torch.nn.Embedding(digits.NUM_CLASSES + 1, digits.EMBED_DIM))
    return folder


def test_digits_family_runs_through_the_same_cli(digits_teacher, tmp_path, capsys):
    prompts = tmp_path / "digits.txt"
    prompts.write_text("0\n3\ndigit 7\n")
    output = tmp_path / "digits_tdm.safetensors"
    argv = ["--model", str(digits_teacher), "--prompts", str(prompts), "--output", str(output), "--lora-rank", "4",
            "--max-train-steps", "2", "--validate-every", "2", "--validation-prompts", "2"]
    assert main(argv) == EXIT_OK
    tensors, info = read_lora(output)
    assert info.base_family == "digits" and info.grid == [899, 674, 449, 224] and tensors
    assert Image.open(tmp_path / "digits_tdm_run" / "validation" / "step-00000002.png").size == (4 * 16, 2 * 16)
    prompts.write_text("0\na cat\n")
    capsys.readouterr()
    assert main(argv[:-4] + ["--output", str(tmp_path / "bad.safetensors"), "--seed", "1"]) == 2
    assert "cannot use a prompt" in capsys.readouterr().err
    assert not (tmp_path / "bad.safetensors").exists()


def test_steps_aware_lora_carries_the_trained_k_table(teacher, tmp_path):
    from tdm_core.steps_aware import K_EMBEDDING_KEY, MAX_K

    output = tmp_path / "unify.safetensors"
    argv = args(teacher, output, "--max-train-steps", 4, "--steps-aware", "--k-choices", "1,4", "--validate-every", 4)
    assert main(argv) == EXIT_OK
    tensors, info = read_lora(output)
    assert info.k_choices == [1, 4] and info.num_steps == 4 and info.grid == [899, 674, 449, 224]
    table = tensors[K_EMBEDDING_KEY]
    assert table.shape[0] == MAX_K
    trained_rows = {k for k in range(1, MAX_K + 1) if table[k - 1].abs().sum() > 0}
    assert trained_rows and trained_rows <= {1, 4}, trained_rows  # only the drawn K's rows learn
    assert not [k for k in tensors if "k_table" in k], "the table leaked into the LoRA weights"
    assert sum(k.endswith(".lora_down.weight") for k in tensors) > 0
    assert (tmp_path / "unify_run" / "validation" / "step-00000004.png").exists()


def test_steps_aware_bad_options_are_refused(teacher, tmp_path, capsys):
    output = tmp_path / "unify.safetensors"
    for extra, message in [(("--k-choices", "1,9"), "between 1 and 8"), (("--k-choices", "x"), "not integers"),
                           (("--grid", "999,500"), "exclude each other")]:
        assert main(args(teacher, output, "--steps-aware", *extra)) == 2
        assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_a_run_that_learns_nothing_says_so(teacher, tmp_path, capsys):
    output = tmp_path / "still.safetensors"
    capsys.readouterr()
    assert main(args(teacher, output, "--max-train-steps", 3, "--learning-rate", 1e-9, "--probe-every", 1)) == EXIT_OK
    captured = capsys.readouterr()
    assert "barely moved" in captured.err and "--learning-rate" in captured.err and "--max-train-steps" in captured.err
    summary = json.loads((tmp_path / "still_run" / "summary.json").read_text())
    assert summary["barely_moved"] and summary["probe_change"] < 1e-3
    log = [json.loads(line) for line in (tmp_path / "still_run" / "log.jsonl").read_text().splitlines()]
    assert all("probe_change" in entry and "lora_delta" in entry for entry in log)
    # issue 22: per-step fidelity in the log and the summary; an untrained fake score is the teacher, so its
    # denoising error equals the teacher's and the distribution-matching term is ~0 against guidance
    for steps in [entry["fidelity"] for entry in log] + [summary["fidelity"]]:
        assert [e["t"] for e in steps] == [899, 449]
        for e in steps:
            assert e["fake_score_error"] == pytest.approx(e["teacher_error"], rel=1e-3) and e["dm_to_cfg"] < 1e-3
    assert "per step, on the probe" in captured.err and "grows most at step" in captured.err


def test_a_run_that_learns_reports_its_movement_without_a_warning(teacher, tmp_path, capsys):
    output = tmp_path / "moved.safetensors"
    capsys.readouterr()
    assert main(args(teacher, output, "--max-train-steps", 6, "--learning-rate", 1e-1, "--lr-warmup-steps", 0)) == EXIT_OK
    captured = capsys.readouterr()
    assert "barely moved" not in captured.err and "probe samples changed by" in captured.out
    summary = json.loads((tmp_path / "moved_run" / "summary.json").read_text())
    assert not summary["barely_moved"] and summary["probe_change"] > BARELY_MOVED and summary["lora_delta"] > 0
    log = [json.loads(line) for line in (tmp_path / "moved_run" / "log.jsonl").read_text().splitlines()]
    assert "probe_change" in log[-1]  # the last step is always probed
    # a trained fake score tracks the student, not the teacher: its error and the DM term move off the teacher's
    last = summary["fidelity"]
    assert len(last) == 2 and any(abs(e["fake_score_error"] - e["teacher_error"]) > 1e-3 and e["dm_to_cfg"] > 1e-2 for e in last)
    assert "per step, on the probe" in captured.out
