"""1000 Genomes / GEUVADIS (GD462.GeneQuantRPKM.50FN.samplename.resk10.txt) onto GEO, as val set.

Tab text, gene id with version suffix in column 1, expression from column 5.

  python -m lsmtl_jax.prepare --config=configs/prepare/g1000.py \
    --config.input.path=GD462.GeneQuantRPKM.50FN.samplename.resk10.txt \
    --config.reference_dataset=DATA/geo --config.output=DATA/g1000
"""

from configs.prepare import default


def get_config():
  config = default.get_config()
  config.name = "g1000"
  config.input.format = "table"
  config.input.id_column = 0
  config.input.first_value_column = 4
  config.input.delimiter = "\t"
  config.input.transform = "log2p1"
  config.genes.map_key = "ensembl"
  config.dedup.enabled = False
  config.split.mode = "val"
  return config
