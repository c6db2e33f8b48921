"""Deep-LSMTL in JAX/Flax: infer ~10k target genes from ~1k landmark genes."""

__version__ = "0.1.0"
