"""Flax Linen networks: DenseNet and D-GEX MLP trunks, the linear head, and the
task-relation bottleneck g of Deep-LSMTL.

Every parameter carries logical axis names so a later mesh can shard the
target axis ('targets') of the head and of the bottleneck across devices:

  trunk_in   width entering a trunk layer      hidden      a trunk layer's units
  trunk_out  width of the trunk's output       targets     one per target gene
  bottleneck the relation subnetwork's k units
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

_kernel_init = nn.initializers.lecun_normal()
_zeros = nn.initializers.zeros_init()
_ones = nn.initializers.ones_init()


def _dense(features: int, axes: tuple[str, str], dtype: Any, name: str) -> nn.Dense:
  return nn.Dense(
      features,
      dtype=dtype,
      kernel_init=nn.with_logical_partitioning(_kernel_init, axes),
      bias_init=nn.with_logical_partitioning(_zeros, axes[1:]),
      name=name)


class DenseNetTrunk(nn.Module):
  """Block i sees the input and every earlier block's output, concatenated.

  Block = BatchNorm -> Dense(hidden) -> LeakyReLU -> Dropout. The trunk's
  output is the full concatenation, of width inputs + depth * hidden.
  """

  hidden: int
  depth: int
  dropout: float = 0.1
  negative_slope: float = 0.2
  batch_norm: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    features = [x]
    for i in range(self.depth):
      h = jnp.concatenate(features, axis=-1) if len(features) > 1 else x
      if self.batch_norm:
        h = nn.BatchNorm(
            use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype,
            scale_init=nn.with_logical_partitioning(_ones, ("trunk_in",)),
            bias_init=nn.with_logical_partitioning(_zeros, ("trunk_in",)),
            name=f"block{i}_norm")(h)
      h = _dense(self.hidden, ("trunk_in", "hidden"), self.dtype, f"block{i}_dense")(h)
      h = nn.leaky_relu(h, self.negative_slope)
      h = nn.Dropout(self.dropout, deterministic=not train)(h)
      features.append(h)
    return jnp.concatenate(features, axis=-1)


class MLPTrunk(nn.Module):
  """D-GEX (Chen et al. 2016): Dense -> tanh -> Dropout, `depth` times."""

  hidden: int
  depth: int
  dropout: float = 0.1
  activation: str = "tanh"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    act: Callable = getattr(nn, self.activation)
    h = x
    for i in range(self.depth):
      h = _dense(self.hidden, ("trunk_in", "hidden"), self.dtype, f"layer{i}_dense")(h)
      h = nn.Dropout(self.dropout, deterministic=not train)(act(h))
    return h


class Regressor(nn.Module):
  """Trunk followed by one linear Dense(T) head: y_hat = W h + b."""

  trunk: nn.Module
  num_targets: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool, return_features: bool = False):
    """y_hat, or (y_hat, h) with the trunk's output h the head reads."""
    h = self.trunk(x, train=train)
    y = _dense(self.num_targets, ("trunk_out", "targets"), self.dtype, "head")(h)
    y = y.astype(jnp.float32)
    return (y, h) if return_features else y


class TaskRelation(nn.Module):
  """g(u) = V sigma(U u + c) + d: a T -> k -> T bottleneck over the task outputs,
  or with `trunk_output_width` set (lsmtl.relation_on='hidden') F -> k -> T
  from the trunk's F output features."""

  num_targets: int
  bottleneck: int
  negative_slope: float = 0.2
  dtype: Any = jnp.float32
  trunk_output_width: Callable[[int], int] | None = None  # num_landmarks -> F

  def dummy_inputs(self, num_landmarks: int, num_targets: int):
    if self.trunk_output_width is not None:
      return (jnp.zeros((1, self.trunk_output_width(num_landmarks))),)
    return (jnp.zeros((1, num_targets)),)

  @nn.compact
  def __call__(self, u: jnp.ndarray) -> jnp.ndarray:
    axis = "targets" if self.trunk_output_width is None else "trunk_out"
    z = _dense(self.bottleneck, (axis, "bottleneck"), self.dtype, "encode")(u)
    z = nn.leaky_relu(z, self.negative_slope)
    r = _dense(self.num_targets, ("bottleneck", "targets"), self.dtype, "decode")(z)
    return r.astype(jnp.float32)


def build_trunk(model_config, dtype=jnp.float32) -> nn.Module:
  if model_config.trunk == "densenet":
    return DenseNetTrunk(hidden=model_config.hidden, depth=model_config.depth,
                         dropout=model_config.dropout,
                         negative_slope=model_config.negative_slope,
                         batch_norm=model_config.batch_norm, dtype=dtype)
  if model_config.trunk == "mlp":
    return MLPTrunk(hidden=model_config.hidden, depth=model_config.depth,
                    dropout=model_config.dropout, activation=model_config.activation,
                    dtype=dtype)
  raise ValueError(f"model.trunk must be 'densenet' or 'mlp', got {model_config.trunk!r}")


def trunk_output_width(model_config, num_landmarks: int) -> int:
  if model_config.trunk == "densenet":
    return num_landmarks + model_config.depth * model_config.hidden
  return model_config.hidden if model_config.depth > 0 else num_landmarks


# ----------------------------------------------------------------------------
# Heads and auxiliary modules of the comparison methods (docs/method.md, "Comparison methods").
# Extra logical axes: 'latent' (GO-MTL's r shared components), 'targets_in'
# (the second target axis of AMTL's T x T matrix; replicated), 'critic' (the
# SemiGAN discriminator's units). Rules that do not name them replicate them.
# ----------------------------------------------------------------------------


class FactorizedRegressor(nn.Module):
  """Deep-GO-MTL: trunk, then y_hat = (h L_b) S + b: the head W = L_b S is built
  from r latent basis tasks shared by every target."""

  trunk: nn.Module
  num_targets: int
  rank: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    h = self.trunk(x, train=train)
    z = nn.Dense(self.rank, use_bias=False, dtype=self.dtype, name="head_basis",
                 kernel_init=nn.with_logical_partitioning(_kernel_init,
                                                          ("trunk_out", "latent")))(h)
    y = _dense(self.num_targets, ("latent", "targets"), self.dtype, "head")(z)
    return y.astype(jnp.float32)


class ClusteredRegressor(nn.Module):
  """Deep-CNMTL: the plain trunk + linear head, and each target's cluster kept in
  the 'batch_stats' collection, so the assignments re-estimated during training
  are saved and restored with the state."""

  trunk: nn.Module
  num_targets: int
  num_clusters: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    self.variable("batch_stats", "clusters", nn.with_logical_partitioning(
        lambda: jnp.arange(self.num_targets, dtype=jnp.int32) % self.num_clusters,
        ("targets",)))
    h = self.trunk(x, train=train)
    y = _dense(self.num_targets, ("trunk_out", "targets"), self.dtype, "head")(h)
    return y.astype(jnp.float32)


class TaskTransfer(nn.Module):
  """Deep-AMTL's free T x T matrix; B = relu(raw) off the diagonal (objectives)."""

  num_targets: int

  def dummy_inputs(self, num_landmarks: int, num_targets: int):
    return ()

  @nn.compact
  def __call__(self) -> jnp.ndarray:
    init = lambda key, shape: nn.initializers.uniform(1e-3)(key, shape)
    return self.param("raw", nn.with_logical_partitioning(init, ("targets", "targets_in")),
                      (self.num_targets, self.num_targets))


class OutputFeedback(nn.Module):
  """Deep-AMTFL: h_hat = LeakyReLU(y_hat A), A (T, F) maps outputs back to features."""

  num_targets: int
  trunk_output_width: Callable[[int], int]  # num_landmarks -> F
  negative_slope: float = 0.2

  def dummy_inputs(self, num_landmarks: int, num_targets: int):
    return (jnp.zeros((1, num_targets)), self.trunk_output_width(num_landmarks))

  @nn.compact
  def __call__(self, y_hat: jnp.ndarray, features: int) -> jnp.ndarray:
    a = self.param("A", nn.with_logical_partitioning(_kernel_init, ("targets", "trunk_out")),
                   (self.num_targets, features))
    return nn.leaky_relu(y_hat @ a, self.negative_slope)


class PairDiscriminator(nn.Module):
  """SemiGAN's critic: an MLP on (landmarks, targets) pairs, one logit per pair."""

  hidden: int
  depth: int
  negative_slope: float = 0.2
  dtype: Any = jnp.float32

  def dummy_inputs(self, num_landmarks: int, num_targets: int):
    return (jnp.zeros((1, num_landmarks)), jnp.zeros((1, num_targets)))

  @nn.compact
  def __call__(self, x: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
    h = jnp.concatenate([x, y], axis=-1)
    for i in range(self.depth):
      h = _dense(self.hidden, ("trunk_in", "critic"), self.dtype, f"layer{i}")(h)
      h = nn.leaky_relu(h, self.negative_slope)
    return _dense(1, ("critic", None), self.dtype, "logit")(h)[:, 0].astype(jnp.float32)
