"""configs/experiments/real_cohorts.py's data steps: reading a GEO SOFT family
file (only the HG-U133A samples, patient groups from the titles) and the
grouped split (every group in exactly one split, columns kept whole)."""

import gzip
import os

import numpy as np

from configs.experiments import real_cohorts


def _sample(gsm, title, platform, values):
  rows = "".join(f"{p}\t{v}\tP\n" for p, v in values.items())
  return (f"^SAMPLE = {gsm}\n!Sample_title = {title}\n!Sample_platform_id = {platform}\n"
          f"!sample_table_begin\nID_REF\tVALUE\tABS_CALL\n{rows}!sample_table_end\n")


def _read(path):
  with open(path) as f:
    return [line.rstrip("\n").split("\t") for line in f]


def test_soft_then_grouped_split(tmp_path, monkeypatch):
  soft = tmp_path / "family.soft.gz"
  rng = np.random.default_rng(0)
  samples = [("GSM1", "N7 Normal U133A", "GPL96"), ("GSM2", "N7 Normal U133B", "GPL97"),
             ("GSM3", "C7 Carcinoma U133A", "GPL96"), ("GSM4", "C8 Carcinoma U133A", "GPL96"),
             ("GSM5", "N9 Normal U133A", "GPL96")]
  values = {gsm: {"b_at": float(rng.integers(1, 999)), "a_at": float(rng.integers(1, 999))}
            for gsm, _, _ in samples}
  with gzip.open(soft, "wt") as f:
    f.write("^SERIES = GSE1\n")
    for gsm, title, platform in samples:
      f.write(_sample(gsm, title, platform, values[gsm]))
  out = tmp_path / "gse"
  out.mkdir()
  real_cohorts.extract_gse781(str(out), soft=str(soft))
  expr = _read(out / "expr.tsv")
  assert expr[0] == ["probe", "GSM1", "GSM3", "GSM4", "GSM5"]  # the U133B sample is left out
  assert [row[0] for row in expr[1:]] == ["a_at", "b_at"]
  for j, gsm in enumerate(expr[0][1:], start=1):
    assert [float(row[j]) for row in expr[1:]] == [values[gsm]["a_at"], values[gsm]["b_at"]]
  assert _read(out / "samples.tsv")[1:] == [["GSM1", "7", "normal"], ["GSM3", "7", "tumour"],
                                            ["GSM4", "8", "tumour"], ["GSM5", "9", "normal"]]

  monkeypatch.setitem(real_cohorts.GROUPED, "toy", dict(val=("8",), test=("9",)))
  counts = real_cohorts.write_grouped(str(out), "toy")
  assert counts == {"train": 2, "val": 1, "test": 1}
  parts = {s: _read(out / f"expr_{s}.tsv") for s in ("train", "val", "test")}
  assert parts["train"][0] == ["probe", "GSM1", "GSM3"]  # both samples of patient 7
  assert parts["val"][0] == ["probe", "GSM4"] and parts["test"][0] == ["probe", "GSM5"]
  for part in parts.values():
    for row, full in zip(part[1:], expr[1:]):
      assert row == [full[0]] + [full[expr[0].index(s)] for s in part[0][1:]]
  assert not os.path.exists(out / "expr_train.tsv.tmp")
