"""The bad-input catalogue: malformed inputs across prepare, main, predict and the
configs. Each must exit with code 2 and one clear `error:` line naming the
problem, leave its inputs byte-for-byte unchanged, and leave no output that a
later step would accept."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

from lsmtl_jax.data import formats
from lsmtl_jax.data import store

from conftest import REPO
from test_prepare import _bad_inputs as prepare_bad_inputs

ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}


def _run(module, *args, env=None, cwd=REPO):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True,
                        text=True, timeout=300, env={**ENV, **(env or {})})


def _checksums(paths):
  out = {}
  for root in paths:
    files = [root] if os.path.isfile(root) else [
        os.path.join(d, f) for d, _, names in os.walk(root) for f in names]
    for f in files:
      out[f] = hashlib.sha256(open(f, "rb").read()).hexdigest()
  return out


def _assert_refused(proc, needle):
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert len(errors) == 1, proc.stderr[-3000:]
  assert needle in errors[0], errors[0]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """A finished tiny run, its dataset and a landmark GCTx for predict."""
  root = tmp_path_factory.mktemp("bad")
  cache = root / "cache"
  run = root / "run"
  proc = _run("lsmtl_jax.main", "--config=configs/tiny.py", f"--workdir={run}",
              f"--config.data.cache_dir={cache}", "--config.train.num_steps=8")
  assert proc.returncode == 0, proc.stderr[-3000:]
  dataset_dir = [os.path.join(cache, d) for d in os.listdir(cache)][0]
  ds = store.open_dataset(dataset_dir)
  rows = ds.read_rows(ds.split("val")[:10])[:, :ds.num_landmarks]
  scale = np.asarray(ds.meta["standardization"]["std"])[:ds.num_landmarks] + 1e-3
  mean = np.asarray(ds.meta["standardization"]["mean"])[:ds.num_landmarks]
  landmarks = root / "landmarks.gctx"
  formats.write_gctx(str(landmarks), rows * scale + mean, [f"S{i}" for i in range(10)],
                     ds.meta["landmarks"]["ids"])
  missing = root / "missing_landmark.gctx"
  formats.write_gctx(str(missing), (rows * scale + mean)[:, 1:], [f"S{i}" for i in range(10)],
                     ds.meta["landmarks"]["ids"][1:])
  return {"root": root, "cache": str(cache), "run": str(run), "dataset": dataset_dir,
          "landmarks": str(landmarks), "missing": str(missing)}


MAIN_CASES = [
    ("mask rate", ["--config.lsmtl.mask_rate=1.5"], {}, "lsmtl.mask_rate must be in [0, 1)"),
    ("negative width", ["--config.model.hidden=-3"], {}, "model.hidden must be positive"),
    ("negative depth", ["--config.model.depth=-1"], {}, "model.depth must be at least 1"),
    ("dropout", ["--config.model.dropout=1.0"], {}, "model.dropout must be in [0, 1)"),
    ("negative lambda", ["--config.lsmtl.lam=-0.1"], {}, "lsmtl.lam must be 'auto' or a number >= 0"),
    ("zero bottleneck", ["--config.lsmtl.bottleneck=0"], {}, "lsmtl.bottleneck must be positive"),
    ("unknown method", ["--config.method=magic"], {}, "method must be one of"),
    ("mask per", ["--config.lsmtl.mask_per=row"], {}, "lsmtl.mask_per must be"),
    ("batch size", ["--config.train.batch_size=0"], {}, "train.batch_size must be positive"),
    ("nonfinite mode", ["--config.train.nonfinite=ignore"], {}, "train.nonfinite must be"),
    ("misspelled override", ["--config.model.hiden=3"], {}, "hiden"),
    ("override type", ["--config.model.hidden=wide"], {}, "config.model.hidden"),
    ("mesh vs devices", ["--config.mesh.data=3"], {}, "needs 3 devices, found 1"),
    ("batch vs data axis", ["--config.mesh.data=2", "--config.train.batch_size=33"],
     {"JAX_NUM_CPU_DEVICES": "2"}, "train.batch_size=33 is not divisible by the data axis (2)"),
    ("model axis vs targets", ["--config.mesh.model=2", "--config.mesh.data=1",
                               "--config.mesh.target_multiple=41"],
     {"JAX_NUM_CPU_DEVICES": "2"}, "does not divide the 41 padded targets"),
]


@pytest.mark.parametrize("name, args, extra_env, needle", MAIN_CASES,
                         ids=[c[0] for c in MAIN_CASES])
def test_main_config_errors(env, tmp_path, name, args, extra_env, needle):
  workdir = tmp_path / "w"
  before = _checksums([env["dataset"]])
  proc = _run("lsmtl_jax.main", "--config=configs/tiny.py", f"--workdir={workdir}",
              f"--config.data.cache_dir={env['cache']}", *args, env=extra_env)
  _assert_refused(proc, needle)
  assert not (workdir / "results.json").exists()
  assert not (workdir / "checkpoints").exists()
  assert _checksums([env["dataset"]]) == before


def test_main_data_errors(env, tmp_path):
  empty = tmp_path / "empty_dir"
  empty.mkdir()
  broken = tmp_path / "broken"
  shutil.copytree(env["dataset"], broken)
  (broken / "meta.json").write_text("{ not json")
  other = tmp_path / "other_genes"
  shutil.copytree(env["dataset"], other)
  meta = json.loads((other / "meta.json").read_text())
  meta["targets"]["ids"] = meta["targets"]["ids"][::-1]
  (other / "meta.json").write_text(json.dumps(meta))
  cases = [
      (["--config=configs/geo.py"], "config.data.path is empty"),
      (["--config=configs/geo.py", f"--config.data.path={tmp_path / 'nope'}"],
       "prepared dataset not found"),
      (["--config=configs/geo.py", f"--config.data.path={empty}"], "meta.json: missing"),
      (["--config=configs/geo.py", f"--config.data.path={broken}"], "not valid JSON"),
      (["--config=configs/tiny.py", f"--config.data.cache_dir={env['cache']}",
        f"--config.data.test_path={other}"], "targets differ from the training dataset"),
      (["--config=/nonexistent/config.py"], "nonexistent/config.py"),
  ]
  before = _checksums([env["dataset"], broken, other])
  for i, (args, needle) in enumerate(cases):
    workdir = tmp_path / f"w{i}"
    _assert_refused(_run("lsmtl_jax.main", f"--workdir={workdir}", *args), needle)
    assert not (workdir / "results.json").exists()
  assert _checksums([env["dataset"], broken, other]) == before


def test_main_refuses_a_workdir_of_another_config(env, tmp_path):
  workdir = tmp_path / "copy"
  shutil.copytree(env["run"], workdir)
  before = _checksums([workdir])
  proc = _run("lsmtl_jax.main", "--config=configs/tiny.py", f"--workdir={workdir}",
              f"--config.data.cache_dir={env['cache']}", "--config.train.num_steps=8",
              "--config.lsmtl.bottleneck=4")
  _assert_refused(proc, "holds checkpoints of a different config")
  assert _checksums([workdir]) == before  # config.json included


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
def test_training_onto_a_full_disk_is_one_line_and_the_same_command_resumes(env, tmp_path):
  # /dev/full fails every write with ENOSPC, as a full disk does: the metrics
  # file pointed at it makes training meet a real "no space left" mid-run.
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "metrics.jsonl").symlink_to("/dev/full")
  args = ("--config=configs/tiny.py", f"--workdir={workdir}",
          f"--config.data.cache_dir={env['cache']}", "--config.train.num_steps=8")
  proc = _run("lsmtl_jax.main", *args)
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert errors == [f"error: {workdir}: no space left on device; free some and run the "
                    "same command again (it resumes from the last checkpoint)"]
  assert "Traceback" not in proc.stderr
  (workdir / "metrics.jsonl").unlink()  # space freed
  proc = _run("lsmtl_jax.main", *args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads((workdir / "results.json").read_text())


def test_disk_full_is_found_behind_the_wrappers_libraries_add():
  from lsmtl_jax import fileio  # pylint: disable=g-import-not-at-top
  try:
    with open("/dev/full" if os.path.exists("/dev/full") else os.devnull, "w") as f:
      f.write("x")
  except OSError as e:
    real = e
  else:  # no /dev/full: the error the kernel would give
    real = OSError(28, os.strerror(28))
  assert fileio.disk_full(real) is real
  try:
    try:
      raise real
    except OSError as e:
      raise RuntimeError("checkpoint save failed") from e
  except RuntimeError as wrapped:
    assert fileio.disk_full(wrapped) is real
  only_message = ValueError(f"write failed: [Errno 28] {os.strerror(28)}")
  assert fileio.disk_full(only_message).errno == 28
  assert fileio.disk_full(OSError(13, os.strerror(13))) is None
  assert fileio.disk_full(ValueError("bad value")) is None


def _prepare_flags(cfg):
  return ["--config=configs/prepare/default.py", f"--config.input.path={cfg.input.path}",
          f"--config.input.format={cfg.input.format}", f"--config.output={cfg.output}",
          f"--config.genes.landmark_map={cfg.genes.landmark_map}",
          f"--config.genes.target_map={cfg.genes.target_map}",
          f"--config.genes.copy_targets={cfg.genes.copy_targets}",
          f"--config.nonfinite={cfg.nonfinite}"]


def test_prepare_errors(tmp_path):
  cases, inputs = prepare_bad_inputs(tmp_path)
  assert len(cases) >= 12
  paths = inputs + [c.input.path for _, c, _ in cases if os.path.exists(c.input.path)]
  before = _checksums(paths)
  for name, cfg, needle in cases:
    proc = _run("lsmtl_jax.prepare", *_prepare_flags(cfg))
    _assert_refused(proc, needle)
    assert not os.path.exists(cfg.output), name
    leftovers = [p for p in os.listdir(os.path.dirname(cfg.output)) if ".tmp-" in p]
    assert not leftovers, (name, leftovers)
  assert _checksums(paths) == before


def test_predict_errors(env, tmp_path):
  unfinished = tmp_path / "unfinished"
  unfinished.mkdir()
  shutil.copy(os.path.join(env["run"], "config.json"), unfinished / "config.json")
  exists = tmp_path / "exists.gctx"
  exists.write_text("keep me")
  unknown = tmp_path / "profiles.xyz"
  unknown.write_text("1 2 3\n")
  cases = [
      ([f"--workdir={env['run']}", f"--input={env['missing']}"], "missing", "LM00000"),
      ([f"--workdir={unfinished}", f"--input={env['landmarks']}"], "out", "has not finished"),
      ([f"--workdir={env['run']}", f"--input={env['landmarks']}", f"--output={exists}"], None,
       "already exists; pass --overwrite"),
      ([f"--workdir={env['run']}", f"--input={unknown}"], "out", "cannot tell the format"),
      ([f"--workdir={env['run']}", f"--input={env['landmarks']}", "--input_units=standardized"],
       "out", "values look unnormalized"),
      ([f"--workdir={tmp_path / 'no_run'}", f"--input={env['landmarks']}"], "out", "no_run"),
  ]
  watched = [env["landmarks"], env["missing"], str(exists), str(unknown), env["run"]]
  before = _checksums(watched)
  for i, (args, out_name, needle) in enumerate(cases):
    output = [] if out_name is None else [f"--output={tmp_path / f'{out_name}{i}.gctx'}"]
    _assert_refused(_run("lsmtl_jax.predict", *args, *output), needle)
    if out_name is not None:
      assert not os.path.exists(tmp_path / f"{out_name}{i}.gctx")
  assert _checksums(watched) == before
  assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


# ----------------------------------------------------------------------------
# predict and prepare by class of bad input, table-driven. Every case: exit 2,
# exactly one `error:` line holding the needle, every input's sha256 unchanged,
# no output and no temporary left.
# ----------------------------------------------------------------------------

CLASSES = ("empty input", "odd output", "damaged dataset", "bad flag", "bad field value")


def _temps(*dirs):
  return [os.path.join(d, p) for d in dirs if os.path.isdir(d) for p in os.listdir(d)
          if ".tmp" in p]


def _check_refused(module, args, needle, watched, out_dirs, outputs):
  before = _checksums(watched)
  existed = {o: os.path.lexists(o) for o in outputs}
  proc = _run(module, *args)
  _assert_refused(proc, needle)
  assert _checksums(watched) == before
  for o in outputs:
    assert os.path.lexists(o) == existed[o], o  # nothing new at the output
  assert not _temps(*out_dirs), _temps(*out_dirs)
  return proc


def _unwritable_dir(root):
  """A folder no file can be created in: read-only for a user, /proc for root."""
  if os.geteuid() == 0:
    return "/proc", "cannot write in /proc"
  d = root / "readonly"
  d.mkdir()
  d.chmod(0o500)
  return str(d), "is not writable"


def _dead_pid():
  proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  return int(proc.stdout)


def _gzip(src, dst):
  import gzip
  with open(src, "rb") as f, gzip.open(dst, "wb") as g:
    g.write(f.read())


def _damaged_copies(dataset_dir, root):
  """name -> (damaged copy of a dataset, text its error must hold)."""
  out = {}
  def copy(name):
    d = root / name
    shutil.copytree(dataset_dir, d)
    return d
  d = copy("meta_lists")
  meta = json.loads((d / "meta.json").read_text())
  meta["sample_ids"].pop()
  (d / "meta.json").write_text(json.dumps(meta))
  out["meta lists"] = (d, f"sample_ids has {len(meta['sample_ids'])} entries")
  d = copy("meta_json")
  (d / "meta.json").write_text((d / "meta.json").read_text()[:-40])
  out["meta not json"] = (d, "not valid JSON")
  d = copy("lost_shard")
  os.remove(d / store.ARRAY_NAME / "c" / "0" / "0")
  last = min(store.open_dataset(str(dataset_dir)).num_samples, store.SHARD_ROWS) - 1
  out["lost shard"] = (d, f"damaged dataset: rows 0-{last} (shard file "
                          "expression.zarr/c/0/0) are missing")
  d = copy("truncated_shard")
  with open(d / store.ARRAY_NAME / "c" / "0" / "0", "r+b") as f:
    f.truncate(1000)
  out["truncated shard"] = (d, "the file has 1000 bytes")
  return out


def _predict_cases(env, root):
  """{class: [(name, args, needle)]}, outputs under root/'out'."""
  ds = store.open_dataset(env["dataset"])
  lm_ids = ds.meta["landmarks"]["ids"]
  out = root / "out"
  out.mkdir()
  run = [f"--workdir={env['run']}"]
  land = f"--input={env['landmarks']}"
  cases = {c: [] for c in CLASSES}

  def add(cls, name, args, needle):
    cases[cls].append((name, args, needle))

  # Empty input.
  empty_gctx = root / "empty.gctx"
  formats.write_gctx(str(empty_gctx), np.zeros((0, len(lm_ids))), [], lm_ids)
  add("empty input", "gctx of 0 profiles", run + [f"--input={empty_gctx}"],
      f"{empty_gctx}: no profiles (0 samples)")
  empty_gct = root / "empty.gct"
  empty_gct.write_text(f"#1.3\n{len(lm_ids)}\t0\t0\t0\nid\n" + "\n".join(lm_ids) + "\n")
  add("empty input", "gct of 0 profiles", run + [f"--input={empty_gct}"],
      f"{empty_gct}: no profiles (0 samples)")
  empty_npy = root / "empty.npy"
  np.save(empty_npy, np.zeros((0, len(lm_ids)), np.float32))
  (root / "lm_ids.txt").write_text("\n".join(lm_ids) + "\n")
  add("empty input", "npy of 0 profiles",
      run + [f"--input={empty_npy}", f"--gene_ids={root / 'lm_ids.txt'}"],
      f"{empty_npy}: no profiles (0 samples)")
  no_genes = root / "no_genes.csv"
  no_genes.write_text("id,S0,S1\n")
  add("empty input", "csv without genes", run + [f"--input={no_genes}"],
      f"{no_genes}: no data lines")
  zero = root / "zero_bytes.gctx"
  zero.write_bytes(b"")
  add("empty input", "0-byte file", run + [f"--input={zero}"], "not a readable HDF5")

  # Unwritable or odd output.
  a_dir = out / "a_dir.gctx"
  a_dir.mkdir()
  add("odd output", "a directory", run + [land, f"--output={a_dir}"], "is a directory")
  add("odd output", "a directory, --overwrite", run + [land, f"--output={a_dir}",
                                                      "--overwrite"], "is a directory")
  fifo = out / "fifo.gctx"
  os.mkfifo(fifo)
  add("odd output", "not a regular file", run + [land, f"--output={fifo}", "--overwrite"],
      "exists and is not a regular file")
  a_file = out / "a_file.txt"
  a_file.write_text("keep me")
  add("odd output", "under a file", run + [land, f"--output={a_file / 'p.gctx'}"],
      "is not a directory")
  add("odd output", "missing folder", run + [land, f"--output={out / 'nope' / 'p.gctx'}"],
      "does not exist")
  add("odd output", "compressed name", run + [land, f"--output={out / 'p.gct.gz'}"],
      "compressed output is not written")
  add("odd output", "exists", run + [land, f"--output={a_file}"],
      "already exists; pass --overwrite")
  add("odd output", "the input itself", run + [land, f"--output={env['landmarks']}",
                                               "--overwrite"], "is the input")
  ro, ro_needle = _unwritable_dir(root)
  add("odd output", "unwritable folder", run + [land, f"--output={ro}/p.gctx"], ro_needle)

  # The run's dataset damaged: a copy of the run pointed at a damaged copy of its cache.
  for i, (name, (damaged, needle)) in enumerate(_damaged_copies(env["dataset"], root).items()):
    cache = root / f"cache{i}"
    cache.mkdir()
    os.rename(damaged, cache / os.path.basename(env["dataset"]))
    workdir = root / f"run{i}"
    shutil.copytree(env["run"], workdir)
    config = json.loads((workdir / "config.json").read_text())
    assert config["data"]["cache_dir"] == env["cache"]
    config["data"]["cache_dir"] = str(cache)
    (workdir / "config.json").write_text(json.dumps(config))
    add("damaged dataset", name, [f"--workdir={workdir}", land], needle)

  # Flags.
  add("bad flag", "unknown", run + [land, "--bogus"], "Unknown command line flag 'bogus'")
  add("bad flag", "enum", run + [land, "--input_units=raw"], "--input_units=raw")
  add("bad flag", "not a number", run + [land, "--batch_size=many"], "--batch_size=many")
  add("bad flag", "required", run, "--input")
  add("bad flag", "stray argument", run + [land, "extra"], "unexpected arguments")

  # Values.
  add("bad field value", "threshold", run + [land, "--threshold=2"],
      "--threshold is a validation CC, in [-1, 1]")
  add("bad field value", "block rows", run + [land, "--block_rows=0"],
      "--block_rows and --batch_size must be positive")
  add("bad field value", "output format", run + [land, "--output_format=xls"],
      "unknown output format 'xls'")
  add("bad field value", "input format", run + [land, "--input_format=xml"],
      "unknown format 'xml'")
  unknown = root / "profiles.xyz"
  unknown.write_text("1 2 3\n")
  add("bad field value", "unknown extension", run + [f"--input={unknown}"],
      "cannot tell the format from the name (.gctx/.h5/.hdf5 (GCTx or ARCHS4), .h5ad, .gct, "
      ".csv/.tsv/.txt or .npy); "
      "set --input_format")
  gz = root / "profiles.gct.gz"
  gct = root / "profiles.gct"
  with formats.open_matrix(env["landmarks"]) as m:
    formats.write_gct(str(gct), m.read_rows(0, m.num_samples), m.sample_ids, m.gene_ids)
  _gzip(gct, gz)
  add("bad field value", ".gct.gz input", run + [f"--input={gz}"],
      f"{gz}: a compressed (.gz) file; decompress it first")
  add("bad field value", ".gz named .gct", run + [f"--input={gz}", "--input_format=gct"],
      "a compressed file; decompress it first")
  other_ids = root / "other_ids.gctx"
  with formats.open_matrix(env["landmarks"]) as m:
    formats.write_gctx(str(other_ids), m.read_rows(0, m.num_samples), m.sample_ids,
                       [f"ENSG{i:011d}" for i in range(m.num_genes)])
  for extra in ([], ["--impute_missing"]):
    add("bad field value", f"no landmark {extra}", run + [f"--input={other_ids}", *extra],
        "none of the run's")
  return cases


@pytest.mark.parametrize("cls", CLASSES)
def test_predict_refuses_by_class(env, tmp_path, cls):
  cases = _predict_cases(env, tmp_path)[cls]
  assert len(cases) >= 4, cls
  inputs = [env["landmarks"], env["missing"], env["run"], env["dataset"],
            str(tmp_path / "out" / "a_file.txt")] + sorted(
                str(p) for p in tmp_path.iterdir() if p.name != "out")
  out_dirs = [str(tmp_path), str(tmp_path / "out"), os.path.dirname(env["landmarks"])]
  for i, (name, args, needle) in enumerate(cases):
    if not any(a.startswith("--output=") for a in args):
      args = args + [f"--output={tmp_path / 'out' / f'pred{i}.gctx'}"]
    output = next(a.split("=", 1)[1] for a in args if a.startswith("--output="))
    proc = _check_refused("lsmtl_jax.predict", args, needle,
                          [p for p in inputs if os.path.exists(p)], out_dirs, [output])
    error = next(l for l in proc.stderr.splitlines() if l.startswith("error:"))
    if name.startswith("no landmark"):  # the hint must not send you to a flag that fails
      assert "--impute_missing" not in error, error


def _prepare_cases(tmp):
  """({class: [(name, flags, needle)]}, inputs): one valid input, outputs under tmp/'out';
  a case's flags follow the valid ones (the last --config.FIELD=VALUE wins)."""
  from test_prepare import _case, _config
  data, lm, tg = _case(tmp, n=40)
  out = tmp / "out"
  out.mkdir()
  good = _prepare_flags(_config(data, lm, tg, out / "ds"))
  cases = {c: [] for c in CLASSES}

  def add(cls, name, needle, *flags, base=good):
    cases[cls].append((name, [*base, *flags], needle))

  # Empty input.
  with h5py.File(data, "r") as f:
    rows = f["0/META/ROW/id"][()]
  empty = tmp / "empty.gctx"
  with h5py.File(empty, "w") as f:
    f["0/DATA/0/matrix"] = np.zeros((0, len(rows)), np.float32)
    f["0/META/ROW/id"], f["0/META/COL/id"] = rows, np.array([], "S1")
  add("empty input", "gctx of 0 samples", f"{empty}: no samples", f"--config.input.path={empty}")
  no_rows = tmp / "no_rows.tsv"
  no_rows.write_text("id\tS0\tS1\n")
  add("empty input", "table without genes", f"{no_rows}: no data lines",
      f"--config.input.path={no_rows}", "--config.input.format=table")
  zero = tmp / "zero.gctx"
  zero.write_bytes(b"")
  add("empty input", "0-byte file", "not a readable HDF5", f"--config.input.path={zero}")

  # Odd output.
  exists = out / "exists"
  exists.mkdir()
  add("odd output", "existing folder", "output already exists", f"--config.output={exists}")
  a_file = out / "a_file.txt"
  a_file.write_text("keep me")
  add("odd output", "existing file", "output already exists", f"--config.output={a_file}")
  add("odd output", "under a file", f"{a_file} is not a directory",
      f"--config.output={a_file / 'ds'}")
  add("odd output", "empty", "config: output is required", "--config.output=")
  add("odd output", "the input itself", "output already exists", f"--config.output={data}")
  ro, ro_needle = _unwritable_dir(tmp)
  add("odd output", "unwritable folder", ro_needle, f"--config.output={ro}/ds")

  # A damaged reference dataset (another platform's preparation reads it first).
  from lsmtl_jax.data import prepare_lib
  reference = prepare_lib.prepare(_config(data, lm, tg, tmp / "reference",
                                          **{"dedup.enabled": False}), log=lambda s: None)
  for name, (damaged, needle) in _damaged_copies(reference.path, tmp).items():
    add("damaged dataset", name, needle, f"--config.reference_dataset={damaged}",
        "--config.split.mode=test", "--config.genes.landmark_map=",
        "--config.genes.target_map=")

  # Flags.
  add("bad flag", "misspelled override", "--config.inptu.path: no config field 'inptu'; "
      "did you mean \"input\"", "--config.inptu.path=x")
  add("bad flag", "unknown", "Unknown command line flag 'bogus'", "--bogus")
  add("bad flag", "not a number", "--config.block_rows=abc", "--config.block_rows=abc")
  add("bad flag", "no config", "--config", base=[])
  add("bad flag", "stray argument", "unexpected arguments", "extra")

  # Values.
  add("bad field value", "nonfinite", "nonfinite must be error, impute or drop",
      "--config.nonfinite=ignore")
  add("bad field value", "block rows", "block_rows must be positive", "--config.block_rows=0")
  add("bad field value", "copy targets", "genes.copy_targets must be drop, error or keep",
      "--config.genes.copy_targets=maybe")
  add("bad field value", "input format", "unknown format 'xml'", "--config.input.format=xml")
  add("bad field value", "transform", "input.transform must be none, log2p1 or log2cpm1",
      "--config.input.transform=log")
  gz = tmp / "data.gctx.gz"
  _gzip(data, gz)
  add("bad field value", ".gz input", f"{gz}: a compressed (.gz) file; decompress it first",
      f"--config.input.path={gz}")
  unknown = tmp / "data.xyz"
  shutil.copy(data, unknown)
  add("bad field value", "unknown extension", "set input.format",
      f"--config.input.path={unknown}")
  return cases, [data, lm, tg, str(a_file)]


@pytest.mark.parametrize("cls", CLASSES)
def test_prepare_refuses_by_class(tmp_path, cls):
  cases, inputs = _prepare_cases(tmp_path)
  cases = cases[cls]
  assert len(cases) >= 3, cls
  watched = inputs + sorted(str(p) for p in tmp_path.iterdir() if p.name != "out")
  for name, args, needle in cases:
    outputs = [a.split("=", 1)[1] for a in args if a.startswith("--config.output=")]
    output = outputs[-1] if outputs else str(tmp_path / "out" / "ds")
    _check_refused("lsmtl_jax.prepare", args, needle, watched,
                   [str(tmp_path), str(tmp_path / "out")], [output] if output else [])


def test_ids_with_a_byte_order_mark_keep_their_first_id(env, tmp_path):
  """An id list saved by Excel starts with a UTF-8 BOM: it is not part of the first id."""
  ds = store.open_dataset(env["dataset"])
  lm_ids = ds.meta["landmarks"]["ids"]
  with formats.open_matrix(env["landmarks"]) as m:
    np.save(tmp_path / "p.npy", m.read_rows(0, m.num_samples))
    ids = m.gene_ids
  assert ids == lm_ids
  (tmp_path / "ids.txt").write_bytes(b"\xef\xbb\xbf" + "\r\n".join(ids).encode() + b"\r\n")
  out = tmp_path / "p.gctx"
  proc = _run("lsmtl_jax.predict", f"--workdir={env['run']}", f"--input={tmp_path / 'p.npy'}",
              f"--gene_ids={tmp_path / 'ids.txt'}", f"--output={out}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  with formats.open_matrix(str(out)) as m:
    assert m.gene_ids[0] == lm_ids[0]


def test_temporaries_of_killed_runs_are_removed_by_the_next(env, tmp_path):
  """A run killed mid-write leaves `.OUT.tmp-PID...`; the next run of the same output
  removes those whose process is gone, and leaves a live writer's alone."""
  dead, live = _dead_pid(), os.getpid()
  out = tmp_path / "p.gctx"
  stale = [tmp_path / f".p.gctx.tmp-{dead}", tmp_path / f".p.gctx.tmp-{dead}.genes"]
  for p in stale:
    p.write_bytes(b"half a file")
  mine = tmp_path / f".p.gctx.tmp-{live}.keep"
  mine.write_bytes(b"being written")
  proc = _run("lsmtl_jax.predict", f"--workdir={env['run']}", f"--input={env['landmarks']}",
              f"--output={out}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert out.is_file() and not any(p.exists() for p in stale) and mine.exists()
  with h5py.File(out, "r") as f:  # the real name, not the temporary one
    assert f.attrs["src"] == "p.gctx"

  # prepare: a half-written dataset folder of a killed run.
  from test_prepare import _case
  data, lm, tg = _case(tmp_path, n=30)
  half = tmp_path / f".ds.tmp-{dead}-x1y2z3"
  (half / store.ARRAY_NAME).mkdir(parents=True)
  (half / store.ARRAY_NAME / "zarr.json").write_text("{}")
  from test_prepare import _config
  cfg = _config(data, lm, tg, tmp_path / "ds")
  proc = _run("lsmtl_jax.prepare", *_prepare_flags(cfg))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert not half.exists() and store.open_dataset(str(tmp_path / "ds")).num_samples == 30
  assert mine.exists()


def test_predict_output_for_the_cmap_tools(env, tmp_path):
  """(Reuses this file's trained run.) The input's column metadata reach the GCTx and
  GCT outputs; numeric row metadata are numeric with CMap's -666 for missing; src is
  the output's own name."""
  with formats.open_matrix(env["landmarks"]) as m:
    values, samples, genes = m.read_rows(0, m.num_samples), m.sample_ids, m.gene_ids
  n = len(samples)
  col_meta = {"pert_iname": np.array([f"drug{i}" for i in range(n)], object),
              "pert_dose": np.where(np.arange(n) == 1, np.nan, np.arange(n) * 2.5),
              "plate": np.arange(n)}
  inp = tmp_path / "in.gctx"
  formats.write_gctx(str(inp), values, samples, genes, col_meta=col_meta)
  for name in ("out.gctx", "out.gct"):
    out = tmp_path / name
    proc = _run("lsmtl_jax.predict", f"--workdir={env['run']}", f"--input={inp}",
                f"--output={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    with formats.open_matrix(str(out)) as m:
      got = m.column_metadata()
    assert sorted(got) == sorted(col_meta), name
    assert got["pert_iname"].tolist() == col_meta["pert_iname"].tolist()
    np.testing.assert_array_equal(got["pert_dose"], col_meta["pert_dose"])
    np.testing.assert_array_equal(got["plate"], col_meta["plate"])
  with h5py.File(tmp_path / "out.gctx", "r") as f:
    assert f.attrs["src"] == "out.gctx"
    num_lm = int(f["0/META/ROW/is_landmark"][()].sum())
    for field in ("val_cc", "val_mae", "val_mae_z"):
      v = f[f"0/META/ROW/{field}"][()]
      assert v.dtype.kind == "f" and (v[:num_lm] == formats.MISSING).all(), field
      assert not np.isnan(v).any(), field  # NaN would make cmapPy read the field as text
    assert f["0/META/COL/pert_dose"][()][1] == formats.MISSING


# ----------------------------------------------------------------------------
# main, report, interpret, experiments and benchmark by class of bad input,
# table-driven like predict and prepare above. Every case: exit 2, exactly one
# `error:` line holding the needle, every input (datasets, runs, config files:
# each file and folder) unchanged, a finished run given as the workdir
# byte-identical (config.json included), nothing at a new output path and no
# temporary left. Each case fails in its checks, before any training or timing.
# ----------------------------------------------------------------------------

COMMAND_CLASSES = ("bad flag", "bad field value", "missing input", "odd output")


def _tree(root):
  """{path: sha256, 'dir' or 'link -> target'} of everything under root (root itself
  included), or {} when root does not exist."""
  out = {}
  if not os.path.lexists(root):
    return out
  entries = [str(root)]
  if os.path.isdir(root) and not os.path.islink(root):
    for d, dirs, names in os.walk(root):
      entries += [os.path.join(d, n) for n in dirs + names]
  for p in entries:
    if os.path.islink(p):
      out[p] = f"link -> {os.readlink(p)}"
    elif os.path.isdir(p):
      out[p] = "dir"
    elif os.path.isfile(p):
      out[p] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    else:
      out[p] = "special"
  return out



def _own_output(stderr: str) -> str:
  """stderr less the tracebacks Orbax's background reads print when a failed
  restore leaves them meeting a closed event loop (a known race after the one
  error line: asyncio's call_soon_threadsafe); the command's own output must
  hold no traceback."""
  blocks = stderr.split("Traceback (most recent call last):")
  kept = [blocks[0]] + [b for b in blocks[1:] if "asyncio/base_events.py" not in b]
  return "Traceback (most recent call last):".join(kept)

class _Cases:
  """{class: [(name, args, needle, run options)]} of one command, the inputs and
  outputs its cases touch."""

  def __init__(self, module, base=()):
    self.module, self.base = module, list(base)
    self.by_class = {c: [] for c in COMMAND_CLASSES}
    self.inputs = []  # files and folders every case must leave as they were
    self.absent = []  # paths no case may create
    self.out_dirs = []  # folders no temporary may be left in

  def add(self, cls, name, needle, *args, base=None, cwd=REPO, env=None):
    base = self.base if base is None else base
    self.by_class[cls].append((name, [*base, *args], needle, {"cwd": cwd, "env": env}))

  def check_refusals(self, cls, minimum=3):
    cases = self.by_class[cls]
    assert len(cases) >= minimum, (self.module, cls)
    inputs = sorted({str(p) for p in self.inputs})
    for name, args, needle, options in cases:
      before = {p: _tree(p) for p in inputs}
      proc = _run(self.module, *args, **options)
      errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
      assert proc.returncode == 2, (name, proc.stderr[-3000:])
      assert len(errors) == 1, (name, proc.stderr[-3000:])
      assert needle in errors[0], (name, errors[0])
      assert "Traceback" not in _own_output(proc.stderr), (name, proc.stderr[-3000:])
      for p in inputs:
        assert _tree(p) == before[p], (name, p)
      for p in self.absent:
        assert not os.path.lexists(p), (name, p)
      assert not _temps(*self.out_dirs), (name, _temps(*self.out_dirs))


def _package_only(root):
  """A PYTHONPATH that holds the package and not the repository, so `configs`
  is found only through --config's own folder (cli.add_config_root)."""
  d = root / "package_only"
  if not d.exists():
    d.mkdir()
    os.symlink(os.path.join(REPO, "lsmtl_jax"), d / "lsmtl_jax")
  return {"PYTHONPATH": str(d)}


def _run_copy(env, root, name, config_edit=None, remove=()):
  """A copy of the finished run, its config.json edited and some files removed."""
  d = root / name
  shutil.copytree(env["run"], d)
  if config_edit:
    config = json.loads((d / "config.json").read_text())
    config_edit(config)
    (d / "config.json").write_text(json.dumps(config))
  for rel in remove:
    p = d / rel
    shutil.rmtree(p) if p.is_dir() else p.unlink()
  return d


def _set(**fields):
  """A config.json edit: {'a__b': v} sets config['a']['b'] = v."""
  def edit(config):
    for dotted, value in fields.items():
      node = config
      *path, leaf = dotted.split("__")
      for part in path:
        node = node[part]
      node[leaf] = value
  return edit


def _main_cases(env, root):
  cases = _Cases("lsmtl_jax.main", ["--config=configs/tiny.py",
                                    f"--config.data.cache_dir={env['cache']}",
                                    "--config.train.num_steps=8"])
  work = _run_copy(env, root, "run")  # every case but the odd workdirs runs on it
  w = f"--workdir={work}"
  damaged = _damaged_copies(env["dataset"], root)
  other = root / "other_genes"
  shutil.copytree(env["dataset"], other)
  meta = json.loads((other / "meta.json").read_text())
  meta["targets"]["ids"] = meta["targets"]["ids"][::-1]
  (other / "meta.json").write_text(json.dumps(meta))
  a_file = root / "a_file.txt"
  a_file.write_text("keep me")
  cases.inputs += [work, env["dataset"], other, a_file, *(d for d, _ in damaged.values())]
  cases.out_dirs.append(str(root))
  geo = ["--config=configs/geo.py"]

  cases.add("bad flag", "unknown", "Unknown command line flag 'bogus'", w, "--bogus")
  cases.add("bad flag", "misspelled override", "--config.model.hiden: no config field 'hiden'",
            w, "--config.model.hiden=3")
  cases.add("bad flag", "not a number", "config.model.hidden", w, "--config.model.hidden=wide")
  cases.add("bad flag", "required", "--workdir")
  cases.add("bad flag", "stray argument", "unexpected arguments", w, "extra")

  cases.add("bad field value", "mesh", "mesh.data must be a positive number of devices or -1",
            w, "--config.mesh.data=0")
  cases.add("bad field value", "split name", "data.val_split must name a split", w,
            "--config.data.val_split=")
  cases.add("bad field value", "schedule", "optim.schedule must be one of", w,
            "--config.optim.schedule=linear")
  cases.add("bad field value", "synthetic size", "data.synthetic: num_samples must be at least",
            w, "--config.data.synthetic.num_samples=5")
  cases.add("bad field value", "memory guard", "out of memory: Deep-LSMTL needs about", w,
            "--config.memory.limit_gb=0.000001")
  cases.add("bad field value", "gtex without its evaluation sets",
            "data.val_path and data.test_path are empty", w,
            f"--config.data.path={env['dataset']}", base=["--config=configs/gtex.py"])

  cases.add("missing input", "no dataset", "prepared dataset not found", w,
            f"--config.data.path={root / 'nope'}", base=geo)
  cases.add("missing input", "no config file", "nonexistent/config.py", w,
            base=["--config=/nonexistent/config.py"])
  cases.add("missing input", "no such split", "no split named 'nope'", w,
            "--config.data.test_split=nope")
  cases.add("missing input", "other genes", "targets differ from the training dataset", w,
            f"--config.data.test_path={other}")
  for name, (d, needle) in damaged.items():
    cases.add("missing input", name, needle, w, f"--config.data.path={d}", base=geo)

  new = root / "new_run"
  cases.absent.append(new)
  cases.add("odd output", "another config's run", "holds checkpoints of a different config", w,
            "--config.lsmtl.bottleneck=4")
  cases.add("odd output", "a dataset", "is a prepared dataset",
            f"--workdir={env['dataset']}")
  cases.add("odd output", "inside a dataset", "is inside",
            f"--workdir={os.path.join(env['dataset'], 'run')}")
  cases.add("odd output", "a file", "exists and is not a directory", f"--workdir={a_file}")
  cases.add("odd output", "under a file", f"{a_file} is not a directory",
            f"--workdir={a_file / 'run'}")
  ro, ro_needle = _unwritable_dir(root)
  cases.add("odd output", "unwritable", ro_needle, f"--workdir={ro}/run")
  # A new workdir of a refused run is not even created.
  cases.add("odd output", "new workdir, refused config", "lsmtl.mask_rate must be in [0, 1)",
            f"--workdir={new}", "--config.lsmtl.mask_rate=1.5")
  return cases


@pytest.mark.parametrize("cls", COMMAND_CLASSES)
def test_main_refuses_by_class(env, tmp_path, cls):
  _main_cases(env, tmp_path).check_refusals(cls)


def _used_run_cases(module, env, root, out_name, extra_flags=()):
  """report and interpret: the same runs, damaged or edited, and odd outputs."""
  cases = _Cases(module)
  run = _run_copy(env, root, "run")
  w = f"--workdir={run}"
  cases.absent.append(run / out_name)
  damaged, damaged_needle = _damaged_copies(env["dataset"], root)["meta not json"]
  prepared = dict(data__synthetic__enabled=False)  # the run's data read from a prepared path
  runs = {
      "lsr": _run_copy(env, root, "lsr", _set(method="lsr")),
      "magic": _run_copy(env, root, "magic", _set(method="magic")),
      "hidden": _run_copy(env, root, "hidden", _set(model__hidden=8)),
      "unfinished": _run_copy(env, root, "unfinished", remove=["results.json"]),
      "no best": _run_copy(env, root, "no_best", remove=["checkpoints/best"]),
      "no dataset": _run_copy(env, root, "no_dataset",
                              _set(data__path=str(root / "nope"), **prepared)),
      "damaged dataset": _run_copy(env, root, "damaged_dataset",
                                   _set(data__path=str(damaged), **prepared)),
  }
  not_json = _run_copy(env, root, "not_json")
  (not_json / "config.json").write_text("{ not json")
  not_a_run = root / "not_a_run"
  not_a_run.mkdir()
  cases.inputs += [run, env["dataset"], damaged, not_json, not_a_run, *runs.values()]
  cases.absent += [p / out_name for p in runs.values()]
  cases.out_dirs += [str(run), str(root)]

  cases.add("bad flag", "unknown", "Unknown command line flag 'bogus'", w, "--bogus")
  cases.add("bad flag", "required", "--workdir")
  cases.add("bad flag", "stray argument", "unexpected arguments", w, "extra")
  cases.add("bad flag", "a flag of another command", "Unknown command line flag 'config'", w,
            "--config=configs/tiny.py")
  for (cls, name), args, needle in extra_flags:
    cases.add(cls, name, needle, w, *args)

  cases.add("bad field value", "method without a network", "has no network checkpoint",
            f"--workdir={runs['lsr']}")
  cases.add("bad field value", "unknown method", "method 'magic' has no network checkpoint",
            f"--workdir={runs['magic']}")
  cases.add("bad field value", "config changed after training", "cannot restore the model",
            f"--workdir={runs['hidden']}")

  cases.add("missing input", "no such run", "no such run directory",
            f"--workdir={root / 'nope'}")
  cases.add("missing input", "not a run", "not a run directory (no config.json)",
            f"--workdir={not_a_run}")
  cases.add("missing input", "unfinished", "training has not finished (no results.json)",
            f"--workdir={runs['unfinished']}")
  cases.add("missing input", "no best checkpoint", "no committed best checkpoint",
            f"--workdir={runs['no best']}")
  cases.add("missing input", "config.json not JSON", "not valid JSON",
            f"--workdir={not_json}")
  cases.add("missing input", "dataset gone", "cannot open the run's dataset",
            f"--workdir={runs['no dataset']}")
  cases.add("missing input", "dataset damaged", damaged_needle,
            f"--workdir={runs['damaged dataset']}")
  # From another folder, without the repository on the path.
  cases.add("missing input", "no such run, another folder", "no such run directory",
            f"--workdir={root / 'nope'}", cwd=str(root), env=_package_only(root))

  for kind in ("file", "symlink", "fifo"):
    odd = _run_copy(env, root, f"odd_{kind}")
    target = odd / out_name
    if kind == "file":
      target.write_text("keep me")
    elif kind == "symlink":
      (root / f"elsewhere_{kind}").mkdir()
      os.symlink(root / f"elsewhere_{kind}", target)
    else:
      os.mkfifo(target)
    cases.inputs.append(odd)
    cases.add("odd output", f"{out_name} is a {kind}", "exists and is not a directory",
              f"--workdir={odd}")
  if os.geteuid() != 0:  # root writes anywhere a folder is
    ro = _run_copy(env, root, "readonly")
    ro.chmod(0o500)
    cases.inputs.append(ro)
    cases.add("odd output", "unwritable run", "is not writable", f"--workdir={ro}")
  return cases


@pytest.mark.parametrize("cls", COMMAND_CLASSES)
def test_report_refuses_by_class(env, tmp_path, cls):
  _used_run_cases("lsmtl_jax.report", env, tmp_path, "report").check_refusals(cls)


_INTERPRET_FLAGS = [
    (("bad flag", "enum"), ["--rule=foo"], "--rule=foo"),
    (("bad flag", "not a number"), ["--num_samples=many"], "--num_samples=many"),
    (("bad field value", "no profiles"), ["--num_samples=0"], "--num_samples must be positive"),
    (("bad field value", "no clusters"), ["--target_clusters=-1"],
     "--target_clusters must be positive"),
    (("bad field value", "split"), ["--split=nope"], "no split named 'nope'"),
]


@pytest.mark.parametrize("cls", COMMAND_CLASSES)
def test_interpret_refuses_by_class(env, tmp_path, cls):
  _used_run_cases("lsmtl_jax.interpret", env, tmp_path, "relevance",
                  _INTERPRET_FLAGS).check_refusals(cls)


EXPERIMENT_CONFIG = """
from configs import tiny

TITLE = "bad input"


def get_config():
  config = tiny.get_config()
  config.data.synthetic.enabled = False
  config.data.path = {dataset!r}
  config.train.num_steps = 8
  return config


def get_runs(config):
  return [{{"method": "lsr", "figures": {{"table": {{"order": 0}}}}}},
          {{"method": "deep_lsmtl", "overrides": {overrides!r},
           "figures": {{"table": {{"order": 1}}}}}}]
"""


def _experiments_cases(env, root):
  good = root / "experiment.py"
  good.write_text(EXPERIMENT_CONFIG.format(dataset=env["dataset"], overrides={}))
  misspelled = root / "misspelled.py"
  misspelled.write_text(EXPERIMENT_CONFIG.format(dataset=env["dataset"],
                                                 overrides={"model.hiden": 3}))
  workdir = root / "experiment"
  cases = _Cases("lsmtl_jax.experiments", [f"--config={good}", f"--workdir={workdir}"])
  damaged = _damaged_copies(env["dataset"], root)
  other = root / "other_genes"
  shutil.copytree(env["dataset"], other)
  meta = json.loads((other / "meta.json").read_text())
  meta["landmarks"]["ids"] = meta["landmarks"]["ids"][::-1]
  (other / "meta.json").write_text(json.dumps(meta))
  a_file = root / "a_file.txt"
  a_file.write_text("keep me")
  cases.inputs += [good, misspelled, env["dataset"], other, a_file,
                   *(d for d, _ in damaged.values())]
  cases.absent.append(workdir)
  cases.out_dirs.append(str(root))

  cases.add("bad flag", "misspelled override", "--config.nope: no config field 'nope'",
            "--config.nope=1")
  cases.add("bad flag", "unknown", "Unknown command line flag 'bogus'", "--bogus")
  cases.add("bad flag", "not a number", "--jobs=many", "--jobs=many")
  cases.add("bad flag", "required", "--config and --workdir are required",
            base=[f"--config={good}"])
  cases.add("bad flag", "stray argument", "unexpected arguments", "extra")

  cases.add("bad field value", "a run's field", "run lsr: config: lsmtl.mask_rate must be in",
            "--config.lsmtl.mask_rate=1.5")
  cases.add("bad field value", "an override in the runs", "no such field 'model.hiden'",
            base=[f"--config={misspelled}", f"--workdir={workdir}"])
  cases.add("bad field value", "jobs", "--jobs must be >= 0", "--jobs=-1")
  cases.add("bad field value", "mesh", "mesh.model must be a positive number of devices or -1",
            "--config.mesh.model=0")
  # The repository's own config, by absolute path from another folder.
  paper = [f"--config={REPO}/configs/experiments/paper_geo.py", f"--workdir={workdir}"]
  cases.add("bad field value", "another folder", "lsmtl.bottleneck must be positive",
            f"--config.data.path={env['dataset']}", "--config.lsmtl.bottleneck=0", base=paper,
            cwd=str(root), env=_package_only(root))

  cases.add("missing input", "no dataset", "prepared dataset not found",
            f"--config.data.path={root / 'nope'}")
  cases.add("missing input", "no config file", "nonexistent/experiment.py",
            base=["--config=/nonexistent/experiment.py", f"--workdir={workdir}"])
  cases.add("missing input", "no such split", "no split named 'nope'",
            "--config.data.val_split=nope")
  cases.add("missing input", "other genes", "landmarks differ from the training dataset",
            f"--config.data.val_path={other}")
  for name, (d, needle) in damaged.items():
    cases.add("missing input", name, needle, f"--config.data.path={d}")
  cases.add("missing input", "no dataset, another folder", "prepared dataset not found",
            f"--config.data.path={root / 'nope'}", base=paper, cwd=str(root),
            env=_package_only(root))

  g = f"--config={good}"
  cases.add("odd output", "a file", "exists and is not a directory", g, f"--workdir={a_file}",
            base=[])
  cases.add("odd output", "a dataset", "is a prepared dataset", g,
            f"--workdir={env['dataset']}", base=[])
  cases.add("odd output", "under a file", f"{a_file} is not a directory", g,
            f"--workdir={a_file / 'experiment'}", base=[])
  ro, ro_needle = _unwritable_dir(root)
  cases.add("odd output", "unwritable", ro_needle, g, f"--workdir={ro}/experiment", base=[])
  return cases


@pytest.mark.parametrize("cls", COMMAND_CLASSES)
def test_experiments_refuse_by_class(env, tmp_path, cls):
  _experiments_cases(env, tmp_path).check_refusals(cls)


def _benchmark_cases(env, root):
  tiny = ["--config=configs/tiny.py", f"--config.data.cache_dir={env['cache']}"]
  cases = _Cases("lsmtl_jax.benchmark", tiny)
  damaged, needle = _damaged_copies(env["dataset"], root)["meta not json"]
  a_file = root / "a_file.txt"
  a_file.write_text("keep me")
  a_dir = root / "a_dir"
  a_dir.mkdir()
  out = root / "bench.json"
  cases.inputs += [env["dataset"], damaged, a_file, a_dir]
  cases.absent.append(out)
  cases.out_dirs.append(str(root))
  o = f"--out={out}"

  cases.add("bad flag", "unknown", "Unknown command line flag 'bogus'", "--bogus", o)
  cases.add("bad flag", "enum", "--torch=maybe", "--torch=maybe", o)
  cases.add("bad flag", "not a number", "--repeats=many", "--repeats=many", o)
  cases.add("bad flag", "misspelled override", "--config.model.hiden: no config field 'hiden'",
            "--config.model.hiden=3", o)
  cases.add("bad flag", "stray argument", "unexpected arguments", "extra", o)

  cases.add("bad field value", "width", "model.hidden must be positive",
            "--config.model.hidden=-3", o)
  cases.add("bad field value", "not a network", "is not a network", "--config.method=lsr", o)
  cases.add("bad field value", "mesh vs devices", "needs 3 devices, found 1",
            "--config.mesh.data=3", o)
  cases.add("bad field value", "peer modes", "--torch_modes: ['fast']", "--torch_modes=fast", o)
  cases.add("bad field value", "repeats", "--repeats must be at least 1", "--repeats=0", o)
  cases.add("bad field value", "another folder", "model.hidden must be positive",
            "--config.model.hidden=-3", o, base=[f"--config={REPO}/configs/tiny.py"],
            cwd=str(root), env=_package_only(root))

  geo = ["--config=configs/geo.py"]
  cases.add("missing input", "no dataset", "prepared dataset not found",
            f"--config.data.path={root / 'nope'}", o, base=geo)
  cases.add("missing input", "damaged dataset", needle, f"--config.data.path={damaged}", o,
            base=geo)
  cases.add("missing input", "no config file", "nonexistent/config.py", o,
            base=["--config=/nonexistent/config.py"])
  cases.add("missing input", "no peer script", "--torch_script=/nonexistent/peer.py: no such",
            "--torch_script=/nonexistent/peer.py", o)

  cases.add("odd output", "a directory", "is a directory", f"--out={a_dir}")
  cases.add("odd output", "under a file", "is not a directory", f"--out={a_file / 'b.json'}")
  cases.add("odd output", "missing folder", "does not exist", f"--out={root / 'nope' / 'b.json'}")
  ro, ro_needle = _unwritable_dir(root)
  cases.add("odd output", "unwritable", ro_needle, f"--out={ro}/b.json")
  cases.add("odd output", "scratch", "--scratch=/nonexistent: no such directory",
            "--suite=issue6", "--scratch=/nonexistent", o)
  return cases


@pytest.mark.parametrize("cls", COMMAND_CLASSES)
def test_benchmark_refuses_by_class(env, tmp_path, cls):
  _benchmark_cases(env, tmp_path).check_refusals(cls)
