"""lsmtl.test_blend: predictions (1 - w) y_hat + w g_loo(y_hat), w chosen on the
validation MAE after training.

g_loo reconstructs each task with that task hidden. Exact leave-one-out takes
one pass of g per task (10,000 at GEO's width); instead a fixed random partition
of the tasks into K = ceil(1 / lsmtl.mask_rate) groups is hidden one group at a
time, so each task is reconstructed exactly once, from the ~(1 - 1/K) of the
others left visible, in K passes of g: about the share of tasks g saw hidden in
training. The partition comes from config.seed. g's parameters are those of the
final training step (the best checkpoint keeps only the regressor's), applied
to the best regressor's y_hat. w = 0 is y_hat itself, so a candidate list
holding 0 can only keep or lower the validation MAE.
"""

from __future__ import annotations

from typing import Any, Callable

import jax

from lsmtl_jax import metrics
from lsmtl_jax import objectives
from lsmtl_jax import steps
from lsmtl_jax.methods import deep_lsmtl

_PARTITION_SALT = 0x5EED  # the partition's key: config.seed folded with this


def enabled(config, network) -> bool:
  """On, and the network has a g to blend with (lam > 0)."""
  return bool(config.lsmtl.test_blend) and deep_lsmtl.TASK_RELATION in network.extras


def partition(config, num_tasks: int) -> tuple[jax.Array, int]:
  key = jax.random.fold_in(jax.random.PRNGKey(config.seed), _PARTITION_SALT)
  return (objectives.blend_groups(key, num_tasks, config.lsmtl.mask_rate),
          objectives.num_blend_groups(config.lsmtl.mask_rate))


def blended_predictions(network, config) -> Callable:
  """(variables, relation params, w, x) -> blended predictions over the padded head."""
  relation = network.extras[deep_lsmtl.TASK_RELATION]
  groups, num_groups = partition(config, network.num_padded)
  valid = steps.valid_targets(network.num_targets, network.num_padded)

  def predict(variables, relation_params, weight, x):
    y_hat = network.regressor.apply(variables, x, train=False)
    g = lambda u: relation.apply({"params": relation_params}, u)
    loo = objectives.leave_group_out(y_hat, groups, num_groups, g, valid)
    return objectives.blend(y_hat, loo, weight)

  return predict


def stats_step(network, config, relation_params) -> Callable:
  """(variables, w) -> (stats, batch) -> stats: steps.eval_stats_step's sums of
  the blended predictions."""
  predict = blended_predictions(network, config)

  @jax.jit
  def step(variables, rel_params, weight, stats, batch):
    y_hat = predict(variables, rel_params, weight, batch["x"])
    y = steps.pad_targets(batch["y"], network.num_padded)
    return metrics.accumulate(stats, y, y_hat, batch["weight"])

  return lambda variables, weight: (
      lambda stats, batch: step(variables, relation_params, weight, stats, batch))


def choose(weights, val_mae: Callable[[float], float]) -> tuple[float, dict[str, Any]]:
  """(w with the lowest validation MAE, the record for results.json); a tie
  keeps the earlier candidate."""
  maes = [(float(w), float(val_mae(float(w)))) for w in weights]
  best = min(maes, key=lambda wm: wm[1])
  return best[0], {"weight": best[0], "val_mae": {repr(w): m for w, m in maes}}
