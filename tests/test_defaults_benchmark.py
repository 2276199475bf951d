"""benchmarks.defaults end to end at tiny sizes: bare training.distill runs (defaults plus --cfg and
--seed), checkpoints scored as rows, a cached rerun, and the table with its command."""
from __future__ import annotations

import json

import pytest

from benchmarks import defaults


@pytest.mark.slow
def test_defaults_benchmark_distils_with_defaults_and_writes_the_table(tmp_path):
    work, output = tmp_path / "work", tmp_path / "R.md"
    argv = ["--teachers", "digits", "--seeds", "0", "--iterations", "1,2", "--ablations", "l2", "--ablation-iterations", "2",
            "--num-eval", "20", "--work", str(work), "--output", str(output)]
    assert defaults.main(argv) == 0
    text = output.read_text()
    assert "python -m benchmarks.defaults --teachers digits --seeds 0" in text
    for needle in ("| teacher 50 steps, CFG 2 | 100 |", f"| {defaults.UNTRAINED} | 4 |", "| TDM K=4, defaults, 1 it. | 4 |", "| TDM K=4, defaults, 2 it. | 4 |",
                   "| squared L2, 2 it. | 4 |"):
        assert needle in text, needle
    # the student was trained by training.distill with nothing but the benchmark's own flags
    assert "wrote " in json.loads((work / "digits" / "seed0" / "done").read_text())["stdout_tail"]
    summary = json.loads((work / "digits" / "seed0" / "student_run" / "summary.json").read_text())
    assert "probe samples changed by" in summary["message"]
    assert json.loads((work / "digits" / "results.json").read_text())["seed0/summary"] == summary
    cache = json.loads((work / "digits" / "results.json").read_text())
    assert cache["seed0/1"] != cache["seed0/2"]  # two checkpoints, two students
    # the step-0 student: the 1-step checkpoint still equals it (the warm-up gives the first update lr 0), the 2-step one not
    assert cache["untrained"] == cache["seed0/1"] and cache["untrained"] != cache["seed0/2"]
    assert cache["teacher50"]["fd_teacher"] == pytest.approx(0.0, abs=1e-3)
    # the preview: teacher at 50 and 4 steps, then the seed-0 student at each checkpoint, linked from the table
    from PIL import Image

    assert "![digits: teacher and the seed-0 student at each checkpoint](R_digits.png)" in text
    preview = Image.open(tmp_path / "R_digits.png")
    row_height = 16 * 3 + 4  # 16x16 digits at scale 3, 4 px apart (benchmarks.grid_image)
    assert preview.height == 18 + 4 * row_height + 4  # header + 2 teacher rows + 2 checkpoints
    assert preview.width > 20 * 16 * 3  # 20 columns
    before = output.stat().st_mtime_ns
    assert defaults.main(argv) == 0  # everything cached: rewrites the table without training
    assert output.read_text() == text and output.stat().st_mtime_ns >= before
    # --cached-only: a second seed that was never run is neither trained nor scored; its rows are counted out
    partial = tmp_path / "P.md"
    only = [*argv[:argv.index("--seeds")], "--seeds", "0,1", *argv[argv.index("--seeds") + 2:argv.index("--output")], "--output", str(partial), "--cached-only"]
    assert defaults.main(only) == 0
    assert not (work / "digits" / "seed1").exists() and "seed1/1" not in json.loads((work / "digits" / "results.json").read_text())
    rows = {line.split(" | ")[0]: line for line in partial.read_text().splitlines() if line.startswith("| TDM K=4, defaults")}
    assert rows["| TDM K=4, defaults, 2 it."].endswith(" | 1 |") and "P_digits.png" in partial.read_text()


def test_defaults_benchmark_refuses_a_cfg_below_one(tmp_path, capsys):
    with pytest.raises(SystemExit):
        defaults.main(["--teachers", "digits", "--cfg", "0.5", "--work", str(tmp_path), "--output", str(tmp_path / "R.md")])
    assert "--cfg 0.5: a teacher CFG is at least 1" in capsys.readouterr().err
    assert not (tmp_path / "R.md").exists()


def test_an_ablation_over_several_seeds_passes_its_flag_and_averages_the_runs(tmp_path):
    work, output = tmp_path / "work", tmp_path / "R.md"
    argv = ["--teachers", "digits", "--seeds", "", "--ablations", "fake_velocity", "--ablation-seeds", "0,1",
            "--ablation-iterations", "2", "--num-eval", "20", "--work", str(work), "--output", str(output)]
    assert defaults.main(argv) == 0
    cache = json.loads((work / "digits" / "results.json").read_text())
    runs = [cache["ablation/fake_velocity"], cache["ablation/fake_velocity/seed1"]]
    assert runs[0] != runs[1]  # two training seeds, two students
    for seed, folder in enumerate(("ablation_fake_velocity", "ablation_fake_velocity_seed1")):
        command = json.loads((work / "digits" / folder / "done").read_text())["command"]
        assert command[command.index("--fake-score-weighting") + 1] == "velocity", folder
        assert command[command.index("--seed") + 1] == str(seed), folder
    mean = (runs[0]["fd_real"] + runs[1]["fd_real"]) / 2
    row = next(line for line in output.read_text().splitlines() if line.startswith(f"| {defaults.ABLATION_NAMES['fake_velocity']}, 2 it."))
    assert row.endswith("| 2 |") and f"| {mean:.1f} ± " in row, row


def test_two_runs_on_one_work_folder_keep_each_others_rows(tmp_path):
    # two benchmark processes on one --work, both through cached_measure: a row the other wrote while this one
    # computed is kept, and a row the other made meanwhile is read, not computed again
    teacher = defaults.TEACHERS["flow"]
    cache_path = tmp_path / "flow" / "results.json"
    cache_path.parent.mkdir()
    cache_path.write_text(json.dumps({"teacher50": {"fd_real": 1.0}}))
    computed, returned = [], {}

    def compute(key, value):
        def run():
            computed.append(key)
            return value
        return run

    def first_run(cached):
        # the second run starts after this one read the file, makes its rows, among them one this run needs
        returned["second"] = defaults.cached_measure(teacher, tmp_path, second_run)
        cached("ablation/shared", compute("ablation/shared again", {"fd_real": 9.0}))

        def mine():
            # while this row is computed, a third run writes another
            defaults.cached_measure(teacher, tmp_path, lambda c: c("ablation/late", compute("ablation/late", {"fd_real": 5.0})))
            computed.append("ablation/mine")
            return {"fd_real": 3.0}

        cached("ablation/mine", mine)

    def second_run(cached):
        cached("ablation/other", compute("ablation/other", {"fd_real": 2.0}))
        cached("ablation/shared", compute("ablation/shared", {"fd_real": 4.0}))

    returned["first"] = defaults.cached_measure(teacher, tmp_path, first_run)
    rows = {"teacher50": {"fd_real": 1.0}, "ablation/other": {"fd_real": 2.0}, "ablation/shared": {"fd_real": 4.0},
            "ablation/late": {"fd_real": 5.0}, "ablation/mine": {"fd_real": 3.0}}
    assert json.loads(cache_path.read_text()) == rows and returned["first"] == rows
    assert computed == ["ablation/other", "ablation/shared", "ablation/late", "ablation/mine"]  # the shared row made once


def test_two_processes_on_one_run_folder_train_it_once(tmp_path, monkeypatch):
    """A run folder is trained by one benchmark process at a time: the second waits, then reuses the finished run
    (two workers once resumed the same seed at once and wrote its log twice). The training subprocess is replaced by
    a recorder here: what is tested is the lock around it."""
    import threading
    import time as _time
    from types import SimpleNamespace

    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        _time.sleep(0.5)  # the other thread arrives meanwhile
        return SimpleNamespace(returncode=0, stdout="wrote x", stderr="")

    monkeypatch.setattr(defaults.subprocess, "run", fake_run)
    evaluator = SimpleNamespace(model_dir=tmp_path, prompts_file=lambda folder: tmp_path / "p.txt")
    folder = tmp_path / "digits" / "seed0"
    runs = [threading.Thread(target=defaults.distil, args=(defaults.TEACHERS["digits"], evaluator, folder, 0, 10, 5, [])) for _ in range(2)]
    for run in runs:
        run.start()
    for run in runs:
        run.join()
    assert len(calls) == 1 and (folder / "done").is_file()


def test_every_ablation_has_a_table_label():
    assert set(defaults.ABLATIONS) == set(defaults.ABLATION_NAMES)
    assert defaults.ABLATIONS["fake_updates_5_l2"] == ["--fake-score-updates", "5", "--distance", "l2"]


def test_the_old_defaults_ablation_sets_both_flags_back():
    """fake_updates_1_huber is the trainer as it was before issue 22: both changed defaults undone, nothing else."""
    from training.config import DistillConfig

    assert defaults.ABLATIONS["fake_updates_1_huber"] == ["--fake-score-updates", "1", "--distance", "huber"]
    new = DistillConfig()
    assert (new.fake_score_updates, new.distance) == (5, "l2")


def test_fidelity_goals_report_each_goal_with_its_number():
    """Issue 22's goals on a synthetic cache: ratio to the teacher's own 4 steps, seed spread, each run's checkpoint
    after 250 iterations against its one before (the worst run named), FD to real data against the teacher's 50 steps."""
    cache = {"teacher4": {"fd_teacher": 10.0}, "teacher50": {"fd_real": 50.0}}
    for seed, values in ((0, (30.0, 20.0, 22.0, 30.0)), (1, (30.0, 24.0, 20.0, 31.0))):
        for n, value in zip((100, 250, 500, 1000), values):
            cache[f"seed{seed}/{n}"] = {"fd_teacher": value, "fd_real": 40.0 + seed * 20}
    text = defaults.fidelity_goals(cache, (0, 1, 2), (100, 250, 500, 1000))[1]
    assert "21.0 = 2.10x the teacher's own 4 steps' 10.0 (goal at most 2x): missed" in text
    assert "seed spread 7 % of the mean over 2 runs (goal at most 25 %): holds" in text
    # per run: seed 0 went 20 -> 22 (+10 %), seed 1 24 -> 20; then 22 -> 30 (+36 %) and 20 -> 31 (+55 %)
    assert "500 against 250 iterations, worst of 2 runs (seed 0) +10 % (goal: at most 20 % worse): holds" in text
    assert "1000 against 500 iterations, worst of 2 runs (seed 1) +55 % (goal: at most 20 % worse): missed" in text
    assert "250 against 100" not in text
    assert "FD to real data 50.0 against the teacher's 50 steps' 50.0 (goal: no worse): holds" in text
    cache["teacher4"]["fd_teacher"] = 11.0
    del cache["seed1/1000"], cache["seed1/500"]
    text = defaults.fidelity_goals(cache, (0, 1), (100, 250, 500, 1000))[1]
    assert "22.0 = 2.00x" in text and ": holds" in text.split(";")[0] and "seed spread: one run, not measured" in text
    assert "1000 against 500 iterations, worst of 1 runs (seed 0)" in text
    assert "FD to real data 40.0" in text
    assert defaults.fidelity_goals({"teacher4": {"fd_teacher": 1.0}}, (0,), (100, 500)) == []  # nothing at 500: no line


def _write_log(folder, rows, finished=True):
    (folder / "student_run").mkdir(parents=True)
    (folder / "student_run" / "log.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    if finished:
        (folder / "done").write_text("{}")


def _probe(step, gaps, ts=(899, 674, 449, 224)):
    return {"step": step, "loss_fake": 0.1,
            "fidelity": [{"t": t, "moment_gap": g, "paired_gap": g, "fake_score_error": g, "teacher_error": g, "dm_to_cfg": None}
                         for t, g in zip(ts, gaps)]}


def test_fidelity_trace_groups_seeds_and_names_what_it_left_out(tmp_path):
    from benchmarks import fidelity_trace

    _write_log(tmp_path / "seed0", [_probe(25, [0.1, 0.2, 0.3, 0.4])])
    _write_log(tmp_path / "seed1", [_probe(25, [0.3, 0.4, 0.5, 0.6])])
    _write_log(tmp_path / "ablation_fake_updates_5", [_probe(25, [1.0] * 4)])
    # a restarted run: the aborted attempt's iteration 50 must not count
    _write_log(tmp_path / "ablation_fake_updates_5_seed1", [_probe(25, [9.0] * 4), _probe(50, [9.0] * 4), _probe(25, [3.0] * 4)],
               finished=False)
    _write_log(tmp_path / "ablation_fake_updates_5_l2_seed2", [_probe(25, [5.0] * 4), _probe(50, [6.0] * 4)])
    _write_log(tmp_path / "ablation_k1", [_probe(25, [7.0], ts=(899,))])
    groups = fidelity_trace.read_runs(tmp_path)
    assert {name: len(seeds) for name, seeds in groups.items()} == {"defaults": 2, "fake_updates_5": 2, "fake_updates_5_l2": 1, "k1": 1}
    table, missing = fidelity_trace.trace_table(groups, [25, 50], "moment_gap")
    lines = table.splitlines()
    assert lines[2:] == [
        "| defaults | 2 | 25 | 1 (899): 0.200, 2 (674): 0.300, 3 (449): 0.400, 4 (224): 0.500 |",
        "| fake_updates_5 | 2 (1 unfinished) | 25 | 1 (899): 2.000, 2 (674): 2.000, 3 (449): 2.000, 4 (224): 2.000 |",
        "| fake_updates_5_l2 | 1 | 25 | 1 (899): 5.000, 2 (674): 5.000, 3 (449): 5.000, 4 (224): 5.000 |",
        "| fake_updates_5_l2 | 1 | 50 | 1 (899): 6.000, 2 (674): 6.000, 3 (449): 6.000, 4 (224): 6.000 |",
        "| k1 | 1 | 25 | 1 (899): 7.000 |"]
    assert "ablation_fake_updates_5_seed1: no probe at iteration 50" in missing and "seed0: no probe at iteration 50" in missing
    assert "1 (899): -" in fidelity_trace.trace_table(groups, [25], "dm_to_cfg")[0]  # None at CFG 1 is shown, not averaged
