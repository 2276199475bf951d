"""benchmarks.unify end to end at tiny sizes: four students distilled by training.distill (plain K=1/K=4,
unify, unify without K on the fake score), the unify LoRA loaded back with its K table, the table written."""
from __future__ import annotations

import json

import torch

from benchmarks import unify
from training.steps_aware import k_embedding_of


def test_unify_benchmark_writes_every_row(tmp_path):
    output = tmp_path / "RESULTS_unify.md"
    argv = ["--iterations", "2", "--batch-size", "2", "--num-eval", "20", "--seeds", "0", "--work", str(tmp_path / "work"),
            "--output", str(output)]
    assert unify.main(argv) == 0
    text = output.read_text()
    assert "python -m benchmarks.unify --iterations 2" in text
    rows = json.loads((tmp_path / "work" / "results.json").read_text())
    assert [(r["student"], r["steps"]) for r in rows] == [(name, steps) for _, name, steps in unify.ROWS]
    # every row was measured on its own samples: untrained students are far from real digits, and the rows differ
    assert all(r["fd_real"] > 1.0 for r in rows)
    assert len({round(r["fd_real"], 6) for r in rows}) > 1
    assert text.count("\n| unify {1,2,4} |") == 3

    family, info = unify.load_student(unify.lora_path(tmp_path / "work", "unify"))
    assert info.k_choices == [1, 2, 4]
    table = k_embedding_of(family.network).table("student")
    assert table[[0, 1, 3]].abs().sum() > 0  # the trained K rows came back from the file
    plain, plain_info = unify.load_student(unify.lora_path(tmp_path / "work", "k4"))
    assert k_embedding_of(plain.network) is None and plain_info.k_choices == []
    noise = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    classes = torch.arange(4)
    at1 = unify.student_samples(family, info, 1, classes, noise)
    assert at1.shape == noise.shape and torch.isfinite(at1).all()
