"""CMap LINCS Level 3 (GSE92742 / GSE70138 GCTx): the 978 landmarks -> the other 11,350 genes.

Landmarks are the rows flagged pr_is_lm = 1, targets every other row (with
--config.genes.target_flag=pr_is_bing only the other best-inferred genes,
9,196). Gene ids are the GCTx row ids, which in LINCS are Entrez ids
(--config.genes.id_field=pr_gene_id reads that field instead); symbols come
from pr_gene_symbol. Values are log2 quantile-normalized already; the usual
quantile normalization to the training split's mean profile and the per-gene
standardization follow, split 80/10/10 by seed. Duplicate removal is off: a
LINCS plate holds replicates on purpose.

With pr_is_lm and pr_gene_symbol at /0/META/ROW/ in the GCTx:

  python -m lsmtl_jax.prepare --config=configs/prepare/cmap.py \
    --config.input.path=GSE92742_Broad_LINCS_Level3_INF_mlr12k_n1319138x12328.gctx \
    --config.output=DATA/cmap

The GCTx files on GEO carry only the ids; their per-gene fields are in the
release's gene info table, given as genes.gene_info:

  python -m lsmtl_jax.prepare --config=configs/prepare/cmap.py \
    --config.input.path=GSE92742_Broad_LINCS_Level3_INF_mlr12k_n1319138x12328.gctx \
    --config.genes.gene_info=GSE92742_Broad_LINCS_gene_info.txt --config.output=DATA/cmap
"""

from configs.prepare import default


def get_config():
  config = default.get_config()
  config.name = "cmap"
  config.input.format = "gctx"
  config.genes.landmark_flag = "pr_is_lm"
  config.genes.symbol_field = "pr_gene_symbol"
  config.dedup.enabled = False
  config.split.mode = "random"
  return config
