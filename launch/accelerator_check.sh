#!/usr/bin/env bash
# The prepared accelerator check (docs/performance.md, "The accelerator check"),
# from the repository root, on a machine with one GPU or TPU; about 9 minutes:
#   launch/accelerator_check.sh OUTDIR [--flag=value ...]
# Prints the plan with its estimate, then runs it; OUTDIR/accelerator_check.json
# and .md are rewritten after every part, so a run stopped early keeps the
# parts it finished. JAX must see the accelerator (e.g. pip install "jax[cuda12]").
set -euo pipefail
usage="usage: launch/accelerator_check.sh OUTDIR [--flag=value ...]"
out=${1:?$usage}
shift
mkdir -p "$out"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # the test and predict children share the device
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
backend=$(python -c "import jax; print(jax.default_backend())" 2>/dev/null)
if [ "$backend" = "cpu" ]; then
  echo "warning: JAX sees no accelerator here (backend cpu); the check runs on the CPU" >&2
fi
python -m lsmtl_jax.benchmark --suite=accelerator --dry_run "$@"
exec timeout 590 python -m lsmtl_jax.benchmark --suite=accelerator \
  --out="$out/accelerator_check.json" --markdown="$out/accelerator_check.md" "$@"
