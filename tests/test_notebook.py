"""The Colab notebook runs headless on CPU with a tiny config, so it cannot rot."""

import os

import pytest

from conftest import REPO

nbformat = pytest.importorskip("nbformat")  # the [test] extra installs it
nbclient = pytest.importorskip("nbclient")


def test_colab_notebook_executes_on_four_cpu_devices(monkeypatch, tmp_path):
  monkeypatch.setenv("LSMTL_NOTEBOOK_TINY", "1")
  monkeypatch.setenv("LSMTL_REPO", REPO)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("JAX_NUM_CPU_DEVICES", "4")
  monkeypatch.setenv("LSMTL_NOTEBOOK_WORKDIR", str(tmp_path / "run"))
  nb = nbformat.read(os.path.join(REPO, "notebooks", "lsmtl_colab.ipynb"), as_version=4)
  nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}}).execute()
  printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                    for o in c.outputs)
  assert "test MAE" in printed
  assert "mesh {'data': 2, 'model': 2}" in printed
  assert "-> (56, 64)" in printed  # each device holds half of the 128 padded targets
