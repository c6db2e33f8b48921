"""Entry point: python -m lsmtl_jax.main --config=configs/demo.py --workdir=DIR

Multi-host: add --distributed. On TPU VMs, SLURM and Kubernetes JAX finds the
coordinator itself; elsewhere pass --coordinator_address, --num_processes and
--process_id (launch/local_multiprocess.sh does so for processes on one host).
"""

import os
import signal
import sys
import traceback

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from lsmtl_jax import cli
from lsmtl_jax import fileio
from lsmtl_jax import parallel
from lsmtl_jax import train
from lsmtl_jax import workdir_lock
from lsmtl_jax.checkpoints import CheckpointError
from lsmtl_jax.data.store import DatasetError

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.json.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first (multi-host).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (with --distributed).")
flags.DEFINE_integer("num_processes", None, "Number of processes (with --distributed).")
flags.DEFINE_integer("process_id", None, "This process's index (with --distributed).")
flags.DEFINE_integer("heartbeat_timeout_seconds", 100,
                     "A process that stops answering for this long fails the whole job.")
config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(logging.logging.Filter):
  """Orbax logs every save at INFO through absl; keep its warnings only."""

  def filter(self, record):
    return record.levelno >= logging.logging.WARNING or "/orbax/" not in record.pathname


def _initialize_distributed():
  # CPU processes exchange collectives over gloo; other backends ignore this.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                             num_processes=FLAGS.num_processes, process_id=FLAGS.process_id,
                             heartbeat_timeout_seconds=FLAGS.heartbeat_timeout_seconds)


def main(argv):
  if len(argv) > 1:
    _exit(2, f"error: unexpected arguments {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if FLAGS.distributed:
    _initialize_distributed()
  logging.info("JAX %s, backend %s, process %d of %d, %d local of %d devices", jax.__version__,
               jax.default_backend(), jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (train.ConfigError, train.MemoryGuardError, parallel.MeshError, DatasetError,
          train.WorkdirError, workdir_lock.LockError) as e:
    _exit(2, f"error: {e}")
  except (train.NonFiniteError, CheckpointError) as e:
    _exit(1, f"error: {e}")
  except train.Preempted as e:
    _exit(128 + signal.SIGTERM, f"preempted: {e}")
  except BaseException as e:  # pylint: disable=broad-except
    full = fileio.disk_full(e)
    if full is not None:  # finished checkpoints are intact: the same command resumes
      where = full.filename or FLAGS.workdir
      _exit(1, f"error: {where}: no space left on device; free some and run the same "
            "command again (it resumes from the last checkpoint)")
    if jax.process_count() == 1:
      raise
    traceback.print_exc()
    _exit(1, f"error: process {jax.process_index()} failed (traceback above)")


def _exit(code: int, line: str):
  print(line, file=sys.stderr, flush=True)
  if jax.process_count() > 1:
    # A graceful exit waits in JAX's shutdown barrier for peers that may be
    # blocked in a collective on us: leave at once, so the coordinator's
    # heartbeat check stops the others within --heartbeat_timeout_seconds.
    logging.flush()
    sys.stdout.flush()
    os._exit(code)
  sys.exit(code)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
