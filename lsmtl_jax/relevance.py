"""Layer-wise relevance propagation (LRP) through a trained regressor, in JAX.

The inference-time network is rewritten as a graph of dense layers over
concatenations of earlier features (`fold`):

* BatchNorm with running statistics is an affine map, folded into the Dense
  that follows it: W' = diag(gamma / sqrt(var + eps)) W, b' = (beta - mean *
  gamma / sqrt(var + eps)) W + b.
* Dropout is the identity at inference.
* LeakyReLU (DenseNet) and tanh (D-GEX MLP) are element-wise: relevance passes
  through them unchanged, as in the standard LRP treatment of activations.
* A DenseNet block reads the concatenation of the input and every earlier
  block's output; relevance arriving at a concatenation is split back into its
  parts, and a feature read by several later layers sums what each sends back.
  Layers are visited in reverse, so a feature's relevance is complete before it
  is passed on.

Rules for a dense layer z_j = sum_i a_i w_ij + b_j with upper relevance R_j:

* epsilon: R_i = a_i sum_j w_ij R_j / (z_j + eps sign(z_j)). With eps -> 0 and
  no biases, sum_i R_i = sum_j R_j (conservation); a bias keeps its share.
* zplus: R_i = sum_j (a_i w_ij)^+ / sum_i' (a_i' w_i'j)^+ R_j, biases ignored.
  For non-negative inputs this is the z+ rule; for signed inputs (standardized
  landmarks, LeakyReLU outputs) it is its alpha=1, beta=0 generalization.

What is explained: the initial relevance of target t is its prediction y_t
(`initial='signed'`, the textbook choice, relevances sum to y_t) or |y_t|
(`initial='abs'`, the default for maps averaged over samples: the
prediction's deviation from the training mean, so that samples where a target
goes up and samples where it goes down do not cancel). The maps are linear in
the initial relevance, so the relevance for a set of targets is one backward
pass with the set's mask, and a landmark x target matrix is one pass per
target, batched.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

RULES = ("epsilon", "zplus")
INITIAL = ("abs", "signed")
_BN_EPSILON = 1e-5  # models.DenseNetTrunk's BatchNorm epsilon
_TINY = 1e-12  # keeps z+ denominators away from zero


@dataclasses.dataclass(frozen=True)
class Layer:
  inputs: tuple[int, ...]  # feature indices concatenated in order (0 is the input)
  kernel: Any  # [sum of input widths, units]
  bias: Any  # [units]


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class Graph:
  """Dense layers over concatenated features; the last layer is the linear head."""

  layers: tuple[Layer, ...]
  activation: str  # 'leaky_relu' or 'tanh' after every layer but the head
  negative_slope: float = 0.2

  def tree_flatten(self):
    leaves = [(l.kernel, l.bias) for l in self.layers]
    aux = (tuple(l.inputs for l in self.layers), self.activation, self.negative_slope)
    return leaves, aux

  @classmethod
  def tree_unflatten(cls, aux, leaves):
    inputs, activation, slope = aux
    return cls(tuple(Layer(i, k, b) for i, (k, b) in zip(inputs, leaves)), activation, slope)


def fold(model_config, variables, num_targets: int, dtype=jnp.float32) -> Graph:
  """The inference graph of a Regressor's variables, head cut to the real targets."""
  params, stats = variables["params"], variables.get("batch_stats", {})
  trunk = params["trunk"]
  layers = []
  if model_config.trunk == "densenet":
    for i in range(model_config.depth):
      w = jnp.asarray(trunk[f"block{i}_dense"]["kernel"], dtype)
      b = jnp.asarray(trunk[f"block{i}_dense"]["bias"], dtype)
      if model_config.batch_norm:
        norm = trunk[f"block{i}_norm"]
        bn = stats["trunk"][f"block{i}_norm"]
        s = jnp.asarray(norm["scale"], dtype) / jnp.sqrt(jnp.asarray(bn["var"], dtype)
                                                         + _BN_EPSILON)
        t = jnp.asarray(norm["bias"], dtype) - jnp.asarray(bn["mean"], dtype) * s
        w, b = s[:, None] * w, t @ w + b
      layers.append(Layer(tuple(range(i + 1)), w, b))
    head_inputs = tuple(range(model_config.depth + 1))
    activation = "leaky_relu"
  elif model_config.trunk == "mlp":
    for i in range(model_config.depth):
      d = trunk[f"layer{i}_dense"]
      layers.append(Layer((i,), jnp.asarray(d["kernel"], dtype), jnp.asarray(d["bias"], dtype)))
    head_inputs = (model_config.depth,)
    activation = model_config.activation
  else:
    raise ValueError(f"model.trunk {model_config.trunk!r} has no relevance rules")
  head = params["head"]
  layers.append(Layer(head_inputs, jnp.asarray(head["kernel"], dtype)[:, :num_targets],
                      jnp.asarray(head["bias"], dtype)[:num_targets]))
  return Graph(tuple(layers), activation, float(getattr(model_config, "negative_slope", 0.2)))


def _activate(graph: Graph, z):
  if graph.activation == "leaky_relu":
    return jnp.where(z >= 0, z, graph.negative_slope * z)
  return getattr(jnp, graph.activation)(z)


def forward(graph: Graph, x):
  """(features, concatenated inputs of each layer, pre-activations, y)."""
  features, inputs, zs = [x], [], []
  for i, layer in enumerate(graph.layers):
    a = jnp.concatenate([features[j] for j in layer.inputs], axis=-1)
    z = a @ layer.kernel + layer.bias
    inputs.append(a)
    zs.append(z)
    if i < len(graph.layers) - 1:
      features.append(_activate(graph, z))
  return features, inputs, zs, zs[-1]


def _stabilize(z, eps):
  return z + eps * jnp.where(z >= 0, 1.0, -1.0)


def dense_rule(a, kernel, z, relevance, rule: str, eps: float):
  """Relevance [n, K, m] at a dense layer's outputs -> [n, K, d] at its inputs a [n, d]."""
  if rule == "epsilon":
    s = relevance / _stabilize(z, eps)[:, None, :]
    return a[:, None, :] * jnp.einsum("nkm,dm->nkd", s, kernel)
  wp, wn = jnp.maximum(kernel, 0), jnp.minimum(kernel, 0)
  ap, an = jnp.maximum(a, 0), jnp.minimum(a, 0)
  zp = ap @ wp + an @ wn  # the positive contributions, >= 0
  s = relevance / (zp + _TINY)[:, None, :]
  return (ap[:, None, :] * jnp.einsum("nkm,dm->nkd", s, wp)
          + an[:, None, :] * jnp.einsum("nkm,dm->nkd", s, wn))


def _head_rule_one_hot(a, kernel, z_sel, r_sel, idx, rule, eps):
  """Head rule when explanation k holds relevance on target idx[k] only: [n, K, d]."""
  w = kernel[:, idx].T  # [K, d]
  if rule == "epsilon":
    s = r_sel / _stabilize(z_sel, eps)  # [n, K]
    return a[:, None, :] * s[:, :, None] * w[None]
  wp, wn = jnp.maximum(w, 0), jnp.minimum(w, 0)
  ap, an = jnp.maximum(a, 0), jnp.minimum(a, 0)
  zp = ap @ wp.T + an @ wn.T  # [n, K]
  s = r_sel / (zp + _TINY)
  return ap[:, None, :] * s[:, :, None] * wp[None] + an[:, None, :] * s[:, :, None] * wn[None]


def _back_through_trunk(graph: Graph, features, inputs, zs, head_relevance, rule, eps):
  """Relevance at the head's input concatenation [n, K, D] -> landmarks [n, K, L]."""
  widths = [f.shape[-1] for f in features]
  per_feature: list[Any] = [None] * len(features)

  def scatter(layer, relevance):
    start = 0
    for j in layer.inputs:
      part = relevance[..., start:start + widths[j]]
      per_feature[j] = part if per_feature[j] is None else per_feature[j] + part
      start += widths[j]

  scatter(graph.layers[-1], head_relevance)
  for i in range(len(graph.layers) - 2, -1, -1):
    out = per_feature[i + 1]  # complete: only later layers read feature i + 1
    if out is None:
      continue
    layer = graph.layers[i]
    scatter(layer, dense_rule(inputs[i], layer.kernel, zs[i], out, rule, eps))
  return per_feature[0]


def _initial(y, initial: str):
  return jnp.abs(y) if initial == "abs" else y


@functools.partial(jax.jit, static_argnames=("rule", "initial"))
def for_target_masks(graph: Graph, x, masks, rule: str = "epsilon", eps: float = 1e-2,
                     initial: str = "abs"):
  """[n, K, L]: explanation k starts with relevance on the targets where masks[k] = 1.

  masks: [K, T] (0/1 or weights). One backward pass for all K at once.
  """
  features, inputs, zs, y = forward(graph, x)
  r_out = _initial(y, initial)[:, None, :] * masks[None]
  head = graph.layers[-1]
  r_head = dense_rule(inputs[-1], head.kernel, y, r_out, rule, eps)
  return _back_through_trunk(graph, features, inputs, zs, r_head, rule, eps)


@functools.partial(jax.jit, static_argnames=("rule", "initial"))
def for_targets(graph: Graph, x, idx, rule: str = "epsilon", eps: float = 1e-2,
                initial: str = "abs"):
  """[n, K, L]: the relevance of every landmark for target idx[k], per sample."""
  features, inputs, zs, y = forward(graph, x)
  head = graph.layers[-1]
  z_sel = y[:, idx]
  r_head = _head_rule_one_hot(inputs[-1], head.kernel, z_sel, _initial(z_sel, initial), idx,
                              rule, eps)
  return _back_through_trunk(graph, features, inputs, zs, r_head, rule, eps)


def mean_matrix(graph: Graph, x: np.ndarray, rule: str = "epsilon", eps: float = 1e-2,
                initial: str = "abs", sample_batch: int = 8, target_chunk: int = 512,
                ) -> np.ndarray:
  """[T, L] float64: relevance of landmark l for target t, averaged over the rows of x.

  Batches of samples times chunks of targets bound the [n, K, L]-sized work
  arrays; the last chunk is padded (repeating target 0) so one program compiles.
  """
  x = np.asarray(x, np.float32)
  num_targets = int(graph.layers[-1].kernel.shape[1])
  chunk = min(target_chunk, num_targets)
  total = np.zeros((num_targets, x.shape[1]))
  for s in range(0, len(x), sample_batch):
    xb = x[s:s + sample_batch]
    if len(xb) < sample_batch:  # pad with zero rows, weighted out below
      xb = np.concatenate([xb, np.zeros((sample_batch - len(xb), x.shape[1]), np.float32)])
    weight = (np.arange(sample_batch) < len(x) - s).astype(np.float64)
    for t in range(0, num_targets, chunk):
      idx = np.arange(t, t + chunk)
      valid = idx < num_targets
      idx = np.where(valid, idx, 0)
      r = np.asarray(for_targets(graph, jnp.asarray(xb), jnp.asarray(idx), rule=rule,
                                 eps=eps, initial=initial), np.float64)
      total[idx[valid]] += np.einsum("n,nkl->kl", weight, r)[valid]
  return total / len(x)


def per_sample(graph: Graph, x: np.ndarray, rule: str = "epsilon", eps: float = 1e-2,
               initial: str = "abs", batch: int = 256) -> np.ndarray:
  """[n, L] float64: each sample's landmark relevance for its whole predicted profile."""
  x = np.asarray(x, np.float32)
  ones = jnp.ones((1, int(graph.layers[-1].kernel.shape[1])), jnp.float32)
  return _batched(lambda xb: for_target_masks(graph, xb, ones, rule=rule, eps=eps,
                                              initial=initial)[:, 0], x, batch)


def by_target_groups(graph: Graph, x: np.ndarray, labels: np.ndarray, num_groups: int,
                     rule: str = "epsilon", eps: float = 1e-2, initial: str = "abs",
                     batch: int = 256) -> np.ndarray:
  """[groups, L] float64: landmark relevance per (sample, target) of each target group,
  averaged over the samples and the group's targets."""
  masks = np.zeros((num_groups, len(labels)), np.float32)
  masks[labels, np.arange(len(labels))] = 1.0
  sizes = np.maximum(masks.sum(1), 1.0)
  m = jnp.asarray(masks)
  r = _batched(lambda xb: for_target_masks(graph, xb, m, rule=rule, eps=eps,
                                           initial=initial), np.asarray(x, np.float32), batch)
  return r.mean(0) / sizes[:, None]


def _batched(fn, x: np.ndarray, batch: int) -> np.ndarray:
  batch = min(batch, len(x))
  parts = []
  for s in range(0, len(x), batch):
    xb = x[s:s + batch]
    n = len(xb)
    if n < batch:
      xb = np.concatenate([xb, np.zeros((batch - n,) + xb.shape[1:], xb.dtype)])
    parts.append(np.asarray(fn(jnp.asarray(xb)), np.float64)[:n])
  return np.concatenate(parts)


def unit_rows(m: np.ndarray) -> np.ndarray:
  """Rows scaled to unit L2 norm, so k-means groups by pattern, not by magnitude."""
  norm = np.linalg.norm(m, axis=1, keepdims=True)
  return m / np.where(norm > 0, norm, 1.0)


def cluster_order(labels: np.ndarray) -> np.ndarray:
  """A stable permutation putting members of each cluster together, cluster 0 first."""
  return np.argsort(labels, kind="stable")

