"""LRP on small DenseNet/MLP regressors against an independent float64 numpy
computation, conservation, the batched aggregates, seeded k-means, and the
interpret command on a trained tiny run."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from lsmtl_jax import kmeans
from lsmtl_jax import models
from lsmtl_jax import relevance

from conftest import REPO
from test_predict import trained_run

L, H, DEPTH, T = 5, 4, 2, 6


def _config(trunk="densenet"):
  return ml_collections.ConfigDict(dict(trunk=trunk, hidden=H, depth=DEPTH, dropout=0.3,
                                        negative_slope=0.2, batch_norm=True,
                                        activation="tanh"))


def _network(seed=0, trunk="densenet", biases=True):
  """A Regressor with random weights and non-trivial BatchNorm running statistics."""
  cfg = _config(trunk)
  regressor = models.Regressor(trunk=models.build_trunk(cfg), num_targets=T)
  variables = jax.tree.map(np.asarray, dict(nn.meta.unbox(regressor.init(
      jax.random.PRNGKey(seed), jnp.zeros((1, L)), train=False))))
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda a: rng.normal(0, 0.7, a.shape).astype(np.float32),
                        variables["params"])
  stats = variables.get("batch_stats", {})
  stats = jax.tree.map(lambda a: rng.uniform(0.5, 2.0, a.shape).astype(np.float32), stats)
  if not biases:  # no bias anywhere, BatchNorm centring included
    params = jax.tree_util.tree_map_with_path(
        lambda p, a: np.zeros_like(a) if p[-1].key == "bias" else a, params)
    stats = jax.tree_util.tree_map_with_path(
        lambda p, a: np.zeros_like(a) if p[-1].key == "mean" else a, stats)
  variables = {"params": params, "batch_stats": stats}
  return cfg, regressor, variables


def _reference_lrp(cfg, variables, x, target, rule, eps):
  """Float64, one sample, one target: explicit BN folding and per-neuron sums."""
  p, s = variables["params"], variables["batch_stats"]
  tr = p["trunk"]
  f64 = lambda a: np.asarray(a, np.float64)
  layers = []  # (input feature indices, W, b)
  for i in range(DEPTH):
    if cfg.trunk == "densenet":
      W, b = f64(tr[f"block{i}_dense"]["kernel"]), f64(tr[f"block{i}_dense"]["bias"])
      g, beta = f64(tr[f"block{i}_norm"]["scale"]), f64(tr[f"block{i}_norm"]["bias"])
      mu, var = f64(s["trunk"][f"block{i}_norm"]["mean"]), f64(s["trunk"][f"block{i}_norm"]["var"])
      a = g / np.sqrt(var + 1e-5)
      Wf = np.array([[a[r] * W[r, c] for c in range(W.shape[1])] for r in range(W.shape[0])])
      bf = np.array([b[c] + sum((beta[r] - mu[r] * a[r]) * W[r, c] for r in range(W.shape[0]))
                     for c in range(W.shape[1])])
      layers.append((list(range(i + 1)), Wf, bf))
    else:
      layers.append(([i], f64(tr[f"layer{i}_dense"]["kernel"]), f64(tr[f"layer{i}_dense"]["bias"])))
  head_in = list(range(DEPTH + 1)) if cfg.trunk == "densenet" else [DEPTH]
  layers.append((head_in, f64(p["head"]["kernel"]), f64(p["head"]["bias"])))
  act = ((lambda z: z if z >= 0 else 0.2 * z) if cfg.trunk == "densenet" else np.tanh)

  feats, ins, zs = [list(np.asarray(x, np.float64))], [], []
  for k, (idx, W, b) in enumerate(layers):
    a = [v for j in idx for v in feats[j]]
    z = [sum(a[r] * W[r, c] for r in range(len(a))) + b[c] for c in range(W.shape[1])]
    ins.append(a)
    zs.append(z)
    if k < len(layers) - 1:
      feats.append([act(v) for v in z])
  out = [0.0] * len(zs[-1])
  out[target] = zs[-1][target]  # signed initial relevance
  rel = {j: [0.0] * len(feats[j]) for j in range(len(feats))}

  def backward(k, r_out):
    idx, W, _ = layers[k]
    a, z = ins[k], zs[k]
    r_in = [0.0] * len(a)
    for c in range(W.shape[1]):
      if rule == "epsilon":
        den = z[c] + (eps if z[c] >= 0 else -eps)
        for r in range(len(a)):
          r_in[r] += a[r] * W[r, c] / den * r_out[c]
      else:
        pos = [max(a[r] * W[r, c], 0.0) for r in range(len(a))]
        den = sum(pos) + 1e-12
        for r in range(len(a)):
          r_in[r] += pos[r] / den * r_out[c]
    start = 0
    for j in idx:
      for q in range(len(feats[j])):
        rel[j][q] += r_in[start + q]
      start += len(feats[j])

  backward(len(layers) - 1, out)
  for k in range(len(layers) - 2, -1, -1):
    backward(k, rel[k + 1])
  return np.array(rel[0]), zs[-1][target]


@pytest.mark.parametrize("trunk, rule", [("densenet", "epsilon"), ("densenet", "zplus"),
                                         ("mlp", "epsilon")])
def test_lrp_matches_a_float64_hand_computation(trunk, rule):
  cfg, regressor, variables = _network(1, trunk)
  x = np.random.default_rng(2).normal(size=(3, L)).astype(np.float32)
  graph = relevance.fold(cfg, variables, T)
  # The folded graph computes what the network computes at inference.
  y = np.asarray(regressor.apply(variables, x, train=False))
  np.testing.assert_allclose(np.asarray(relevance.forward(graph, jnp.asarray(x))[-1]), y,
                             rtol=1e-5, atol=1e-5)
  got = np.asarray(relevance.for_targets(graph, jnp.asarray(x), jnp.arange(T), rule=rule,
                                         eps=0.05, initial="signed"))
  assert got.shape == (3, T, L)
  for n in range(3):
    for t in range(T):
      want, _ = _reference_lrp(cfg, variables, x[n], t, rule, 0.05)
      np.testing.assert_allclose(got[n, t], want, rtol=2e-4, atol=2e-5)
  # |y| as initial relevance flips the sign where y < 0.
  flipped = np.asarray(relevance.for_targets(graph, jnp.asarray(x), jnp.arange(T), rule=rule,
                                             eps=0.05, initial="abs"))
  np.testing.assert_allclose(flipped, got * np.sign(y)[:, :, None], rtol=1e-5, atol=1e-6)


def test_conservation_without_biases():
  """Epsilon rule, eps -> 0, no biases: each target's relevances sum to its output.
  (z+ conserves only through units with some positive contribution; its hand
  computation above covers it.)"""
  rule = "epsilon"
  cfg, regressor, variables = _network(3, biases=False)
  x = np.random.default_rng(4).normal(size=(8, L)).astype(np.float32)
  graph = relevance.fold(cfg, variables, T)
  y = np.asarray(regressor.apply(variables, x, train=False))
  r = np.asarray(relevance.for_targets(graph, jnp.asarray(x), jnp.arange(T), rule=rule,
                                       eps=1e-9, initial="signed"))
  np.testing.assert_allclose(r.sum(-1), y, rtol=1e-3, atol=1e-4)
  # Explaining all targets at once is the sum of explaining each.
  total = relevance.per_sample(graph, x, rule=rule, eps=1e-9, initial="signed")
  np.testing.assert_allclose(total.sum(-1), y.sum(-1), rtol=1e-3, atol=1e-4)


def test_batched_aggregates_equal_the_per_target_maps():
  cfg, _, variables = _network(5)
  x = np.random.default_rng(6).normal(size=(11, L)).astype(np.float32)
  graph = relevance.fold(cfg, variables, T)
  full = np.asarray(relevance.for_targets(graph, jnp.asarray(x), jnp.arange(T)), np.float64)
  matrix = relevance.mean_matrix(graph, x, sample_batch=4, target_chunk=4)  # both padded
  np.testing.assert_allclose(matrix, full.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(relevance.per_sample(graph, x, batch=4), full.sum(1),
                             rtol=1e-4, atol=1e-5)
  labels = np.array([0, 1, 0, 2, 1, 0])
  groups = relevance.by_target_groups(graph, x, labels, 3, batch=5)
  for g in range(3):
    np.testing.assert_allclose(groups[g], full[:, labels == g].mean((0, 1)), rtol=1e-4,
                               atol=1e-6)


def test_kmeans_is_seeded_and_finds_separated_groups():
  rng = np.random.default_rng(0)
  centres = rng.normal(0, 10, (4, 3))
  sizes = [40, 30, 20, 10]
  data = np.concatenate([c + rng.normal(0, 0.1, (n, 3)) for c, n in zip(centres, sizes)])
  truth = np.repeat(np.arange(4), sizes)
  labels, found = kmeans.kmeans(data, 4, seed=3)
  # Clusters are numbered by size, so they come out as the generating groups.
  np.testing.assert_array_equal(labels, truth)
  np.testing.assert_allclose(found, centres, atol=0.1)
  again, _ = kmeans.kmeans(data, 4, seed=3)
  np.testing.assert_array_equal(again, labels)
  noise = rng.normal(size=(200, 5))
  a, _ = kmeans.kmeans(noise, 7, seed=1)
  b, _ = kmeans.kmeans(noise, 7, seed=1)
  np.testing.assert_array_equal(a, b)
  assert len(set(a)) == 7
  assert len(set(kmeans.kmeans(noise[:3], 10, seed=0)[0])) == 3  # k capped at n


def test_interpret_writes_heatmaps_and_arrays(tmp_path_factory):
  workdir = trained_run(tmp_path_factory)
  proc = subprocess.run(
      [sys.executable, "-m", "lsmtl_jax.interpret", f"--workdir={workdir}",
       "--num_samples=20", "--matrix_samples=6", "--target_clusters=5", "--landmark_groups=3",
       "--sample_clusters=4"], cwd=REPO, capture_output=True, text=True, timeout=300,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = os.path.join(workdir, "relevance")
  for name in ("fig6a_sample_clusters", "fig6b_target_clusters", "fig6c_groups",
               "fig6d_matrix"):
    with open(os.path.join(out, f"{name}.png"), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  ids = json.load(open(os.path.join(out, "ids.json")))
  assert len(ids["samples"]) == 20 and len(ids["landmarks"]) == 24
  assert np.load(os.path.join(out, "relevance_matrix.npy")).shape == (40, 24)
  assert np.load(os.path.join(out, "sample_relevance.npy")).shape == (20, 24)
  assert np.load(os.path.join(out, "fig6a_sample_clusters.npy")).shape == (4, 24)
  assert np.load(os.path.join(out, "fig6b_target_clusters.npy")).shape == (5, 24)
  assert np.load(os.path.join(out, "fig6c_groups.npy")).shape == (3, 5)
  t = np.load(os.path.join(out, "target_clusters.npy"))
  assert t.shape == (40,) and set(t) == set(range(5))
  assert ids["arrays"]["fig6c_groups"] == {"rows": "landmark_groups", "cols": "target_clusters"}

  proc = subprocess.run(
      [sys.executable, "-m", "lsmtl_jax.interpret", f"--workdir={tmp_path_factory.mktemp('x')}"],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert proc.returncode == 2 and len(lines) == 1 and "config.json" in lines[0]
