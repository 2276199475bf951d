"""The package layering issue 21 relies on: ``nodes/`` (inside ComfyUI) never imports ``training/`` (the
headless trainer and its diffusers/accelerate stack), and ``tdm_core/`` (shared by both) imports neither host."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "nodes": {"training", "diffusers", "accelerate", "peft"},
    "tdm_core": {"training", "nodes", "comfy", "comfy_api", "comfy_extras", "folder_paths", "diffusers", "transformers", "accelerate", "peft"},
}


def imported_packages(path: Path) -> set[str]:
    """Top-level names a module imports, relative imports resolved against the repository root."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                names.add((node.module or "").split(".")[0])
            elif node.level >= 2:  # from ..x import y: a sibling package of the repository root
                names.add(node.module.split(".")[0] if node.module else "")
                names.update(alias.name for alias in node.names if not node.module)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_stay_in_their_layer(package):
    offending = {str(path.relative_to(ROOT)): sorted(imported_packages(path) & FORBIDDEN[package])
                 for path in sorted((ROOT / package).rglob("*.py"))}
    assert not {k: v for k, v in offending.items() if v}, offending
