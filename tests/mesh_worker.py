"""Run by test_parallel.py in a subprocess with JAX_NUM_CPU_DEVICES=8: trains the
tiny config on each mesh shape given and saves final parameters and metrics."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import tiny  # noqa: E402
from lsmtl_jax import train  # noqa: E402


def flat_params(state):
  gathered = jax.device_get(state.params)
  return {"/".join(str(k.key) for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_flatten_with_path(gathered)[0]}


def run(cache_dir, out_dir, data, model, steps, extra, tag=""):
  config = tiny.get_config()
  config.data.cache_dir = cache_dir
  config.train.num_steps = steps
  config.mesh.data, config.mesh.model = data, model
  for key, value in extra.items():
    node = config
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  name = f"{data}x{model}{tag}"
  workdir = os.path.join(out_dir, f"mesh_{name}")
  results = train.train_and_evaluate(config, workdir)
  state = results.pop("state")
  kernel = state.params["regressor"]["head"]["kernel"]
  np.savez(os.path.join(out_dir, f"params_{name}.npz"), **flat_params(state))
  with open(os.path.join(out_dir, f"summary_{name}.json"), "w") as f:
    json.dump({"splits": results["splits"], "devices": jax.device_count(),
               "head_shape": list(kernel.shape),
               "head_shard_shapes": [list(s.data.shape) for s in kernel.addressable_shards],
               "head_spec": str(kernel.sharding.spec),
               "trunk_spec": str(state.params["regressor"]["trunk"]["block0_dense"]["kernel"]
                                 .sharding.spec)}, f)


if __name__ == "__main__":
  cache_dir, out_dir, steps, meshes = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
  extra = json.loads(sys.argv[5]) if len(sys.argv) > 5 else {}
  tag = sys.argv[6] if len(sys.argv) > 6 else ""
  for shape in meshes.split(","):
    d, m = (int(v) for v in shape.split("x"))
    run(cache_dir, out_dir, d, m, steps, extra, tag)
