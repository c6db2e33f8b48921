"""Selection on validation, then seeds: what the experiment runner does for a
run marked `tune`.

A tuned entry {"method", "overrides", "tune": {...}, "figures"} becomes
  1. candidates: the same run at `budget` settings of the method's own
     coefficients (its record's tunables, or an explicit "search" list), each
     trained once (seed 0) with the test split switched off, so nothing about
     test can leak into the choice;
  2. the setting with the lowest validation MAE, rerun with `seeds` seeds
     (initialisation, dropout, task masks; the data split is the dataset's),
     evaluating test once per seed.
Candidates come from a seeded shuffle of the tunables' grid, the method's
defaults first, so every method gets the same number of tries.

"tune": {"on_top_of": KEY} tunes an entry on top of another entry's choice:
each of its candidates is the other entry's chosen setting plus its own
search point (e.g. Deep-LSMTL's lam on the dropout the lam = 0 network chose),
so the added coefficient is judged against a tuned network, on validation only.
"""

from __future__ import annotations

import itertools
import math
import zlib
from typing import Any

import numpy as np

NO_TEST = {"data.test_split": ""}  # candidates never evaluate the test split


def candidates(tunables, budget: int, name: str, seed: int = 0) -> list[dict[str, Any]]:
  """`budget` override dicts: {} (the defaults) then distinct grid points of the
  tunables in a seeded order (fewer when the grid is smaller)."""
  fields = [t.field for t in tunables]
  grid = list(itertools.product(*[t.values for t in tunables]))
  out: list[dict[str, Any]] = [{}]
  if not grid or budget <= 1:
    return out[:max(budget, 1)]
  order = np.random.default_rng([seed, zlib.crc32(name.encode())]).permutation(len(grid))
  implied = {k: v for t in tunables for k, v in t.implies.items()}
  for i in order:
    if len(out) >= budget:
      break
    out.append({**dict(zip(fields, grid[i])), **implied})
  return out


def search_space(entry: dict, method) -> list[dict[str, Any]]:
  tune = entry["tune"]
  if "search" in tune:
    return [dict(s) for s in tune["search"]]
  return candidates(method.tunables, int(tune.get("budget", 1)), method.name,
                    int(tune.get("search_seed", 0)))


class TuningError(ValueError):
  """A plan whose tuned entries cannot be ordered (an unknown or circular on_top_of)."""


def levels(entries: list[dict]) -> list[list[dict]]:
  """Entries grouped so that each comes after the entry it is tuned on top of."""
  keys = {e["key"] for e in entries}
  done: set[str] = set()
  out, pending = [], list(entries)
  while pending:
    level = [e for e in pending if e["tune"].get("on_top_of") in done | {None}]
    if not level:
      bad = pending[0]
      base = bad["tune"]["on_top_of"]
      why = "is not a tuned entry of the plan" if base not in keys else "is circular"
      raise TuningError(f"entry {bad['key']}: on_top_of {base!r} {why}")
    out.append(level)
    done |= {e["key"] for e in level}
    pending = [e for e in pending if e["key"] not in done]
  return out


def candidate_runs(entry: dict, method, base: dict | None = None) -> list[dict]:
  """The runs of step 1, each tagged with its entry and setting; `base` is the
  chosen setting of the entry this one is tuned on top of."""
  out = []
  for i, own in enumerate(search_space(entry, method)):
    setting = {**(base or {}), **own}
    out.append({"method": entry["method"], "figures": {},
                "overrides": {**entry.get("overrides", {}), **setting, **NO_TEST, "seed": 0},
                "tuning": {"entry": entry["key"], "role": "candidate", "index": i,
                           "setting": setting}})
  return out


def choose(candidate_rows: list[dict]) -> dict | None:
  """The candidate row with the lowest validation MAE (the first on a tie);
  None when no candidate finished."""
  ok = [r for r in candidate_rows
        if r["status"] == "ok" and math.isfinite(r["splits"]["val"]["mae_mean"])]
  if not ok:
    return None
  return min(ok, key=lambda r: (r["splits"]["val"]["mae_mean"], r["tuning"]["index"]))


def seed_runs(entry: dict, setting: dict) -> list[dict]:
  seeds = entry["tune"].get("seeds", 3)
  seeds = range(seeds) if isinstance(seeds, int) else seeds
  return [{"method": entry["method"], "figures": {},
           "overrides": {**entry.get("overrides", {}), **setting, "seed": s},
           "tuning": {"entry": entry["key"], "role": "seed", "seed": s, "setting": setting}}
          for s in seeds]


def _mean_sd(values) -> tuple[float, float]:
  v = np.asarray(values, np.float64)
  return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def aggregate(entry: dict, candidate_rows: list[dict], seed_rows: list[dict]) -> dict:
  """One row for the entry: splits averaged over seeds (mean of each summary
  number), the spread over seeds, the chosen setting and what was tried."""
  ok = [r for r in seed_rows if r["status"] == "ok"]
  row = {"name": entry["key"], "method": entry["method"], "label": entry["label"],
         "figures": entry.get("figures", {}), "overrides": entry.get("overrides", {}),
         "status": "ok" if ok else (seed_rows[0]["status"] if seed_rows else "missing"),
         "tuning": {
             "tried": [{"setting": r["tuning"]["setting"],
                        "val_mae": (r["splits"]["val"]["mae_mean"] if r["status"] == "ok"
                                    else None), "status": r["status"]}
                       for r in candidate_rows],
             "chosen": seed_rows[0]["tuning"]["setting"] if seed_rows else None,
             "seeds": [r["tuning"]["seed"] for r in ok]}}
  if not ok:
    oom = next((r for r in seed_rows + candidate_rows if r["status"] == "oom"), None)
    if oom is not None:
      row.update(status="oom", oom=oom["oom"])
    return row
  splits = {}
  for split in ("val", "test"):
    splits[split] = {"n_genes": ok[0]["splits"][split].get("n_genes")}
    for key in ("mae_mean", "mae_std", "cc_mean", "cc_std"):
      mean, sd = _mean_sd([r["splits"][split][key] for r in ok])
      splits[split][key] = mean
      if key in ("mae_mean", "cc_mean"):
        splits[split][f"{key}_seed_sd"] = sd
        splits[split][f"{key}_per_seed"] = [r["splits"][split][key] for r in ok]
  row.update(splits=splits, num_parameters=ok[0].get("num_parameters"),
             train_seconds=float(np.mean([r["train_seconds"] for r in ok])),
             steps=ok[0].get("steps"), peak_bytes=max(r.get("peak_bytes") or 0 for r in ok),
             peak_kind=ok[0].get("peak_kind"))
  genes = [r["genes"] for r in ok if "genes" in r and "test_mae" in r["genes"]]
  if len(genes) == len(ok):
    row["genes"] = {"test_mae": np.mean([g["test_mae"] for g in genes], axis=0),
                    "test_mae_per_seed": [g["test_mae"] for g in genes]}
  return row


def paired_seeds(a: dict, b: dict, split: str = "test") -> dict[str, Any]:
  """Per-seed relative MAE change of `a` against `b` (both rows aggregated;
  seeds paired by their number): (b - a) / b, positive when a is better."""
  ma = dict(zip(a["tuning"]["seeds"], a["splits"][split]["mae_mean_per_seed"]))
  mb = dict(zip(b["tuning"]["seeds"], b["splits"][split]["mae_mean_per_seed"]))
  gains = [(mb[s] - ma[s]) / mb[s] for s in sorted(set(ma) & set(mb))]
  mean, sd = _mean_sd(gains) if gains else (float("nan"), float("nan"))
  return {"per_seed": gains, "mean": mean, "sd": sd}
