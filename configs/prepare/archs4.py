"""ARCHS4 gene counts (human_gene_v2.x.h5): log2(CPM + 1), genes by symbol, split 80/10/10.

  python -m lsmtl_jax.prepare --config=configs/prepare/archs4.py \
    --config.input.path=human_gene_v2.2.h5 --config.genes.landmark_ids=landmarks.txt \
    --config.genes.target_ids=targets.txt --config.output=DATA/archs4

landmarks.txt and targets.txt hold one gene symbol per line (from the D-GEX
maps: `cut -f1 map_lm.txt > landmarks.txt`, likewise for map_tg.txt). The
dataset's gene ids are then symbols, as the file's, so `predict --quantile_map`
takes ARCHS4 counts directly. docs/data.md, "ARCHS4 HDF5", has the layout.
"""

from configs.prepare import default


def get_config():
  config = default.get_config()
  config.name = "archs4"
  config.input.format = "archs4"
  config.input.gene_id_field = "symbol"  # meta/genes/gene_symbol (or symbol)
  # Per sample over every gene of the file, then the usual quantile mapping.
  config.input.transform = "log2cpm1"
  # A block is read with all ~67,000 genes (the library size needs them):
  # 512 samples is 0.13 GB of counts and as much float32.
  config.block_rows = 512
  # A sample without counts has no CPM (NaN): dropped, and counted in meta.json.
  config.nonfinite = "drop"
  # Dedup's sketches take 2 KB a sample, 3 GB for 1.5 million: off unless asked.
  config.dedup.enabled = False
  config.split.mode = "random"
  return config
