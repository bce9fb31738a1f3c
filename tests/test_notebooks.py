"""Notebooks: static checks on every notebook, then nbval (lax) on each one in the smoke preset.

nbval executes a copy of each notebook whose `parameters` cell papermill has overridden with PRESET="smoke"; cells
marked `# NBVAL_CHECK_OUTPUT` must reproduce their saved output exactly, every other cell must run without error.
Notebook 07 needs a task without context, so for PRESET="smoke" it runs the smoke preset's reasoning twin
(`smoke-reasoning`: the tiny model on one-digit addition, 8 pairs, 10 test problems; `reasoning.reasoning_twin`).
The copies share one temporary runs folder, so a later notebook reuses the smoke pairs and adapters of an earlier
one (each notebook still builds what it needs when run alone).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
ABSOLUTE = re.compile(r"(?<![\w.])/(work|tmp|root|home|Users|content)/")


def _tags(cell) -> list[str]:
    return cell.get("metadata", {}).get("tags", [])


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 1


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_valid_with_one_parameters_cell(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    params = [i for i, c in enumerate(nb.cells) if "parameters" in _tags(c)]
    assert len(params) == 1, f"{path.name}: {len(params)} cells tagged 'parameters'"
    cell = nb.cells[params[0]]
    assert cell.cell_type == "code"
    # raw values only: every statement is NAME = literal
    for line in cell.source.splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, value = line.partition("=")
            assert name.strip().isupper(), f"{path.name}: parameter {name!r} should be an UPPER_CASE name"
            compile(value.strip(), "<parameter>", "eval")
            assert "(" not in value or value.strip().startswith(("(", "[")), f"{path.name}: {line!r} is not a raw value"
    assert "PRESET" in cell.source


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_outputs_do_not_leak_paths(path):
    nb = nbformat.read(path, as_version=4)
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            text = json.dumps({k: v for k, v in out.items() if k != "data"}) + json.dumps(out.get("data", {}).get("text/plain", ""))
            assert not ABSOLUTE.search(text), f"{path.name} cell {i} output shows an absolute path"
        if cell.cell_type == "code":
            assert not ABSOLUTE.search(cell.source), f"{path.name} cell {i} uses an absolute path"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_ends_with_versions_cell(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "versions_table" in code[-1].source


@pytest.fixture(scope="session")
def smoke_copies(tmp_path_factory):
    """Papermill-parameterized copies of every notebook with PRESET='smoke' (not executed yet)."""
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    out = tmp_path_factory.mktemp("nbval")
    for path in NOTEBOOKS:
        nb = load_notebook_node(str(path))  # papermill's loader: gives every cell the `tags` list it looks up
        nb = parameterize_notebook(nb, {"PRESET": "smoke"})
        nbformat.write(nb, out / path.name)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_under_nbval_smoke(path, smoke_copies, tmp_path_factory):
    env = dict(os.environ)
    shared = tmp_path_factory.getbasetemp() / "nbval-runs"
    # one thread: the tiny smoke model is dominated by threading overhead (25x faster on a busy 2-core machine)
    env.update(MIPO_RUNS_DIR=str(shared / "runs"), MIPO_FIGURES_DIR=str(shared / "figures"), PYTHONWARNINGS="ignore",
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "pytest", "--nbval-lax", "--nbval-cell-timeout=900", "-p", "no:cacheprovider", "-q",
           str(smoke_copies / path.name)]
    proc = subprocess.run(cmd, cwd=ROOT / "notebooks", env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
