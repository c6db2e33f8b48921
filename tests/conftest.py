import os
import sys

# Tests run on the CPU even where an accelerator exists, and never preallocate.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # configs/ is a top-level folder, imported like the flax examples do
  sys.path.insert(0, REPO)

import pytest  # noqa: E402

from lsmtl_jax.data import synthetic  # noqa: E402

from configs import tiny  # noqa: E402

_SYN = tiny.get_config().data.synthetic
TINY_SPEC = synthetic.SyntheticSpec(
    num_samples=_SYN.num_samples, num_landmarks=_SYN.num_landmarks,
    num_targets=_SYN.num_targets, num_programs=_SYN.num_programs,
    num_modules=_SYN.num_modules, num_tissues=_SYN.num_tissues, seed=_SYN.seed)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
  return synthetic.generate(TINY_SPEC, str(tmp_path_factory.mktemp("data") / "tiny"))
