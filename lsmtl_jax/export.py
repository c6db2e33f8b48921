"""Export a finished run as one portable model file.

  python -m lsmtl_jax.export --workdir=RUN --output=MODEL

MODEL (any name; e.g. runs/demo.lsmtl) is a single zip file holding the
format version, the lsmtl_jax version, the resolved config, the best
checkpoint's parameters and batch statistics, the landmark and target ids and
symbols, the standardization statistics, the landmark quantile reference,
per-target validation CC and MAE, the prediction intervals' quantiles and the
sha256 of every part (lsmtl_jax/model_file.py). `predict --model=MODEL` then
needs nothing else: no run directory, no dataset, and gives the same numbers
as `predict --workdir=RUN`, bit for bit.

The file is written under a temporary name beside MODEL and renamed when
complete. Errors are one `error:` line and exit code 2.
"""

from __future__ import annotations

import datetime
import os
import sys
import time

import jax
import numpy as np

from lsmtl_jax import __version__
from lsmtl_jax import inference
from lsmtl_jax import model_file
from lsmtl_jax import results as results_lib
from lsmtl_jax.data import store


class ExportError(ValueError):
  """Bad options; the message is one line."""


def contents_of(run: inference.Run) -> model_file.Contents:
  """Everything of `run` that prediction reads, as numbers."""
  stats = run.meta["standardization"]
  results = results_lib.read_results(run.workdir) or {}
  splits = {name: {k: split.get(k) for k in ("mae_mean", "cc_mean", "n_samples")}
            for name, split in results.get("splits", {}).items()}
  return model_file.Contents(
      config=run.config.to_dict(),
      landmarks={"ids": run.landmark_ids, "symbols": run.landmark_symbols},
      targets={"ids": run.target_ids, "symbols": run.target_symbols},
      variables=jax.tree.map(np.asarray, jax.device_get(run.variables)),
      standardization={"mean": np.asarray(stats["mean"], np.float64),
                       "std": np.asarray(stats["std"], np.float64), "eps": stats["eps"]},
      landmark_reference=run.landmark_reference(),
      validation=run.validation_metrics(),
      calibration=run.calibration(run.config.train.eval_batch_size),
      provenance={"workdir": os.path.abspath(run.workdir), "method": run.config.method,
                  "best_step": run.best_step, "dataset": run.dataset.path,
                  "results": splits, "lsmtl_jax_version": __version__,
                  "exported_at": datetime.datetime.now(datetime.timezone.utc)
                  .isoformat(timespec="seconds")})


def _check_output(path: str, overwrite: bool) -> None:
  if not path:
    raise ExportError("--output is empty; name the model file to write")
  if os.path.isdir(path):
    raise ExportError(f"{path}: is a directory; name a file in it, e.g. "
                      f"{os.path.join(path, 'model.lsmtl')}")
  if os.path.lexists(path) and not overwrite:
    raise ExportError(f"{path}: already exists; pass --overwrite to replace it")
  folder = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(folder):
    raise ExportError(f"{path}: directory {folder} does not exist")
  if not os.access(folder, os.W_OK | os.X_OK):
    raise ExportError(f"{path}: directory {folder} is not writable")


def export(workdir: str, output: str, overwrite: bool = False) -> dict:
  """Writes the model file of the run at `workdir`; returns a summary."""
  t0 = time.perf_counter()
  _check_output(output, overwrite)
  run = inference.load_run(workdir)
  contents = contents_of(run)
  try:
    model_file.write(output, contents)
  except OSError as e:
    raise ExportError(f"{output}: cannot write: {e.strerror or e}") from None
  return {"output": output, "bytes": os.path.getsize(output), "method": run.config.method,
          "best_step": run.best_step, "landmarks": run.num_landmarks,
          "targets": run.num_targets, "calibration": contents.calibration.info(),
          "seconds": time.perf_counter() - t0}


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)
  FLAGS = flags.FLAGS
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
    sys.exit(2)
  try:
    s = export(FLAGS.workdir, FLAGS.output, FLAGS.overwrite)
  except (ExportError, inference.RunError, store.DatasetError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  cal = s["calibration"]
  print(f"export: {s['method']} (best step {s['best_step']}), {s['landmarks']} landmarks, "
        f"{s['targets']} targets, intervals from {cal['num_profiles']} {cal['source']} "
        f"profiles, {s['bytes'] / 1e6:.1f} MB in {s['seconds']:.1f} s -> {s['output']}")


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("workdir", None, "A finished training run.")
  flags.DEFINE_string("output", None, "The model file to write (e.g. runs/demo.lsmtl).")
  flags.DEFINE_bool("overwrite", False, "Replace an existing model file.")
  flags.mark_flags_as_required(["workdir", "output"])
  from lsmtl_jax import cli  # pylint: disable=g-import-not-at-top
  app.run(main, flags_parser=cli.parse_flags)
