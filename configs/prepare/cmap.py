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

A random split puts replicates of one perturbation (the same pert_id, cell line,
dose and time on replicate plates X1, X2, X3) in training and test alike, which
flatters the test figures. To split by perturbation instead, group by a Level 3
column field: pert_id in /0/META/COL when the GCTx carries it, or the release's
instance table (inst_info: inst_id first, then rna_plate, rna_well, pert_id,
pert_iname, pert_type, pert_dose, pert_time, cell_id, det_plate ...), whose
inst_id column matches the GCTx's column ids:

  python -m lsmtl_jax.prepare --config=configs/prepare/cmap.py \
    --config.input.path=GSE92742_Broad_LINCS_Level3_INF_mlr12k_n1319138x12328.gctx \
    --config.genes.gene_info=GSE92742_Broad_LINCS_gene_info.txt \
    --config.split.sample_table=GSE92742_Broad_LINCS_inst_info.txt \
    --config.split.group_by=pert_id --config.output=DATA/cmap_by_pert

group_by=rna_plate keeps each plate (one batch of 384 wells) in one split, a
guard against plate effects rather than replicate leakage.
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
  # config.split.group_by = "pert_id"  # replicates of a perturbation in one split only
  # config.split.sample_table = "GSE92742_Broad_LINCS_inst_info.txt"  # when the GCTx lacks it
  return config
