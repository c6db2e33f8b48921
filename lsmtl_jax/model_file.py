"""A portable model: one file with everything prediction needs, and no
training data (written by python -m lsmtl_jax.export, read by
inference.load_model).

The file is a zip archive (stored, not compressed; `unzip -l MODEL` lists it):

  manifest.json   format, format_version, the lsmtl_jax version that wrote it,
                  and the sha256 and size of every other part
  model.json      the resolved config, landmark and target ids and symbols,
                  the standardization eps, the calibration's record, where the
                  model came from (run, method, best step), and every array's
                  dtype and shape
  arrays/*.npy    one numpy array a part: the best checkpoint's variables
                  (variables/params/..., variables/batch_stats/...), the
                  per-gene standardization mean and std (float64), the
                  landmark quantile reference, per-target validation CC and MAE,
                  and the prediction intervals' quantiles (calibration/...)

Reading checks the format, refuses a newer format version than this code
knows, and checks every part's sha256 before anything is used: any problem is
a `ModelFileError` with a one-line message naming the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import zipfile
from typing import Any

import ml_dtypes  # noqa: F401  (registers bfloat16 & co. with numpy for np.dtype(name))
import numpy as np

from lsmtl_jax import __version__
from lsmtl_jax import fileio
from lsmtl_jax import intervals

FORMAT = "lsmtl_jax.model"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MODEL_JSON = "model.json"
ARRAYS = "arrays/"
_PLAIN_KINDS = "biuf"  # numpy kinds np.save stores natively


class ModelFileError(ValueError):
  """A model file that cannot be used; the message is one line naming it."""


@dataclasses.dataclass
class Contents:
  """What a model file holds (numbers exactly as the run had them)."""

  config: dict[str, Any]  # the resolved config
  landmarks: dict[str, list[str]]  # {'ids', 'symbols'}
  targets: dict[str, list[str]]
  variables: dict[str, Any]  # {'params': {...}, 'batch_stats': {...}} of numpy arrays
  standardization: dict[str, Any]  # {'mean': f64[genes], 'std': f64[genes], 'eps': float}
  landmark_reference: np.ndarray  # f64[landmarks]: --quantile_map's target profile
  validation: dict[str, np.ndarray]  # {'cc', 'mae', 'mae_expression'}: f64[targets]
  calibration: intervals.Calibration
  provenance: dict[str, Any]  # run, method, best step, when


def _flatten(tree: dict[str, Any], prefix: str) -> dict[str, np.ndarray]:
  out = {}
  for key, value in tree.items():
    if "/" in key or not key:
      raise ModelFileError(f"variable name {key!r} cannot be stored")
    name = f"{prefix}/{key}"
    if isinstance(value, dict):
      out.update(_flatten(value, name))
    else:
      out[name] = np.asarray(value)
  return out


def _unflatten(arrays: dict[str, np.ndarray], prefix: str) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for name, value in arrays.items():
    if not name.startswith(prefix + "/"):
      continue
    *path, leaf = name[len(prefix) + 1:].split("/")
    node = tree
    for part in path:
      node = node.setdefault(part, {})
    node[leaf] = value
  return tree


def _arrays(contents: Contents) -> dict[str, np.ndarray]:
  arrays = _flatten({k: contents.variables.get(k, {}) for k in ("params", "batch_stats")},
                    "variables")
  arrays["standardization/mean"] = np.asarray(contents.standardization["mean"], np.float64)
  arrays["standardization/std"] = np.asarray(contents.standardization["std"], np.float64)
  arrays["landmark_reference"] = np.asarray(contents.landmark_reference, np.float64)
  for name in ("cc", "mae", "mae_expression"):
    arrays[f"validation/{name}"] = np.asarray(contents.validation[name], np.float64)
  for name, value in contents.calibration.to_arrays().items():
    arrays[f"calibration/{name}"] = value
  return arrays


class _HashingWriter:
  def __init__(self, f):
    self._f, self.sha256, self.bytes = f, hashlib.sha256(), 0

  def write(self, data) -> int:
    data = memoryview(data).cast("B")
    self.sha256.update(data)
    self.bytes += len(data)
    return self._f.write(data)


def write(path: str, contents: Contents) -> None:
  """Writes the model file to a temporary name beside `path`, then renames it."""
  arrays = _arrays(contents)
  described = {}
  parts = {}
  with fileio.atomic_file(path) as tmp:
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
      for name, value in sorted(arrays.items()):
        value = np.ascontiguousarray(value)
        described[name] = {"dtype": value.dtype.name, "shape": list(value.shape)}
        if value.dtype.kind not in _PLAIN_KINDS:  # bfloat16 & co.: their bits as uint
          value = value.view(f"uint{8 * value.dtype.itemsize}")
        member = f"{ARRAYS}{name}.npy"
        with zf.open(member, "w", force_zip64=True) as f:
          writer = _HashingWriter(f)
          np.lib.format.write_array(writer, value, allow_pickle=False)
        parts[member] = {"sha256": writer.sha256.hexdigest(), "bytes": writer.bytes}
      model = {
          "config": contents.config,
          "landmarks": {k: list(v) for k, v in contents.landmarks.items()},
          "targets": {k: list(v) for k, v in contents.targets.items()},
          "standardization": {"eps": float(contents.standardization["eps"])},
          "calibration": contents.calibration.info(),
          "provenance": contents.provenance,
          "arrays": described,
      }
      data = json.dumps(model, indent=1).encode()
      zf.writestr(MODEL_JSON, data)
      parts[MODEL_JSON] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
      manifest = {"format": FORMAT, "format_version": FORMAT_VERSION,
                  "lsmtl_jax_version": __version__, "parts": parts}
      zf.writestr(MANIFEST, json.dumps(manifest, indent=1).encode())


def _json(zf: zipfile.ZipFile, name: str, path: str) -> Any:
  try:
    return json.loads(zf.read(name))
  except KeyError:
    raise ModelFileError(f"{path}: not an lsmtl_jax model file (no {name}); write one with "
                         "python -m lsmtl_jax.export") from None
  except (ValueError, zipfile.BadZipFile) as e:
    raise ModelFileError(f"{path}: {name} is damaged ({_one_line(e)})") from None


def read_manifest(path: str) -> dict[str, Any]:
  """The manifest of a model file, its format and version checked."""
  with _open_zip(path) as zf:
    return _manifest(zf, path)


def _open_zip(path: str) -> zipfile.ZipFile:
  if os.path.isdir(path):
    raise ModelFileError(f"{path}: is a directory, not a model file; give the file "
                         "python -m lsmtl_jax.export wrote (a run directory goes to --workdir)")
  if not os.path.isfile(path):
    raise ModelFileError(f"{path}: no such model file")
  try:
    return zipfile.ZipFile(path)
  except (zipfile.BadZipFile, OSError) as e:
    raise ModelFileError(f"{path}: not an lsmtl_jax model file ({_one_line(e)}); write one "
                         "with python -m lsmtl_jax.export") from None


def _manifest(zf: zipfile.ZipFile, path: str) -> dict[str, Any]:
  manifest = _json(zf, MANIFEST, path)
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    got = manifest.get("format") if isinstance(manifest, dict) else None
    raise ModelFileError(f"{path}: format is {got!r}, expected {FORMAT!r}")
  version = manifest.get("format_version")
  writer = manifest.get("lsmtl_jax_version", "an unknown version")
  if not isinstance(version, int) or isinstance(version, bool) or version < 1:
    raise ModelFileError(f"{path}: unknown model format version {version!r}")
  if version > FORMAT_VERSION:
    raise ModelFileError(
        f"{path}: model format version {version} (written by lsmtl_jax {writer}) is newer "
        f"than this lsmtl_jax {__version__} reads (up to {FORMAT_VERSION}); upgrade lsmtl_jax")
  if not isinstance(manifest.get("parts"), dict):
    raise ModelFileError(f"{path}: {MANIFEST} lists no parts")
  return manifest


def _verified(zf: zipfile.ZipFile, path: str, parts: dict[str, Any], name: str) -> bytes:
  if name not in parts:
    raise ModelFileError(f"{path}: part {name} is not listed in {MANIFEST}")
  try:
    data = zf.read(name)
  except KeyError:
    raise ModelFileError(f"{path}: part {name} is missing") from None
  except (zipfile.BadZipFile, OSError, ValueError) as e:  # the zip's own CRC-32, truncation
    raise ModelFileError(f"{path}: part {name} is damaged ({_one_line(e)})") from None
  entry = parts[name]
  digest = hashlib.sha256(data).hexdigest()
  if not isinstance(entry, dict) or digest != entry.get("sha256"):
    raise ModelFileError(f"{path}: part {name} fails its sha256 check (damaged or changed "
                         "after export); export the model again")
  return data


def read(path: str) -> Contents:
  """The model file's contents, every part checked against the manifest."""
  with _open_zip(path) as zf:
    manifest = _manifest(zf, path)
    parts = manifest["parts"]
    names = set(zf.namelist()) - {MANIFEST}
    unlisted = sorted(names - set(parts))
    if unlisted:
      raise ModelFileError(f"{path}: part {unlisted[0]} is not listed in {MANIFEST}")
    for name in sorted(set(parts) - names):
      raise ModelFileError(f"{path}: part {name} is missing")
    try:
      model = json.loads(_verified(zf, path, parts, MODEL_JSON))
    except ValueError as e:
      raise ModelFileError(f"{path}: {MODEL_JSON} is not valid JSON ({e})") from None
    arrays = {}
    for name, spec in model.get("arrays", {}).items():
      data = _verified(zf, path, parts, f"{ARRAYS}{name}.npy")
      value = np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
      if value.dtype.name != spec["dtype"]:
        value = value.view(np.dtype(spec["dtype"]))
      if list(value.shape) != spec["shape"]:
        raise ModelFileError(f"{path}: array {name} has shape {list(value.shape)}, "
                             f"{MODEL_JSON} says {spec['shape']}")
      arrays[name] = value
  try:
    return Contents(
        config=model["config"], landmarks=model["landmarks"], targets=model["targets"],
        variables={"params": _unflatten(arrays, "variables/params"),
                   "batch_stats": _unflatten(arrays, "variables/batch_stats")},
        standardization={"mean": arrays["standardization/mean"],
                         "std": arrays["standardization/std"],
                         "eps": float(model["standardization"]["eps"])},
        landmark_reference=arrays["landmark_reference"],
        validation={k: arrays[f"validation/{k}"] for k in ("cc", "mae", "mae_expression")},
        calibration=intervals.Calibration.from_arrays(
            {k: arrays[f"calibration/{k}"] for k in ("levels", "quantiles")},
            model["calibration"]),
        provenance=model.get("provenance", {}))
  except (KeyError, TypeError, ValueError) as e:
    raise ModelFileError(f"{path}: {MODEL_JSON} lacks {_one_line(e)}") from None


def _one_line(e: BaseException) -> str:
  return " ".join(str(e).split()) or type(e).__name__
