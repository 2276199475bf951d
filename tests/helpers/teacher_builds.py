"""The check both text-conditioned teacher scripts share: two builds from one seed are the same bytes."""
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
