"""Cross-platform setting (docs/data.md, "The D-GEX preparation", setting b): train on the GEO
training split, select on 1000G, test on GTEx.

Prepare GEO first, then 1000G and GTEx mapped onto GEO's quantile reference and
training statistics (configs/prepare/g1000.py and gtex.py, which write the whole
dataset as a 'val' and a 'test' split respectively), then:

  python -m lsmtl_jax.main --config=configs/gtex.py --workdir=RUN \
    --config.data.path=DATA/geo --config.data.val_path=DATA/1000g \
    --config.data.test_path=DATA/gtex
"""

from configs import geo


def get_config():
  config = geo.get_config()
  config.data.val_path = ""  # DATA/1000g
  config.data.val_split = "val"
  config.data.test_path = ""  # DATA/gtex
  config.data.test_split = "test"
  # Empty paths would evaluate on GEO's own splits: refuse them instead.
  config.data.require_external_eval = True
  return config
