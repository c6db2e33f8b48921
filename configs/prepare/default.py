"""Every field of `python -m lsmtl_jax.prepare`, commented. Other prepare configs import this.

  python -m lsmtl_jax.prepare --config=configs/prepare/geo.py \
    --config.input.path=bgedv2_QNORM.gctx --config.genes.landmark_map=map_lm.txt \
    --config.genes.target_map=map_tg.txt --config.output=DATA/geo
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.name = "custom"  # stored in meta.json
  config.output = ""  # the dataset directory to create; must not exist yet
  config.seed = 0  # k-means, the sketch basis and the split derive from it
  config.block_rows = 1024  # rows per streamed block (rounded to whole HDF5 chunks)
  config.memory_budget_mb = 1024  # candidate rows held for the exact duplicate check
  config.checksum_inputs = True  # sha256 of every input file into meta.json

  config.input = ml_collections.ConfigDict()
  config.input.path = ""
  # gctx, gct, table (tab/CSV), npy, h5ad, archs4; auto: by extension (an .h5 with
  # ARCHS4's groups is archs4)
  config.input.format = "auto"
  config.input.id_column = 0  # table: the gene id column (0-based)
  config.input.first_value_column = 1  # table: the first sample column (0-based)
  config.input.delimiter = "auto"  # table: ',' for .csv, tab otherwise
  config.input.strip_versions = True  # ENSG00000175063.12 -> ENSG00000175063
  config.input.gene_ids = ""  # npy: a file of gene ids, one per line
  config.input.sample_ids = ""  # npy: a file of sample ids (default S0, S1, ...)
  # archs4: the meta/genes field naming the genes ('symbol', 'ensembl' or a field's
  # name; '': symbol); h5ad: a var column ('': the var index).
  config.input.gene_id_field = ""
  # 'log2p1' takes log2(max(v, 0) + 1) of each value before probe averaging (RPKM
  # inputs). Quantile normalization is rank based, so this changes only the
  # duplicate distances and nothing else. 'log2cpm1' (raw counts: ARCHS4,
  # configs/prepare/archs4.py) takes log2(counts / library * 1e6 + 1) per sample,
  # the library being the sample's sum over every gene of the file.
  config.input.transform = "none"

  config.genes = ml_collections.ConfigDict()
  # D-GEX maps: tab-separated symbol, Ensembl id, comma-separated probes.
  config.genes.landmark_map = ""
  config.genes.target_map = ""
  # Which map field names the data columns: 'probes' (microarray: a gene is the
  # mean of its probes), 'ensembl' (RNA-seq with Ensembl ids), 'symbol'.
  config.genes.map_key = "probes"
  # Or plain lists, one gene id (optionally id<TAB>symbol) per line.
  config.genes.landmark_ids = ""
  config.genes.target_ids = ""
  # Or per-gene 0/1 flags (CMap LINCS, configs/prepare/cmap.py): landmarks are the
  # genes whose landmark_flag is 1, targets the others (only those whose
  # target_flag is 1, if set). The fields are read from the GCTx's /0/META/ROW/,
  # or from gene_info: a tab-separated table with a header, the data's gene id
  # in its first column (GSE92742_Broad_LINCS_gene_info.txt).
  config.genes.landmark_flag = ""  # e.g. pr_is_lm
  config.genes.target_flag = ""  # e.g. pr_is_bing
  config.genes.id_field = ""  # the gene id stored in the dataset; '': the data's row id
  config.genes.symbol_field = ""  # e.g. pr_gene_symbol; '': the gene id
  config.genes.gene_info = ""
  config.genes.allow_missing_landmarks = False  # else a landmark absent from the data is an error
  # Targets that copy a landmark (same gene id or data column, or identical
  # values in every sample): 'drop' (reported in meta.json), 'error', 'keep'.
  config.genes.copy_targets = "drop"

  # NaN/Inf in the selected columns: 'error' (count and first location),
  # 'impute' (the gene's mean over the finite values of the training rows only),
  # 'drop' (drop those samples).
  config.nonfinite = "error"

  # D-GEX duplicate removal: k-means clusters, then within a cluster drop a
  # sample closer than `threshold` (Euclidean) to an earlier kept one.
  config.dedup = ml_collections.ConfigDict()
  config.dedup.enabled = False
  config.dedup.num_clusters = 100
  config.dedup.threshold = 1.0
  config.dedup.sketch_dim = 256  # per-row sketch that rules out far pairs; memory 8 B each

  # Another platform: genes, quantile reference and standardization statistics
  # come from this prepared dataset (e.g. the GEO one), so models trained there
  # apply here. Needs split.mode train, val or test.
  config.reference_dataset = ""

  config.split = ml_collections.ConfigDict()
  config.split.mode = "random"  # or 'train', 'val', 'test': the whole dataset as that split
  config.split.fractions = (0.8, 0.1, 0.1)
  # Group-aware split (lsmtl_jax/data/groups.py, docs/data.md "Grouped splits"): the
  # samples sharing this per-sample field's value (donor, GEO series, plate,
  # perturbation) land in one split only; whole groups meet the fractions as closely
  # as they allow. '' = the plain random split above. The field is read from the
  # input (GCTx /0/META/COL, GCT 1.3 column rows, h5ad obs, ARCHS4 /meta/samples)
  # or from sample_table. A missing value makes its sample a group of its own.
  config.split.group_by = ""
  # A table beside any input (CSV/npy too): header row, tab-separated (comma for
  # .csv); sample_id_column ('' = the first column) holds the data's sample ids,
  # matched exactly; every sample needs a row, extra rows are ignored.
  config.split.sample_table = ""
  config.split.sample_id_column = ""
  return config
