#!/usr/bin/env bash
# How much a random split flatters each method on data with donor structure
# (docs/data.md, "Grouped splits"). One GEO-shaped GCTx of 2,000 samples from 200
# donors of 10 (each donor a per-gene offset, sd 0.5 log2), 943 landmarks -> 1,000
# targets, prepared per seed with a random split and with split.group_by=donor;
# each method trained on each with the same seed. Prints the table.
#
#   nice bash configs/experiments/grouped_splits.sh WORKDIR "0 1 2" [GROUP_EFFECT]
#
# About 100 s per split kind and seed on 2 shared CPU cores.
set -euo pipefail
work=${1:?usage: grouped_splits.sh WORKDIR [SEEDS] [GROUP_EFFECT]}
seeds=${2:-0 1 2}
effect=${3:-0.5}  # sd of the donor offsets; a fresh WORKDIR for another
mkdir -p "$work"
if [ ! -f "$work/donors.gctx" ]; then
  python -m lsmtl_jax.data.synthetic_gctx --out="$work/donors.gctx" --samples=2000 \
    --probes=4000 --write_maps="$work/maps" --landmarks=943 --targets=1000 \
    --duplicate_fraction=0 --group_size=10 --group_effect="$effect" --seed=0
fi
net=(--config=configs/demo.py --config.data.synthetic.enabled=false
     --config.model.hidden=256 --config.lsmtl.bottleneck=64 --config.train.num_epochs=30
     --config.report=false)
for seed in $seeds; do
  for kind in random grouped; do
    data="$work/data/${kind}_s$seed"
    group=()
    [ "$kind" = grouped ] && group=(--config.split.group_by=donor)
    [ -d "$data" ] || python -m lsmtl_jax.prepare --config=configs/prepare/geo.py \
      --config.input.path="$work/donors.gctx" --config.genes.landmark_map="$work/maps/map_lm.txt" \
      --config.genes.target_map="$work/maps/map_tg.txt" --config.seed="$seed" \
      --config.output="$data" "${group[@]}"
    run="$work/runs/${kind}_s$seed"
    [ -f "$run/lam0.1/results.json" ] || python -m lsmtl_jax.main "${net[@]}" \
      --config.data.path="$data" --config.seed="$seed" --workdir="$run/lam0.1" \
      --config.method=deep_lsmtl --config.lsmtl.lam=0.1 \
      --config.compare_with='("lsr","knn","densenet")'
    [ -f "$run/lam0.01/results.json" ] || python -m lsmtl_jax.main "${net[@]}" \
      --config.data.path="$data" --config.seed="$seed" --workdir="$run/lam0.01" \
      --config.method=deep_lsmtl --config.lsmtl.lam=0.01 --config.compare_with='()'
  done
done
python - "$work" $seeds <<'PY'
import json, os, sys
import numpy as np
work, seeds = sys.argv[1], sys.argv[2:]
methods = [("LSR", "lam0.1/compare/lsr"), ("KNN-GE", "lam0.1/compare/knn"),
           ("DenseNet", "lam0.1/compare/densenet"), ("Deep-LSMTL lam=0.01", "lam0.01"),
           ("Deep-LSMTL lam=0.1", "lam0.1")]
def mae(kind, seed, sub, units):
  r = json.load(open(os.path.join(work, "runs", f"{kind}_s{seed}", sub, "results.json")))
  t = r["splits"]["test"]
  return (t["expression_units"] if units else t)["mae_mean"]
for units in (False, True):
  print("\ntest MAE, " + ("expression units (log2)" if units else "standardized units")
        + f", mean over seeds {' '.join(seeds)} (per-seed flattering in brackets)")
  print("| method | random split | grouped split | flattering (random - grouped) / grouped |")
  print("|---|---|---|---|")
  for name, sub in methods:
    r = np.array([mae("random", s, sub, units) for s in seeds])
    g = np.array([mae("grouped", s, sub, units) for s in seeds])
    per = ", ".join(f"{x:+.1%}" for x in (r - g) / g)
    print(f"| {name} | {r.mean():.4f} | {g.mean():.4f} | "
          f"{((r.mean() - g.mean()) / g.mean()):+.1%} ({per}) |")
PY
