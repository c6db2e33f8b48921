"""A user's cohort with plain gene id lists, split 80/10/10 by seed.

  python -m lsmtl_jax.prepare --config=configs/prepare/custom.py \
    --config.input.path=cohort.csv --config.genes.landmark_ids=landmarks.txt \
    --config.genes.target_ids=targets.txt --config.output=DATA/cohort

To evaluate a GEO-trained model on the cohort instead, add
--config.reference_dataset=DATA/geo --config.split.mode=test.
"""

from configs.prepare import default


def get_config():
  config = default.get_config()
  config.name = "custom"
  config.input.format = "auto"
  config.dedup.enabled = False
  config.split.mode = "random"
  return config
