"""Execute every notebook in ``notebooks/`` top to bottom: a failing cell fails the test.

The notebooks run in a fresh kernel with the repository root as working directory, so they import
the checked-out package. ``python tests/test_notebooks.py [NAME ...]`` re-executes them and writes
the outputs (plots included) back into the committed files.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 600  # the quickstart trains in one cell (~1-3 min on 2 cores)


def execute(path: Path, write: bool = False):
    """Run the notebook at ``path`` in a new kernel; with ``write``, save it with its outputs."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT)}}).execute()
    if write:
        nbformat.write(nb, path)
    return nb


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path):
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")
    nb = execute(path)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), f"{path.name} shows no plot"


def test_notebooks_are_committed_with_outputs():
    """The committed notebooks carry their outputs (the plots are part of the documentation)."""
    nbformat = pytest.importorskip("nbformat")
    assert NOTEBOOKS, "no notebooks found"
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(c.get("execution_count") for c in code), f"{path.name} has cells that were not executed"
        assert any("image/png" in o.get("data", {}) for c in code for o in c.get("outputs", [])), path.name


if __name__ == "__main__":
    names = set(sys.argv[1:])
    for nb_path in NOTEBOOKS:
        if names and nb_path.stem not in names:
            continue
        start = time.perf_counter()
        execute(nb_path, write=True)
        print(f"{nb_path.name}: executed and written in {time.perf_counter() - start:.1f} s")
