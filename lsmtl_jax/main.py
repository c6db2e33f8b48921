"""Entry point: python -m lsmtl_jax.main --config=configs/demo.py --workdir=DIR"""

import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from lsmtl_jax import parallel
from lsmtl_jax import train
from lsmtl_jax.data.store import DatasetError

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.json.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first (multi-host).")
config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(logging.logging.Filter):
  """Orbax logs every save at INFO through absl; keep its warnings only."""

  def filter(self, record):
    return record.levelno >= logging.logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if FLAGS.distributed:
    jax.distributed.initialize()
  logging.info("JAX %s, backend %s, %d process(es), %d device(s)", jax.__version__,
               jax.default_backend(), jax.process_count(), jax.device_count())
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (train.ConfigError, parallel.MeshError, DatasetError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
