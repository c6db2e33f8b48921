"""Launch scripts: valid shell (shellcheck-clean where shellcheck exists) and
usage errors instead of surprises."""

import glob
import os
import shutil
import subprocess

import pytest

from conftest import REPO

SCRIPTS = sorted(glob.glob(os.path.join(REPO, "launch", "*.sh"))) + [
    os.path.join(REPO, "launch", "slurm.sbatch")]


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_script_is_valid_shell(script):
  assert subprocess.run(["bash", "-n", script]).returncode == 0
  if shutil.which("shellcheck"):
    proc = subprocess.run(["shellcheck", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize("script", ["local.sh", "local_multiprocess.sh", "tpu_vm.sh",
                                    "accelerator_check.sh"])
def test_missing_arguments_print_usage(script):
  proc = subprocess.run(["bash", os.path.join(REPO, "launch", script)], capture_output=True,
                        text=True)
  assert proc.returncode != 0 and "usage: launch/" in proc.stderr


def test_jobset_manifest_names_the_entry_point():
  text = open(os.path.join(REPO, "launch", "gke_jobset.yaml")).read()
  assert "kind: JobSet" in text and "lsmtl_jax.main" in text and "--distributed" in text
