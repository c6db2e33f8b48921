"""GTEx (GTEx_RNASeq_RPKM_n2921x55993.gctx) mapped onto a prepared GEO dataset, as test set.

Genes are matched by Ensembl id (version suffixes stripped), each sample is
mapped by rank onto GEO's quantile reference and standardized with GEO's
training statistics; the whole dataset becomes the 'test' split.

  python -m lsmtl_jax.prepare --config=configs/prepare/gtex.py \
    --config.input.path=GTEx_RNASeq_RPKM_n2921x55993.gctx \
    --config.reference_dataset=DATA/geo --config.output=DATA/gtex
"""

from configs.prepare import default


def get_config():
  config = default.get_config()
  config.name = "gtex"
  config.input.format = "gctx"
  config.input.transform = "log2p1"
  # Genes: the reference dataset's ids (Ensembl). Maps with map_key='ensembl' work too.
  config.genes.map_key = "ensembl"
  config.dedup.enabled = False
  config.split.mode = "test"
  return config
