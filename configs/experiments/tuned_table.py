"""The comparison table with every method's own coefficients selected on
validation and the selected setting rerun with three seeds (demo-table size:
synthetic compendium, 9,520 targets, 2 x 256 trunks, 200 steps of 128).

  python -m lsmtl_jax.experiments --config=configs/experiments/tuned_table.py --workdir=runs/tuned_table

Budget, equal for every network method: `tune.budget` settings (the method's
defaults, then a seeded draw from its record's tunables: Deep-LSMTL lam, k,
rho, mask_per, stop_gradient_target, dropout; GO-MTL, CNMTL, AMTL, AMTFL
penalty weights over four decades; SemiGAN's adversarial weight and dropout;
the DenseNet's and D-GEX's dropout and weight decay), each trained once with
the test split switched off; the best by validation MAE rerun with
`tune.seeds` seeds. LSR searches its ridge with the same budget; LSR-L1 and
KNN-GE choose alpha and k on validation inside one fit. table.md gives the
mean and sd over seeds, the chosen setting and how many were tried, and the
Deep-LSMTL vs lam = 0 per-seed differences with a paired per-gene test.
"""

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402  pylint: disable=g-import-not-at-top
import demo_table  # noqa: E402  pylint: disable=g-import-not-at-top

TITLE = ("Tuned comparison: synthetic compendium, 2 x 256 trunks, 200 steps; every method's "
         "coefficients chosen on validation, seeds mean ± sd; standardized units, 800 test "
         "profiles")


def get_config():
  config = demo_table.get_config()
  config.report = False
  config.train.measure_peak = False
  config.tune = ml_collections.ConfigDict(dict(budget=4, seeds=3))
  return config


def get_runs(config):
  runs = []
  for run in common.table_runs(demo_table.TRUNK, extra={"deep_lsmtl": demo_table.LSMTL}):
    network = run["method"] in common.NETWORKS
    budget = config.tune.budget if network or run["method"] == "lsr" else 1
    seeds = config.tune.seeds if network else 1  # the linear and neighbour fits use no seed
    runs.append({**run, "tune": {"budget": budget, "seeds": seeds}})
  return runs
