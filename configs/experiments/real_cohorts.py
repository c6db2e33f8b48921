"""Does the task-relation term pay on real cohorts? A driver script, not a config.

  apt-get update && apt-get install -y r-bioc-bladderbatch r-bioc-geoquery
  python configs/experiments/real_cohorts.py --data=cohort_data \
    --landmark_map=map_lm.txt --target_map=map_tg.txt --workdir=runs/real_cohorts --jobs=2

Two public microarray cohorts that ship inside Debian's Bioconductor packages
(no download): bladderbatch's bladderEset (57 bladder profiles, HG-U133A, RMA;
groups: the 5 processing batches) and the HG-U133A half of GSE781 in GEOquery's
extdata (17 kidney profiles, MAS5 signal, log2(v + 1) in prepare; groups: the
10 patients, tumour and adjacent normal). Steps, each skipped when its output
exists:

1. extract: Rscript writes bladderbatch's matrix and sample table; GSE781's
   SOFT file is read here. Tables go under --data (never into the repository).
2. prepare (configs/prepare/bioc_cohort.py, D-GEX maps): a random 60/20/20
   split, and a grouped one. lsmtl_jax.prepare has no group-aware split here,
   so the grouped split is three datasets prepared from the samples of the
   train / val / test groups: train with split.mode=train, the other two with
   reference_dataset=<train> and split.mode=val / test; training reads them
   with data.val_path / data.test_path (the cross-platform setting).
3. train with configs/demo_small_cohort.py's settings (2 x 512 DenseNet,
   dropout 0.3, k = 128, 200 steps, patience 4) on the real data: lam in
   {0, 0.01, 0.1} (always explicit), seeds 0-2, and LSR. The cohorts are
   tiny, so the batch is 64 capped at the largest power of two that fits the
   training split.
4. tabulate: real_cohorts.md in --workdir (test MAE per lam and seed, gain
   vs lam = 0 per seed, mean +- sd, LSR).
"""

import argparse
import concurrent.futures
import gzip
import json
import os
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GSE781 = "/usr/lib/R/site-library/GEOquery/extdata/GSE781_family.soft.gz"
LAMS = (0.0, 0.01, 0.1)
SEEDS = (0, 1, 2)
# Grouped splits: which groups validate and test (the rest train).
GROUPED = {
    "bladderbatch": dict(val=("3", "4"), test=("1",)),
    "gse781": dict(val=("023", "2"), test=("035", "1", "3")),
}

BLADDER_R = r"""
suppressMessages({library(Biobase); library(bladderbatch)})
data(bladderdata)
out <- commandArgs(trailingOnly = TRUE)[1]
x <- exprs(bladderEset)
write.table(data.frame(probe = rownames(x), x, check.names = FALSE),
            file.path(out, "expr.tsv"), sep = "\t", quote = FALSE, row.names = FALSE)
p <- pData(bladderEset)
write.table(data.frame(sample = rownames(p), group = p$batch, cancer = p$cancer),
            file.path(out, "samples.tsv"), sep = "\t", quote = FALSE, row.names = FALSE)
cat(as.character(packageVersion("bladderbatch")), file = file.path(out, "version.txt"))
"""


def _write_table(path, probes, samples, values):
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write("probe\t" + "\t".join(samples) + "\n")
    for probe, row in zip(probes, values):
      f.write(probe + "\t" + "\t".join(f"{v:.6g}" for v in row) + "\n")
  os.replace(tmp, path)


def extract_bladderbatch(out):
  subprocess.run(["Rscript", "-e", BLADDER_R, out], check=True)


def extract_gse781(out, soft=GSE781):
  """The GPL96 (HG-U133A) samples of GSE781; group = patient (title minus N/C)."""
  samples, columns, meta, current = [], {}, [], None
  with gzip.open(soft, "rt") as f:
    in_table = False
    for line in f:
      line = line.rstrip("\n")
      if line.startswith("^SAMPLE = "):
        current = dict(id=line.split(" = ")[1])
      elif current is not None and line.startswith("!Sample_title = "):
        current["title"] = line.split(" = ")[1]
      elif current is not None and line.startswith("!Sample_platform_id = "):
        current["platform"] = line.split(" = ")[1]
      elif line == "!sample_table_begin":
        in_table, table = True, {}
      elif line == "!sample_table_end":
        in_table = False
        if current.get("platform") == "GPL96":
          samples.append(current["id"])
          columns[current["id"]] = table
          title = current["title"].split()[0]
          meta.append((current["id"], title[1:], title[0]))
      elif in_table and not line.startswith("ID_REF"):
        probe, value = line.split("\t")[:2]
        table[probe] = float(value) if value not in ("", "null") else np.nan
  probes = sorted(columns[samples[0]])
  values = np.array([[columns[s].get(p, np.nan) for s in samples] for p in probes])
  _write_table(os.path.join(out, "expr.tsv"), probes, samples, values)
  with open(os.path.join(out, "samples.tsv"), "w") as f:
    f.write("sample\tgroup\ttissue\n")
    for sid, group, tissue in meta:
      f.write(f"{sid}\t{group}\t{'tumour' if tissue == 'C' else 'normal'}\n")


def read_samples(path):
  with open(path) as f:
    next(f)
    return [line.rstrip("\n").split("\t") for line in f]


def write_grouped(cohort_dir, name):
  """expr_<split>.tsv: the expression columns of each split's groups."""
  rows = read_samples(os.path.join(cohort_dir, "samples.tsv"))
  split_of = {}
  for sample, group, *_ in rows:
    split = next((s for s in ("val", "test") if group in GROUPED[name][s]), "train")
    split_of[sample] = split
  with open(os.path.join(cohort_dir, "expr.tsv")) as f:
    header = f.readline().rstrip("\n").split("\t")
    body = [line.rstrip("\n").split("\t") for line in f]
  counts = {}
  for split in ("train", "val", "test"):
    keep = [0] + [i for i, s in enumerate(header) if split_of.get(s) == split]
    counts[split] = len(keep) - 1
    path = os.path.join(cohort_dir, f"expr_{split}.tsv")
    with open(path + ".tmp", "w") as f:
      for row in [header] + body:
        f.write("\t".join(row[i] for i in keep) + "\n")
    os.replace(path + ".tmp", path)
  return counts


def run(cmd, log):
  with open(log, "w") as f:
    subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT, cwd=REPO,
                   env=dict(os.environ, PYTHONPATH=REPO))


def prepare(args, name, cohort_dir):
  base = [sys.executable, "-m", "lsmtl_jax.prepare", "--config=configs/prepare/bioc_cohort.py",
          f"--config.genes.landmark_map={os.path.abspath(args.landmark_map)}",
          f"--config.genes.target_map={os.path.abspath(args.target_map)}"]
  if name == "gse781":
    base.append("--config.input.transform=log2p1")  # MAS5 signal, not log
  out = os.path.join(args.workdir, "data", name)
  os.makedirs(out, exist_ok=True)
  jobs = [("random", "expr.tsv", [])]
  jobs += [("grouped_train", "expr_train.tsv", ["--config.split.mode=train"])]
  jobs += [(f"grouped_{s}", f"expr_{s}.tsv",
            [f"--config.reference_dataset={out}/grouped_train", f"--config.split.mode={s}"])
           for s in ("val", "test")]
  for tag, table, extra in jobs:
    if not os.path.exists(os.path.join(out, tag)):
      run(base + [f"--config.input.path={cohort_dir}/{table}", f"--config.output={out}/{tag}"]
          + extra, os.path.join(out, tag + ".log"))
  return out



def train_jobs(args, name, data):
  jobs = []
  for kind in args.kinds:
    path = f"{data}/random" if kind == "random" else f"{data}/grouped_train"
    data_flags = [f"--config.data.path={path}"]
    if kind == "grouped":
      data_flags += [f"--config.data.val_path={data}/grouped_val",
                     f"--config.data.test_path={data}/grouped_test"]
    batch = min(64, 2 ** int(np.log2(args.n_train[(name, kind)])))
    common = [sys.executable, "-m", "lsmtl_jax.main", "--config=configs/demo_small_cohort.py",
              "--config.data.synthetic.enabled=False", "--config.data.max_train=0",
              "--config.compare_with=()", f"--config.train.batch_size={batch}",
              "--config.report=False"] + data_flags
    for lam in args.lams:
      for seed in SEEDS:
        jobs.append(((name, kind, lam, seed), common + [
            "--config.method=deep_lsmtl", f"--config.lsmtl.lam={lam}", f"--config.seed={seed}"]))
    if args.lsr:
      jobs.append(((name, kind, "lsr", 0), common + ["--config.method=lsr"]))
  return jobs


def run_train(args, key, cmd):
  name, kind, lam, seed = key
  workdir = os.path.join(args.workdir, name, kind, f"lam{lam}_seed{seed}")
  results = os.path.join(workdir, "results.json")
  if args.skip_running and os.path.isdir(workdir) and not os.path.exists(results):
    return key, None  # another invocation is training it; rerun to tabulate
  if not os.path.exists(results):
    os.makedirs(os.path.dirname(workdir), exist_ok=True)
    run(cmd + [f"--workdir={workdir}"], workdir + ".log")
  with open(results) as f:
    return key, json.load(f)["splits"]["test"]["mae_mean"]


def _fmt_gain(gains):
  return f"{np.mean(gains):+.2f} ± {np.std(gains, ddof=1):.2f} %"


def tabulate(args, maes, info):
  lines = [f"Test MAE (standardized units), configs/demo_small_cohort.py settings, "
           f"seeds {', '.join(map(str, SEEDS))}; gain = (MAE(lam = 0) - MAE) / MAE(lam = 0).", ""]
  for name in args.cohorts:
    for kind in args.kinds:
      i = info[(name, kind)]
      lines += [f"### {name}, {kind} split ({i['train']} / {i['val']} / {i['test']} profiles, "
                f"{i['landmarks']} landmarks, {i['targets']} targets; batch {i['batch']})", "",
                "| lam | " + " | ".join(f"seed {s}" for s in SEEDS) + " | gain per seed | mean gain ± sd |",
                "|---|" + "---|" * (len(SEEDS) + 2)]
      base = [maes.get((name, kind, 0.0, s)) for s in SEEDS]
      for lam in LAMS:
        row = [maes.get((name, kind, lam, s)) for s in SEEDS]
        if all(m is None for m in row):
          lines.append(f"| {lam:g} | " + " | ".join("not run" for _ in SEEDS) + " | - | - |")
          continue
        gains = [100 * (b - m) / b for b, m in zip(base, row) if None not in (b, m)]
        cells = " | ".join("not run" if m is None else f"{m:.4f}" for m in row)
        per = " / ".join(f"{g:+.2f}" for g in gains) if lam else "-"
        mean = _fmt_gain(gains) if lam and len(gains) > 1 else "-"
        lines.append(f"| {lam:g} | {cells} | {per} | {mean} |")
      lsr = maes.get((name, kind, "lsr", 0))
      lines += ["", f"LSR: {'not run' if lsr is None else f'{lsr:.4f}'}", ""]
  return "\n".join(lines)


def dataset_info(path):
  with open(os.path.join(path, "meta.json")) as f:
    meta = json.load(f)
  return meta


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data", required=True, help="scratch folder for the extracted tables")
  parser.add_argument("--landmark_map", required=True, help="D-GEX's map_lm.txt")
  parser.add_argument("--target_map", required=True, help="D-GEX's map_tg.txt")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--jobs", type=int, default=1)
  parser.add_argument("--cohorts", default="bladderbatch,gse781")
  parser.add_argument("--skip_running", action="store_true",
                      help="skip runs whose workdir exists without results (started elsewhere)")
  parser.add_argument("--lams", default=",".join(map(str, LAMS)),
                      help="a subset of the lam values to train (the table reads all it finds)")
  parser.add_argument("--no_lsr", dest="lsr", action="store_false")
  parser.add_argument("--kinds", default="random,grouped", help="which splits to train on")
  args = parser.parse_args()
  args.cohorts, args.kinds = args.cohorts.split(","), args.kinds.split(",")
  args.lams = [float(v) for v in args.lams.split(",")]
  args.workdir = os.path.abspath(args.workdir)
  start = time.time()
  datasets, args.n_train, info = {}, {}, {}
  for name in args.cohorts:
    cohort_dir = os.path.join(os.path.abspath(args.data), name)
    if not os.path.exists(os.path.join(cohort_dir, "samples.tsv")):
      os.makedirs(cohort_dir, exist_ok=True)
      {"bladderbatch": extract_bladderbatch, "gse781": extract_gse781}[name](cohort_dir)
    counts = write_grouped(cohort_dir, name)
    datasets[name] = prepare(args, name, cohort_dir)
    for kind in ("random", "grouped"):
      meta = dataset_info(os.path.join(datasets[name], "random" if kind == "random" else "grouped_train"))
      sizes = ({s: len(meta["splits"][s]) for s in ("train", "val", "test")} if kind == "random"
               else counts)
      args.n_train[(name, kind)] = sizes["train"]
      info[(name, kind)] = dict(sizes, landmarks=len(meta["landmarks"]["ids"]),
                                targets=len(meta["targets"]["ids"]),
                                batch=min(64, 2 ** int(np.log2(sizes["train"]))))
  print(f"extract + prepare: {time.time() - start:.0f} s", flush=True)
  jobs = [j for name in args.cohorts for j in train_jobs(args, name, datasets[name])]
  maes = {}
  with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
    for key, mae in pool.map(lambda j: run_train(args, *j), jobs):
      maes[key] = mae
      print(key, "running elsewhere" if mae is None else f"{mae:.4f}", flush=True)
  for name in args.cohorts:
    for kind in args.kinds:
      for lam in list(LAMS) + ["lsr"]:
        for seed in SEEDS if lam != "lsr" else (0,):
          path = os.path.join(args.workdir, name, kind, f"lam{lam}_seed{seed}", "results.json")
          if (name, kind, lam, seed) not in maes and os.path.exists(path):
            with open(path) as f:
              maes[(name, kind, lam, seed)] = json.load(f)["splits"]["test"]["mae_mean"]
  if None in maes.values():
    print("not tabulated: some runs are still training elsewhere")
    return
  table = tabulate(args, maes, info)
  table += f"\nWall time: {time.time() - start:.0f} s at --jobs={args.jobs}.\n"
  with open(os.path.join(args.workdir, "real_cohorts.md"), "w") as f:
    f.write(table)
  print(table)


if __name__ == "__main__":
  main()
