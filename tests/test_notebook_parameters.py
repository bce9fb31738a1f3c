"""papermill must understand every notebook's `parameters` cell: a line it cannot parse is dropped from its
parameter list, and every run then warns "Passed unknown parameter" for it (a comment containing `=` does that)."""

from __future__ import annotations

import ast
from pathlib import Path

import nbformat
import pytest
from papermill.translators import PythonTranslator

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("[0-9][0-9]_*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_papermill_parses_every_parameter(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    assigned = [t.id for node in ast.parse(cell.source).body if isinstance(node, ast.Assign) for t in node.targets]
    parsed = [p.name for p in PythonTranslator.inspect(cell)]
    assert parsed == assigned, f"papermill cannot parse {sorted(set(assigned) - set(parsed))} in {path.name}"
