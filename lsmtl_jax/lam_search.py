"""lsmtl.lam = 'auto': the term's weight chosen on validation, one ordinary run
per candidate.

Each value of lsmtl.lam_candidates trains as a normal, resumable run in
WORKDIR/lam/<value>/ (report off). When the DenseNet is among compare_with and
is the very network of the lam = 0 candidate (the same config but the method
name), its run in WORKDIR/compare/densenet is that candidate: trained once.
The candidate with the lowest validation MAE (ties: the smaller lam) then
becomes WORKDIR's run: its checkpoints, scalars and per-gene files are linked
(or copied) into WORKDIR, config.json is the run's config with the chosen lam,
and results.json is the candidate's with "lam_search" added (every candidate's
validation MAE and workdir, and the choice). WORKDIR is then a finished run
like any other for inference.load_run, predict, export and report.

Rerunning the command resumes: finished candidates are restored and evaluated
again (no training), an interrupted one resumes from its latest checkpoint,
and the choice is made again. WORKDIR/lam_search.json marks a workdir as an
'auto' run, so an explicit lam never resumes it, nor 'auto' replaces an
explicit run.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
from typing import Any, Callable

from absl import logging
import jax
import ml_collections

from lsmtl_jax import config_lib
from lsmtl_jax import fileio
from lsmtl_jax import inference
from lsmtl_jax import report
from lsmtl_jax import results as results_lib
from lsmtl_jax.methods import registry

Config = ml_collections.ConfigDict
SEARCH_NAME = "lam_search.json"
_SHARED_METHOD = "densenet"  # the compared method that can be the lam = 0 candidate
# What of the chosen candidate's workdir becomes WORKDIR's (config.json and
# results.json are written, not copied).
_PROMOTED = (results_lib.GENES_MAE_NAME, results_lib.GENE_STATS_NAME, results_lib.SCALARS_NAME,
             "checkpoints", "tensorboard")


@dataclasses.dataclass
class Search:
  config: Config  # the requested run (lsmtl.lam = 'auto'), resolved
  workdir: str
  lams: list[float]  # ascending
  members: list[int]  # index into Plan.runs of each lam's run


@dataclasses.dataclass
class Plan:
  runs: list[tuple[Config, str]]  # the concrete runs, in the order they train
  outputs: list[int | Search]  # per requested run: its concrete run, or its search


def candidate_dir(workdir: str, lam: float) -> str:
  return os.path.join(workdir, "lam", repr(float(lam)))


def _candidate(config: Config, lam: float) -> Config:
  run = config_lib.with_lam(config, lam)
  run.compare_with, run.report = (), False  # the chosen one's report is WORKDIR's
  run = config_lib.resolve(run)
  config_lib.validate(run)
  return run


def _same_network(a: Config, b: Config) -> bool:
  """Whether two resolved configs train the same network the same way (the
  method's name, report and compare_with aside)."""
  strip = lambda c: {k: v for k, v in c.to_dict().items()
                     if k not in ("method", "report", "compare_with")}
  return strip(a) == strip(b)


def _check_top(config: Config, workdir: str, auto: bool) -> None:
  """An 'auto' run never replaces an explicit run's workdir, nor resumes as one."""
  marked = os.path.isfile(os.path.join(workdir, SEARCH_NAME))
  if auto and not marked and os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise results_lib.WorkdirError(
        f"{workdir}: holds a run with an explicit lsmtl.lam (no {SEARCH_NAME}); lsmtl.lam="
        "'auto' would replace it: use a new --workdir or the lsmtl.lam it was started with")
  if not auto and marked and registry.get(config.method).is_network:
    raise results_lib.WorkdirError(
        f"{workdir}: holds an lsmtl.lam='auto' run ({SEARCH_NAME}); rerun it with "
        "--config.lsmtl.lam=auto or use a new --workdir")


def expand(runs: list[tuple[Config, str]]) -> Plan:
  """The concrete runs behind `runs` (resolved, validated configs): an 'auto'
  run becomes one run per candidate. Only checks; nothing is written."""
  concrete, position = [], {}
  for k, (config, workdir) in enumerate(runs):
    if not config_lib.lam_is_auto(config):
      position[k] = len(concrete)
      concrete.append((config, workdir))
  outputs: list[int | Search] = []
  for k, (config, workdir) in enumerate(runs):
    auto = config_lib.lam_is_auto(config)
    _check_top(config, workdir, auto)
    if not auto:
      outputs.append(position[k])
      continue
    lams = sorted(float(v) for v in config.lsmtl.lam_candidates)
    members = []
    for lam in lams:
      run = _candidate(config, lam)
      shared = [i for i, (c, _) in enumerate(concrete)
                if lam == 0 and c.method == _SHARED_METHOD and _same_network(c, run)]
      if shared:
        logging.info("lam = 0 candidate: the compared %s run (the same network)",
                     registry.label(_SHARED_METHOD))
        members.append(shared[0])
      else:
        members.append(len(concrete))
        concrete.append((run, candidate_dir(workdir, lam)))
    outputs.append(Search(config, workdir, lams, members))
  return Plan(concrete, outputs)


def execute(plan: Plan, run_one: Callable[[int], dict],
            skippable: tuple[type[BaseException], ...]) -> list[dict]:
  """Runs plan.runs in order (run_one(i) -> that run's results) and returns the
  results of each requested run, an 'auto' one's after its choice. A candidate
  with lam > 0 that fails with `skippable` (a non-finite loss) is left out of
  the choice; any other failure stops the whole run."""
  optional = {m for s in plan.outputs if isinstance(s, Search)
              for lam, m in zip(s.lams, s.members) if lam > 0}
  done: dict[int, dict] = {}
  failed: dict[int, str] = {}
  for i in range(len(plan.runs)):
    try:
      done[i] = run_one(i)
    except skippable as e:
      if i not in optional:
        raise
      failed[i] = str(e)
      logging.warning("lam candidate %s failed, left out of the choice: %s", plan.runs[i][1], e)
  return [done[o] if isinstance(o, int) else _finish(o, plan, done, failed)
          for o in plan.outputs]


def _val_mae(row: dict) -> float:
  val = (row.get("splits") or {}).get("val") or {}
  return float(val.get("mae_mean", math.nan))


def choose(candidates: list[dict]) -> dict:
  """The candidate (dicts with 'lam', 'val_mae', 'status') to keep: the lowest
  finite validation MAE, ties to the smaller lam; without any, the smallest
  lam that finished."""
  ok = [c for c in candidates if c["status"] == "ok"]
  return min(ok, key=lambda c: (not math.isfinite(c["val_mae"]),
                                c["val_mae"] if math.isfinite(c["val_mae"]) else 0.0, c["lam"]))


def _finish(search: Search, plan: Plan, done: dict[int, dict], failed: dict[int, str]) -> dict:
  candidates = []
  for lam, member in zip(search.lams, search.members):
    where = os.path.relpath(plan.runs[member][1], search.workdir)
    entry = {"lam": lam, "workdir": where}
    if member in done:
      entry.update(status="ok", val_mae=_val_mae(done[member]))
    else:
      entry.update(status="failed", val_mae=None, error=failed[member])
    candidates.append(entry)
  chosen = choose(candidates)
  member = search.members[search.lams.index(chosen["lam"])]
  record = {"requested": config_lib.AUTO_LAM, "chosen": chosen["lam"],
            "rule": "lowest validation MAE; ties to the smaller lam",
            "candidates": candidates}
  config = config_lib.with_lam(search.config, chosen["lam"])
  results = dict(done[member], method=config.method, config=config.to_dict(),
                 lam_search=record)
  if jax.process_index() == 0:
    _promote(search.workdir, plan.runs[member][1], config, results, record)
  logging.info("%s", summary(record))
  if config.report and jax.process_count() == 1 and "test" in results["splits"]:
    path = report.write_report(search.workdir,
                               inference.load_run(search.workdir, jax.local_devices()))
    logging.info("Per-gene report: %s", os.path.join(path, "report.html"))
  return results


def summary(record: dict) -> str:
  tried = ", ".join(f"{c['lam']:g}: {c['val_mae']:.4f}" if c["status"] == "ok"
                    else f"{c['lam']:g}: failed" for c in record["candidates"])
  return f"lsmtl.lam chosen on validation: {record['chosen']:g} (val MAE by lam: {tried})"


def _link_or_copy(src: str, dst: str) -> str:
  try:
    os.link(src, dst)
  except OSError:
    shutil.copy2(src, dst)
  return dst


def _promote(workdir: str, source: str, config: Config, results: dict, record: dict) -> None:
  """Makes `source`'s run WORKDIR's. The marker goes first and results.json
  last, so an interrupted promotion leaves an unfinished run that the same
  command promotes again."""
  try:
    fileio.write_json(os.path.join(workdir, SEARCH_NAME), record)
    top_results = os.path.join(workdir, results_lib.RESULTS_NAME)
    if os.path.exists(top_results):
      os.remove(top_results)
    staging = os.path.join(workdir, ".lam_promote")
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    for name in _PROMOTED:
      src, staged, dst = (os.path.join(d, name) for d in (source, staging, workdir))
      if os.path.isdir(src):
        shutil.copytree(src, staged, copy_function=_link_or_copy)
      elif os.path.isfile(src):
        _link_or_copy(src, staged)
      else:
        continue
      if os.path.isdir(dst) and not os.path.islink(dst):
        shutil.rmtree(dst)
      elif os.path.lexists(dst):
        os.remove(dst)
      os.replace(staged, dst)
    shutil.rmtree(staging)
    fileio.write_json(os.path.join(workdir, results_lib.CONFIG_NAME), config.to_dict())
    fileio.write_json(top_results, {k: v for k, v in results.items() if k != "state"})
  except OSError as e:
    raise results_lib.WorkdirError(f"{workdir}: cannot write: {e.strerror or e}") from None


def table_label(row: dict) -> str:
  """The comparison table's name for a run: an 'auto' one shows its choice."""
  label = registry.label(row["method"])
  record: dict[str, Any] | None = row.get("lam_search")
  return f"{label} (lam {record['chosen']:g}, chosen on val)" if record else label
