"""The tutorial notebooks run top to bottom without errors, in their fast mode (YOSO_NOTEBOOK_FAST=1).

Fast mode shrinks every training budget so each notebook executes in well under a minute: 01 runs a
200-step demo and a 60-step one-seed study in a temporary folder; 02 trains 4 steps on 256 CIFAR-10
images (64 random images when shared/data/cifar10-jpeg.zip is absent: no network); 03 runs a few
adaption and YOSO steps on the tiny offline PixArt-α pipeline. It checks that the code runs, not the
numbers — tests/test_toy2d.py, test_train_cifar.py and test_finetune_t2i.py check those. A second test
reads the committed outputs: no machine-specific absolute paths in them.
"""
import os
import re

import pytest

nbformat = pytest.importorskip("nbformat", reason="nbformat is not installed (pip install -r requirements.txt)")
nbclient = pytest.importorskip("nbclient", reason="nbclient is not installed (pip install -r requirements.txt)")

NOTEBOOKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")


@pytest.mark.parametrize("name", ["01_yoso_in_2d.ipynb", "02_cifar10_one_step.ipynb", "03_one_step_text_to_image.ipynb"])
def test_notebook_runs_in_fast_mode(name, monkeypatch):
    monkeypatch.setenv("YOSO_NOTEBOOK_FAST", "1")       # the kernel inherits this process's environment
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": NOTEBOOKS}})
    client.execute()                                     # raises CellExecutionError on the first failing cell
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, errors


@pytest.mark.parametrize("name", ["01_yoso_in_2d.ipynb", "02_cifar10_one_step.ipynb", "03_one_step_text_to_image.ipynb"])
def test_committed_outputs_show_no_machine_paths(name):
    # a reader's clone has no /work or /tmp folder of ours: printed paths are relative or placeholders
    nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    texts = [o.get("text", "") + o.get("data", {}).get("text/plain", "") + o.get("data", {}).get("text/html", "")
             for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]   # images are base64: not text
    found = [m for t in texts for m in re.findall(r"(?<![\w.])/(?:tmp|work|home|root|Users)/\S*", t)]
    assert not found, found


def test_committed_result_files_show_no_machine_paths():
    # every committed text result (notebooks/results, benchmarks): JSON, logs, tables
    root = os.path.dirname(NOTEBOOKS)
    files = [os.path.join(d, n) for top in ("notebooks/results", "benchmarks") for d, _, ns in os.walk(os.path.join(root, top))
             for n in ns if n.endswith((".json", ".jsonl", ".log", ".md", ".txt", ".csv"))]
    assert len(files) > 10
    found = {f: m for f in files for m in re.findall(r"(?<![\w.])/(?:tmp|work|home|root|Users)/\S*", open(f).read())}
    assert not found, found
