"""The paper's cross-platform comparison: train on GEO, select on 1000G, test on
GTEx (all three prepared onto the GEO quantile reference with the same gene
maps; README 'Real data'). The same runs as paper_geo.py.

  python -m lsmtl_jax.experiments --config=configs/experiments/paper_gtex.py \
    --config.data.path=/data/prepared/geo --config.data.val_path=/data/prepared/g1000 \
    --config.data.test_path=/data/prepared/gtex --workdir=runs/paper_gtex
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import paper_geo  # noqa: E402  pylint: disable=g-import-not-at-top

TITLE = "Cross-platform: train GEO, validation 1000G, test GTEx; standardized units"


def get_config():
  config = paper_geo.get_config()
  # Prepared with configs/prepare/g1000.py and gtex.py: the whole of 1000G is its
  # 'val' split and the whole of GTEx its 'test' split. Override the paths on the
  # command line; a missing one stops the run with a one-line error.
  config.data.val_path = "/data/prepared/g1000"
  config.data.test_path = "/data/prepared/gtex"
  config.data.require_external_eval = True  # an empty path is refused, not GEO's splits
  return config


get_runs = paper_geo.get_runs
