"""The run lists shared by the experiment configs: the table (paper Figure 2), the
MTL comparison at equal trunk sizes (Figure 3), D-GEX vs Deep-LSMTL on the MLP
base (Figure 4) and Deep-LSMTL's hyperparameter sensitivity (Figure 5).

A run is {"method", "overrides", "figures"}; identical runs are trained once.
"""

TABLE_ORDER = ("lsr", "lsr_l1", "knn", "dgex", "semigan", "semigan_semi", "go_mtl", "cnmtl",
               "amtl", "amtfl", "densenet", "deep_lsmtl")
MTL = ("go_mtl", "cnmtl", "amtl", "amtfl", "deep_lsmtl")
NETWORKS = ("dgex", "semigan", "semigan_semi", "go_mtl", "cnmtl", "amtl", "amtfl", "densenet",
            "deep_lsmtl")


def table_runs(trunk: dict, widths: dict | None = None, extra: dict | None = None):
  """One run per method. trunk: model overrides of every DenseNet network;
  widths: per-method hidden units (the paper's 'largest that fits' sizes)."""
  runs = []
  for i, method in enumerate(TABLE_ORDER):
    overrides = {}
    if method in NETWORKS:
      overrides = dict(trunk)
      if widths and method in widths:
        overrides["model.hidden"] = widths[method]
    overrides.update((extra or {}).get(method, {}))
    runs.append({"method": method, "overrides": overrides, "figures": {"table": {"order": i}}})
  return runs


def mtl_runs(depth: int, widths, extra: dict | None = None):
  return [{"method": m, "overrides": {**(extra or {}).get(m, {}), "model.depth": depth,
                                      "model.hidden": w},
           "figures": {"fig3": {"width": w, "order": j}}}
          for w in widths for j, m in enumerate(MTL)]


def dgex_lsmtl_runs(depths, widths, extra: dict | None = None):
  """Deep-LSMTL on the D-GEX base: the MLP trunk (tanh) with the bottleneck term."""
  runs = []
  for d in depths:
    for w in widths:
      runs.append({"method": "dgex", "overrides": {"model.depth": d, "model.hidden": w,
                                                   **(extra or {}).get("dgex", {})},
                   "figures": {"fig4": {"depth": d, "width": w}}})
      runs.append({"method": "deep_lsmtl",
                   "overrides": {"model.trunk": "mlp", "model.activation": "tanh",
                                 "model.depth": d, "model.hidden": w,
                                 **(extra or {}).get("deep_lsmtl", {})},
                   "figures": {"fig4": {"depth": d, "width": w}}})
  return runs


def sensitivity_runs(base: dict, grid: dict):
  """Deep-LSMTL varying one field of `grid` at a time around `base` (its overrides).

  The run at the base value is the table's own Deep-LSMTL run when `base`
  equals its overrides."""
  names = {"model.dropout": "dropout", "lsmtl.lam": "lambda", "lsmtl.mask_rate": "mask rate",
           "lsmtl.bottleneck": "bottleneck k"}
  runs = []
  for field, values in grid.items():
    for v in values:
      overrides = dict(base)
      overrides[field] = v
      runs.append({"method": "deep_lsmtl", "overrides": overrides,
                   "figures": {"fig5": {names.get(field, field): v}}})
  return runs
