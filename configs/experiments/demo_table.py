"""Every method of the comparison on the synthetic demo compendium (8,000
profiles, 943 landmarks, 9,520 targets), with CPU-sized trunks: the table and
the four figures in under 30 minutes on 2 CPU cores.

  python -m lsmtl_jax.experiments --config=configs/experiments/demo_table.py --workdir=runs/demo_table

Sizes are the paper's divided by ~35 (2 blocks of 256 units instead of 3 of
9,000) and every network trains 4 epochs (200 steps of 128), so the numbers
show the machinery, not the paper's ranking.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402  pylint: disable=g-import-not-at-top
from configs import demo  # noqa: E402  pylint: disable=g-import-not-at-top

TITLE = ("Demo comparison: synthetic compendium, 9,520 targets, 2 x 256 trunks, 200 steps; "
         "standardized units, 800 test profiles")

TRUNK = {"model.depth": 2, "model.hidden": 256}
LSMTL = {**TRUNK, "model.dropout": 0.1, "lsmtl.lam": 0.1, "lsmtl.mask_rate": 0.1,
         "lsmtl.bottleneck": 128}


def get_config():
  config = demo.get_config()
  config.compare_with = ()
  config.lsmtl.lam = 0.1  # pinned: the table's runs predate lsmtl.lam = 'auto'
  config.model.depth, config.model.hidden = 2, 256
  config.lsmtl.bottleneck = 128
  config.optim.learning_rate = 1e-3
  config.train.batch_size = 128
  config.train.num_steps = 200
  config.train.log_every = 25
  config.train.eval_every = 100
  config.train.checkpoint_every = 100
  config.train.eval_batch_size = 400
  config.lsr_l1.alphas = (1e-3, 1e-2, 3e-2)
  config.lsr_l1.max_iters = 60
  config.lsr_l1.tol = 1e-4
  config.knn.ks = (1, 5, 10, 20, 40)
  config.semigan.critic_hidden = 128
  # ||W - WB||^2 on 64 sampled rows of W per step keeps Deep-AMTL's 9,520 x 9,520
  # B trainable on 2 cores; the memory guard still counts B at full size.
  config.amtl.row_sample = 64
  return config


def get_runs(config):
  del config
  runs = common.table_runs(TRUNK, extra={"deep_lsmtl": LSMTL})
  runs += common.mtl_runs(2, (128, 256), extra={"deep_lsmtl": LSMTL})
  runs += common.dgex_lsmtl_runs((1, 2, 3), (128, 256))
  runs += common.sensitivity_runs(LSMTL, {
      "model.dropout": (0.0, 0.1, 0.3), "lsmtl.lam": (0.01, 0.1, 1.0),
      "lsmtl.mask_rate": (0.05, 0.1, 0.3), "lsmtl.bottleneck": (32, 128, 512)})
  return runs
