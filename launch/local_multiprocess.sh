#!/usr/bin/env bash
# N JAX processes on this host, each with its own CPU devices, one job:
#   launch/local_multiprocess.sh NUM_PROCESSES DEVICES_PER_PROCESS CONFIG WORKDIR [--config.x=y ...]
# For testing multi-host code paths and for one big CPU host. If any process
# fails, the others are stopped and the script exits with its status.
set -euo pipefail
usage="usage: launch/local_multiprocess.sh NUM_PROCESSES DEVICES_PER_PROCESS CONFIG WORKDIR [overrides]"
num=${1:?$usage}
devices=${2:?$usage}
config=${3:?$usage}
workdir=${4:?$usage}
shift 4
port=${COORDINATOR_PORT:-$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
mkdir -p "$workdir"

pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; }
trap cleanup EXIT INT TERM
for ((i = 0; i < num; i++)); do
  JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES=$devices \
    python -m lsmtl_jax.main --config="$config" --workdir="$workdir" \
    --distributed --coordinator_address="127.0.0.1:$port" \
    --num_processes="$num" --process_id="$i" "$@" >"$workdir/process_$i.log" 2>&1 &
  pids+=("$!")
done
status=0
for _ in "${pids[@]}"; do
  # wait -n returns as soon as any process ends: a failure stops the rest at once.
  if ! wait -n; then
    status=1
    break
  fi
done
if [ "$status" -ne 0 ]; then
  echo "a process failed; stopping the others (logs: $workdir/process_*.log)" >&2
  exit 1
fi
trap - EXIT
echo "all $num processes finished (logs: $workdir/process_*.log)"
