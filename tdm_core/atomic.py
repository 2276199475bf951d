"""Atomic file writes: a crash or a kill never leaves a half-written file under the final name (host-free: the
trainer, the benchmarks and the TDM Distill node write through it)."""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _umask() -> int:
    """The process umask, read without changing it where the kernel says it (Linux: /proc/self/status), since
    setting it to read it back is process-wide and races with other threads (ComfyUI's server writes files too)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0)  # elsewhere: set and restore
    os.umask(umask)
    return umask


def _default_file_mode() -> int:
    # mkstemp creates 0600 files; give the result the mode a plain open() would (ComfyUI may run as another user)
    return 0o666 & ~_umask()


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; renames it onto ``path`` when the block succeeds,
    removes it when the block fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        yield Path(temp)
        os.chmod(temp, _default_file_mode())
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.remove(temp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    with atomic_write(path) as temp:
        temp.write_text(text)
    return Path(path)


def save_png_atomic(image, path: str | os.PathLike) -> Path:
    """``image``: a PIL image."""
    with atomic_write(path) as temp:
        image.save(temp, format="PNG")
    return Path(path)


@contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yields an empty temporary folder beside ``path``; when the block succeeds its entries get the modes a
    plain mkdir/open would give and it replaces ``path`` (an existing folder is moved aside first, then
    removed); when the block fails it is removed and ``path`` is left as it was."""
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        yield temp
        umask = _umask()
        for entry in [temp, *temp.rglob("*")]:
            os.chmod(entry, (0o777 if entry.is_dir() else 0o666) & ~umask)
        if path.exists():
            old = path.with_name(f".{path.name}-old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(temp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(temp, path)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
