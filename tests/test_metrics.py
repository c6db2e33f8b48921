"""Streamed per-gene statistics against direct float64 numpy computations."""

import jax.numpy as jnp
import numpy as np

from lsmtl_jax import metrics


def _lin_cc(y, p):
  my, mp = y.mean(0), p.mean(0)
  cov = ((y - my) * (p - mp)).mean(0)
  return 2 * cov / (y.var(0) + p.var(0) + (my - mp) ** 2)


def _stream(y, p, batch=7):
  """Accumulates in padded batches the way evaluation does."""
  stats = metrics.zeros(y.shape[1])
  for start in range(0, len(y), batch):
    yb, pb = y[start:start + batch], p[start:start + batch]
    real = len(yb)
    pad = batch - real
    w = np.r_[np.ones(real), np.zeros(pad)].astype(np.float32)
    yb = np.concatenate([yb, np.full((pad, y.shape[1]), 99.0)])  # garbage in the pads
    pb = np.concatenate([pb, np.full((pad, y.shape[1]), -99.0)])
    stats = metrics.accumulate(stats, jnp.asarray(yb, jnp.float32), jnp.asarray(pb, jnp.float32),
                               jnp.asarray(w))
  return {k: np.asarray(v, np.float64) for k, v in stats.items()}


def _data(n=45, genes=6, seed=0):
  rng = np.random.default_rng(seed)
  y = rng.normal(size=(n, genes))
  p = 0.7 * y + 0.4 * rng.normal(size=(n, genes)) + 0.1
  y[:, 0] = 1.5            # a constant gene
  p[:, 1] = y[:, 1]        # a perfectly predicted gene
  return y.astype(np.float32).astype(np.float64), p.astype(np.float32).astype(np.float64)


def test_per_gene_mae_and_cc_match_numpy():
  y, p = _data()
  genes = metrics.per_gene(_stream(y, p))
  np.testing.assert_allclose(genes["mae"], np.abs(y - p).mean(0), rtol=1e-5)
  cc = _lin_cc(y, p)
  np.testing.assert_allclose(genes["cc"][1:], cc[1:], rtol=1e-4, atol=1e-5)


def test_constant_and_perfect_genes():
  y, p = _data()
  genes = metrics.per_gene(_stream(y, p))
  assert genes["constant"].tolist() == [True] + [False] * 5
  assert np.isnan(genes["cc"][0])
  assert abs(genes["cc"][1] - 1.0) < 1e-5
  assert genes["mae"][1] == 0.0


def test_summary_excludes_constant_genes_from_cc_and_counts_them():
  y, p = _data()
  s = metrics.summarize(_stream(y, p))
  mae = np.abs(y - p).mean(0)
  cc = _lin_cc(y, p)[1:]
  assert s["n_samples"] == 45 and s["n_genes"] == 6 and s["n_constant_genes"] == 1
  np.testing.assert_allclose([s["mae_mean"], s["mae_std"]], [mae.mean(), mae.std()], rtol=1e-5)
  np.testing.assert_allclose([s["cc_mean"], s["cc_std"]], [cc.mean(), cc.std()], rtol=1e-4)


def test_expression_units_via_affine_statistics():
  y, p = _data()
  scale = np.array([0.5, 1.0, 2.0, 1.3, 0.9, 3.1])
  offset = np.array([8.0, 5.0, 10.0, 4.2, 12.0, 7.7])
  got = metrics.summarize(metrics.affine(_stream(y, p), scale, offset))
  ye, pe = y * scale + offset, p * scale + offset
  mae = np.abs(ye - pe).mean(0)
  cc = _lin_cc(ye, pe)[1:]
  np.testing.assert_allclose(got["mae_mean"], mae.mean(), rtol=1e-5)
  np.testing.assert_allclose(got["mae_std"], mae.std(), rtol=1e-5)
  np.testing.assert_allclose(got["cc_mean"], cc.mean(), rtol=1e-4)
  assert got["n_constant_genes"] == 1


def test_hand_computed_case():
  # y = [0, 2], p = [1, 1]: MAE 1; cov 0 -> CC 0.
  # y = [0, 2], p = [0, 4]: MAE 1; my=1, mp=2, var_y=1, var_p=4, cov=2 -> CC 4/(1+4+1) = 2/3.
  y = np.array([[0.0, 0.0], [2.0, 2.0]])
  p = np.array([[1.0, 0.0], [1.0, 4.0]])
  genes = metrics.per_gene(_stream(y, p, batch=4))
  np.testing.assert_allclose(genes["mae"], [1.0, 1.0])
  np.testing.assert_allclose(genes["cc"], [0.0, 2 / 3], atol=1e-7)


def _cc_error_against_float64(y, p, batch):
  got = metrics.per_gene(_stream(y, p, batch=batch))["cc"]
  return np.abs(got - _lin_cc(y, p))


def test_shifted_gene_stays_exact_in_float32_accumulation():
  """A cross-platform shift (mean 300, sd 1 in standardized units): plain float32
  sums lose the variance to cancellation (CC off by ~1e-2); sums around the
  gene's reference keep it."""
  rng = np.random.default_rng(7)
  n = 1000
  y = rng.normal(0, 1, (n, 3))
  y[:, 0] += 300.0                          # the shifted gene
  y[:, 1] = y[:, 1] * 0.01 - 40.0           # shifted and narrow: mean/sd 4000
  p = 0.8 * y + 0.3 * rng.normal(0, 1, (n, 3)) + np.array([60.0, -8.0, 0.2])
  p[:, 1] = y[:, 1] + 0.004 * rng.normal(0, 1, n)
  y = y.astype(np.float32).astype(np.float64)
  p = p.astype(np.float32).astype(np.float64)
  for batch in (7, 64, 1000):
    err = _cc_error_against_float64(y, p, batch)
    assert err.max() < 1e-5, (batch, err)
  # The same sums without the per-gene reference, as before: visibly wrong.
  plain = metrics.zeros(3)
  for start in range(0, n, 64):
    b = metrics.batch_statistics(jnp.asarray(y[start:start + 64], jnp.float32),
                                 jnp.asarray(p[start:start + 64], jnp.float32))
    plain = {k: plain[k] + b[k] for k in metrics.STAT_NAMES}
  assert abs(metrics.per_gene(plain)["cc"][0] - _lin_cc(y, p)[0]) > 1e-4


def test_shifted_sums_through_affine_and_unshift():
  rng = np.random.default_rng(3)
  y = rng.normal(300, 1, (200, 2))
  p = y + rng.normal(0, 0.5, (200, 2))
  y, p = (v.astype(np.float32).astype(np.float64) for v in (y, p))
  stats = _stream(y, p, batch=16)
  assert np.all(stats["shift_y"] != 0)  # the first batch's mean
  plain = metrics.unshift(stats)
  np.testing.assert_allclose(plain["sum_y"], y.sum(0), rtol=1e-9)
  np.testing.assert_allclose(plain["sum_yp"], (y * p).sum(0), rtol=1e-9)
  for s in (stats, plain):
    np.testing.assert_allclose(metrics.per_gene(s)["cc"], _lin_cc(y, p), atol=1e-5)
  scale, offset = np.array([0.5, 2.0]), np.array([8.0, -3.0])
  ye, pe = y * scale + offset, p * scale + offset
  for s in (stats, plain):
    genes = metrics.per_gene(metrics.affine(s, scale, offset))
    np.testing.assert_allclose(genes["cc"], _lin_cc(ye, pe), atol=1e-5)
    np.testing.assert_allclose(genes["mae"], np.abs(ye - pe).mean(0), rtol=1e-5)


def test_accumulate_jits_and_keeps_the_first_shift():
  import jax
  step = jax.jit(metrics.accumulate)
  stats = step(metrics.zeros(2), jnp.zeros((4, 2)), jnp.zeros((4, 2)), jnp.zeros(4))
  assert float(stats["n"][0]) == 0  # all padding: no shift fixed yet
  y = jnp.array([[10.0, 1.0], [12.0, 3.0]])
  stats = step(stats, y, y, jnp.ones(2))
  np.testing.assert_array_equal(stats["shift_y"], [11.0, 2.0])
  stats = step(stats, y + 100, y, jnp.ones(2))
  np.testing.assert_array_equal(stats["shift_y"], [11.0, 2.0])
  assert sorted(stats) == sorted(metrics.STAT_NAMES)
