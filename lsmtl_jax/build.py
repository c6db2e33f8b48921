"""A network, assembled once: mesh -> model -> optimizer -> sharded state -> jitted steps.

`build_network(config, num_landmarks, num_targets, mesh)` is what training,
the memory guard, the benchmark and inference all start from, so each builds
the same model with the same padding and shardings. The method record
(methods/) supplies the regressor, its extra parameter modules and its loss.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from lsmtl_jax import config_lib
from lsmtl_jax import metrics
from lsmtl_jax import parallel
from lsmtl_jax import steps
from lsmtl_jax.methods import base
from lsmtl_jax.methods import deep_lsmtl
from lsmtl_jax.methods import registry


def create_learning_rate_fn(config, num_steps: int) -> optax.Schedule:
  lr, warmup = config.optim.learning_rate, config.optim.warmup_steps
  if config.optim.schedule == "constant":
    return optax.constant_schedule(lr)
  if config.optim.schedule == "cosine":
    return optax.cosine_decay_schedule(lr, max(num_steps, 1))
  return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(num_steps, warmup + 1))


def create_optimizer(config, num_steps: int) -> optax.GradientTransformation:
  schedule = create_learning_rate_fn(config, num_steps)
  if config.optim.name == "adam":
    opt = optax.adam(schedule)
  elif config.optim.name == "adamw":
    opt = optax.adamw(schedule, weight_decay=config.optim.weight_decay)
  else:
    opt = optax.sgd(schedule, momentum=0.9)
  if config.optim.grad_clip_norm > 0:
    opt = optax.chain(optax.clip_by_global_norm(config.optim.grad_clip_norm), opt)
  scale = config.lsmtl.relation_lr_scale
  if scale != 1.0:
    opt = _scale_subtree_updates(opt, deep_lsmtl.TASK_RELATION, scale)
  return opt


def _scale_subtree_updates(inner: optax.GradientTransformation, name: str,
                           scale: float) -> optax.GradientTransformation:
  """`inner`, with the updates of params[name] (when present) multiplied by
  `scale`: that subtree's learning rate is lr * scale. The optimizer state is
  inner's own, so its layout (and a checkpoint's) does not depend on scale."""

  def update(updates, state, params=None):
    updates, state = inner.update(updates, state, params)
    if name in updates:
      updates = {**updates, name: jax.tree.map(lambda u: u * scale, updates[name])}
    return updates, state

  return optax.GradientTransformation(inner.init, update)


def init_variables(key, regressor, extras: dict[str, nn.Module], num_landmarks: int,
                   num_targets: int):
  """({'regressor': ..., <extra name>: ...} params, batch_stats), with logical boxes."""
  reg_key, extra_key = jax.random.split(key)
  variables = regressor.init(reg_key, jnp.zeros((1, num_landmarks)), train=False)
  params = {"regressor": variables["params"]}
  for i, (name, module) in enumerate(sorted(extras.items())):
    k = extra_key if i == 0 else jax.random.fold_in(extra_key, i)
    params[name] = module.init(k, *module.dummy_inputs(num_landmarks, num_targets))["params"]
  return params, variables.get("batch_stats", {})


@dataclasses.dataclass(frozen=True)
class Network:
  """A method's model on a mesh: the regressor (padded head), its extra
  parameter modules, and how to create, shard and step its state."""

  config: ml_collections.ConfigDict
  method: base.Method
  mesh: jax.sharding.Mesh
  num_landmarks: int
  num_targets: int
  num_padded: int
  regressor: nn.Module
  extras: dict[str, nn.Module]

  @property
  def rules(self):
    return parallel.logical_rules(self.config.mesh)

  def _boxed_state(self, tx):
    def boxed_state(k):
      params, batch_stats = init_variables(k, self.regressor, self.extras, self.num_landmarks,
                                           self.num_padded)
      return steps.TrainState.create(
          apply_fn=self.regressor.apply, params=params, batch_stats=batch_stats, tx=tx,
          nonfinite_steps=jnp.zeros((), jnp.int32),
          first_nonfinite=jnp.array([-1.0, 0.0, 0.0], jnp.float32))
    return boxed_state

  def init_params_fn(self, key=None):
    """() -> boxed params, for shape-only uses (eval_shape)."""
    key = jax.random.PRNGKey(0) if key is None else key
    return lambda: init_variables(key, self.regressor, self.extras, self.num_landmarks,
                                  self.num_padded)[0]

  def num_parameters(self, padded: bool = False) -> int:
    """Parameters over the real targets (the same network built with an
    unpadded head), or with padded=True over the padded head columns too (what
    the train state holds). Shapes only: nothing is allocated."""
    regressor, extras = self.regressor, self.extras
    num_targets = self.num_padded if padded else self.num_targets
    if not padded:
      dtype = jnp.dtype(config_lib.matmul_dtype(self.config.model.dtype))
      regressor, extras = self.method.build(self.config, num_targets, dtype)
    shapes = jax.eval_shape(lambda: init_variables(
        jax.random.PRNGKey(0), regressor, dict(extras), self.num_landmarks, num_targets)[0])
    return int(sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree.leaves(
        nn.meta.unbox(shapes))))

  def create_state(self, key, tx) -> tuple[steps.TrainState, Any]:
    """(state, shardings): parameters and optimizer state are created already sharded.

    eval_shape gives the logical axes of every leaf (optimizer moments included),
    the rules map them onto the mesh, and the jitted init writes each shard in place.
    """
    boxed = self._boxed_state(tx)
    shardings = parallel.shardings_of(jax.eval_shape(boxed, key), self.mesh, self.rules)
    state = jax.jit(lambda k: nn.meta.unbox(boxed(k)), out_shardings=shardings)(key)
    return state, shardings

  def abstract_state(self, key, tx) -> tuple[Any, Any]:
    """(ShapeDtypeStructs of the sharded state, shardings): nothing allocated."""
    shapes = jax.eval_shape(self._boxed_state(tx), key)
    shardings = parallel.shardings_of(shapes, self.mesh, self.rules)
    state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                         nn.meta.unbox(shapes), shardings)
    return state, shardings

  def step_kwargs(self, base_key) -> dict[str, Any]:
    """The static arguments of steps.train_step / steps.loss_and_gradients."""
    return dict(method=self.method, regressor=self.regressor, extras=self.extras,
                config=self.config, base_key=base_key)

  def train_step(self, state_shardings, base_key):
    """The jitted train_step: state donated, batch split over 'data'."""
    return jax.jit(
        functools.partial(steps.train_step, **self.step_kwargs(base_key)),
        in_shardings=(state_shardings, parallel.batch_sharding(self.mesh)),
        out_shardings=(state_shardings, parallel.replicated(self.mesh)), donate_argnums=0)

  def eval_step(self, variables_shardings):
    """(jitted stats step (variables, stats, batch) -> stats, jitted zero stats),
    the per-gene sums sharded over 'model' like the head."""
    stats_sharding = {k: NamedSharding(self.mesh, P("model")) for k in metrics.STAT_NAMES}
    stats_step = jax.jit(functools.partial(steps.eval_stats_step, regressor=self.regressor),
                         in_shardings=(variables_shardings, stats_sharding,
                                       parallel.batch_sharding(self.mesh)),
                         out_shardings=stats_sharding, donate_argnums=1)
    init_stats = jax.jit(lambda: metrics.zeros(self.num_padded), out_shardings=stats_sharding)
    return stats_step, init_stats


def with_lsr_head(state: steps.TrainState, network: Network, weights, bias) -> steps.TrainState:
  """`state` with the regressor's head set to a linear solution y = x W + b
  (model.head_init='lsr'): head kernel rows [0, L) x columns [0, T) = W (L, T),
  every other kernel entry 0, bias[:T] = b, padding 0. The DenseNet trunk's
  output starts with the raw landmarks (BatchNorm and dropout act only inside
  its blocks), so the network then predicts x W + b exactly, in training and
  evaluation mode. Shardings are kept; nothing else in the state changes."""
  problem = config_lib.lsr_head_problem(network.config)
  if problem:
    raise config_lib.ConfigError(f"config: {problem}")
  num_l, num_t = network.num_landmarks, network.num_targets
  weights = np.asarray(weights, np.float32)
  bias = np.asarray(bias, np.float32)
  if weights.shape != (num_l, num_t) or bias.shape != (num_t,):
    raise ValueError(f"an LSR head for {num_l} landmarks and {num_t} targets needs W "
                     f"{(num_l, num_t)} and b {(num_t,)}, got {weights.shape} and {bias.shape}")
  head = state.params["regressor"]["head"]
  kernel, old_bias = head["kernel"], head["bias"]

  @functools.partial(jax.jit, out_shardings=(kernel.sharding, old_bias.sharding))
  def lsr_head(w, b):
    return (jnp.zeros(kernel.shape, kernel.dtype).at[:num_l, :num_t].set(w.astype(kernel.dtype)),
            jnp.zeros(old_bias.shape, old_bias.dtype).at[:num_t].set(b.astype(old_bias.dtype)))

  new_kernel, new_bias = lsr_head(weights, bias)
  regressor = {**state.params["regressor"], "head": {**head, "kernel": new_kernel,
                                                      "bias": new_bias}}
  return state.replace(params={**state.params, "regressor": regressor})


def build_network(config, num_landmarks: int, num_targets: int,
                  mesh: jax.sharding.Mesh | None = None) -> Network:
  """The network of a resolved config; the head is padded so the mesh's
  'model' axis divides it. An 'auto' lam builds its largest candidate's network
  (every lam > 0 builds the same one): training expands 'auto' into one run per
  candidate first (lam_search.py), so only shape checks and benchmarks see it."""
  config = config_lib.concrete_lam(config)
  method = registry.get(config.method)
  if not method.is_network:
    raise ValueError(f"{method.label} is not a network method")
  mesh = parallel.make_mesh(config.mesh) if mesh is None else mesh
  num_padded = parallel.padded_targets(num_targets, config.mesh.target_multiple,
                                       mesh.shape["model"])
  dtype = jnp.dtype(config_lib.matmul_dtype(config.model.dtype))
  regressor, extras = method.build(config, num_padded, dtype)
  return Network(config=config, method=method, mesh=mesh, num_landmarks=num_landmarks,
                 num_targets=num_targets, num_padded=num_padded, regressor=regressor,
                 extras=dict(extras))
