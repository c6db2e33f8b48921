"""The accelerator check and the precision suite: the plan's arithmetic, the
known peaks, the dtype pair, and the whole check at toy sizes on the CPU (the
machinery, not the figures: no timing is asserted)."""

import json
import subprocess
import sys

import jax
import pytest

from lsmtl_jax import bench_accelerator
from lsmtl_jax import bench_plan
from lsmtl_jax import bench_precision
from lsmtl_jax import config_lib
from lsmtl_jax import perf

from conftest import REPO


def _tiny():
  from configs import tiny
  return tiny.get_config()


@pytest.mark.parametrize("kind,name", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H100 PCIe", "H100 PCIe"),
    ("NVIDIA H200", "H200"), ("NVIDIA A100-SXM4-80GB", "A100 SXM"), ("TPU v4", "TPU v4"),
    ("TPU v5 lite", "TPU v5e"), ("TPU v5", "TPU v5p"), ("TPU v6 lite", "TPU v6e")])
def test_known_peaks_by_device_kind(kind, name):
  peak = perf.known_peak(kind)
  assert peak["name"] == name
  assert peak["bfloat16"] >= peak["float32"] > 0


def test_no_known_peak_for_a_cpu():
  assert perf.known_peak("cpu") is None


def test_step_estimate_is_the_slower_of_the_gemms_and_the_optimizer_bytes():
  # 2 x 4 DenseNet, 3 -> 5: MACs 3*4 + 7*4 + 11*5 = 95 per example.
  peak, bw = 1e6, 1e4
  flops = 6 * 95 * 10
  want = max(flops / (bench_plan.MATMUL_EFFICIENCY * peak),
             bench_plan.ADAM_BYTES_PER_PARAM * 95 / (bench_plan.BANDWIDTH_EFFICIENCY * bw))
  got = bench_plan.step_seconds(2, 4, 10, 3, 5, 0, peak, bw)
  assert got == pytest.approx(want + bench_plan.LAUNCH_S)


def test_the_dry_run_prints_the_plan_for_the_device_it_is_told():
  proc = subprocess.run(
      [sys.executable, "-m", "lsmtl_jax.benchmark", "--suite=accelerator", "--dry_run",
       "--assume_device=H200"], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.startswith("== accelerator check plan on H200 (peaks: bf16 989")
  total = [line for line in proc.stdout.splitlines() if line.strip().startswith("total")]
  estimate = float(total[0].split()[1].rstrip("s"))
  want = sum(p.estimate_s for p in bench_plan.make_plan("cuda", "H200"))
  assert estimate == pytest.approx(want, abs=1)


@pytest.mark.parametrize("device", ["H100", "H200"])
def test_the_plan_fits_ten_minutes_on_one_h100_or_h200_by_its_own_estimate(device):
  parts = bench_plan.make_plan("cuda", device)
  total = bench_plan.total_seconds(parts)
  assert total["estimate_s"] <= bench_plan.LIMIT_S and total["budget_s"] <= bench_plan.LIMIT_S
  assert [p.name for p in parts] == ["startup", "device_tests", "steps", "predict", "paper"]
  for p in parts:  # each part's own estimate inside the budget it is given
    assert p.estimate_s <= p.budget_s, p.name
  paper = parts[-1].detail
  assert paper["steps_each"] >= 100 and parts[3].detail["profiles"] == 100_000


def test_sizes_parse_and_refuse():
  assert bench_plan.parse_sizes("3x3000@64, 2x512", 256) == [
      bench_plan.Size(3, 3000, 64), bench_plan.Size(2, 512, 256)]
  for bad in ("3x", "0x10", "3x3000@0", ""):
    with pytest.raises(bench_plan.PlanError, match="--precision_sizes"):
      bench_plan.parse_sizes(bad, 256)


def test_auto_dtype_resolves_by_platform():
  assert config_lib.auto_dtype("gpu") == config_lib.auto_dtype("tpu") == "bfloat16"
  assert config_lib.auto_dtype("cpu") == "float32"
  c = _tiny()
  c.model.dtype = "auto"
  resolved = config_lib.resolve(c)
  config_lib.validate(resolved)
  assert resolved.model.dtype == config_lib.auto_dtype(jax.default_backend())
  assert config_lib.fingerprint(resolved, 40, [])["model"]["dtype"] == resolved.model.dtype
  c.model.dtype = "bfloat16"  # explicit values are kept
  assert config_lib.resolve(c).model.dtype == "bfloat16"


def test_both_dtypes_step_one_float32_state():
  pair = bench_precision.DtypePair(_tiny(), bench_plan.Size(2, 16, 32), 24, 40)
  row = bench_precision.measure_pair(pair, repeats=2, block_seconds=0.01)
  for leaf in jax.tree.leaves(pair.bench.state.params):
    assert leaf.dtype == jax.numpy.float32
  assert row["bf16_over_fp32_step"]["n"] == 2
  for dtype in bench_precision.DTYPES:
    t = row[dtype]
    assert t["examples_per_s"] == pytest.approx(32 / t["step_s"]["median"])
    assert t["achieved_flops"] == pytest.approx(row["flops_per_example"] * t["examples_per_s"])


def test_junit_counts(tmp_path):
  xml = tmp_path / "j.xml"
  xml.write_text('<testsuites><testsuite><testcase classname="a" name="ok"/>'
                 '<testcase classname="a" name="bad"><failure message="x"/></testcase>'
                 '<testcase classname="b" name="skip"><skipped/></testcase>'
                 '<testcase classname="b" name="err"><error/></testcase></testsuite>'
                 '</testsuites>')
  counts = bench_accelerator.junit_counts(str(xml))
  assert counts == {"passed": 1, "failed": 1, "errors": 1, "skipped_tests": 1,
                    "failures": ["a::bad", "b::err"]}


def test_the_check_at_toy_sizes_writes_its_json_and_markdown(tmp_path):
  out = tmp_path / "check.json"
  proc = subprocess.run(
      [sys.executable, "-m", "lsmtl_jax.benchmark", "--suite=accelerator", "--toy",
       "--config=configs/tiny.py", f"--out={out}", f"--scratch={tmp_path}"], cwd=REPO,
      capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(out.read_text())
  parts = report["parts"]
  assert parts["device_tests"]["passed"] == 1 and parts["device_tests"]["failed"] == 0
  (size,) = parts["steps"]["sizes"]
  assert size["float32"]["step_s"]["median"] > 0 and size["bfloat16"]["step_s"]["median"] > 0
  assert size["guard_estimate_bytes"] > 0
  assert "skipped" in parts["predict"]
  paper = parts["paper"]
  assert set(paper["test_mae"]) == {"deep_lsmtl", "lsr", "densenet"}
  assert all(0 < v < 2 for v in paper["test_mae"].values())
  assert paper["steps_each"] == 4 and paper["feed"]["examples_per_s"] > 0
  md = out.with_suffix(".md").read_text()
  assert md.startswith("# Accelerator check: ") and "| paper |" in md
  # The scratch (the compendium, the run, the test report) is removed afterwards.
  assert {p.name for p in tmp_path.iterdir()} == {out.name, out.with_suffix(".md").name}
