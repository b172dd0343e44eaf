#!/usr/bin/env bash
# Stage, in git-ignored folders of this checkout, the Python wheels a bare GPU machine lacks, so a
# GPU job can install them offline. Runs on a machine with PyPI access (Python 3.12 wheels, x86-64).
#
#   benchmarks/jobs/gpu_wheels.sh            -> .whl/  diffusers (pyproject's pin) + ftfy, wcwidth, importlib_metadata,
#                                      peft + accelerate + psutil (LoRA loading, --offload model),
#                                      torchao (the fp8 extra's pin: --quantize fp8, ~3.4 MB)
#   benchmarks/jobs/gpu_wheels.sh --fa4      -> also flash-attn-4 and its CuTe-DSL dependencies (.whl/), with the
#                                      ~90 MB CUDA-13 runtime wheel split in two parts: .whl-big/part.aa and
#                                      .whl/part.ab (a job carries at most 64 MiB at a time)
#   benchmarks/jobs/gpu_wheels.sh --ffmpeg   -> .ffmpeg/: imageio-ffmpeg's Python files + its ffmpeg binary, xz-packed
#
# On the GPU machine (see benchmarks/jobs/gpu_env.sh, which does the install):
#   job 1 carries .whl-big and copies part.aa to /tmp/parts/; job 2 (right after, same machine) carries
#   .whl and runs `source benchmarks/jobs/gpu_env.sh`, which joins the parts and installs into /tmp/site.
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
fa4=0; ff=0
for a in "$@"; do
  case $a in --fa4) fa4=1 ;; --ffmpeg) ff=1 ;; *) echo "unknown option $a" >&2; exit 2 ;; esac
done
mkdir -p .git/info
for d in /.whl/ /.whl-big/ /.ffmpeg/; do
  grep -qxF "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude
done
mkdir -p .whl
get() {  # get DIR SPEC...
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$1" "${@:2}"
}
diffusers=$(python3 -c 'import re,pathlib; print(re.search(r"\"(diffusers[^\"]*)\"", pathlib.Path("pyproject.toml").read_text())[1].replace(" ", ""))')
peft=$(python3 -c 'import re,pathlib; print(re.search(r"\"(peft[^\"]*)\"", pathlib.Path("pyproject.toml").read_text())[1].replace(" ", ""))')
torchao=$(python3 -c 'import re,pathlib; print(re.search(r"fp8 = \[\"(torchao[^\"]*)\"", pathlib.Path("pyproject.toml").read_text())[1].replace(" ", ""))')
get .whl "$diffusers" ftfy wcwidth importlib_metadata "$peft" accelerate psutil "$torchao"
if [[ $fa4 == 1 ]]; then
  get .whl flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
    nvidia-cutlass-dsl-libs-core==4.8.1 apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5 quack-kernels==0.6.5
  if [[ ! -f .whl-big/part.aa ]]; then
    tmp=$(mktemp -d)
    get "$tmp" nvidia-cutlass-dsl-libs-cu13==4.8.1
    mkdir -p .whl-big
    (cd "$tmp" && split -b 47M nvidia_cutlass_dsl_libs_cu13-*.whl part. && ls nvidia_cutlass_dsl_libs_cu13-*.whl > name)
    mv "$tmp/part.aa" .whl-big/part.aa && mv "$tmp/part.ab" .whl/part.ab && mv "$tmp/name" .whl/big.name
    rm -rf "$tmp"
  fi
fi
if [[ $ff == 1 && ! -f .ffmpeg/ffmpeg.xz ]]; then
  tmp=$(mktemp -d)
  get "$tmp" imageio-ffmpeg
  (cd "$tmp" && unzip -q imageio_ffmpeg-*.whl)
  mkdir -p .ffmpeg/imageio_ffmpeg/binaries
  cp "$tmp"/imageio_ffmpeg/*.py .ffmpeg/imageio_ffmpeg/
  cp "$tmp"/imageio_ffmpeg/binaries/__init__.py .ffmpeg/imageio_ffmpeg/binaries/
  xz -T0 -6 -c "$tmp"/imageio_ffmpeg/binaries/ffmpeg-* > .ffmpeg/ffmpeg.xz
  rm -rf "$tmp"
fi
du -sh .whl .whl-big .ffmpeg 2>/dev/null || true
