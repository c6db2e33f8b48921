"""Deep-LSMTL in JAX/Flax: infer ~10k target genes from ~1k landmark genes.

`lsmtl_jax.load_model(path)` (lsmtl_jax/api.py) is imported on first use, so
`import lsmtl_jax` stays light: no JAX, pandas or anndata until then.
"""

__version__ = "0.1.0"

_API = ("load_model", "Model", "Prediction")


def __getattr__(name):
  if name in _API:
    # By name, not an import statement: modules of every layer import this
    # package for __version__, and the layer contract would read a static
    # import here as each of them reaching up to the API.
    import importlib  # pylint: disable=g-import-not-at-top
    return getattr(importlib.import_module("lsmtl_jax.api"), name)
  raise AttributeError(f"module 'lsmtl_jax' has no attribute {name!r}")


def __dir__():
  return sorted([*globals(), *_API])
