# Source this on a GPU machine, in the checkout: installs the wheels staged by benchmarks/jobs/gpu_wheels.sh
# (carried as .whl/, and for FA4 the first half of the CUDA library copied to /tmp/parts/ by an
# earlier job) into /tmp/site and sets PYTHONPATH so the checkout runs in place.
#   source benchmarks/jobs/gpu_env.sh
_root=$(pwd)
if [[ -f .whl/part.ab && -f /tmp/parts/part.aa ]]; then
  cat /tmp/parts/part.aa .whl/part.ab > "/tmp/$(cat .whl/big.name)"
  _big="/tmp/$(cat .whl/big.name)"
else
  _big=""
fi
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl $_big || return 1
fi
if [[ -d .ffmpeg ]]; then
  cp -r .ffmpeg/imageio_ffmpeg /tmp/site/ && xz -dc .ffmpeg/ffmpeg.xz > /tmp/ffmpeg && chmod +x /tmp/ffmpeg
  export IMAGEIO_FFMPEG_EXE=/tmp/ffmpeg
fi
export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:$_root${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export WAN_NABLA_COMMIT=${WAN_NABLA_COMMIT:-$(cat .commit 2>/dev/null || echo unknown)}
