#!/usr/bin/env bash
# The H100 measurement of the flash-attn-4 backend, in one job: ~8 minutes on an H100 with FA4's
# first-call compiles and the published-style max-autotune compile, capped at 9.5 minutes:
#   source benchmarks/jobs/gpu_env.sh && WAN_NABLA_COMMIT=<sha> benchmarks/jobs/gpu_fa4.sh "$OUT"
# 1. benchmarks/jobs/gpu_fa4_check.py: FA4 vs flex vs float64 references (kernel, rotary, tiny transformer
#    on padded grids with batch 2, every preset)       -> gpu_fa4_check.json (~2-3 min, cut at 200 s)
# 2. the attention op at 14B heads, 1280x720x81, both backends: dense cuDNN/flex/FA4, every
#    NABLA/STA/preset row, checks, the geometry comparison (128x64 vs 128x128, time-paired or
#    not, by total time), the mask breakdown, the published-style rows (last) on their cropped
#    grid                      -> fa4_op.json/.md/.png, targets.json (~5-6 min, cut at 9.3 min in all)
# Every step has its own time limit, results are checkpointed while they are measured, and a
# short table is printed last. Files under OUT: gpu.txt, log.txt, gpu_fa4_check.json, fa4_op.json,
# fa4_op.md, fa4_op_speedup.png, targets.json (7). The 14B transformer level (T3, T6) is
# benchmarks/jobs/gpu_fa4_transformer.sh, a second job. WAN_NABLA_QUICK=1 runs the same steps at tiny
# sizes on the CPU (a smoke run of this script; FA4 is then reported unavailable).
set -uo pipefail
out=${1:?usage: benchmarks/jobs/gpu_fa4.sh OUT_DIR}
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
source benchmarks/jobs/gpu_prelude.sh
python3 -c "from wan_nabla.attention.backends import fa4; import torch; print('flash-attn-4:', fa4.available(torch.device('cuda')))" \
  > "$out/log.txt" 2>&1; cat "$out/log.txt"
quick_check=(); bench_args=(--op 40@1280x720 --budget-ms 200)
if [[ ${WAN_NABLA_QUICK:-0} == 1 ]]; then
  quick_check=(--device cpu --quick); bench_args=(--quick --device cpu --budget-ms 5)
fi
start=$(date +%s)
timeout 200 python3 benchmarks/jobs/gpu_fa4_check.py "$out" ${quick_check[@]+"${quick_check[@]}"} > "$out/check_log.txt" 2>&1
check_rc=$?
sed -n '/^SUMMARY/,$p' "$out/check_log.txt"  # the failures and one line per section
cat "$out/check_log.txt" >> "$out/log.txt" && rm -f "$out/check_log.txt"
echo "[check: rc $check_rc, $(( $(date +%s) - start )) s]" | tee -a "$out/log.txt"
left=$(( 560 - ($(date +%s) - start) ))
timeout $(( left > 120 ? left : 120 )) python3 -m benchmarks.harness --levels op "${bench_args[@]}" --backends flex fa4 \
  --geometry --breakdown --out "$out" --stem fa4_op >> "$out/log.txt" 2>&1
op_rc=$?
grep -E "geometry \[|FAILED|Error" "$out/log.txt" | tail -n 20
echo "[op level: rc $op_rc, $(( $(date +%s) - start )) s in all]" | tee -a "$out/log.txt"
if [[ -f "$out/fa4_op.json" ]]; then  # a stopped run still has its checkpointed rows: render them
  python3 -m benchmarks.harness --render "$out/fa4_op.json" --out "$out" --stem fa4_op | tail -n 45
fi
echo "check rc $check_rc, op level rc $op_rc"
