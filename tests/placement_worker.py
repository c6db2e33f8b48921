"""Run by test_placement.py in a subprocess with JAX_NUM_CPU_DEVICES=8: gathers
from the resident matrix on several mesh shapes (written beside the rows numpy
picks), and trains the tiny config on a 4x2 mesh with
data.placement 'host' and 'device'."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from configs import tiny  # noqa: E402
from lsmtl_jax import parallel  # noqa: E402
from lsmtl_jax import resident  # noqa: E402
from lsmtl_jax import train  # noqa: E402
from lsmtl_jax.data import loader  # noqa: E402
from lsmtl_jax.data import store  # noqa: E402


def gathers(dataset_path, out_dir):
  """For each mesh: the gathered batch, its sharding, and the host path's."""
  dataset = store.open_dataset(dataset_path)
  # 37 rows: not a multiple of any data axis, so the last block is padded.
  indices = dataset.split("train")[:37]
  order = loader.TrainOrder(indices, 16, seed=3)
  out = {}
  for data, model in ((1, 8), (8, 1), (4, 2), (2, 4)):
    mesh = parallel.make_mesh(ml_collections.ConfigDict({"data": data, "model": model}))
    matrix = resident.ResidentMatrix.load(dataset, indices, mesh)
    host = parallel.Placement(mesh).put(
        next(loader.train_batches(dataset, order, 5, 6)), order.batch_size)
    batch = matrix.gather(order.positions(5))
    np.savez(os.path.join(out_dir, f"gather_{data}x{model}.npz"),
             x=np.asarray(batch["x"]), y=np.asarray(batch["y"]), rows=order.rows(5))
    out[f"{data}x{model}"] = {"same_sharding": all(batch[k].sharding == host[k].sharding
                                                   for k in ("x", "y")),
                              "shard_rows": sorted({s.data.shape[0]
                                                    for s in matrix.x.addressable_shards})}
  return out


def trains(cache_dir, out_dir):
  out = {}
  for data, model in ((4, 2),):  # 'data' splits the rows, 'model' replicates them
    for placement in ("host", "device"):
      config = tiny.get_config()
      config.data.cache_dir = cache_dir
      config.train.num_steps = 12
      config.train.measure_peak = False
      config.mesh.data, config.mesh.model = data, model
      config.data.placement = placement
      workdir = os.path.join(out_dir, f"run_{data}x{model}_{placement}")
      train.train_and_evaluate(config, workdir)
      with open(os.path.join(workdir, "results.json")) as f:
        out[f"{data}x{model}_{placement}"] = json.load(f)
  return out


if __name__ == "__main__":
  cache_dir, out_dir, dataset_path = sys.argv[1:4]
  summary = {"devices": jax.device_count(), "gathers": gathers(dataset_path, out_dir),
             "runs": trains(cache_dir, out_dir)}
  with open(os.path.join(out_dir, "summary.json"), "w") as f:
    json.dump(summary, f)
