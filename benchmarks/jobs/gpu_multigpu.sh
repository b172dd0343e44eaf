#!/usr/bin/env bash
# The one command for the multi-GPU measurements (per-step time 1 GPU vs Ulysses vs CFG parallel,
# all-to-all time, exactness across ranks) on every GPU of one machine:
#   benchmarks/jobs/gpu_multigpu.sh OUT_DIR [python -m benchmarks.harness.multigpu arguments...]
# e.g. on the device machine:  source benchmarks/jobs/gpu_env.sh && benchmarks/jobs/gpu_multigpu.sh "$OUT"
# Installs the carried wheels when the image lacks diffusers (benchmarks/jobs/gpu_env.sh), turns NVLink
# multicast off in every process (torchrun's children inherit it), records the GPUs and their
# topology, runs torchrun with one process per GPU (NPROC overrides) and writes multigpu.json,
# multigpu.md, gpus.txt and log.txt under OUT_DIR; the table is printed last. About 8 minutes on
# 2x H200 (--budget-s, default 470 s, stops starting new measurements; the JSON is rewritten after
# every measurement, so a run cut short keeps what it measured).
set -euo pipefail
out=${1:?usage: benchmarks/jobs/gpu_multigpu.sh OUT_DIR [multigpu arguments...]}
shift
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
if ! python3 -c "import diffusers" 2>/dev/null; then
  # shellcheck source=/dev/null
  source benchmarks/jobs/gpu_env.sh
fi
export PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
mkdir -p "$out"
n=${NPROC:-$(nvidia-smi -L 2>/dev/null | wc -l)}
if [[ "$n" -lt 1 ]]; then
  echo "no GPU found (nvidia-smi -L); set NPROC and pass --device cpu for a CPU run" >&2
  exit 2
fi
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.used,memory.total --format=csv \
    && nvidia-smi topo -m; } > "$out/gpus.txt" 2>&1 || echo "nvidia-smi unavailable" > "$out/gpus.txt"
python3 -m torch.distributed.run --nproc-per-node "$n" -m benchmarks.harness.multigpu --out "$out" "$@" 2>&1 \
  | tee "$out/log.txt"
