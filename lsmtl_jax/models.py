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
  def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    h = self.trunk(x, train=train)
    y = _dense(self.num_targets, ("trunk_out", "targets"), self.dtype, "head")(h)
    return y.astype(jnp.float32)


class TaskRelation(nn.Module):
  """g(u) = V sigma(U u + c) + d: a T -> k -> T bottleneck over the task outputs."""

  num_targets: int
  bottleneck: int
  negative_slope: float = 0.2
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, u: jnp.ndarray) -> jnp.ndarray:
    z = _dense(self.bottleneck, ("targets", "bottleneck"), self.dtype, "encode")(u)
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
