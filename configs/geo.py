"""The paper's GEO setting: 3 x 9,000 DenseNet, T = 9,520 targets, 80/10/10 split.

Reads a prepared dataset (python -m lsmtl_jax.prepare --config=configs/prepare/geo.py)
from config.data.path; sized for a GPU or TPU.

  python -m lsmtl_jax.main --config=configs/geo.py --config.data.path=DATA/geo --workdir=RUN
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.path = ""  # set on the command line: --config.data.path=DIR
  config.model.trunk = "densenet"
  config.model.hidden = 9000
  config.model.depth = 3
  config.model.dropout = 0.1
  config.lsmtl.lam = 0.1
  config.lsmtl.bottleneck = 256
  config.lsmtl.mask_rate = 0.1
  config.optim.learning_rate = 5e-4
  config.train.batch_size = 256
  config.train.num_epochs = 200
  config.train.log_every = 100
  config.train.eval_every = 1000
  config.train.checkpoint_every = 1000
  config.train.patience = 10
  config.train.eval_batch_size = 1024
  return config
