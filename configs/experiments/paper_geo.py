"""The paper's GEO comparison at full size (GPU/TPU): every method of the table,
the MTL comparison on 2-block DenseNets of 3,000 / 6,000 / 9,000 units, D-GEX vs
Deep-LSMTL on the MLP base (1-3 layers x 3,000 / 6,000 / 9,000) and Deep-LSMTL's
sensitivity to dropout, lambda, mask rate and bottleneck size.

  python -m lsmtl_jax.experiments --config=configs/experiments/paper_geo.py \
    --config.data.path=/data/prepared/geo --workdir=runs/paper_geo

Trunk widths of the table follow the paper ("the largest network that fits"):
GO-MTL 8,000, CNMTL 4,000, AMTFL 5,000, AMTL 7,000, Deep-LSMTL 9,000 units.
memory.limit_gb caps what the guard allows (0: the device's memory); set it to
the paper's GPU (e.g. 12) to reproduce its out-of-memory cells.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402  pylint: disable=g-import-not-at-top
from configs import geo  # noqa: E402  pylint: disable=g-import-not-at-top

TITLE = "GEO (80/10/10): test and validation on held-out GEO profiles, standardized units"

TRUNK = {"model.depth": 3, "model.hidden": 9000}
WIDTHS = {"go_mtl": 8000, "cnmtl": 4000, "amtfl": 5000, "amtl": 7000, "deep_lsmtl": 9000,
          "densenet": 9000, "dgex": 9000, "semigan": 9000, "semigan_semi": 9000}
LSMTL = {"model.dropout": 0.1, "lsmtl.lam": 0.1, "lsmtl.mask_rate": 0.1,
         "lsmtl.bottleneck": 256}


def get_config():
  config = geo.get_config()
  config.compare_with = ()
  config.memory.limit_gb = 0.0
  config.lsr_l1.alphas = (1e-4, 1e-3, 1e-2, 3e-2)
  config.lsr_l1.max_iters = 500
  config.knn.ks = (1, 5, 10, 20, 50)
  config.knn.query_block = 64
  config.semigan.critic_hidden = 3000
  return config


def get_runs(config):
  del config
  runs = common.table_runs(TRUNK, WIDTHS, extra={"deep_lsmtl": LSMTL,
                                                 "dgex": {"model.depth": 3}})
  runs += common.mtl_runs(2, (3000, 6000, 9000), extra={"deep_lsmtl": LSMTL})
  runs += common.dgex_lsmtl_runs((1, 2, 3), (3000, 6000, 9000), extra={"deep_lsmtl": LSMTL})
  base = {**TRUNK, **LSMTL}
  runs += common.sensitivity_runs(base, {
      "model.dropout": (0.0, 0.1, 0.2, 0.3), "lsmtl.lam": (0.01, 0.1, 0.5, 1.0),
      "lsmtl.mask_rate": (0.05, 0.1, 0.2, 0.3), "lsmtl.bottleneck": (64, 256, 1024)})
  return runs
