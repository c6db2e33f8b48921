"""Landmarks and targets chosen by per-gene 0/1 flags, as CMap's LINCS releases mark them.

A LINCS GCTx has one row per gene (12,328 in GSE92742 Level 3); `pr_is_lm` = 1
marks the 978 measured landmarks and `pr_is_bing` = 1 the best-inferred genes.
The fields sit either beside the row ids at /0/META/ROW/<field>, or, as in the
files on GEO (whose GCTx carry the ids only), in the release's gene info table
(GSE92742_Broad_LINCS_gene_info.txt: tab-separated, a header, the row id
first). Only per-gene metadata is read here, never the matrix.

Every problem raises PrepareError with one line naming the file and the field.
"""

from __future__ import annotations

import dataclasses
import os

import h5py
import numpy as np

from lsmtl_jax.data import formats
from lsmtl_jax.data.formats import PrepareError

FIELDS = ("landmark_flag", "target_flag", "id_field", "symbol_field", "gene_info")


@dataclasses.dataclass
class Flagged:
  landmarks: np.ndarray  # data columns of the landmarks, in file order
  targets: np.ndarray  # data columns of the targets, in file order
  ids: list[str]  # gene id of every data column
  symbols: list[str]  # symbol of every data column (its id when none is known)
  source: str  # where the fields came from, for messages and meta.json
  report: dict


def check_config(genes) -> None:
  """The flag fields make sense together, before any file is opened."""
  if not genes.landmark_flag:
    extra = [f for f in FIELDS[1:] if genes[f]]
    if extra:
      raise PrepareError(f"config: genes.{extra[0]} is used with genes.landmark_flag "
                         "(e.g. pr_is_lm), which is empty")
    return
  lists = [f for f in ("landmark_map", "target_map", "landmark_ids", "target_ids") if genes[f]]
  if lists:
    raise PrepareError(f"config: genes.landmark_flag and genes.{lists[0]} both choose the "
                       "genes; set one of them")
  if genes.target_flag == genes.landmark_flag:
    raise PrepareError(f"config: genes.target_flag is genes.landmark_flag "
                       f"({genes.landmark_flag!r}); targets are the genes not flagged as "
                       "landmarks, optionally narrowed by another flag")


def _read_gctx_field(path: str, name: str, count: int, role: str) -> np.ndarray:
  group = formats.ROW_META_GROUP
  try:
    with h5py.File(path, "r") as f:
      node = f.get(f"{group}/{name}")
      if not isinstance(node, h5py.Dataset):
        present = sorted(k for k in f.get(group, {}) if k != "id")
        hint = (f"its row fields are {', '.join(present[:8])}" if present else
                "it has no row metadata besides the ids (as on GEO); give the release's "
                "gene info table as genes.gene_info")
        raise PrepareError(f"{path}: no /{group}/{name} for {role}; {hint}")
      values = node[()]
  except OSError as e:
    raise PrepareError(f"{path}: cannot read /{group}/{name}: "
                       f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
  if values.ndim != 1 or len(values) != count:
    raise PrepareError(f"{path}: /{group}/{name} has shape {values.shape}, expected one value "
                       f"for each of {count} genes (/{formats.ROW_ID_NODE})")
  return formats.decode_metadata(values)


def read_gene_info(path: str, row_ids: list[str], names: list[str],
                   roles: list[str]) -> dict[str, np.ndarray]:
  """Columns `names` of a tab-separated table with a header, keyed by its first
  column, in the order of `row_ids`; every row id must have a line."""
  if not os.path.isfile(path):
    raise PrepareError(f"{path}: no such file (genes.gene_info)")
  lines: dict[str, list[str]] = {}
  try:
    with open(path, encoding="utf-8-sig", newline="") as f:
      header = f.readline().rstrip("\r\n").split("\t")
      for name, role in zip(names, roles):
        if name not in header:
          raise PrepareError(f"{path}: no column {name!r} for {role}; its columns are "
                             f"{', '.join(header[:8])}")
      for line_no, line in enumerate(f, start=2):
        cells = line.rstrip("\r\n").split("\t")
        if cells == [""]:
          continue
        if len(cells) != len(header):
          raise PrepareError(f"{path}: line {line_no} has {len(cells)} tab-separated fields, "
                             f"the header {len(header)}")
        if cells[0] in lines:
          raise PrepareError(f"{path}: line {line_no}: gene {cells[0]} listed twice")
        lines[cells[0]] = cells
  except UnicodeDecodeError:
    raise PrepareError(f"{path}: not a UTF-8 text file") from None
  absent = [r for r in row_ids if r not in lines]
  if absent:
    raise PrepareError(f"{path}: {len(absent)} of the data's {len(row_ids)} genes have no "
                       f"line (first {absent[0]}); the first column must hold the data's "
                       "gene ids")
  cols = [header.index(n) for n in names]
  return {n: np.array([lines[r][c].strip() for r in row_ids], object)
          for n, c in zip(names, cols)}


def _shown(x) -> str:
  return repr(x.item() if isinstance(x, np.generic) else x)


def _flag(values: np.ndarray, row_ids: list[str], where: str) -> np.ndarray:
  """0/1 as CMap writes them: integers, 0.0/1.0, booleans or the strings '0'/'1'."""
  v = np.asarray(values)
  if v.dtype == object:
    ok = np.array([x in ("0", "1") for x in v])
    parsed = np.array([x == "1" for x in v])
  else:
    ok = np.isin(v, (0, 1))
    parsed = v == 1
  if not ok.all():
    bad = np.flatnonzero(~ok)
    raise PrepareError(f"{where} must be 0 or 1 for every gene; {len(bad)} gene(s) have "
                       f"another value, first {row_ids[bad[0]]}: {_shown(v[bad[0]])}")
  return parsed


def _text(x) -> str:
  """A metadata value as text: integral numbers without a '.0' (Entrez ids
  stored as floats); CMap's -666, NaN and blanks as ''."""
  if isinstance(x, (float, np.floating)):
    text = "" if not np.isfinite(x) else str(int(x)) if float(x).is_integer() else repr(float(x))
  else:
    text = str(x.item() if isinstance(x, np.generic) else x).strip()
  return "" if text in (str(formats.MISSING), "nan", "NaN", "-666.0") else text


def _ids(values: np.ndarray, row_ids: list[str], chosen: np.ndarray, where: str) -> list[str]:
  out = [_text(x) for x in values]
  missing = [j for j in chosen if not out[j]]
  if missing:
    raise PrepareError(f"{where} is missing for {len(missing)} gene(s), first row "
                       f"{row_ids[missing[0]]}")
  return [formats.strip_version(t) for t in out]


def select(genes, matrix: formats.Matrix) -> Flagged:
  """Landmarks: columns whose landmark flag is 1. Targets: every other column,
  or only those whose target flag is 1 too."""
  row_ids = list(matrix.gene_ids)
  wanted = [(genes.landmark_flag, "genes.landmark_flag")]
  for field in ("target_flag", "id_field", "symbol_field"):
    if genes[field]:
      wanted.append((genes[field], f"genes.{field}"))
  names, roles = [w[0] for w in wanted], [w[1] for w in wanted]
  if genes.gene_info:
    source = genes.gene_info
    fields = read_gene_info(source, row_ids, names, roles)
    at = {n: f"{source}: column {n}" for n in names}
  elif isinstance(matrix, formats.GctxMatrix):
    source = matrix.path
    fields = {n: _read_gctx_field(source, n, len(row_ids), r) for n, r in zip(names, roles)}
    at = {n: f"{source}: /{formats.ROW_META_GROUP}/{n}" for n in names}
  else:
    raise PrepareError(f"{matrix.path}: genes.landmark_flag reads per-gene fields, which only "
                       "a GCTx carries; give them as a table with genes.gene_info")

  is_lm = _flag(fields[genes.landmark_flag], row_ids, at[genes.landmark_flag])
  is_tg = ~is_lm
  if genes.target_flag:
    is_tg &= _flag(fields[genes.target_flag], row_ids, at[genes.target_flag])
  if not is_lm.any():
    raise PrepareError(f"{at[genes.landmark_flag]}: no gene is flagged 1, so there are no "
                       "landmarks")
  if not is_tg.any():
    rule = (f"{genes.landmark_flag} = 0 and {genes.target_flag} = 1" if genes.target_flag
            else f"{genes.landmark_flag} = 0")
    raise PrepareError(f"{at[genes.landmark_flag]}: no gene has {rule}, so there are no "
                       "targets")
  chosen = np.flatnonzero(is_lm | is_tg)
  ids = (_ids(fields[genes.id_field], row_ids, chosen, at[genes.id_field]) if genes.id_field
         else row_ids)
  symbols = list(ids)
  if genes.symbol_field:  # a gene without a symbol is shown by its id
    symbols = [_text(x) or i for x, i in zip(fields[genes.symbol_field], ids)]
  seen: dict[str, int] = {}
  for j in chosen:
    if ids[j] in seen:
      where = at[genes.id_field] if genes.id_field else f"{matrix.path}: row ids"
      raise PrepareError(f"{where}: gene id {ids[j]} repeats (rows {row_ids[seen[ids[j]]]} "
                         f"and {row_ids[j]}); each chosen gene needs its own id")
    seen[ids[j]] = j
  report = {"source": os.path.abspath(source), "landmark_flag": genes.landmark_flag,
            "target_flag": genes.target_flag or None, "id_field": genes.id_field or "row id",
            "symbol_field": genes.symbol_field or None,
            "flagged_landmarks": int(is_lm.sum()),
            "not_targets": int((~is_lm & ~is_tg).sum())}
  return Flagged(np.flatnonzero(is_lm), np.flatnonzero(is_tg), ids, symbols, source, report)
