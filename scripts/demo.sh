#!/usr/bin/env bash
# The main job: set up the environment, then distil the committed digits teacher with
# training.distill (K=4 and K=1, a few minutes on a 2-core CPU) and write outputs/demo/digits_grid.png.
# Extra arguments go to `python -m benchmarks.demo` (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec "${TDM_VENV:-.venv}/bin/python" -m benchmarks.demo "$@"
