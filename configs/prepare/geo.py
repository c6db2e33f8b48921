"""GEO (bgedv2_QNORM.gctx, 22,268 HG-U133A probes x 129,158 samples) as D-GEX prepares it.

Duplicates removed, probes averaged per gene, quantile normalized to the
training split's mean sorted profile, standardized with training statistics,
split 80/10/10 by seed.

  python -m lsmtl_jax.prepare --config=configs/prepare/geo.py \
    --config.input.path=bgedv2_QNORM.gctx --config.genes.landmark_map=map_lm.txt \
    --config.genes.target_map=map_tg.txt --config.output=DATA/geo
"""

from configs.prepare import default


def get_config():
  config = default.get_config()
  config.name = "geo"
  config.input.format = "gctx"
  config.genes.map_key = "probes"
  config.dedup.enabled = True
  config.split.mode = "random"
  return config
