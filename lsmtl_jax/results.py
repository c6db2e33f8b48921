"""One results format for every method: `results.json` in the run's workdir."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Any, Iterator

RESULTS_NAME = "results.json"


def write_json_atomic(path: str, obj: Any) -> None:
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=False)
    f.write("\n")
  os.replace(tmp, path)


@contextlib.contextmanager
def replaced_dir(final: str) -> Iterator[str]:
  """Yields a temporary sibling of `final`; on success it replaces `final`,
  on any error it is removed, so a half-written folder is never left there."""
  tmp = tempfile.mkdtemp(prefix=os.path.basename(final) + ".tmp-",
                         dir=os.path.dirname(os.path.abspath(final)))
  try:
    yield tmp
    if os.path.exists(final):
      shutil.rmtree(final)
    os.rename(tmp, final)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


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
