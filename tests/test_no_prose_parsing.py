"""Prose is rendered from tables and never read back: no library code opens a conclusions file, and the modules that
render prose use no regular expressions (there is no sentence for them to search)."""

from __future__ import annotations

import ast
import builtins
import pathlib
import shutil
from pathlib import Path

import pytest

from mipo_lib.analysis import ablation_findings, reasoning_findings
from mipo_lib.config import repo_root
from mipo_lib.workbook import readme

PACKAGE = Path(__file__).resolve().parents[1] / "mipo_lib"

#: The modules that turn tables into sentences.
RENDERERS = ("analysis/render.py", "analysis/ablation_findings.py", "analysis/reasoning_findings.py",
             "workbook/readme.py")


def regex_uses(source: str) -> list[str]:
    """Where a module imports `re` or calls it (`import re`, `from re import ...`, `re.search(...)`)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import) and any(a.name == "re" for a in node.names):
            found.append(f"line {node.lineno}: import re")
        elif isinstance(node, ast.ImportFrom) and node.module == "re":
            found.append(f"line {node.lineno}: from re import")
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "re":
            found.append(f"line {node.lineno}: re.{node.attr}")
    return found


@pytest.mark.parametrize("module", RENDERERS)
def test_the_modules_that_render_prose_use_no_regular_expressions(module):
    assert regex_uses((PACKAGE / module).read_text()) == []


def test_the_regex_check_can_fail():
    old = "import re\n_CI = re.compile(r': ([+-]?[0-9.]+)')\ndef f(text):\n    return re.search('a detectable', text)\n"
    assert regex_uses(old) == ["line 1: import re", "line 2: re.compile", "line 4: re.search"]


@pytest.fixture
def no_conclusions_reads(monkeypatch):
    """Any attempt to open a `*_conclusions.*` file fails the test."""
    real_open, real_read = builtins.open, pathlib.Path.read_text

    def guard(path) -> None:
        if "_conclusions" in str(path):
            raise AssertionError(f"library code read {path}: render it from its tables instead")

    def open_(file, *args, **kwargs):
        guard(file)
        return real_open(file, *args, **kwargs)

    def read_text(self, *args, **kwargs):
        guard(self)
        return real_read(self, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(pathlib.Path, "read_text", read_text)


def test_no_renderer_reads_a_conclusions_file(no_conclusions_reads, tmp_path):
    shutil.copy(repo_root() / "README.md", tmp_path / "README.md")
    shutil.copytree(repo_root() / "docs", tmp_path / "docs")
    for preset in readme.REFERENCE_TABLES:
        readme.update_readme(preset, tmp_path)
    assert ablation_findings.committed_findings("cpu") and reasoning_findings.committed_lines("cpu")


def test_the_read_guard_can_fail(no_conclusions_reads):
    with pytest.raises(AssertionError, match="render it from its tables"):
        (repo_root() / "figures" / "ablations_cpu_conclusions.txt").read_text()
