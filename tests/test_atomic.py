"""tdm_core.atomic: a folder written under a temporary name replaces the old one only when complete."""
from __future__ import annotations

import os
import stat

import pytest

from tdm_core.atomic import atomic_folder


def test_atomic_folder_replaces_an_existing_folder_with_plain_modes(tmp_path):
    target = tmp_path / "teacher"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    with atomic_folder(target) as temp:
        assert temp.parent == tmp_path and temp != target and not any(temp.iterdir())
        (temp / "unet").mkdir()
        (temp / "unet" / "weights.bin").write_bytes(b"new")
        assert (target / "stale.txt").is_file()  # the old folder stays readable while the new one is written
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*")) == ["unet", "unet/weights.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["teacher"]  # no temporary or moved-aside folder left
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o777 & ~umask  # mkdtemp's 0700 would hide it from other users
    assert stat.S_IMODE((target / "unet" / "weights.bin").stat().st_mode) == 0o666 & ~umask


def test_atomic_folder_that_fails_leaves_the_old_folder_and_no_temporary(tmp_path):
    target = tmp_path / "teacher"
    target.mkdir()
    (target / "kept.txt").write_text("old")
    with pytest.raises(RuntimeError, match="half-way"):
        with atomic_folder(target) as temp:
            (temp / "partial.bin").write_bytes(b"x")
            raise RuntimeError("half-way")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["teacher"]
    assert [p.name for p in target.iterdir()] == ["kept.txt"]
    with atomic_folder(tmp_path / "fresh" / "new") as temp:  # parents are created; no old folder to move aside
        (temp / "a.txt").write_text("a")
    assert (tmp_path / "fresh" / "new" / "a.txt").read_text() == "a"
