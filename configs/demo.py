"""The demo: Deep-LSMTL on the embedded synthetic compendium, on a 2-core CPU.

Generates the dataset on first use (cached under data.cache_dir), trains
Deep-LSMTL with lam chosen on validation among 0, 0.01 and 0.1 (the default
lsmtl.lam = 'auto'; the lam = 0 candidate is the DenseNet run compared below),
the closed-form linear baseline and the lam = 0 DenseNet on the same split, and
prints them side by side with the chosen lam. All 9,520 targets.
--config.lsmtl.lam=0.1 trains the one run with lam = 0.1 instead.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.synthetic.enabled = True

  config.model.hidden = 512
  config.model.depth = 2
  config.model.dropout = 0.1
  config.lsmtl.bottleneck = 128
  config.lsmtl.mask_rate = 0.1

  config.optim.learning_rate = 1e-3
  config.train.batch_size = 256
  config.train.num_epochs = 10
  config.train.log_every = 25
  config.train.eval_every = 50
  config.train.checkpoint_every = 50
  config.train.patience = 4
  config.train.eval_batch_size = 400
  config.compare_with = ("lsr", "densenet")
  return config
