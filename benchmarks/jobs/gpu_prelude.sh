# Sourced by the GPU job scripts (benchmarks/jobs/gpu_fa4.sh, benchmarks/jobs/gpu_fa4_transformer.sh) after `cd` to
# the checkout: refuse to run without the carried wheels installed, record the commit, run the
# checkout in place, create the output folder and note the GPU's state in it.
#   out=$1; source benchmarks/jobs/gpu_prelude.sh
if ! python3 -c "import diffusers" 2>/dev/null; then
  echo "diffusers missing: run 'source benchmarks/jobs/gpu_env.sh' (with .whl carried) first" >&2
  exit 2
fi
if [[ -z "${WAN_NABLA_COMMIT:-}" || "${WAN_NABLA_COMMIT}" == unknown ]]; then
  WAN_NABLA_COMMIT=$(git rev-parse HEAD 2>/dev/null || echo unknown)
  [[ $WAN_NABLA_COMMIT == unknown ]] && echo "WARNING: WAN_NABLA_COMMIT not set and no git: results will say 'unknown'" >&2
fi
export WAN_NABLA_COMMIT PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
mkdir -p "$out"
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw,memory.used \
    --format=csv 2>/dev/null || echo "nvidia-smi unavailable"; } > "$out/gpu.txt"
