"""The notebooks run top to bottom (fast configuration)."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


#: Run only with ``-m slow``: the shear notebook's estimators and harness are tested in test_shear.py and
#: test_shear_bias.py, and the suite has to stay under 20 minutes on two cores.
SLOW = {"02_shear.ipynb"}


@pytest.mark.parametrize(
    "path",
    [pytest.param(p, marks=pytest.mark.slow) if p.name in SLOW else p for p in NOTEBOOKS],
    ids=[p.name for p in NOTEBOOKS],
)
def test_notebook_executes(path, monkeypatch):
    monkeypatch.setenv("BAYESBLEND_FAST", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(
        nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    ).execute()
    errors = [
        o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"
    ]
    assert not errors
    code = [c for c in nb.cells if c.cell_type == "code"]
    printed = "".join(o.get("text", "") for o in code[0].get("outputs", []) if o.get("name") == "stdout")
    assert "fast configuration" in printed  # the kernel saw the fast setting
    tables = [o["data"].get("text/html", "") for c in code for o in c.get("outputs", []) if "data" in o]
    assert any("<th>e1_std</th>" in t for t in tables)  # the catalogue was displayed (all columns in HTML)
