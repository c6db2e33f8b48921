#!/usr/bin/env bash
# One host, one process, from the repository root:
#   launch/local.sh CONFIG WORKDIR [--config.field=value ...]
# Multi-process, TPU VM, SLURM and GKE launchers come with the sharded trainer.
set -euo pipefail
usage="usage: launch/local.sh CONFIG WORKDIR [--config.field=value ...]"
config=${1:?$usage}
workdir=${2:?$usage}
shift 2
exec python -m lsmtl_jax.main --config="$config" --workdir="$workdir" "$@"
