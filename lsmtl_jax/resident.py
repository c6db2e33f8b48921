"""The training matrix resident on the devices, and where training batches come from.

config.data.placement:
  'host'    every step's rows are read from the dataset's TensorStore on a
            background thread (loader.train_batches) and put on the devices.
  'device'  the rows of data.train_indices (landmarks and targets) go to the
            devices once, split by rows over the mesh's 'data' axis; each step
            sends only its int32 positions into that matrix (the positions
            TrainOrder.positions(step) gives, so the rows are those the host
            path reads) and gathers the batch on the devices.
  'auto'    on an accelerator, 'device' when the matrix's share per device
            fits DEVICE_SHARE of the device's memory, else 'host'; on the CPU
            backend 'host' (choose() says why, and the run's log line too).

Both paths hand the train step the same arrays with the same sharding
(parallel.batch_sharding), so the step, its results and a resume do not depend
on the placement.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterator

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from lsmtl_jax import parallel
from lsmtl_jax.data import loader
from lsmtl_jax.data.store import Dataset

PLACEMENTS = ("auto", "host", "device")
# The share of one device's memory the resident matrix may take under 'auto':
# the rest is the train state, activations and XLA's temporaries.
DEVICE_SHARE = 0.25


def padded_rows(num_rows: int, data_size: int) -> int:
  """Rows rounded up so the 'data' axis splits them evenly (pads are never gathered)."""
  return -(-num_rows // data_size) * data_size


def bytes_per_device(num_rows: int, width: int, data_size: int) -> int:
  """float32 bytes of the resident matrix one device holds."""
  return 4 * padded_rows(num_rows, data_size) // data_size * width


def choose(requested: str, per_device_bytes: int, device_bytes: int, backend: str,
           process_count: int) -> tuple[str, str]:
  """('host' | 'device', why) for data.placement = `requested`."""
  share = f"{per_device_bytes / 2**30:.2f} GiB per device of {device_bytes / 2**30:.1f} GiB"
  if requested == "host":
    return "host", "data.placement='host'"
  if requested == "device":
    return "device", f"data.placement='device' ({share})"
  if backend == "cpu":
    # CPU devices live in host RAM and their step is far slower than either
    # feed (docs/performance.md#feeding-the-step): a resident copy would take
    # RAM and gain nothing.
    return "host", ("auto: on the CPU backend the step, not the loader, sets the pace; "
                    "data.placement='device' holds the matrix in RAM instead")
  if per_device_bytes > DEVICE_SHARE * device_bytes:
    return "host", f"auto: the matrix does not fit {DEVICE_SHARE:.0%} of device memory ({share})"
  del process_count  # each process holds only its devices' shard: it fits as on one
  return "device", f"auto: the matrix fits {DEVICE_SHARE:.0%} of device memory ({share})"


@dataclasses.dataclass
class ResidentMatrix:
  """The training rows on the devices: x (rows, L) and y (rows, T), split over 'data'."""

  mesh: jax.sharding.Mesh
  x: jax.Array
  y: jax.Array
  num_rows: int

  @classmethod
  def load(cls, dataset: Dataset, indices: np.ndarray, mesh) -> "ResidentMatrix":
    """Reads `indices`' rows once; a process reads only the blocks its devices hold."""
    indices = np.asarray(indices)
    data_size = mesh.shape["data"]
    total = padded_rows(len(indices), data_size)
    sharding = NamedSharding(mesh, P("data", None))
    lm = dataset.num_landmarks
    width = lm + dataset.num_targets

    @functools.lru_cache(maxsize=None)  # devices along 'model' hold the same block
    def block(start: int, stop: int) -> np.ndarray:
      rows = indices[start:min(stop, len(indices))]
      values = np.zeros((stop - start, width), np.float32)
      if len(rows):
        values[:len(rows)] = dataset.read_rows(rows)
      return values

    def part(columns: slice):
      def cb(index):
        rows = index[0]
        start, stop = rows.start or 0, total if rows.stop is None else rows.stop
        return block(start, stop)[:, columns]
      return cb

    x = jax.make_array_from_callback((total, lm), sharding, part(slice(0, lm)))
    y = jax.make_array_from_callback((total, width - lm), sharding, part(slice(lm, None)))
    block.cache_clear()
    return cls(mesh, x, y, len(indices))

  @property
  def bytes_per_device(self) -> int:
    return sum(s.data.nbytes for s in self.x.addressable_shards[:1] + self.y.addressable_shards[:1])

  def positions(self, positions: np.ndarray) -> jax.Array:
    """The int32 positions of one global batch, replicated (each process holds all)."""
    positions = np.asarray(positions, np.int32)
    sharding = parallel.replicated(self.mesh)
    if jax.process_count() == 1:
      return jax.device_put(positions, sharding)
    return jax.make_array_from_callback(positions.shape, sharding, lambda i: positions[i])

  def gather(self, positions: np.ndarray) -> dict[str, jax.Array]:
    """{'x', 'y'} of the rows at `positions`, sharded like parallel.Placement.put's."""
    return _gather_fn(self.mesh)(self.x, self.y, self.positions(positions))


@functools.lru_cache(maxsize=None)
def _gather_fn(mesh):
  """Each device gathers the positions that fall in its block of rows and zeros
  the rest; a reduce-scatter over 'data' sums the blocks' contributions and
  leaves each device its slice of the batch. The values travel as int32 bit
  patterns, so the sum of one value and zeros is that value bit for bit
  (a float sum would turn -0.0 into +0.0)."""
  data_size = mesh.shape["data"]
  out = parallel.batch_sharding(mesh)

  def local(x, y, positions):
    start = jax.lax.axis_index("data") * x.shape[0]
    offset = positions - start
    mine = (offset >= 0) & (offset < x.shape[0])
    offset = jnp.where(mine, offset, 0)

    def take(m):
      bits = jax.lax.bitcast_convert_type(jnp.take(m, offset, axis=0), jnp.int32)
      bits = jnp.where(mine[:, None], bits, 0)
      bits = jax.lax.psum_scatter(bits, "data", scatter_dimension=0, tiled=True)
      return jax.lax.bitcast_convert_type(bits, jnp.float32)

    return {"x": take(x), "y": take(y)}

  if data_size == 1:  # no split: a plain gather
    fn = lambda x, y, p: {"x": jnp.take(x, p, axis=0), "y": jnp.take(y, p, axis=0)}
  else:
    fn = jax.shard_map(local, mesh=mesh, in_specs=(P("data", None), P("data", None), P()),
                       out_specs={"x": P("data"), "y": P("data")})
  return jax.jit(fn, out_shardings={"x": out, "y": out})


def train_batches(placement: str, dataset: Dataset, order: loader.TrainOrder, start_step: int,
                  num_steps: int, mesh, prefetch: int = 4,
                  resident: ResidentMatrix | None = None) -> Iterator[dict[str, jax.Array]]:
  """Global batches (on the devices) for steps start_step .. num_steps - 1, from
  `placement` ('host' or 'device'; 'device' loads the matrix unless given)."""
  batch_size = order.batch_size
  if placement == "device":
    if resident is None:
      resident = ResidentMatrix.load(dataset, order.indices, mesh)
    return (resident.gather(order.positions(s)) for s in range(start_step, num_steps))
  put = parallel.Placement(mesh)
  host = loader.train_batches(dataset, order, start_step, num_steps, prefetch,
                              put.local_rows(batch_size))
  return (put.put(b, batch_size) for b in host)
