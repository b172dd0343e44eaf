# wan-nabla for a CUDA GPU node. Weights are not baked in: mount them.
#
#   docker build --build-arg WAN_NABLA_COMMIT="$(git rev-parse HEAD)" -t wan-nabla .
#   mkdir -p outputs          # else Docker creates it as root and uid 1000 cannot write (the
#                             # entrypoint then stops with one line saying so)
#   docker run --rm --gpus all \
#     -v "$PWD/weights:/weights:ro" -v "$PWD/outputs:/outputs" -v wan-cache:/hf-cache \
#     wan-nabla generate --model /weights/Wan2.1-T2V-1.3B-Diffusers \
#       --config nabla_0.7 --prompt "a red fox in the snow"      # -> outputs/a-red-fox-in-the-snow.mp4
#
# The image installs wan-nabla with the fa4, lora, compare and serve extras (below). The commit given as
# WAN_NABLA_COMMIT is recorded in every sidecar (the image has no .git to read it from).
#
#   docker run --rm --gpus all -p 8000:8000 -e WAN_NABLA_API_KEY=change-me \
#     -v "$PWD/weights:/weights:ro" -v "$PWD/outputs:/outputs" -v wan-cache:/hf-cache \
#     wan-nabla serve --model /weights/Wan2.1-T2V-1.3B-Diffusers --config nabla_0.7 \
#       --host 0.0.0.0 --data-dir /outputs/serve        (docs/serve.md)
#
# The base image's torch (2.11, CUDA 12.8) satisfies pyproject's torch pin, so pip keeps it.
FROM pytorch/pytorch:2.11.0-cuda12.8-cudnn9-runtime

# The source commit, for the sidecars' versions.commit (output/sidecar.py git_commit).
ARG WAN_NABLA_COMMIT=unknown

# torch.compile (FlexAttention) JIT-builds Triton launchers with a host C compiler, which the
# "runtime" images lack (pytorch/pytorch#116696); g++ serves inductor's CPU fallback.
# Distro package versions are not pinned: the base image tag already fixes the distro release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc g++ libc6-dev \
    && rm -rf /var/lib/apt/lists/*

# Compiled Triton/inductor kernels go to the cache volume too, so only the first run compiles.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/hf-cache \
    TORCHINDUCTOR_CACHE_DIR=/hf-cache/torchinductor \
    TRITON_CACHE_DIR=/hf-cache/triton \
    WAN_NABLA_OUTPUT_DIR=/outputs \
    WAN_NABLA_COMMIT=${WAN_NABLA_COMMIT} \
    WAN_NABLA_HEALTH_FILE=/tmp/wan-nabla-serve.health

WORKDIR /opt/wan-nabla
# configs/ is built into the package as its presets (setup.py); benchmarks/ stays out of the image.
COPY pyproject.toml setup.py MANIFEST.in README.md ./
COPY configs ./configs
COPY wan_nabla ./wan_nabla
COPY --chmod=755 scripts/docker-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
# The fa4 extra (flash-attn-4 + the CUTLASS DSL, CUDA 12 libraries) gives `attention.backend: auto`
# the FA4 kernels on sm90+ GPUs; elsewhere, or if it cannot load, wan-nabla runs flex (one log line).
# lora: peft for --lora; compare: SSIM and pictures for `wan-nabla compare`.
# DL3013 reads the local source with extras as an unpinned package; its dependencies are pinned in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[fa4,lora,compare,serve]"

# uid 1000 (the "app" user) matches the usual host user, so bind-mounted outputs stay editable. Newer Ubuntu bases
# ship a uid-1000 'ubuntu' user, which is removed first. Ownership must be set before VOLUME.
RUN if id -u 1000 >/dev/null 2>&1; then userdel "$(id -nu 1000)"; fi \
    && useradd --create-home --uid 1000 app \
    && mkdir -p /weights /outputs /hf-cache \
    && chown app:app /outputs /hf-cache

# Numeric, so Kubernetes' runAsNonRoot can verify it (a name cannot be checked).
USER 1000
VOLUME ["/weights", "/outputs", "/hf-cache"]
WORKDIR /outputs
EXPOSE 8000
# `serve` writes its /health URL to WAN_NABLA_HEALTH_FILE while it listens: the check probes it
# (unhealthy while the model loads, past the start period, or if it died). Any other command
# (`generate`, `batch`) writes no file and the check passes. Run by path: the script needs only
# the standard library, and importing the package would import torch on every probe.
HEALTHCHECK --interval=30s --timeout=10s --start-period=15m --retries=3 \
    CMD ["python", "/opt/wan-nabla/wan_nabla/serve/healthcheck.py"]
ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]
CMD ["--help"]
