#!/usr/bin/env bash
# The one command for a whole GPU benchmark run of wan-nabla:
#   benchmarks/jobs/gpu_bench.sh OUT_DIR [python -m benchmarks.harness arguments...]
# e.g. on the device machine:  benchmarks/jobs/gpu_bench.sh "$OUT" --sweep
# Installs the carried wheels (.whl/, staged by benchmarks/jobs/gpu_wheels.sh: diffusers, ftfy) when
# the image lacks them, runs the checkout in place (PYTHONPATH), records the GPU's state, runs
# `python -m benchmarks.harness` (all levels unless arguments say otherwise) writing results.json,
# results.md, results_speedup.png and log.txt under OUT_DIR, and prints a short table last.
set -euo pipefail
out=${1:?usage: benchmarks/jobs/gpu_bench.sh OUT_DIR [python -m benchmarks.harness arguments...]}
shift
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
if ! python3 -c "import diffusers, ftfy" 2>/dev/null; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "diffusers/ftfy missing and no .whl/ here: run benchmarks/jobs/gpu_wheels.sh in the checkout and carry .whl" >&2
    exit 2
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$root:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
mkdir -p "$out"
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw,memory.used \
    --format=csv 2>/dev/null || echo "nvidia-smi unavailable"; } > "$out/gpu.txt"
set -o pipefail
python3 -m benchmarks.harness --out "$out" "$@" 2>&1 | tee "$out/log.txt"
