"""What a method is: one record that says everything the rest of the code asks.

A network method names its model (`build`: the regressor and any extra
parameter modules, each under a name that says what it is), its loss (`loss`:
gradients, batch statistics and step metrics for one batch) and the extra
memory its step holds (`memory`). A closed-form or neighbour method has `fit`
instead. Every method may own a config section with defaults, fixed settings
it imposes on the shared sections (e.g. lam = 0 for the DenseNet), checks of
its own fields, and the coefficients a tuning run may search (`tunables`).

The training loop, the memory guard, the benchmark and inference read these
records; none of them asks which method it runs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import optax

Config = ml_collections.ConfigDict


@dataclasses.dataclass(frozen=True)
class Tunable:
  """A coefficient a tuning run may search: a config field and candidate values.

  `values` are the candidates in search order; `scale` says how they are spaced
  ('log' or 'linear'; 'choice' for switches), for plots and for refining.
  `implies` are settings a searched value needs (e.g. weight decay: AdamW).
  """

  field: str
  values: tuple[Any, ...]
  scale: str = "log"
  implies: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class StepInputs:
  """What a network method's loss sees of one training step.

  `y` is padded to the head's width; `valid` is 1 for real targets (None when
  nothing is padded). Keys derive from (seed, step), so a resumed run draws
  what an uninterrupted one would.
  """

  regressor: Any
  extras: Mapping[str, Any]
  config: Config
  dropout_key: jax.Array
  mask_key: jax.Array
  y: jnp.ndarray
  valid: jnp.ndarray | None


# (state, batch, inputs) -> (gradients, new batch statistics, step metrics)
LossFn = Callable[[Any, dict, StepInputs], tuple[Any, Any, dict]]
# (config, padded number of targets, dtype) -> (regressor, {name: extra module})
BuildFn = Callable[[Config, int, Any], tuple[Any, dict[str, Any]]]
# (config, padded number of targets, trunk output width) -> (float32 elements, note)
MemoryFn = Callable[[Config, int, int], tuple[int, str]]
# config -> [(ok, message)]: the method's own checks, each message naming the field
ChecksFn = Callable[[Config], Iterable[tuple[bool, str]]]


@dataclasses.dataclass(frozen=True)
class Method:
  name: str
  label: str
  section: str | None = None  # the method's own config section
  defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  fixed: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # dotted field: value
  checks: ChecksFn | None = None
  tunables: tuple[Tunable, ...] = ()
  build: BuildFn | None = None
  loss: LossFn | None = None
  memory: MemoryFn | None = None
  fit: Callable[[Config, Any], dict] | None = None

  @property
  def is_network(self) -> bool:
    return self.build is not None

  def __post_init__(self):
    if (self.build is None) == (self.fit is None):
      raise ValueError(f"method {self.name!r}: give exactly one of build (a network) or fit")
    if self.build is not None and self.loss is None:
      raise ValueError(f"method {self.name!r}: a network method needs a loss")


def gradients_and_metrics(loss_fn, params, second_term: str):
  """loss_fn(params) -> (total, (batch_stats, task loss, second term)): the
  gradients, new batch statistics and the step's metrics, the second term
  reported under the method's own name for it."""
  (loss, (batch_stats, l_task, l_second)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(params)
  step_metrics = {"loss": loss, "task_loss": l_task, second_term: l_second,
                  "grad_norm": optax.tree.norm(grads)}
  return grads, batch_stats, step_metrics
