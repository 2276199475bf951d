#!/usr/bin/env bash
# The whole test suite, slow end-to-end tests (real ComfyUI server, real browser) included.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"` for the fast ones.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m pytest "$@"
