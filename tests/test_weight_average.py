"""benchmarks.weight_average: which checkpoints it averages, that the mean is of the student's tensors only, and the
goal line it prints (the scoring is benchmarks.defaults's evaluator, tested there)."""
import pytest
import torch

from benchmarks import weight_average
from training.checkpoint import save_checkpoint


def write_run(run_dir, steps):
    for step in steps:  # the student's tensors are the step number, the fake score's its negative
        adapters = {"student": {"a.lora_A.weight": torch.full((2, 3), float(step)), "a.lora_B.weight": torch.full((3, 2), 2.0 * step)},
                    "fake_score": {"a.lora_A.weight": torch.full((2, 3), -float(step))}}
        save_checkpoint(run_dir, step, adapters, {"note": step}, keep=1000)


def test_the_average_is_the_students_tensors_over_the_window_ending_at_the_iteration(tmp_path):
    write_run(tmp_path, [50, 100, 150, 200, 250, 300])
    state, steps = weight_average.averaged_student(tmp_path, 250, 200)
    assert steps == [100, 150, 200, 250]  # (50, 250]: the window's start is left out
    assert torch.equal(state["a.lora_A.weight"], torch.full((2, 3), 175.0))
    assert torch.equal(state["a.lora_B.weight"], torch.full((3, 2), 350.0))
    alone, steps = weight_average.averaged_student(tmp_path, 300, 1)
    assert steps == [300] and torch.equal(alone["a.lora_A.weight"], torch.full((2, 3), 300.0))
    with pytest.raises(SystemExit, match="no checkpoint at step 275"):
        weight_average.averaged_student(tmp_path, 275, 200)


def test_the_goal_line_names_the_worst_change_after_250_iterations():
    per_seed = {0: {250: 10.0, 500: 13.0, 1000: 12.0}, 1: {100: 10.0, 250: 20.0, 500: 10.0, 1000: 11.0}}
    worst, where = weight_average.worst_worsening(per_seed, [100, 250, 500, 1000])
    assert worst == pytest.approx(0.3) and where == "seed 0, 250 to 500"  # 100 to 250 (+100 %) is before the goal's window
    text = weight_average.goals_text("alone", per_seed, [100, 250, 500, 1000], teacher4=5.0)
    # spread: the sample standard deviation over the seeds, as benchmarks.defaults's goal line (18 %, not the population's 13 %)
    assert "at 500 it. 11.5 (2.30x the teacher's own 4 steps), spread 18%" in text and "+30% (seed 0, 250 to 500)" in text


def test_the_benchmarks_score_the_student_a_run_hands_out(tmp_path):
    # with --student-ema a checkpoint holds the raw student and its average: the average is what is scored
    from benchmarks.defaults import checkpoint_student
    from training.ema import EMA_ADAPTER

    write_run(tmp_path / "plain", [50])
    assert torch.equal(checkpoint_student(tmp_path / "plain", 50)["a.lora_A.weight"], torch.full((2, 3), 50.0))
    save_checkpoint(tmp_path / "ema", 50, {"student": {"a.lora_A.weight": torch.zeros(2, 3)}, EMA_ADAPTER: {"a.lora_A.weight": torch.ones(2, 3)},
                                           "fake_score": {"a.lora_A.weight": torch.zeros(2, 3)}}, {}, keep=1000)
    assert torch.equal(checkpoint_student(tmp_path / "ema", 50)["a.lora_A.weight"], torch.ones(2, 3))
