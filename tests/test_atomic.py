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


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="the umask is read from /proc on Linux only")
def test_atomic_write_reads_the_umask_without_setting_it(tmp_path, monkeypatch):
    # setting the umask to read it back is process-wide: a file another thread of ComfyUI's server created in
    # that window would get mode 0666. The mode of the written file is still the one a plain open() gives.
    from tdm_core.atomic import write_text_atomic

    umask = os.umask(0o027)
    try:
        def refuse(_mask):
            raise AssertionError("os.umask was called")

        monkeypatch.setattr(os, "umask", refuse)
        written = write_text_atomic(tmp_path / "x.txt", "x")
        assert stat.S_IMODE(written.stat().st_mode) == 0o640
    finally:
        monkeypatch.undo()
        os.umask(umask)
