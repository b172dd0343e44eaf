#!/usr/bin/env bash
# The speed-lever measurement on one GPU (H100 80GB): 14B 1280x720x81, 4 CFG-free steps, random
# weights; rows dense -> + STA 11-3-3 -> + compiled blocks -> + LoRA (fused) -> + cache, a variant
# row (compiled blocks split at attention), the 50-step CFG estimate. About 6-8 minutes.
#   benchmarks/jobs/gpu_levers.sh OUT_DIR [python -m benchmarks.harness.levers arguments...]
# Installs the carried wheels (.whl/: diffusers, ftfy, peft, accelerate, ...; benchmarks/jobs/gpu_wheels.sh)
# through benchmarks/jobs/gpu_env.sh, writes OUT_DIR/levers.json, levers.md, log.txt, gpu.txt, and prints
# the table last. Exit status 1 if a row failed (its error is in levers.json).
set -euo pipefail
out=${1:?usage: benchmarks/jobs/gpu_levers.sh OUT_DIR [arguments...]}
shift
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
# shellcheck source=/dev/null
source benchmarks/jobs/gpu_env.sh
python3 -c "import diffusers, peft" || { echo "diffusers/peft missing: stage them with benchmarks/jobs/gpu_wheels.sh and carry .whl" >&2; exit 2; }
mkdir -p "$out"
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw,memory.used \
    --format=csv 2>/dev/null || echo "nvidia-smi unavailable"; } > "$out/gpu.txt"
python3 -m benchmarks.harness.levers --out "$out" "$@" 2>&1 | tee "$out/log.txt"
