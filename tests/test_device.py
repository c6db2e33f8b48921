"""The default device, whatever it is: batches shard over every device found,
the training step's arithmetic on it matches the host CPU's, and a short
training run keeps its state there.

On CI the default device is the CPU (tests/conftest.py), so the comparisons
are of the CPU with itself; `python -m lsmtl_jax.benchmark --suite=accelerator`
runs this file with JAX_PLATFORMS naming the accelerator, where they are not.
Tolerances admit TF32 matmuls (10-bit mantissa; JAX's default float32
precision on NVIDIA GPUs) and TPU's bf16 passes.
"""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lsmtl_jax import build
from lsmtl_jax import config_lib
from lsmtl_jax import parallel
from lsmtl_jax import train

L, T, B = 24, 40, 32


def _tiny(tmp_path=None, **kw):
  from configs import tiny
  c = tiny.get_config()
  c.mesh.target_multiple = 1
  if tmp_path is not None:
    c.data.cache_dir = str(tmp_path / "cache")
  for k, v in kw.items():
    config_lib.set_field(c, k, v)
  return c


def _rel(a, b):
  a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def test_batches_shard_over_every_device_found():
  devices = jax.devices()
  mesh = parallel.make_mesh(ml_collections.ConfigDict({"data": -1, "model": 1, "fsdp": False}))
  rows = B * len(devices)
  host = {"x": np.arange(rows * L, dtype=np.float32).reshape(rows, L)}
  placed = parallel.Placement(mesh).put(host, rows)["x"]
  shards = placed.addressable_shards
  assert {s.device for s in shards} == set(devices)
  assert all(s.data.shape == (B, L) for s in shards)
  starts = sorted(s.index[0].start or 0 for s in shards)
  assert starts == [i * B for i in range(len(devices))]
  np.testing.assert_array_equal(parallel.Placement(mesh).fetch(placed), host["x"])


def test_forward_and_gradients_on_the_device_match_the_host_cpu():
  config = config_lib.resolve(_tiny())
  net = build.build_network(config, L, T)
  variables = jax.tree.map(np.asarray, net.regressor.init(
      jax.random.PRNGKey(0), jnp.zeros((2, L)), train=False))
  variables = nn.meta.unbox(variables)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((B, L)).astype(np.float32)
  y = rng.standard_normal((B, net.num_padded)).astype(np.float32)

  def loss(params, x, y):
    pred = net.regressor.apply({**variables, "params": params}, x, train=False)
    return jnp.mean((pred - y) ** 2), pred

  fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
  results = {}
  for name, device in (("device", jax.devices()[0]), ("cpu", jax.devices("cpu")[0])):
    args = jax.device_put((variables["params"], x, y), device)
    (value, pred), grads = fn(*args)
    assert pred.devices() == {device}
    results[name] = jax.device_get((value, pred, grads))
  (v_d, p_d, g_d), (v_c, p_c, g_c) = results["device"], results["cpu"]
  assert _rel(p_d, p_c) < 1e-2
  assert abs(v_d - v_c) / v_c < 1e-2
  flat_d = np.concatenate([np.ravel(a) for a in jax.tree.leaves(g_d)])
  flat_c = np.concatenate([np.ravel(a) for a in jax.tree.leaves(g_c)])
  assert _rel(flat_d, flat_c) < 2e-2
  assert flat_d @ flat_c / (np.linalg.norm(flat_d) * np.linalg.norm(flat_c)) > 0.999


def test_a_short_training_run_keeps_its_state_on_the_device(tmp_path):
  config = _tiny(tmp_path, **{"train.num_steps": 6, "train.eval_every": 6,
                              "train.checkpoint_every": 6, "model.dtype": "auto"})
  workdir = tmp_path / "run"
  results = train.train_and_evaluate(config, str(workdir))
  platform = jax.devices()[0].platform
  for leaf in jax.tree.leaves(results["state"].params):
    assert {d.platform for d in leaf.devices()} == {platform}
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["model"]["dtype"] == config_lib.auto_dtype(platform)
  for split in ("val", "test"):
    assert np.isfinite(results["splits"][split]["mae_mean"])
