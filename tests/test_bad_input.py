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

import numpy as np
import pytest

from lsmtl_jax.data import formats
from lsmtl_jax.data import store

from conftest import REPO
from test_prepare import _bad_inputs as prepare_bad_inputs

ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}


def _run(module, *args, env=None):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True,
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
    ("negative lambda", ["--config.lsmtl.lam=-0.1"], {}, "lsmtl.lam must be >= 0"),
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
  after = _checksums([workdir])
  after.pop(str(workdir / "config.json"), None)
  before.pop(str(workdir / "config.json"), None)
  assert after == before


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
