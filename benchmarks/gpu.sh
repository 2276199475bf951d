#!/usr/bin/env bash
# GPU rows of benchmarks/RESULTS_speed.md: SD1.5 UNet at 512x512 batch 4 and SDXL UNet at 1024x1024 batch 1
# (real configs from training/configs, random weights), bf16, gradient checkpointing, K=4, CFG 2: s/iteration and
# peak VRAM (torch.cuda.max_memory_allocated) of the project, the network floor and the three-copies design,
# each in a fresh process. Writes OUTDIR/RESULTS_gpu.md (a markdown snippet) and OUTDIR/log.txt.
#
#   bash benchmarks/gpu.sh OUTDIR            (about 5-8 minutes on one H100/H200; needs ~90 GB of GPU memory for
#                                             SDXL's three copies, which are skipped with a note where it is short)
#
# Needs python3 with torch (CUDA), diffusers, peft, accelerate, safetensors. A machine without diffusers (the device
# image here) takes it from wheels in .whl/ (or $TDM_WHEELS), e.g. made beforehand with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1
set -euo pipefail
out=${1:?usage: bash benchmarks/gpu.sh OUTDIR}
cd "$(dirname "$0")/.."
mkdir -p "$out"
out=$(cd "$out" && pwd)
py=${PYTHON:-python3}
if ! "$py" -c "import diffusers" 2>/dev/null; then
  wheels=${TDM_WHEELS:-.whl}
  ls "$wheels"/*.whl >/dev/null 2>&1 || { echo "diffusers is not installed and no wheels are in $wheels" >&2; exit 1; }
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/tdm_site "$wheels"/*.whl
  export PYTHONPATH=/tmp/tdm_site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$out/log.txt" 2>&1 || true
export PYTHONUNBUFFERED=1
"$py" -m benchmarks.speed_table --gpu --work "$out/work" --output "$out/RESULTS_gpu.md" "${@:2}" 2>&1 | tee -a "$out/log.txt"
rm -rf "$out/work"  # the random model folders (GBs)
cat "$out/RESULTS_gpu.md"
