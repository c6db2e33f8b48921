"""One results format for every method: `results.json` in the run's workdir."""

from __future__ import annotations

import json
import os
from typing import Any

RESULTS_NAME = "results.json"


def write_json_atomic(path: str, obj: Any) -> None:
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=False)
    f.write("\n")
  os.replace(tmp, path)


def write_results(workdir: str, *, method: str, config: dict, steps: int,
                  train_seconds: float, examples_per_sec: float,
                  splits: dict[str, dict], extra: dict | None = None) -> str:
  results = {
      "method": method,
      "config": config,
      "steps": int(steps),
      "train_seconds": float(train_seconds),
      "examples_per_sec": float(examples_per_sec),
      "splits": splits,
      **(extra or {}),
  }
  path = os.path.join(workdir, RESULTS_NAME)
  write_json_atomic(path, results)
  return path


def read_results(workdir: str) -> dict | None:
  path = os.path.join(workdir, RESULTS_NAME)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def format_table(rows: list[dict]) -> str:
  """A Markdown table of test (and val) MAE and CC, one row per results.json."""
  header = ("| method | test MAE | test CC | val MAE | val CC | steps | train s |\n"
            "|---|---|---|---|---|---|---|")
  lines = [header]
  for r in rows:
    t, v = r["splits"]["test"], r["splits"]["val"]
    lines.append(
        f"| {r['method']} | {t['mae_mean']:.4f} ± {t['mae_std']:.4f} | "
        f"{t['cc_mean']:.4f} ± {t['cc_std']:.4f} | {v['mae_mean']:.4f} | "
        f"{v['cc_mean']:.4f} | {r['steps']} | {r['train_seconds']:.1f} |")
  return "\n".join(lines)
