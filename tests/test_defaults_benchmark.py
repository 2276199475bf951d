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
    # when a student drifts: benchmarks.fidelity_trace groups both seeds' logs and averages their per-step probe
    from benchmarks import fidelity_trace

    groups = fidelity_trace.read_runs(work / "digits")
    assert list(groups) == ["fake_velocity"] and len(groups["fake_velocity"]) == 2
    logs = [[json.loads(line) for line in (work / "digits" / folder / "student_run" / "log.jsonl").read_text().splitlines()]
            for folder in ("ablation_fake_velocity", "ablation_fake_velocity_seed1")]
    last = [next(row for row in reversed(log) if row.get("fidelity")) for log in logs]
    assert last[0]["step"] == last[1]["step"] == 2
    gaps = [(last[0]["fidelity"][k]["moment_gap"] + last[1]["fidelity"][k]["moment_gap"]) / 2 for k in range(4)]
    trace = fidelity_trace.trace_table(groups, [1, 2], "moment_gap").splitlines()
    assert trace[-1] == "| fake_velocity | 2 | 2 | " + " | ".join(f"{g:.3f}" for g in gaps) + " |"


def test_two_runs_on_one_work_folder_keep_each_others_rows(tmp_path):
    # two benchmark processes on one --work: a row the other wrote while this one computed is not lost
    teacher = defaults.TEACHERS["flow"]
    cache_path = tmp_path / "flow" / "results.json"
    cache_path.parent.mkdir()
    cache_path.write_text(json.dumps({"teacher50": {"fd_real": 1.0}}))

    def other_run_writes(cached):
        def compute():
            on_disk = json.loads(cache_path.read_text())
            cache_path.write_text(json.dumps({**on_disk, "ablation/other": {"fd_real": 2.0}}))
            return {"fd_real": 3.0}

        cached("ablation/mine", compute)

    defaults.cached_measure(teacher, tmp_path, other_run_writes)
    assert json.loads(cache_path.read_text()) == {"teacher50": {"fd_real": 1.0}, "ablation/other": {"fd_real": 2.0},
                                                   "ablation/mine": {"fd_real": 3.0}}
