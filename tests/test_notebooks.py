"""The tutorial notebooks run top to bottom without errors, in their fast mode (YOSO_NOTEBOOK_FAST=1).

Fast mode shrinks every training budget (a 200-step demo, a 60-step one-seed study in a temporary
folder) so the whole notebook executes in well under a minute; it checks that the code runs, not
the numbers — tests/test_toy2d.py checks those.
"""
import os

import pytest

nbformat = pytest.importorskip("nbformat", reason="nbformat is not installed (pip install -r requirements.txt)")
nbclient = pytest.importorskip("nbclient", reason="nbclient is not installed (pip install -r requirements.txt)")

NOTEBOOKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")


@pytest.mark.parametrize("name", ["01_yoso_in_2d.ipynb"])
def test_notebook_runs_in_fast_mode(name, monkeypatch):
    monkeypatch.setenv("YOSO_NOTEBOOK_FAST", "1")       # the kernel inherits this process's environment
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": NOTEBOOKS}})
    client.execute()                                     # raises CellExecutionError on the first failing cell
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, errors
