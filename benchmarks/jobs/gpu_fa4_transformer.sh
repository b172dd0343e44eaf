#!/usr/bin/env bash
# Optional second job: the 14B transformer forward per backend (targets T3 and T6), ~5 minutes on
# an H100 (14B random-weight model built on the GPU, 8 rows x 3 forwards):
#   source benchmarks/jobs/gpu_env.sh && WAN_NABLA_COMMIT=<sha> benchmarks/jobs/gpu_fa4_transformer.sh "$OUT"
# Rows: full (dense cuDNN under flex, dense flash-attn-4 under fa4), STA 11-3-3, NABLA 0.05 and
# 0.1 (random weights keep more blocks than a trained model: these land near density 0.07-0.15),
# each on both backends. Files under OUT: gpu.txt, log.txt, fa4_transformer.json/.md, targets.json.
# Merge with the op job afterwards (on any machine):
#   python -m benchmarks.harness --render OP/fa4_op.json TR/fa4_transformer.json --stem h100_fa4 --out benchmarks/results
set -uo pipefail
out=${1:?usage: benchmarks/jobs/gpu_fa4_transformer.sh OUT_DIR}
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
source benchmarks/jobs/gpu_prelude.sh
timeout 560 python3 -m benchmarks.harness --levels transformer --transformer 14B@1280x720 --backends flex fa4 \
  --transformer-rows sta_11_3_3 "nabla 0.05" "nabla 0.1" --reps 2 --out "$out" --stem fa4_transformer 2>&1 \
  | tee "$out/log.txt" | tail -n 40
