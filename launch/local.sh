#!/usr/bin/env bash
# One host (CPU or GPUs): the same command every launcher runs.
#   launch/local.sh [CONFIG] [WORKDIR] [--config.key=value ...]
set -euo pipefail
config=${1:-configs/gemma.py}; workdir=${2:-runs/local}
shift $(( $# > 2 ? 2 : $# ))
exec python -m haf_jax.train --config="$config" --workdir="$workdir" "$@"
