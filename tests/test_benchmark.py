"""The benchmark's pieces on tiny shapes (no timing assertions: speed targets live
in `python -m lsmtl_jax.benchmark --suite=issue6`, not in tests)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsmtl_jax import benchmark
from lsmtl_jax import perf
from lsmtl_jax import train
from lsmtl_jax.data import store

from conftest import REPO


def _tiny(**overrides):
  from configs import tiny
  c = tiny.get_config()
  for k, v in overrides.items():
    section, field = k.split(".")
    c[section][field] = v
  return c


FAKE_PEER = """
import argparse, json
p = argparse.ArgumentParser()
for name in ("hidden", "layers", "batch", "bottleneck", "n_in", "n_out", "steps", "warmup",
             "threads"):
  p.add_argument("--" + name, type=int)
for name in ("lam", "mask_rate", "dropout"):
  p.add_argument("--" + name, type=float)
a = p.parse_args()
print("noise before the JSON line")
print(json.dumps({"impl": "torch", "torch": "fake", "threads": a.threads, "step_s": 0.5,
                  "examples_per_s": a.batch / 0.5, "flops_per_example": 1,
                  "args": vars(a)}))
"""


@pytest.fixture
def fake_peer(tmp_path):
  path = tmp_path / "peer.py"
  path.write_text(FAKE_PEER)
  return str(path)


def test_regularizer_memory_is_order_t_k_against_t_squared():
  m = benchmark.regularizer_memory(9520, 128)
  assert m["lsmtl_params"] == 2 * 9520 * 128 + 9520 + 128
  assert m["amtl_params"] == 9520**2
  assert m["lsmtl_bytes_with_adam"] == 12 * m["lsmtl_params"]
  assert m["amtl_over_lsmtl"] > 30


def test_step_bench_builds_the_training_step_and_counts_bytes():
  bench = benchmark.StepBench(_tiny(), 24, 40)
  bench.warmup(2)
  assert bench.block(2) > 0 and bench.compile_seconds > 0
  assert np.isfinite(float(bench.last_metrics["loss"]))
  params = sum(x.size for x in jax.tree.leaves(bench.state.params))
  assert bench.param_bytes == 4 * params
  # Adam: two float32 moments per parameter plus integer counters.
  assert 2 * bench.param_bytes <= bench.opt_state_bytes <= 2 * bench.param_bytes + 64
  padded = bench.padded_targets  # the head and bottleneck are padded like in training
  assert padded == 128 and bench.relation_param_bytes == 4 * (2 * padded * 8 + padded + 8)
  c = _tiny()
  assert bench.flops_per_example() == perf.train_flops_per_example(c.model, 24, 40, 8)


def test_benchmark_size_interleaves_lam0_and_the_peer(fake_peer):
  options = benchmark.SizeOptions(repeats=2, steps=1, warmup=1, torch="auto",
                                  torch_script=fake_peer, threads=3)
  r = benchmark.benchmark_size(_tiny(), 24, 40, options, peak_flops=1e9, label="tiny",
                               log=lambda *_: None)
  assert r["step_s"]["n"] == 2 and r["examples_per_s"] > 0
  assert r["mfu"] == pytest.approx(r["examples_per_s"] * r["flops_per_example"] / 1e9)
  assert r["lam0"]["lsmtl_over_lam0_step"]["n"] == 2
  assert r["lam0"]["extra_state_bytes"] == 3 * r["relation_param_bytes"]
  t = r["torch"]
  assert t["step_s"]["median"] == 0.5 and t["threads"] == 3
  ratio = t["jax_over_torch_examples_per_s"]
  assert ratio["n"] == 2 and ratio["min"] <= ratio["median"] <= ratio["max"]
  text = benchmark.format_report({"machine": benchmark.machine_info(1e9), "sizes": [r],
                                  "loaders": [], "host_peak_rss": 0,
                                  "summary": benchmark._summary({"sizes": [r]})})
  assert "JAX / PyTorch examples/s" in text and "LSMTL / lam=0" in text and "O(T^2)" in text


def test_peer_gets_the_same_network_and_batch(fake_peer):
  out = benchmark.run_torch_peer(fake_peer, hidden=7, depth=3, batch=16, bottleneck=5, n_in=11,
                                 n_out=13, steps=2, warmup=1, threads=2, lam=0.1,
                                 mask_rate=0.2, dropout=0.1)
  assert out["args"] == {"hidden": 7, "layers": 3, "batch": 16, "bottleneck": 5, "n_in": 11,
                         "n_out": 13, "steps": 2, "warmup": 1, "threads": 2, "lam": 0.1,
                         "mask_rate": 0.2, "dropout": 0.1}


def test_missing_or_failing_peer_is_skipped_with_the_reason(tmp_path):
  missing = benchmark.run_torch_peer(str(tmp_path / "nope.py"), hidden=1, depth=1, batch=1,
                                     bottleneck=0, n_in=1, n_out=1, steps=1, warmup=0,
                                     threads=1, lam=0.0, mask_rate=0.1, dropout=0.0)
  assert "not found" in missing["skipped"]
  bad = tmp_path / "bad.py"
  bad.write_text("import torch_that_is_not_there\n")
  failed = benchmark.run_torch_peer(str(bad), hidden=1, depth=1, batch=1, bottleneck=0, n_in=1,
                                    n_out=1, steps=1, warmup=0, threads=1, lam=0.0,
                                    mask_rate=0.1, dropout=0.0)
  assert "failed" in failed["skipped"]
  options = benchmark.SizeOptions(repeats=1, steps=1, warmup=1, torch="auto",
                                  torch_script=str(tmp_path / "nope.py"), lam0=False)
  r = benchmark.benchmark_size(_tiny(), 24, 40, options, 1e9, log=lambda *_: None)
  assert "not found" in r["torch"]["skipped"]
  options.torch = "on"
  with pytest.raises(RuntimeError, match="not found"):
    benchmark.benchmark_size(_tiny(), 24, 40, options, 1e9, log=lambda *_: None)


def test_loader_rate_on_a_real_store(tiny_dataset, tmp_path):
  r = benchmark.measure_loader(tiny_dataset, batch_size=32, num_batches=5, prefetch=2)
  assert r["examples_per_s"] > 0 and r["rows_in_store"] == tiny_dataset.num_samples
  ds = benchmark.write_random_store(str(tmp_path / "geo"), 50, num_landmarks=5, num_targets=7,
                                    block_rows=16)
  assert (ds.num_samples, ds.num_landmarks, ds.num_targets) == (50, 5, 7)
  assert sorted(np.concatenate([ds.split(s) for s in ("train", "val", "test")])) == list(
      range(50))
  assert benchmark.measure_loader(ds, 8, 3, 2)["examples_per_s"] > 0
  assert isinstance(ds, store.Dataset)


def test_unrolled_threefry_draws_the_same_bits():
  """perf installs JAX's unrolled threefry lowering on CPU (one fused pass
  instead of a while loop); the random numbers must not change."""
  assert perf.UNROLLED_THREEFRY
  key = jax.random.PRNGKey(42)
  code = ("import jax, numpy as np, sys; k = jax.random.PRNGKey(42); "
          "np.save(sys.argv[1], np.asarray(jax.random.bernoulli(k, 0.3, (37, 53))));"
          "np.save(sys.argv[2], np.asarray(jax.random.normal(k, (101,))))")
  paths = [str(os.path.join(os.environ.get("TMPDIR", "/tmp"), f"lsmtl_rng_{os.getpid()}_{i}.npy"))
           for i in range(2)]
  try:
    subprocess.run([sys.executable, "-c", code, *paths], check=True,
                   env={**os.environ, "JAX_PLATFORMS": "cpu"})  # JAX's own rolled lowering
    rolled = [np.load(p) for p in paths]
  finally:
    for p in paths:
      if os.path.exists(p):
        os.remove(p)
  np.testing.assert_array_equal(jax.jit(lambda k: jax.random.bernoulli(k, 0.3, (37, 53)))(key),
                                rolled[0])
  np.testing.assert_array_equal(jax.jit(lambda k: jax.random.normal(k, (101,)))(key), rolled[1])


def test_command_line_prints_the_table_and_json(fake_peer, tmp_path):
  out = tmp_path / "report.json"
  cmd = [sys.executable, "-m", "lsmtl_jax.benchmark", "--config=configs/tiny.py",
         f"--config.data.cache_dir={tmp_path / 'cache'}", "--repeats=1", "--steps=1",
         "--warmup=1", "--loader_batches=3", f"--torch_script={fake_peer}", f"--out={out}"]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-2000:]
  for needle in ("JAX examples/s", "MFU", "JAX / PyTorch examples/s", "LSMTL / lam=0",
                 "loader / training"):
    assert needle in proc.stdout
  report = json.loads(out.read_text())
  assert report["sizes"][0]["torch"]["step_s"]["median"] == 0.5
  assert report["loaders"][0]["loader_over_training"] > 0
  proc = subprocess.run(cmd[:-1] + ["--json", "--torch=off", "--noloader"], cwd=REPO,
                        capture_output=True, text=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-2000:]
  report = json.loads(proc.stdout)
  assert "torch" not in report["sizes"][0] and report["loaders"] == []
