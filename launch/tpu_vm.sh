#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: create it (unless it exists), copy this
# repository to every worker, install, and run the same command on all workers.
# JAX finds the other hosts itself (--distributed).
#
#   launch/tpu_vm.sh NAME CONFIG WORKDIR [--config.field=value ...]
#
# Environment (defaults in brackets): ZONE [us-central2-b], ACCELERATOR [v4-32],
# VERSION [tpu-ubuntu2204-base], PROJECT [gcloud's default], SPOT [0; 1 = spot VMs].
# WORKDIR should be a gs:// path or a shared disk so every worker sees the same
# checkpoints (Orbax writes gs:// directly).
set -euo pipefail
usage="usage: launch/tpu_vm.sh NAME CONFIG WORKDIR [overrides]"
name=${1:?$usage}
config=${2:?$usage}
workdir=${3:?$usage}
shift 3
zone=${ZONE:-us-central2-b}
accelerator=${ACCELERATOR:-v4-32}
version=${VERSION:-tpu-ubuntu2204-base}
project_flag=()
if [ -n "${PROJECT:-}" ]; then project_flag=(--project "$PROJECT"); fi
spot_flag=()
if [ "${SPOT:-0}" = 1 ]; then spot_flag=(--spot); fi

if ! gcloud compute tpus tpu-vm describe "$name" --zone "$zone" "${project_flag[@]}" >/dev/null 2>&1; then
  gcloud compute tpus tpu-vm create "$name" --zone "$zone" "${project_flag[@]}" \
    --accelerator-type "$accelerator" --version "$version" "${spot_flag[@]}"
fi

repo=$(cd "$(dirname "$0")/.." && pwd)
archive=$(mktemp --suffix=.tar.gz)
trap 'rm -f "$archive"' EXIT
git -C "$repo" archive --format=tar.gz -o "$archive" HEAD
gcloud compute tpus tpu-vm scp "$archive" "$name:~/lsmtl_jax.tar.gz" --worker=all \
  --zone "$zone" "${project_flag[@]}"

overrides=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$name" --worker=all --zone "$zone" "${project_flag[@]}" \
  --command "set -e; mkdir -p ~/lsmtl_jax && tar -xzf ~/lsmtl_jax.tar.gz -C ~/lsmtl_jax
    cd ~/lsmtl_jax && python3 -m pip install -q -e . 'jax[tpu]'
    python3 -m lsmtl_jax.main --distributed --config=$(printf %q "$config") \
      --workdir=$(printf %q "$workdir")$overrides"
