#!/usr/bin/env bash
# Attention error and kept mass of every sparse preset against full attention, on one GPU:
#   source benchmarks/jobs/gpu_env.sh && benchmarks/jobs/gpu_compare.sh OUT_DIR [python -m benchmarks.harness.compare_table args]
# Wan2.1-1.3B with random weights at 832x480x81, 3 denoising steps, one pipeline for all presets
# (about 3-4 minutes on one H100). Writes compare_table.json, compare_table.md, log.txt, gpu.txt and,
# with matplotlib, compare_table.png and one mask picture under OUT_DIR; prints the table last. No MP4
# is written (no ffmpeg needed); SSIM is left out when scikit-image is not installed.
# On a CPU: benchmarks/jobs/gpu_compare.sh OUT --quick --device cpu (tiny model, the same code).
set -euo pipefail
out=${1:?usage: benchmarks/jobs/gpu_compare.sh OUT_DIR [python -m benchmarks.harness.compare_table args]}
shift
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
if ! python3 -c "import diffusers, ftfy" 2>/dev/null; then
  echo "diffusers/ftfy missing: run 'source benchmarks/jobs/gpu_env.sh' first (carry .whl from benchmarks/jobs/gpu_wheels.sh)" >&2
  exit 2
fi
export PYTHONPATH=$root:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
mkdir -p "$out"
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw,memory.used \
    --format=csv 2>/dev/null || echo "nvidia-smi unavailable"; } > "$out/gpu.txt"
python3 -m benchmarks.harness.compare_table --out "$out" "$@" 2>&1 | tee "$out/log.txt"
