"""Device mesh, logical-axis rules, shardings and global batches.

The mesh has two axes: 'data' splits the batch, 'model' splits the target axis
(the head's kernel and bias, the bottleneck's U and V, the per-gene metric
statistics). Trunk parameters are replicated, or split over 'data' with
mesh.fsdp (each device keeps a slice of every trunk kernel's hidden axis).
Linen logical constraints need Auto axes, so the mesh is built with them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

AXES = ("data", "model")


class MeshError(ValueError):
  """A mesh that does not fit the devices or the sizes; the message says why."""


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, int]:
  """(data, model) sizes; one -1 takes what the other leaves."""
  data, model = int(mesh_config.data), int(mesh_config.model)
  if data == -1 and model == -1:
    raise MeshError("config: mesh.data and mesh.model cannot both be -1")
  for name, size in (("data", data), ("model", model)):
    if size == 0 or size < -1:
      raise MeshError(f"config: mesh.{name} must be positive or -1, got {size}")
  if data == -1 or model == -1:
    known = model if data == -1 else data
    if num_devices % known:
      raise MeshError(f"config: mesh axis of size {known} does not divide the "
                      f"{num_devices} devices")
    data, model = (num_devices // known, known) if data == -1 else (known, num_devices // known)
  if data * model != num_devices:
    raise MeshError(f"config: mesh {data}x{model} (data x model) needs {data * model} devices, "
                    f"found {num_devices}")
  return data, model


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_config, len(devices))
  return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2,
                       devices=devices)


def logical_rules(mesh_config) -> tuple[tuple[str, Any], ...]:
  trunk = "data" if mesh_config.fsdp else None
  return (("batch", "data"), ("targets", "model"), ("hidden", trunk), ("trunk_in", None),
          ("trunk_out", None), ("bottleneck", None))


def padded_targets(num_targets: int, multiple: int, model_size: int) -> int:
  """Targets rounded up to `multiple`, which the model axis must divide.

  The padding depends on the config, not on the mesh, so a checkpoint written
  on one mesh shape restores onto another.
  """
  padded = math.ceil(num_targets / multiple) * multiple
  if padded % model_size:
    raise MeshError(f"config: mesh.model={model_size} does not divide the {padded} padded "
                    f"targets; choose mesh.target_multiple as a multiple of {model_size}")
  return padded


def shardings_of(abstract_boxed_tree, mesh: Mesh, rules) -> Any:
  """NamedShardings for a tree whose leaves carry Linen logical axis metadata."""
  specs = nn.get_partition_spec(abstract_boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P("data"))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def process_rows(mesh: Mesh, global_batch: int) -> slice:
  """The contiguous slice of a global batch that this process's devices hold."""
  index_map = batch_sharding(mesh).addressable_devices_indices_map((global_batch,))
  starts = [idx[0].start or 0 for idx in index_map.values()]
  stops = [global_batch if idx[0].stop is None else idx[0].stop for idx in index_map.values()]
  return slice(min(starts), max(stops))


def to_host(tree, mesh: Mesh):
  """Gathers a (possibly multi-process) sharded tree into numpy on every process."""
  gathered = jax.jit(lambda t: t, out_shardings=replicated(mesh))(tree)
  return jax.tree.map(np.asarray, jax.device_get(gathered))


def global_batch(mesh: Mesh, local: dict[str, np.ndarray], global_size: int) -> dict[str, jax.Array]:
  """Stitches each process's rows into arrays sharded over 'data'."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v, (global_size, *v.shape[1:]))
          for k, v in local.items()}


@dataclasses.dataclass(frozen=True)
class Placement:
  """Where batches and results live: host rows in, global arrays, numpy out."""

  mesh: Mesh

  def local_rows(self, global_size: int) -> slice:
    return process_rows(self.mesh, global_size)

  def put(self, local: dict[str, np.ndarray], global_size: int) -> dict[str, jax.Array]:
    return global_batch(self.mesh, local, global_size)

  def fetch(self, tree):
    return to_host(tree, self.mesh)
