#!/bin/sh
# The Docker image's entrypoint: check that the output volume is writable, then run wan-nabla.
#
#   docker-entrypoint.sh generate --prompt "..."   ->  exec wan-nabla generate --prompt "..."
#
# Why: `docker run -v "$PWD/outputs:/outputs"` on a host without outputs/ makes Docker create
# it owned by root, and the image's user (uid 1000) cannot write there; without this check the
# run loads the model and fails only when it writes. Here it is one line and exit 2 before any
# work. WAN_NABLA_OUTPUT_DIR (default /outputs) is where videos go when --output is not given.
# Limits: only the output directory is checked (weights are read-only by design).
set -eu
out="${WAN_NABLA_OUTPUT_DIR:-/outputs}"
if [ -d "$out" ]; then
    probe="$out/.wan-nabla-write-probe.$$"
    if ! ( : > "$probe" ) 2>/dev/null; then
        echo "wan-nabla: error: the output volume $out is not writable by uid $(id -u); on the host run" \
             "'mkdir -p outputs' before 'docker run' (Docker creates a missing directory as root)," \
             "or give 'docker run --user \$(id -u):\$(id -g)'" >&2
        exit 2
    fi
    rm -f "$probe"
fi
exec wan-nabla "$@"
