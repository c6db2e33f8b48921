"""Prediction intervals: the conformal quantile against a hand and a numpy
computation, coverage on exchangeable scores, the calibration rows held out of
validation, a tiny run's test coverage, and predict --intervals."""

import json
import os

import numpy as np
import pytest

from lsmtl_jax import config_lib
from lsmtl_jax import inference
from lsmtl_jax import intervals
from lsmtl_jax import predict
from lsmtl_jax import report
from lsmtl_jax import train
from lsmtl_jax.data import formats
from lsmtl_jax.data import sources
from lsmtl_jax.data import store

from test_predict import trained_run


def test_conformal_quantile_by_hand():
  # n = 19 scores 1..19 (shuffled): coverage c takes the ceil(20 c)-th smallest.
  scores = np.random.default_rng(0).permutation(np.arange(1.0, 20.0))
  scores = np.stack([scores, 2 * scores], axis=1)
  q = intervals.conformal_quantiles(scores, (0.5, 0.9, 0.95, 0.99))
  np.testing.assert_array_equal(q[:, 0], [10, 18, 19, np.inf])  # ceil(20 * 0.99) = 20 > 19
  np.testing.assert_array_equal(q[:, 1], [20, 36, 38, np.inf])
  assert intervals.conformal_rank(9, 0.9) == 9  # (n + 1) c = 9.000000000000002: still 9


def test_conformal_quantile_matches_numpy():
  rng = np.random.default_rng(1)
  scores = np.abs(rng.standard_normal((37, 6))) * rng.uniform(0.1, 3, 6)
  q = intervals.conformal_quantiles(scores)
  n = scores.shape[0]
  for i, c in enumerate(intervals.LEVELS):
    k = int(np.ceil((n + 1) * c - 1e-9))
    if k > n:
      assert np.isinf(q[i]).all()
      continue
    # The k-th order statistic: inverted_cdf at any q in ((k - 1) / n, k / n].
    expected = np.quantile(scores, (k - 0.5) / n, axis=0, method="inverted_cdf")
    np.testing.assert_array_equal(q[i], expected)


def test_quantile_refuses_off_grid_and_too_few_profiles():
  cal = intervals.Calibration.from_scores(np.ones((30, 4)), "validation")
  assert cal.quantile(0.9).shape == (4,)
  with pytest.raises(intervals.IntervalError, match="0.50 to 0.99 in steps of 0.01"):
    cal.quantile(0.925)
  with pytest.raises(intervals.IntervalError, match="needs at least 99 held-out profiles; "
                     "the calibration has 30"):
    cal.quantile(0.99)
  lower, upper = cal.bounds(np.zeros((2, 4)), 0.9)
  np.testing.assert_array_equal(upper, -lower)
  restored = intervals.Calibration.from_arrays(cal.to_arrays(), cal.info())
  np.testing.assert_array_equal(restored.quantiles, cal.quantiles)
  assert restored.num_profiles == 30 and restored.source == "validation"


def test_coverage_is_nominal_on_exchangeable_scores():
  # Split conformal: for every gene, coverage k / (n + 1) in expectation
  # (k = ceil((n + 1) c)); averaged over many genes the mean is close to it.
  rng = np.random.default_rng(2)
  genes, n, n_test = 400, 99, 2000
  scale = rng.uniform(0.2, 5.0, genes)
  cal = intervals.Calibration.from_scores(np.abs(rng.standard_t(4, (n, genes)) * scale),
                                          "calibration")
  y = rng.standard_t(4, (n_test, genes)) * scale
  for c in (0.5, 0.8, 0.9, 0.95):
    lower, upper = cal.bounds(np.zeros_like(y), c)
    covered = intervals.coverage(y, lower, upper)
    expected = intervals.conformal_rank(n, c) / (n + 1)
    assert abs(covered.mean() - expected) < 0.01, (c, covered.mean(), expected)


def test_calibration_rows_are_held_out_of_validation():
  rows = np.arange(100, 140)
  val, cal = sources.split_off_calibration(rows, 0.25)
  assert len(cal) == 10 and len(val) == 30
  assert not set(val) & set(cal) and set(val) | set(cal) == set(rows)
  again_val, again_cal = sources.split_off_calibration(rows[::-1].copy(), 0.25)
  np.testing.assert_array_equal(again_cal, cal)  # a fixed draw, whatever the order given
  with pytest.raises(store.DatasetError, match="leaves 0 for calibration"):
    sources.split_off_calibration(rows, 0.01)
  from configs import tiny
  for bad in (1.0, -0.1, True):
    config = config_lib.resolve(tiny.get_config())
    config.data.calibration_fraction = bad
    with pytest.raises(config_lib.ConfigError, match="data.calibration_fraction must be"):
      config_lib.validate(config)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  return inference.load_run(trained_run(tmp_path_factory))


def _abs_errors(run, rows):
  values = run.dataset.read_rows(rows)
  p = inference.Predictor(run, 16)(values[:, :run.num_landmarks])
  return np.abs(values[:, run.num_landmarks:] - p)


def test_tiny_run_calibration_and_test_coverage(run):
  # The shared tiny run has no calibration rows: its validation split calibrates.
  cal = run.calibration(16)
  assert (cal.source, cal.num_profiles) == ("validation", 30)
  np.testing.assert_array_equal(
      cal.quantiles, intervals.conformal_quantiles(_abs_errors(run, run.dataset.split("val"))))
  cov = report.interval_coverage(run, inference.Predictor(run, 16), cal)
  assert list(cov["levels"]) == [0.5, 0.6, 0.7, 0.8, 0.9, 0.95]  # 0.99 needs 99 profiles
  errors = _abs_errors(run, run.dataset.split("test"))
  for i, c in enumerate(cov["levels"]):
    np.testing.assert_allclose(cov["coverage"][i], (errors <= cal.quantile(c)).mean(0))
    # 30 test profiles, 40 genes: a loose bound around the nominal coverage.
    assert abs(cov["coverage"][i].mean() - c) < 0.1, (c, cov["coverage"][i].mean())


def test_held_out_calibration_rows_are_never_evaluated(tmp_path):
  from configs import tiny
  config = tiny.get_config()
  config.data.cache_dir = str(tmp_path / "cache")
  config.data.calibration_fraction = 0.5
  config.train.num_steps = 8
  config.train.log_every = 8
  config.train.measure_peak = False
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)
  results = json.load(open(os.path.join(workdir, "results.json")))
  assert results["splits"]["val"]["n_samples"] == 15  # of the 30 validation profiles
  run = inference.load_run(workdir)
  cal = run.calibration(16)
  assert (cal.source, cal.num_profiles) == ("calibration", 15)
  held_out, source = sources.calibration_set(run.config, run.dataset)
  assert source == "calibration"
  data = sources.load_data(run.config)
  assert not set(held_out.indices) & set(data.eval_sets["val"].indices)
  assert set(held_out.indices) | set(data.eval_sets["val"].indices) == set(
      run.dataset.split("val"))
  np.testing.assert_array_equal(cal.quantiles,
                                intervals.conformal_quantiles(_abs_errors(run, held_out.indices)))


def test_predict_writes_bounds_around_the_prediction(run, tmp_path):
  rows = run.dataset.split("test")
  z = run.dataset.read_rows(rows)[:, :run.num_landmarks]
  scale, offset = run.landmark_scale_and_offset()
  ids = [run.meta["sample_ids"][i] for i in rows]
  inp = tmp_path / "in.gctx"
  # Two landmarks missing: imputed, so their bounds are NaN.
  formats.write_gctx(str(inp), (z * scale + offset).astype(np.float32)[:, 2:], ids,
                     run.landmark_ids[2:])
  out = tmp_path / "out.gctx"
  summary = predict.predict_file(run.workdir, str(inp), str(out),
                                 predict.Options(intervals=0.8, impute_missing=True))
  paths = predict.interval_paths(str(out))
  assert paths == {"lower": str(tmp_path / "out.lower.gctx"),
                   "upper": str(tmp_path / "out.upper.gctx")}
  assert summary["interval_files"] == [paths["lower"], paths["upper"]]
  assert sorted(os.listdir(tmp_path)) == ["in.gctx", "out.gctx", "out.lower.gctx",
                                          "out.upper.gctx"]
  values = {}
  for kind, path in (("pred", str(out)), *paths.items()):
    with formats.open_matrix(path) as m:
      assert m.sample_ids == ids and m.gene_ids == run.landmark_ids + run.target_ids
      values[kind] = m.read_rows(0, m.num_samples)
    meta = predict.read_gctx_row_metadata(path)
    assert list(meta["symbol"]) == run.landmark_symbols + run.target_symbols
  L = run.num_landmarks
  lower, pred, upper = values["lower"], values["pred"], values["upper"]
  assert (lower[:, L:] <= pred[:, L:]).all() and (pred[:, L:] <= upper[:, L:]).all()
  assert np.isnan(lower[:, :2]).all() and np.isnan(upper[:, :2]).all()
  np.testing.assert_array_equal(lower[:, 2:L], pred[:, 2:L])
  np.testing.assert_array_equal(upper[:, 2:L], pred[:, 2:L])
  # Half-width: the calibration's quantile in expression units, the same for every profile.
  q = run.calibration(16).quantile(0.8) * run.target_scale_and_offset()[0]
  np.testing.assert_allclose((upper[:, L:] - lower[:, L:]) / 2, np.broadcast_to(q, pred[:, L:].shape),
                             rtol=1e-5, atol=1e-4)

  # Coverage the calibration cannot give, or off the grid: one-line errors, no output.
  for level, message in ((0.99, "needs at least 99 held-out profiles"),
                         (0.925, "in steps of 0.01"), (1.5, r"a coverage in \(0, 1\)")):
    with pytest.raises(predict.PredictError, match=message):
      predict.predict_file(run.workdir, str(inp), str(tmp_path / "x.gctx"),
                           predict.Options(intervals=level, impute_missing=True))
  assert not [p for p in os.listdir(tmp_path) if p.startswith(("x", ".x"))]
