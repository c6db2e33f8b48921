"""Settings of the comparison methods (SPEC.md section 3), one section each.

`add_defaults(config)` fills in any section a config lacks, so older configs
and workdirs keep working; configs/experiments/* set them explicitly.
Regularizer weights are per task: the training step divides each penalty by
the number of real targets, as the task loss is a mean over targets.
"""

from __future__ import annotations

import ml_collections

DEFAULTS = {
    # LSR-L1: lasso (1/2n)||Y - XW - b||^2 + alpha ||W||_1 by FISTA, all targets at
    # once, started from the ridge solution; alpha picked on the validation MAE.
    "lsr_l1": {"alphas": (1e-4, 1e-3, 1e-2, 3e-2), "max_iters": 300, "tol": 1e-5},
    # KNN-GE: mean target profile of the k nearest training profiles (Euclidean, in
    # standardized landmark space); k picked on the validation MAE.
    "knn": {"ks": (1, 5, 10, 20, 40), "query_block": 32, "train_block": 16384},
    # SemiGAN: G = the regressor, D = MLP on (landmarks, targets) pairs, trained
    # simultaneously; G minimizes task loss + adversarial * BCE(D(x, G(x)), real).
    # semigan_semi also treats a fixed fraction of the training profiles (picked by
    # a hash of their landmark values) as landmark-only: adversarial terms only.
    "semigan": {"adversarial": 0.01, "critic_hidden": 256, "critic_depth": 2,
                "unlabeled_fraction": 0.5},
    "go_mtl": {"rank": 64, "mu": 1e-4, "lam": 1e-4},
    "cnmtl": {"num_clusters": 10, "eps_m": 1e-3, "eps_b": 1e-3, "eps_w": 1e-2,
              "every": 100, "kmeans_iters": 10},
    # row_sample > 0: ||W - WB||^2 estimated each step on that many random rows of W
    # (unbiased; a CPU economy for the demo); 0: exact.
    "amtl": {"alpha": 1e-2, "gamma": 1e-2, "row_sample": 0},
    "amtfl": {"alpha": 1e-3, "gamma": 0.1, "mu": 1e-5},
    # Estimated training memory above this stops a network run before it
    # allocates (the paper's out-of-memory cells). 0: the device's own memory.
    "memory": {"limit_gb": 0.0},
}


def add_defaults(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  for section, fields in DEFAULTS.items():
    if section not in config:
      config[section] = ml_collections.ConfigDict(fields)
    else:
      for name, value in fields.items():
        if name not in config[section]:
          config[section][name] = value
  return config
