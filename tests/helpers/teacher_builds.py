"""The checks both text-conditioned teachers share: two builds from one seed are the same bytes, and the
teacher draws what a prompt asks (and not when the text is cut)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch


def assert_deterministic_build(build: Callable[[Path], object], tmp_path: Path, family_name: str) -> None:
    """``build(output)`` twice into fresh folders: identical files, no temporary folder left, loads as ``family_name``."""
    from training.models import load_family

    torch.set_num_threads(1)
    outs = [tmp_path / "a" / "teacher", tmp_path / "b" / "teacher"]
    for out in outs:
        out.parent.mkdir()
        build(out)
    files = sorted(p.relative_to(outs[0]) for p in outs[0].rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(outs[1]) for p in outs[1].rglob("*") if p.is_file())
    for rel in files:
        assert (outs[0] / rel).read_bytes() == (outs[1] / rel).read_bytes(), rel
    assert not list(outs[0].parent.glob(".*")), "temporary folders left beside the teacher"
    assert load_family(str(outs[0])).name == family_name


def prompt_adherence(teacher, cfg: float, with_text: bool = True) -> float:
    """Share of 60 samples (50 DDIM / Euler steps, one per fully specified caption, fixed noise) whose colour,
    shape and position the shapes classifier reads as the caption asks; chance is 1/60. ``with_text=False``
    gives every sample the empty prompt, which must fail the same bar."""
    from benchmarks import text_metrics, text_sampling

    prompts, labels = text_sampling.balanced_prompts(60, full_only=True)
    noise = text_sampling.noise_for(teacher, 60, seed=7)
    samples = text_sampling.sample_text_teacher(teacher, 50, prompts if with_text else [""] * 60, noise, cfg=cfg)
    _, predicted = text_metrics.classifier_outputs(text_metrics.load_classifier(train_if_missing=False), samples)
    return text_metrics.attribute_accuracy(predicted, labels)["all"]
