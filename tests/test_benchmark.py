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


# A stand-in for lsmtl_jax/torch_peer.py's command line: eager steps take 0.5 s,
# compiled ones 0.25 s (compile 9 s), or with COMPILE_OK = False torch.compile
# fails the way the real peer reports it.
FAKE_PEER = """
import argparse, json, sys
COMPILE_OK = True
p = argparse.ArgumentParser()
for name in ("hidden", "layers", "batch", "bottleneck", "n_in", "n_out", "steps", "warmup",
             "threads"):
  p.add_argument("--" + name, type=int)
for name in ("lam", "mask_rate", "dropout"):
  p.add_argument("--" + name, type=float)
p.add_argument("--mode", choices=("eager", "compile"))
a = p.parse_args()
print("noise before the JSON line")
if a.mode == "compile" and not COMPILE_OK:
  print(json.dumps({"mode": a.mode, "skipped": "torch.compile failed: no C++ compiler"}))
  sys.exit(3)
step = 0.5 if a.mode == "eager" else 0.25
out = {"impl": "torch", "torch": "fake", "threads": a.threads, "step_s": step,
       "examples_per_s": a.batch / step, "flops_per_example": 1, "args": vars(a)}
if a.mode == "compile":
  out["compile_s"] = 9.0
print(json.dumps(out))
"""


@pytest.fixture
def fake_peer(tmp_path):
  path = tmp_path / "peer.py"
  path.write_text(FAKE_PEER)
  return str(path)


@pytest.fixture
def fake_peer_without_compile(tmp_path):
  path = tmp_path / "peer_eager_only.py"
  path.write_text(FAKE_PEER.replace("COMPILE_OK = True", "COMPILE_OK = False"))
  return str(path)


def _torch():
  """torch, or skip: it is the optional `bench` extra, which CI does not install."""
  return pytest.importorskip(
      "torch", reason="torch is not installed (the optional `bench` extra: "
      "pip install -e '.[bench]'); the PyTorch peer is not tested")


def _report_text(sizes):
  return benchmark.format_report({"machine": benchmark.machine_info(1e9), "sizes": sizes,
                                  "loaders": [], "host_peak_rss": 0,
                                  "summary": benchmark._summary({"sizes": sizes})})


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
  eager, compiled = r["torch"]["eager"], r["torch"]["compile"]
  assert eager["step_s"]["median"] == 0.5 and eager["threads"] == 3
  assert compiled["step_s"]["median"] == 0.25 and compiled["compile_s"]["n"] == 2
  for t in (eager, compiled):
    ratio = t["jax_over_torch_examples_per_s"]
    assert ratio["n"] == 2 and ratio["min"] <= ratio["median"] <= ratio["max"]
  text = _report_text([r])
  for needle in ("JAX / PyTorch eager examples/s", "JAX / PyTorch compiled examples/s",
                 "PyTorch compiled compile + first step", "LSMTL / lam=0", "O(T^2)"):
    assert needle in text
  assert "JAX/PyTorch compiled examples/s, tiny" in benchmark._summary({"sizes": [r]})


def test_a_mode_that_cannot_run_is_reported_unavailable(fake_peer_without_compile):
  options = benchmark.SizeOptions(repeats=2, steps=1, warmup=1, torch="on", lam0=False,
                                  torch_script=fake_peer_without_compile)
  r = benchmark.benchmark_size(_tiny(), 24, 40, options, 1e9, label="tiny",
                               log=lambda *_: None)
  assert r["torch"]["eager"]["step_s"]["n"] == 2  # eager still measured, --torch=on satisfied
  assert r["torch"]["compile"] == {"skipped": "torch.compile failed: no C++ compiler"}
  text = _report_text([r])
  assert "PyTorch compiled" in text and "unavailable: torch.compile failed: no C++ compiler" in text
  assert "JAX / PyTorch eager examples/s" in text
  options.torch_modes = ("compile",)  # nothing could run: --torch=on is an error
  with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
    benchmark.benchmark_size(_tiny(), 24, 40, options, 1e9, log=lambda *_: None)


def test_peer_gets_the_same_network_and_batch(fake_peer):
  out = benchmark.run_torch_peer(fake_peer, hidden=7, depth=3, batch=16, bottleneck=5, n_in=11,
                                 n_out=13, steps=2, warmup=1, threads=2, lam=0.1,
                                 mask_rate=0.2, dropout=0.1, mode="compile")
  assert out["args"] == {"hidden": 7, "layers": 3, "batch": 16, "bottleneck": 5, "n_in": 11,
                         "n_out": 13, "steps": 2, "warmup": 1, "threads": 2, "lam": 0.1,
                         "mask_rate": 0.2, "dropout": 0.1, "mode": "compile"}


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
  # The in-repo peer (script '') where torch cannot be imported: a torch.py that
  # fails the way a missing package does, first on the path.
  (tmp_path / "no_torch").mkdir()
  (tmp_path / "no_torch" / "torch.py").write_text(
      "raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n")
  env = {**os.environ, "PYTHONPATH": str(tmp_path / "no_torch")}
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(os, "environ", env)
    no_torch = benchmark.run_torch_peer("", hidden=1, depth=1, batch=1, bottleneck=0, n_in=1,
                                        n_out=1, steps=1, warmup=1, threads=1, lam=0.0,
                                        mask_rate=0.1, dropout=0.0)
  assert "torch is not installed" in no_torch["skipped"], no_torch
  options = benchmark.SizeOptions(repeats=1, steps=1, warmup=1, torch="auto",
                                  torch_script=str(tmp_path / "nope.py"), lam0=False)
  r = benchmark.benchmark_size(_tiny(), 24, 40, options, 1e9, log=lambda *_: None)
  assert set(r["torch"]) == {"eager", "compile"}
  assert all("not found" in t["skipped"] for t in r["torch"].values())
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
  for needle in ("JAX examples/s", "MFU", "JAX / PyTorch eager examples/s",
                 "JAX / PyTorch compiled examples/s", "LSMTL / lam=0", "loader / training"):
    assert needle in proc.stdout
  report = json.loads(out.read_text())
  assert report["sizes"][0]["torch"]["eager"]["step_s"]["median"] == 0.5
  assert report["sizes"][0]["torch"]["compile"]["step_s"]["median"] == 0.25
  assert report["loaders"][0]["loader_over_training"] > 0
  proc = subprocess.run(cmd[:-1] + ["--json", "--torch=off", "--noloader"], cwd=REPO,
                        capture_output=True, text=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-2000:]
  report = json.loads(proc.stdout)
  assert "torch" not in report["sizes"][0] and report["loaders"] == []


# ----------------------------------------------------------------------------
# The in-repo PyTorch peer (lsmtl_jax/torch_peer.py): only where torch is
# installed (the `bench` extra); skipped, with the reason, elsewhere.
# ----------------------------------------------------------------------------


def test_only_the_peer_imports_torch():
  package = os.path.join(REPO, "lsmtl_jax")
  importers = []
  for root, _, files in os.walk(package):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(root, name)
        with open(path) as f:
          if any(line.lstrip().startswith(("import torch", "from torch")) for line in f):
            importers.append(os.path.relpath(path, package))
  assert importers == ["torch_peer.py"]


def _jax_lsmtl(num_landmarks, num_targets, padded, hidden, depth, bottleneck, seed=0):
  """models.Regressor + TaskRelation (dropout 0), with every parameter and
  BatchNorm statistic perturbed away from its init (ones, zeros)."""
  import flax.linen as nn
  from lsmtl_jax import models
  regressor = models.Regressor(trunk=models.DenseNetTrunk(hidden=hidden, depth=depth,
                                                          dropout=0.0),
                               num_targets=padded)
  relation = models.TaskRelation(num_targets=padded, bottleneck=bottleneck)
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  variables = nn.meta.unbox(regressor.init(k1, jnp.zeros((1, num_landmarks)), train=False))
  rel_params = nn.meta.unbox(relation.init(k2, jnp.zeros((1, padded))))["params"]

  def perturb(tree, key, positive=False):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    noisy = [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, [jnp.abs(x) + 0.5 if positive else x for x in noisy])

  ka, kb, kc, kd = jax.random.split(k3, 4)
  params = perturb(variables["params"], ka)
  stats = {"trunk": {name: {"mean": perturb(s["mean"], kb), "var": perturb(s["var"], kc, True)}
                     for name, s in variables["batch_stats"]["trunk"].items()}}
  return regressor, relation, params, perturb(rel_params, kd), stats


def test_torch_peer_forward_loss_and_gradients_match_the_jax_model():
  torch = _torch()
  from lsmtl_jax import objectives
  from lsmtl_jax import torch_peer
  n_in, n_out, padded, hidden, depth, k, batch, lam = 24, 40, 128, 16, 2, 8, 32, 0.5
  regressor, relation, params, rel_params, stats = _jax_lsmtl(n_in, n_out, padded, hidden,
                                                              depth, k)
  model = torch_peer.DenseNetLSMTL(n_in, n_out, hidden, depth, dropout=0.0, bottleneck=k)
  torch_peer.load_jax_params(model, params, rel_params, stats)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((batch, n_in)).astype(np.float32)
  y = rng.standard_normal((batch, n_out)).astype(np.float32)
  mask = (rng.random((batch, padded)) < 0.2).astype(np.float32)  # the padding's is ignored
  tx, ty, tmask = (torch.from_numpy(a) for a in (x, y, mask[:, :n_out]))
  close = dict(rtol=1e-5, atol=1e-5)

  # Eval mode: the running statistics.
  model.eval()
  with torch.no_grad():
    eval_out = model(tx).numpy()
  jax_eval = regressor.apply({"params": params, "batch_stats": stats}, x, train=False)
  np.testing.assert_allclose(eval_out, np.asarray(jax_eval)[:, :n_out], **close)

  # Train mode: batch statistics, the loss and its gradients.
  valid = (jnp.arange(padded) < n_out).astype(jnp.float32)
  y_pad = jnp.pad(y, ((0, 0), (0, padded - n_out)))

  def jax_loss(p, rp):
    y_hat, updates = regressor.apply({"params": p, "batch_stats": stats}, x, train=True,
                                     mutable=["batch_stats"])
    task = objectives.task_loss(y_pad, y_hat, "mse", valid)
    rec = objectives.reconstruction_loss(
        y_hat, jnp.asarray(mask), lambda u: relation.apply({"params": rp}, u), False, valid)
    return task + lam * rec, (y_hat, task, rec, updates["batch_stats"])

  (j_total, (j_hat, j_task, j_rec, j_stats)), (j_grad, j_rgrad) = jax.value_and_grad(
      jax_loss, argnums=(0, 1), has_aux=True)(params, rel_params)
  model.train()
  y_hat = model(tx)
  total, task, rec = torch_peer.lsmtl_loss(model, y_hat, ty, tmask, lam)
  total.backward()
  np.testing.assert_allclose(y_hat.detach().numpy(), np.asarray(j_hat)[:, :n_out], **close)
  for a, b in ((total, j_total), (task, j_task), (rec, j_rec)):
    np.testing.assert_allclose(float(a.detach()), float(b), rtol=1e-5)
  assert float(rec.detach()) > 0

  def grad_close(layer, g):  # Flax kernels are (in, out), torch weights (out, in)
    rows, cols = layer.weight.shape
    np.testing.assert_allclose(layer.weight.grad.numpy(), np.asarray(g["kernel"]).T[:rows, :cols],
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(layer.bias.grad.numpy(), np.asarray(g["bias"])[:rows],
                               rtol=1e-4, atol=1e-6)

  for i, block in enumerate(model.blocks):
    grad_close(block[1], j_grad["trunk"][f"block{i}_dense"])
    np.testing.assert_allclose(block[0].weight.grad.numpy(),
                               np.asarray(j_grad["trunk"][f"block{i}_norm"]["scale"]),
                               rtol=1e-4, atol=1e-6)
  grad_close(model.head, j_grad["head"])
  grad_close(model.relation.encode, j_rgrad["encode"])
  grad_close(model.relation.decode, j_rgrad["decode"])

  # Running averages: the same momentum; torch keeps the unbiased batch variance
  # (n / (n - 1) x Flax's biased one), which only eval mode reads.
  for i, block in enumerate(model.blocks):
    old = stats["trunk"][f"block{i}_norm"]
    new = j_stats["trunk"][f"block{i}_norm"]
    np.testing.assert_allclose(block[0].running_mean.numpy(), np.asarray(new["mean"]), **close)
    batch_var = (np.asarray(new["var"]) - 0.9 * np.asarray(old["var"])) / 0.1
    np.testing.assert_allclose(block[0].running_var.numpy(),
                               0.9 * np.asarray(old["var"]) + 0.1 * batch_var * batch / (batch - 1),
                               rtol=1e-4, atol=1e-5)


def test_torch_peer_adam_step_matches_optax():
  torch = _torch()
  import optax
  from lsmtl_jax import objectives
  from lsmtl_jax import torch_peer
  n_in, n_out, hidden, depth, batch, lr = 12, 20, 8, 2, 16, 1e-3
  regressor, _, params, _, stats = _jax_lsmtl(n_in, n_out, n_out, hidden, depth, 4, seed=1)
  model = torch_peer.DenseNetLSMTL(n_in, n_out, hidden, depth, dropout=0.0)
  torch_peer.load_jax_params(model, params, None, stats)
  rng = np.random.default_rng(1)
  x = rng.standard_normal((batch, n_in)).astype(np.float32)
  y = rng.standard_normal((batch, n_out)).astype(np.float32)
  step = torch_peer.TrainStep(model, lr, lam=0.0, mask_rate=0.1, mode="eager")
  step(torch.from_numpy(x), torch.from_numpy(y))

  def loss(p):
    y_hat, _ = regressor.apply({"params": p, "batch_stats": stats}, x, train=True,
                               mutable=["batch_stats"])
    return objectives.task_loss(y, y_hat)

  tx = optax.adam(lr)
  updates, _ = tx.update(jax.grad(loss)(params), tx.init(params), params)
  new = optax.apply_updates(params, updates)
  # One Adam step moves each weight by about lr; compare the moves to 0.1 % of lr.
  for a, b in ((model.head, new["head"]), (model.blocks[0][1], new["trunk"]["block0_dense"])):
    np.testing.assert_allclose(a.weight.detach().numpy(), np.asarray(b["kernel"]).T,
                               rtol=0, atol=1e-6)
  np.testing.assert_allclose(model.blocks[1][0].weight.detach().numpy(),
                             np.asarray(new["trunk"]["block1_norm"]["scale"]), rtol=0, atol=1e-6)


def test_the_suite_runs_the_in_repo_peer_eager_and_compiled():
  _torch()
  options = benchmark.SizeOptions(repeats=1, steps=2, warmup=2, torch="on", lam0=False,
                                  threads=1)
  r = benchmark.benchmark_size(_tiny(), 24, 40, options, 1e9, label="tiny",
                               log=lambda *_: None)
  eager, compiled = r["torch"]["eager"], r["torch"]["compile"]
  assert eager["impl"] == "torch" and eager["step_s"]["median"] > 0
  assert eager["flops_per_example"] == perf.train_flops_per_example(_tiny().model, 24, 40, 8)
  text = _report_text([r])
  assert "JAX / PyTorch eager examples/s" in text
  if "skipped" in compiled:  # e.g. no C++ compiler here: reported, not a crash
    assert "PyTorch compiled" in text and "unavailable: " + compiled["skipped"] in text
  else:
    assert compiled["impl"] == "torch.compile" and compiled["compile_s"]["n"] == 1
    assert "JAX / PyTorch compiled examples/s" in text
