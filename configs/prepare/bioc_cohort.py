"""A real microarray cohort on HG-U133A probes (a table: probe id, one column per sample).

  python -m lsmtl_jax.prepare --config=configs/prepare/bioc_cohort.py \
    --config.input.path=cohort_data/bladderbatch/expr.tsv \
    --config.genes.landmark_map=map_lm.txt --config.genes.target_map=map_tg.txt \
    --config.output=DATA/bladderbatch

Genes are D-GEX's (a gene is the mean of its probes present), so a landmark
whose probes the array lacks is allowed and left out. The cohorts of
configs/experiments/real_cohorts.py are tens of profiles, so the random split
is 60/20/20 (80/10/10 would test on 2 to 6 profiles). For a grouped split
(train, validation and test samples from different batches or donors) prepare
the three sample tables apart: the train one with --config.split.mode=train,
then the others with --config.reference_dataset=<the train dataset> and
--config.split.mode=val / test, so their genes, quantile reference and
standardization are the training samples' (train with data.val_path and
data.test_path, docs/training.md).
"""

from configs.prepare import custom


def get_config():
  config = custom.get_config()
  config.name = "bioc_cohort"
  config.genes.map_key = "probes"
  config.genes.allow_missing_landmarks = True
  config.split.fractions = (0.6, 0.2, 0.2)
  return config
