"""The two editions of the exercises: the numbered notebooks (the student edition, what the Colab badges open) and
one solutions notebook per numbered notebook with exercises, `notebooks/solutions/NN_slug_solutions.ipynb`.

In a numbered notebook an exercise is three consecutive cells: its statement (markdown, tag ``exercise``), the stub
the student fills in (tag ``stub``) and the check cell (tag ``check``, it calls a checker of
`mipo_lib.workbook.exercises`). A solutions notebook holds, for each exercise, the same statement, its solution
(cells tagged ``solution``) and the same check. Only the solution cells are written by hand: `build_solutions`
copies the statements and checks from the numbered notebook and keeps the solution cells of the previous solutions
notebook (matched by the checker they are checked with), so a statement edited in the notebook cannot drift from its
solution's copy; `tests/test_exercises.py` checks that the committed solutions notebooks are what this builds.

Standard library only (the notebooks are JSON), so `make solutions` needs no set-up:
``python3 -m mipo_lib.workbook.editions [--check]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mipo_lib.config import repo_root
from mipo_lib.errors import MipoError

#: What every exercise's function may use besides its arguments: the set-up cell of the solutions notebooks, and what
#: the grader (`mipo_lib.workbook.grade`) runs before a student's exercise cells. Stubs say which of these they use.
SETUP = """# What every exercise may use besides its arguments (the grader runs your exercise cells after exactly this)
import math

import numpy as np
import pandas as pd
import torch

from mipo_lib.workbook import exercises
"""

STATEMENT, STUB, CHECK, SOLUTION = "exercise", "stub", "check", "solution"
_CHECKER = re.compile(r"exercises\.(check_\w+)\(")
_BADGE_TARGET = re.compile(r"(\(https://colab\.research\.google\.com/github/[^)]*/notebooks/)([^)/]+)\.ipynb\)")

Cell = dict[str, Any]
Notebook = dict[str, Any]


def tags(cell: Cell) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def source(cell: Cell) -> str:
    text = cell.get("source", "")
    return text if isinstance(text, str) else "".join(text)


def _lines(text: str) -> list[str]:
    """A cell's source as Jupyter writes it: a list of lines, each but the last ending in a newline."""
    return text.splitlines(keepends=True)


@dataclass(frozen=True)
class ExerciseCells:
    """One exercise of a numbered notebook: its statement, stub and check cells, and the checker the check calls."""

    statement: Cell
    stub: Cell
    check: Cell

    @property
    def checker(self) -> str:
        return checker_of(self.check)


def checker_of(check: Cell) -> str:
    found = _CHECKER.findall(source(check))
    if len(found) != 1:
        raise MipoError(f"check cell {check.get('id')} should call exactly one exercises.check_... function")
    return found[0]


def exercise_cells(nb: Notebook, name: str = "notebook") -> list[ExerciseCells]:
    """The exercises of a numbered notebook, in order: each ``stub`` cell with the ``exercise`` statement right
    before it and the ``check`` cell right after it (anything else is a mistake in the notebook, named here)."""
    cells, found = nb["cells"], []
    for i, cell in enumerate(cells):
        if STUB not in tags(cell):
            continue
        before, after = (cells[i - 1] if i else {}), (cells[i + 1] if i + 1 < len(cells) else {})
        if before.get("cell_type") != "markdown" or STATEMENT not in tags(before):
            raise MipoError(f"{name}: the stub {cell.get('id')} needs its statement (markdown tagged 'exercise') right before it")
        if after.get("cell_type") != "code" or CHECK not in tags(after):
            raise MipoError(f"{name}: the stub {cell.get('id')} needs its check cell (tagged 'check') right after it")
        found.append(ExerciseCells(before, cell, after))
    return found


def solutions_path(notebook: Path) -> Path:
    """notebooks/NN_slug.ipynb -> notebooks/solutions/NN_slug_solutions.ipynb"""
    return notebook.parent / "solutions" / f"{notebook.stem}_solutions.ipynb"


def solution_blocks(solutions: Notebook | None) -> dict[str, list[Cell]]:
    """checker name -> the solution cells checked by it, read from an existing solutions notebook."""
    blocks: dict[str, list[Cell]] = {}
    pending: list[Cell] = []
    for cell in (solutions or {}).get("cells", []):
        if SOLUTION in tags(cell):
            pending.append(cell)
        elif CHECK in tags(cell):
            blocks[checker_of(cell)], pending = pending, []
    return blocks


def _copy(cell: Cell, new_id: str | None = None) -> Cell:
    """A cell as the solutions notebook stores it: same source and tags, no outputs (they come from running it)."""
    out: Cell = {"cell_type": cell["cell_type"], "id": new_id or cell["id"], "metadata": {}}
    if tags(cell):
        out["metadata"]["tags"] = tags(cell)
    if cell["cell_type"] == "code":
        out.update(execution_count=None, outputs=[])
    out["source"] = _lines(source(cell))
    return out


def _placeholder(exercise: ExerciseCells) -> Cell:
    """A solution still to write: the stub itself, so the solutions test fails until someone writes it."""
    cell = _copy(exercise.stub, new_id=f"{exercise.stub['id']}-solution")
    cell["metadata"]["tags"] = [SOLUTION]
    return cell


def _title(nb: Notebook, notebook: str) -> Cell:
    first = source(nb["cells"][0])
    heading = first.splitlines()[0].lstrip("# ").strip() if first else notebook
    badge = _BADGE_TARGET.search(first)
    link = f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]" \
           f"{badge.group(1)}solutions/{badge.group(2)}_solutions.ipynb)\n\n" if badge else ""
    text = (
        f"# Solutions · {heading}\n\n{link}"
        f"The exercises of [`{notebook}`](../{notebook}), each with its statement, a solution and the notebook's own "
        "check, which says *right* here. Try them in the notebook first: its check cells say what is wrong without "
        "giving the answer away.\n\n"
        "A solution uses only its arguments and the set-up cell below, as the grader (`python -m mipo_lib grade`) runs "
        "a student's exercise cells. This notebook is rebuilt by `make solutions` (`mipo_lib/workbook/editions.py`): "
        "the statements and checks are copied from the notebook, only the solution cells are written here, and "
        "`tests/test_exercises.py` runs every solution through its checker."
    )
    return {"cell_type": "markdown", "id": "solutions-title", "metadata": {}, "source": _lines(text)}


def _colab_cell(nb: Notebook) -> list[Cell]:
    """The notebook's Colab install cell (its first code cell), so the solutions run on Colab too."""
    first_code = next((c for c in nb["cells"] if c["cell_type"] == "code"), None)
    if first_code is None or "google.colab" not in source(first_code):
        return []
    return [_copy(first_code, new_id="solutions-colab")]


def build_solutions(nb: Notebook, notebook: str, previous: Notebook | None = None) -> Notebook:
    """The solutions notebook of numbered notebook `nb` (file name `notebook`): title, Colab cell, set-up, then per
    exercise its statement, the solution cells of `previous` checked by the same checker (a placeholder when there
    are none yet) and its check."""
    blocks = solution_blocks(previous)
    setup = {"cell_type": "code", "execution_count": None, "id": "solutions-setup", "metadata": {}, "outputs": [],
             "source": _lines(SETUP)}
    cells = [_title(nb, notebook), *_colab_cell(nb), setup]
    for exercise in exercise_cells(nb, notebook):
        solution = blocks.get(exercise.checker) or [_placeholder(exercise)]
        cells += [_copy(exercise.statement), *[_copy(c) for c in solution], _copy(exercise.check)]
    return {"cells": cells, "metadata": copy.deepcopy(nb["metadata"]), "nbformat": nb["nbformat"],
            "nbformat_minor": nb["nbformat_minor"]}


def read(path: Path) -> Notebook:
    return json.loads(path.read_text(encoding="utf-8"))


def dumps(nb: Notebook) -> str:
    """The workbook's notebook formatting (what Jupyter writes): one-space indent, UTF-8 as is, a final newline."""
    return json.dumps(nb, indent=1, ensure_ascii=False) + "\n"


def numbered_notebooks(folder: Path) -> list[Path]:
    return sorted(folder.glob("[0-9][0-9]_*.ipynb"))


def stale_solutions(folder: Path, write: bool) -> list[Path]:
    """The solutions notebooks that differ from what `build_solutions` makes of the numbered notebooks in `folder`
    (written anew when `write`)."""
    stale = []
    for path in numbered_notebooks(folder):
        nb = read(path)
        if not exercise_cells(nb, path.name):
            continue
        target = solutions_path(path)
        built = dumps(build_solutions(nb, path.name, read(target) if target.exists() else None))
        if not target.exists() or target.read_text(encoding="utf-8") != built:
            stale.append(target)
            if write:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(built, encoding="utf-8")
    return stale


def main(argv: Sequence[str] | None = None) -> int:
    """`python3 -m mipo_lib.workbook.editions [--check] [--notebooks DIR]`: rebuild the solutions notebooks."""
    parser = argparse.ArgumentParser(prog="python3 -m mipo_lib.workbook.editions", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a solutions notebook is stale")
    parser.add_argument("--notebooks", type=Path, default=repo_root() / "notebooks", help="the numbered notebooks' folder")
    args = parser.parse_args(argv)
    try:
        stale = stale_solutions(args.notebooks, write=not args.check)
    except MipoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in stale:
        print(f"{'stale' if args.check else 'wrote'} {path}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
