"""The package's shape as a contract: the import layers of .importlinter hold
(no cycle, no upward import, lazy imports included), and no module outside the
method records asks which method it runs."""

import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_import_layers_hold():
  lint = shutil.which("lint-imports") or os.path.join(os.path.dirname(sys.executable),
                                                      "lint-imports")
  proc = subprocess.run([lint, "--config", os.path.join(ROOT, ".importlinter")], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
  assert "0 broken" in proc.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
  # The contract is live: a low module importing the loop back is caught.
  copy = tmp_path / "repo"
  shutil.copytree(os.path.join(ROOT, "lsmtl_jax"), copy / "lsmtl_jax",
                  ignore=shutil.ignore_patterns("__pycache__"))
  shutil.copy(os.path.join(ROOT, ".importlinter"), copy / ".importlinter")
  with open(copy / "lsmtl_jax" / "metrics.py", "a") as f:
    f.write("\n\ndef _late():\n  from lsmtl_jax import train  # noqa\n")
  env = dict(os.environ, PYTHONPATH=str(copy))
  lint = shutil.which("lint-imports") or os.path.join(os.path.dirname(sys.executable),
                                                      "lint-imports")
  proc = subprocess.run([lint], cwd=copy, capture_output=True, text=True, env=env, timeout=300)
  assert proc.returncode != 0 and "BROKEN" in proc.stdout
  assert "lsmtl_jax.metrics -> lsmtl_jax.train" in proc.stdout


# A dispatch on the method's name: `method == "..."`, `method in (...)`.
_DISPATCH = re.compile(r"""method\s*(==|!=|\bin\b|\bnot in\b)\s*[("'A-Z]""")


def test_no_method_dispatch_outside_the_records():
  offenders = []
  package = os.path.join(ROOT, "lsmtl_jax")
  for folder, _, files in os.walk(package):
    for name in files:
      path = os.path.join(folder, name)
      if not name.endswith(".py") or path.endswith(os.path.join("methods", "registry.py")):
        continue
      for number, line in enumerate(open(path), 1):
        if _DISPATCH.search(line.split("#")[0]):
          offenders.append(f"{os.path.relpath(path, ROOT)}:{number}: {line.strip()}")
  assert not offenders, "\n".join(offenders)
