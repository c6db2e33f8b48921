"""The comparison methods against independent float64 numpy references on tiny
data: LSR-L1 vs coordinate descent and its KKT conditions, KNN vs brute force,
each MTL penalty vs a hand computation, k-means, SemiGAN's unlabeled rows, the
memory guard; and every network method trains and improves its validation MAE."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from lsmtl_jax import build
from lsmtl_jax import config_lib
from lsmtl_jax import memory
from lsmtl_jax import models
from lsmtl_jax import objectives
from lsmtl_jax import train
from lsmtl_jax.data import sources
from lsmtl_jax.methods import knn
from lsmtl_jax.methods import lasso
from lsmtl_jax.methods import linear
from lsmtl_jax.methods import mtl
from lsmtl_jax.methods import semigan


def _tiny(cache_dir, method, steps=24):
  from configs import tiny
  config = tiny.get_config()
  config.data.cache_dir = str(cache_dir)
  config.method = method
  config.train.num_steps = steps
  return config


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp("cache")


# ----------------------------------------------------------------------------
# LSR-L1
# ----------------------------------------------------------------------------


def _coordinate_descent(x, y, alpha, sweeps=3000):
  """sklearn's objective (1/2n)||y - Xw - b||^2 + alpha ||w||_1, one target, float64."""
  xc, yc = x - x.mean(0), y - y.mean()
  n = len(x)
  w = np.zeros(x.shape[1])
  col_sq = (xc**2).sum(0) / n
  r = yc.copy()
  for _ in range(sweeps):
    for j in range(x.shape[1]):
      r += xc[:, j] * w[j]
      rho = xc[:, j] @ r / n
      w[j] = np.sign(rho) * max(abs(rho) - alpha, 0.0) / col_sq[j]
      r -= xc[:, j] * w[j]
  return w


def test_lasso_matches_coordinate_descent_and_kkt(tiny_dataset):
  mean_x, mean_y, cxx, cxy = linear.moments(tiny_dataset, "train", 50)
  alphas = (0.003, 0.03, 0.1)
  path = lasso.path(mean_x, mean_y, cxx, cxy, alphas, max_iters=20000, tol=1e-9)
  rows = tiny_dataset.read_rows(tiny_dataset.split("train")).astype(np.float64)
  x, y = rows[:, :tiny_dataset.num_landmarks], rows[:, tiny_dataset.num_landmarks:]
  for alpha, w, b, _ in path:
    for t in (0, 7, 31):
      ref = _coordinate_descent(x, y[:, t], alpha)
      np.testing.assert_allclose(w[:, t], ref, atol=2e-4)
    # KKT: |grad_j| <= alpha where w_j = 0, grad_j = -alpha sign(w_j) elsewhere.
    grad = cxx @ w - cxy
    zero = w == 0
    assert np.all(np.abs(grad[zero]) <= alpha + 1e-4)
    np.testing.assert_allclose(grad[~zero], -alpha * np.sign(w[~zero]), atol=1e-4)
    np.testing.assert_allclose(b, mean_y - mean_x @ w)
  nonzero = [np.mean(w != 0) for _, w, _, _ in path]
  assert nonzero[0] > nonzero[-1] and nonzero[-1] < 1.0  # sparser as alpha grows


def test_lsr_l1_run_selects_alpha_on_validation(cache, tmp_path):
  config = _tiny(cache, "lsr_l1")
  config.lsr_l1.alphas = (1e-3, 0.03, 1.0)
  results = train.train_and_evaluate(config, str(tmp_path))
  chosen = min(results["selection"], key=lambda s: s["val_mae"])
  assert results["alpha"] == chosen["alpha"]
  assert results["splits"]["val"]["mae_mean"] == pytest.approx(chosen["val_mae"])
  genes = np.load(tmp_path / "genes_mae.npz")
  assert genes["test_mae"].shape == (40,)
  assert genes["test_mae"].mean() == pytest.approx(results["splits"]["test"]["mae_mean"])


# ----------------------------------------------------------------------------
# KNN-GE
# ----------------------------------------------------------------------------


def test_neighbour_search_is_exact():
  rng = np.random.default_rng(0)
  train_x = rng.normal(size=(257, 9)).astype(np.float32)
  queries = rng.normal(size=(13, 9)).astype(np.float32)
  search = knn.Neighbours(train_x, train_block=40)  # several blocks, a ragged last one
  d, idx = search.search(jnp.asarray(queries), 7)
  brute = ((queries[:, None, :].astype(np.float64) - train_x[None].astype(np.float64))**2).sum(-1)
  np.testing.assert_array_equal(np.asarray(idx), np.argsort(brute, axis=1)[:, :7])
  np.testing.assert_allclose(np.asarray(d), np.sort(brute, axis=1)[:, :7], rtol=1e-4, atol=1e-4)


def test_knn_predictions_match_brute_force(tiny_dataset):
  train_idx, val_idx = tiny_dataset.split("train"), tiny_dataset.split("val")
  lm = tiny_dataset.num_landmarks
  train_rows = tiny_dataset.read_rows(train_idx).astype(np.float64)
  val_rows = tiny_dataset.read_rows(val_idx).astype(np.float64)
  search = knn.Neighbours(train_rows[:, :lm].astype(np.float32), train_block=100)
  ks = (1, 3, 10)
  stats = knn.split_statistics(tiny_dataset, val_idx, search,
                               jnp.asarray(train_rows[:, lm:], jnp.float32), ks, query_block=8)
  dist = ((val_rows[:, None, :lm] - train_rows[None, :, :lm])**2).sum(-1)
  order = np.argsort(dist, axis=1)
  for k, s in zip(ks, stats):
    pred = train_rows[order[:, :k], lm:].mean(1)
    mae = np.abs(val_rows[:, lm:] - pred).mean(0)
    np.testing.assert_allclose(s["sum_abs"] / s["n"], mae, rtol=1e-4, atol=1e-5)
    assert s["n"][0] == len(val_idx)


# ----------------------------------------------------------------------------
# MTL penalties, by hand
# ----------------------------------------------------------------------------


def test_go_mtl_penalty_by_hand():
  basis = np.array([[1.0, -2.0], [0.5, 0.0], [0.0, 3.0]])  # (H=3, r=2)
  codes = np.array([[1.0, -1.0, 0.0, 2.0], [0.0, 0.5, -3.0, 1.0]])  # (r=2, T=4)
  # mu * (1 + 1 + 0 + 2 + 0 + .5 + 3 + 1) + lam * (1 + 4 + .25 + 9)
  assert float(objectives.go_mtl_penalty(basis, codes, 0.1, 0.01)) == pytest.approx(
      0.1 * 8.5 + 0.01 * 14.25, rel=1e-6)
  valid = np.array([1.0, 1.0, 1.0, 0.0])  # the padded 4th task's codes do not count
  assert float(objectives.go_mtl_penalty(basis, codes, 0.1, 0.0, valid)) == pytest.approx(
      0.1 * 5.5, rel=1e-6)


def _cluster_norm_reference(w, clusters, eps_m, eps_b, eps_w):
  w_bar = w.mean(1)
  total = eps_m * (w_bar**2).sum()
  for c in np.unique(clusters):
    cols = w[:, clusters == c]
    w_c = cols.mean(1)
    total += eps_b * cols.shape[1] * ((w_c - w_bar)**2).sum()
    total += eps_w * ((cols - w_c[:, None])**2).sum()
  return total


def test_cluster_norm_penalty_by_hand():
  w = np.array([[1.0, 3.0, -2.0, 0.0], [2.0, 2.0, 4.0, 0.0]])  # columns w_t, H=2, T=4
  clusters = np.array([0, 0, 1, 1])
  # w_bar = (0.5, 2); cluster 0: mean (2, 2), cluster 1: mean (-1, 2).
  # eps_M |w_bar|^2 = 4.25; between: 2 * 2.25 + 2 * 2.25 = 9; within: 1 + 1 + (1 + 4) + (1 + 4) = 12
  got = objectives.cluster_norm_penalty(jnp.asarray(w), jnp.asarray(clusters), 2, 1.0, 1.0, 1.0)
  assert float(got) == pytest.approx(4.25 + 9 + 12, rel=1e-6)
  rng = np.random.default_rng(1)
  w = rng.normal(size=(5, 11))
  clusters = rng.integers(0, 3, size=11)
  got = objectives.cluster_norm_penalty(jnp.asarray(w), jnp.asarray(clusters), 3, 0.3, 0.7, 1.3)
  assert float(got) == pytest.approx(_cluster_norm_reference(w, clusters, 0.3, 0.7, 1.3), rel=1e-5)
  # A padded column changes nothing.
  padded = np.concatenate([w, rng.normal(size=(5, 1))], axis=1)
  got = objectives.cluster_norm_penalty(jnp.asarray(padded), jnp.asarray(np.append(clusters, 0)),
                                        3, 0.3, 0.7, 1.3, jnp.asarray([1.0] * 11 + [0.0]))
  assert float(got) == pytest.approx(_cluster_norm_reference(w, clusters, 0.3, 0.7, 1.3), rel=1e-5)


def test_amtl_terms_by_hand():
  raw = np.array([[5.0, 0.5, -1.0], [0.2, 5.0, 0.3], [-0.4, 1.0, 5.0]])
  b = np.asarray(objectives.amtl_transfer(jnp.asarray(raw)))
  np.testing.assert_allclose(b, [[0, 0.5, 0], [0.2, 0, 0.3], [0, 1.0, 0]], rtol=1e-6)
  w = np.array([[1.0, 2.0, 0.0], [0.0, 1.0, -1.0]])
  losses = np.array([0.5, 1.0, 2.0])
  weighted, rec = objectives.amtl_terms(jnp.asarray(w), jnp.asarray(b), jnp.asarray(losses),
                                        alpha=2.0, gamma=0.1)
  # (1 + 2 * .5) * .5 + (1 + 2 * .5) * 1 + (1 + 2 * 1) * 2
  assert float(weighted) == pytest.approx(1.0 + 2.0 + 6.0, rel=1e-6)
  wb = np.array([[0.4, 0.5, 0.6], [0.2, -1.0, 0.3]])  # W @ B
  assert float(rec) == pytest.approx(0.1 * ((w - wb)**2).sum(), rel=1e-6)
  # Padded task 3: no edges to or from it, its loss and column drop out.
  b_pad = np.asarray(objectives.amtl_transfer(jnp.asarray(raw), jnp.asarray([1.0, 1.0, 0.0])))
  np.testing.assert_allclose(b_pad, [[0, 0.5, 0], [0.2, 0, 0], [0, 0, 0]], rtol=1e-6)


def test_amtfl_terms_by_hand():
  h = np.array([[1.0, 0.0], [2.0, -1.0]])  # batch 2, features 2
  h_hat = np.array([[0.5, 0.0], [2.0, 1.0]])
  a = np.array([[1.0, -1.0], [0.0, 0.5], [2.0, 0.0]])  # T=3
  w = np.array([[1.0, -2.0, 0.0], [0.5, 0.0, 1.0]])
  losses = np.array([1.0, 2.0, 0.5])
  weighted, reg = objectives.amtfl_terms(*(jnp.asarray(v) for v in (h, h_hat, a, w, losses)),
                                         alpha=0.5, gamma=2.0, mu=0.1)
  assert float(weighted) == pytest.approx(2 * 1.0 + 1.25 * 2.0 + 2 * 0.5, rel=1e-6)
  assert float(reg) == pytest.approx(2.0 * (0.25 + 4.0) / 2 + 0.1 * 4.5, rel=1e-6)


def test_kmeans_columns_finds_separated_groups():
  rng = np.random.default_rng(2)
  centers = np.array([[10.0, 0.0], [0.0, 10.0], [-10.0, -10.0]])
  labels = rng.integers(0, 3, size=30)
  w = (centers[labels] + rng.normal(scale=0.1, size=(30, 2))).T  # (H=2, T=30)
  got = np.asarray(mtl.kmeans_columns(jnp.asarray(w), 3, 10))
  for c in range(3):  # the same partition up to relabelling
    assert len(set(got[labels == c])) == 1
  assert len(set(got)) == 3
  np.testing.assert_array_equal(got, np.asarray(mtl.kmeans_columns(jnp.asarray(w), 3, 10)))


def test_semigan_unlabeled_rows_are_a_fixed_fraction():
  x = np.random.default_rng(3).normal(size=(4000, 20)).astype(np.float32)
  u = np.asarray(semigan.unlabeled_rows(jnp.asarray(x), 0.3))
  assert 0.27 < u.mean() < 0.33
  # The same row is unlabeled wherever it appears in a batch.
  perm = np.random.default_rng(4).permutation(4000)
  np.testing.assert_array_equal(np.asarray(semigan.unlabeled_rows(jnp.asarray(x[perm]), 0.3)),
                                u[perm])


# ----------------------------------------------------------------------------
# Memory guard
# ----------------------------------------------------------------------------


def _full_size_amtl():
  from configs import default
  config = default.get_config()
  config.method = "amtl"
  return config_lib.resolve(config)


def test_amtl_memory_guard_fires_when_b_cannot_fit():
  config = _full_size_amtl()
  num_t, num_l = 9520, 943  # 9,520 targets are padded to 9,600, a multiple of 128
  network = build.build_network(config, num_l, num_t)
  assert network.num_padded == 9600
  no_plan = lambda network: None  # arithmetic only: no compile of the full-size step
  estimate = memory.estimate_training_bytes(network)
  assert estimate["bytes"] >= 4 * 4 * 9600**2  # B, its gradient and two Adam moments
  config.memory.limit_gb = 12.0  # the paper's 12 GB GPU
  with pytest.raises(memory.MemoryGuardError, match=r"out of memory: Deep-AMTL needs about .* GiB"
                     r".*9,600 x 9,600"):
    memory.check_memory(network, plan=no_plan)
  config.memory.limit_gb = estimate["bytes"] / 2**30 * 1.01
  assert memory.check_memory(network, plan=no_plan) == estimate


@pytest.mark.parametrize("method", ["amtl", "deep_lsmtl", "cnmtl"])
def test_guard_uses_xla_plan_of_the_compiled_step(method):
  """The guard's figure is XLA's buffer plan of the real train step, compiled on
  shapes only; checked against a count of the state it must hold."""
  from configs import tiny
  config = tiny.get_config()
  config.method = method
  config = config_lib.resolve(config)
  config.model.hidden, config.train.batch_size = 64, 64
  num_l, num_t = 48, 1024  # a multiple of 128: no padding
  network = build.build_network(config, num_l, num_t)
  plan = memory.compiled_step_memory(network)
  num_params = sum(x.size for x in jax.tree.leaves(
      nn.meta.unbox(jax.eval_shape(network.init_params_fn()))))
  param_bytes = 4 * num_params
  assert plan["argument"] >= 3 * param_bytes  # parameters and two Adam moments
  assert plan["alias"] >= 3 * param_bytes  # ... donated: updated in place
  assert plan["peak"] >= 4 * param_bytes  # + every gradient (the global norm needs all)
  config.memory.limit_gb = plan["peak"] * 0.99 / 2**30
  with pytest.raises(memory.MemoryGuardError, match="out of memory"):
    memory.check_memory(network, plan=lambda network: plan["peak"])
  config.memory.limit_gb = plan["peak"] * 1.01 / 2**30
  used = memory.check_memory(network, plan=lambda network: plan["peak"])
  assert used["bytes"] == plan["peak"] and used["num_params"] == num_params


def test_guard_stops_a_run_before_it_allocates(cache, tmp_path):
  config = _tiny(cache, "amtl")
  config.memory.limit_gb = 1e-4  # ~100 KB: the tiny B (128 x 128) and trunk do not fit
  with pytest.raises(memory.MemoryGuardError, match="out of memory"):
    train.train_and_evaluate(config, str(tmp_path))
  assert not os.path.exists(tmp_path / "checkpoints")
  assert not os.path.exists(tmp_path / "results.json")


# ----------------------------------------------------------------------------
# Every network method learns
# ----------------------------------------------------------------------------


def _initial_val_mae(config, dataset):
  """Val MAE of the untrained model the run starts from (same seed)."""
  config = config_lib.resolve(config)
  network = build.build_network(config, dataset.num_landmarks, dataset.num_targets)
  regressor, num_padded = network.regressor, network.num_padded
  init_key, _ = jax.random.split(jax.random.PRNGKey(config.seed))
  params, batch_stats = build.init_variables(init_key, regressor, network.extras,
                                             dataset.num_landmarks, num_padded)
  import flax.linen as nn
  variables = nn.meta.unbox({"params": params["regressor"], "batch_stats": batch_stats})
  rows = dataset.read_rows(dataset.split("val"))
  lm = dataset.num_landmarks
  y_hat = np.asarray(regressor.apply(variables, jnp.asarray(rows[:, :lm]), train=False))
  return float(np.abs(rows[:, lm:] - y_hat[:, :dataset.num_targets]).mean())


@pytest.mark.parametrize("method", ["dgex", "densenet", "deep_lsmtl", "semigan", "semigan_semi",
                                    "go_mtl", "cnmtl", "amtl", "amtfl"])
def test_every_network_method_improves_validation(cache, tmp_path, method):
  config = _tiny(cache, method)
  results = train.train_and_evaluate(config, str(tmp_path))
  dataset = sources.load_dataset(config_lib.resolve(config))
  before = _initial_val_mae(config, dataset)
  after = results["splits"]["val"]["mae_mean"]
  assert after < before - 0.02, (method, before, after)
  assert results["method"] == method and results["estimated_train_bytes"] > 0
  genes = np.load(tmp_path / "genes_mae.npz")
  assert genes["val_mae"].mean() == pytest.approx(after, rel=1e-4)
  state = results["state"]
  if method == "cnmtl":  # clusters were re-estimated by k-means and are in the state
    clusters = np.asarray(state.batch_stats["clusters"])
    assert clusters.shape == (128,) and not np.array_equal(clusters, np.arange(128) % 10)
  if method == "amtl":
    assert state.params[mtl.TRANSFER]["raw"].shape == (128, 128)


def test_non_network_methods_write_results_and_genes(cache, tmp_path):
  for method in ("lsr", "knn"):
    results = train.train_and_evaluate(_tiny(cache, method), str(tmp_path / method))
    saved = json.load(open(tmp_path / method / "results.json"))
    assert saved["method"] == method and saved["splits"] == results["splits"]
    genes = np.load(tmp_path / method / "genes_mae.npz")
    assert genes["test_mae"].mean() == pytest.approx(results["splits"]["test"]["mae_mean"])
  assert saved["k"] in _tiny(cache, "knn").knn.ks
