"""Atomic file writes: a crash or a kill never leaves a half-written file under the final name."""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _default_file_mode() -> int:
    # mkstemp creates 0600 files; give the result the mode a plain open() would (ComfyUI may run as another user)
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


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
