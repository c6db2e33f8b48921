"""Entry point: python -m lsmtl_jax.prepare --config=configs/prepare/geo.py --config.output=DIR ...

Turns an expression matrix (GCTx, GCT, tab/CSV, .npy) into a training dataset
(lsmtl_jax/data/prepare_lib.py describes the steps). Bad input, a bad flag or a
misspelled --config override stops it with one line `error: <file or field>:
<problem>` and exit code 2, leaving no output behind (a killed run's temporary
`.OUTPUT.tmp-PID...` folder is removed by the next run of the same output).
"""

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from lsmtl_jax import cli
from lsmtl_jax import workdir_lock
from lsmtl_jax.data import prepare_lib
from lsmtl_jax.data.store import DatasetError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Prepare configuration file.",
                                          lock_config=True)
flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]} (every option is a --config.FIELD=VALUE "
          "flag)", file=sys.stderr)
    sys.exit(2)
  try:
    with cli.interruptible():  # a signal unwinds the temporary and the lock like an error
      ds = prepare_lib.prepare(_CONFIG.value, log=logging.info)
  except (prepare_lib.PrepareError, DatasetError, workdir_lock.LockError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except cli.Interrupted as e:
    print(f"error: {_CONFIG.value.output}: interrupted by {e.name}; nothing written (the "
          "partial dataset was removed)", file=sys.stderr)
    sys.exit(128 + e.signum)
  print(f"prepared {ds.path}: {ds.num_samples} samples, {ds.num_landmarks} landmarks, "
        f"{ds.num_targets} targets; splits "
        + ", ".join(f"{k} {len(v)}" for k, v in ds.meta["splits"].items()))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
