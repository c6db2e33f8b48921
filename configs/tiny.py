"""A seconds-long smoke run on a tiny synthetic compendium (used by the tests)."""

from configs import default


def get_config():
  config = default.get_config()
  config.data.synthetic.update(dict(
      enabled=True, num_samples=300, num_landmarks=24, num_targets=40, num_programs=4,
      num_modules=6, num_tissues=3, seed=7))
  config.model.hidden = 16
  config.model.depth = 2
  config.lsmtl.bottleneck = 8
  config.lsmtl.mask_rate = 0.2
  config.lsmtl.lam = 0.5
  config.optim.learning_rate = 3e-3
  config.train.batch_size = 32
  config.train.num_steps = 24
  config.train.log_every = 4
  config.train.eval_every = 8
  config.train.checkpoint_every = 8
  config.train.patience = 100
  config.train.eval_batch_size = 64
  config.report = False  # seconds matter in the tests; test_train turns it on once
  return config
