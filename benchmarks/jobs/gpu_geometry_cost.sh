#!/usr/bin/env bash
# What the exact 64x64 tile geometry of the fine-tuned NABLA presets costs against the fast one,
# at 14B 1280x720x81 (docs/parity.md): one attention call (op level, 40 heads) and one transformer
# forward (random 14B weights), per backend (flex, and fa4 where it runs).
#   benchmarks/jobs/gpu_geometry_cost.sh OUT_DIR
# Writes OUT_DIR/geometry_cost.json/.md (the bench's own files, log.txt, gpu.txt) and
# OUT_DIR/geometry_cost_pairs.md/.json (exact vs fast side by side; commit, device, torch, command).
# Needs one GPU with >= 80 GB (the 14B forward); about 10 minutes on an H100.
set -euo pipefail
out=${1:?usage: benchmarks/jobs/gpu_geometry_cost.sh OUT_DIR}
root=$(cd "$(dirname "$0")/../.." && pwd)
rows=(nabla_0.7 "nabla_0.7 @fast" nabla_0.6_sta_11_3_3 "nabla_0.6_sta_11_3_3 @fast"
      nabla_0.5_sta_11_5_5 "nabla_0.5_sta_11_5_5 @fast")
status=0
"$root/benchmarks/jobs/gpu_bench.sh" "$out" --stem geometry_cost --levels op transformer --op 40@1280x720 \
    --transformer 14B@1280x720 --backends flex fa4 --no-published --no-checks \
    --op-rows "${rows[@]}" --transformer-rows "${rows[@]}" || status=$?
PYTHONPATH=$root:/tmp/site:${PYTHONPATH:-} python3 -m benchmarks.harness.geometry_cost "$out/geometry_cost.json" || status=$?
exit $status
