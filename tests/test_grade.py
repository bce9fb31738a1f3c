"""The teacher's grader: it finds submissions in both layouts, runs only the exercise cells (matched by the function
they define) through the checkers in worker processes, and writes the CSV: right for a solved notebook, not done yet
for an untouched one, wrong for a library call through an aliased import, timeout and error for broken cells."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from mipo_lib.workbook import editions, grade

ROOT = Path(__file__).resolve().parents[1]
NB01 = ROOT / "notebooks" / "01_mutual_information.ipynb"


def _solved(path: Path) -> dict:
    """The student notebook with every stub replaced by the solutions notebook's solution cells."""
    nb = editions.read(path)
    blocks = editions.solution_blocks(editions.read(editions.solutions_path(path)))
    for exercise in editions.exercise_cells(nb, path.name):
        exercise.stub["source"] = "\n\n".join(editions.source(c) for c in blocks[exercise.checker])
    return nb


def _with_stubs(path: Path, sources: dict[int, str]) -> dict:
    """The student notebook with stub k (from 0) replaced by sources[k]."""
    nb = editions.read(path)
    for k, exercise in enumerate(editions.exercise_cells(nb, path.name)):
        if k in sources:
            exercise.stub["source"] = sources[k]
    return nb


def _write(path: Path, nb: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(editions.dumps(nb))


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


ALIASED = "from mipo_lib.mi import conditional_pmi as f\n\n\ndef conditional_pmi_table(pi0_c, pc):\n    return f(pi0_c, pc)\n"


def test_submissions_are_found_in_both_layouts(tmp_path):
    names = ["alice/01_mutual_information.ipynb", "alice/02_preference_pairs (1).ipynb", "bob_smith_03_dpo_training.ipynb",
             "carol2024_01_mutual_information.ipynb", "dave/00_quickstart.ipynb", "notes.ipynb",
             "eve/old/01_mutual_information.ipynb", "alice/.ipynb_checkpoints/01_mutual_information-checkpoint.ipynb"]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("{}")
    found, skipped = grade.find_submissions(tmp_path)
    assert sorted((s.student, s.notebook) for s in found) == [
        ("alice", "01_mutual_information"), ("alice", "02_preference_pairs"), ("bob_smith", "03_dpo_training"),
        ("carol2024", "01_mutual_information")]
    assert sorted(p.relative_to(tmp_path).as_posix() for p in skipped) == [
        "dave/00_quickstart.ipynb", "eve/old/01_mutual_information.ipynb", "notes.ipynb"]


def test_exercise_cells_are_matched_by_the_function_they_define():
    broken = "def pmi_and_kl(pi0, px, beta)\n    return 0"
    in_place = grade.tasks_of(_with_stubs(NB01, {1: broken}), "01")
    assert [t.label for t in in_place] == ["1 world_summary", "2 pmi_and_kl", "3 log_partition", "4 conditional_pmi_table"]
    assert in_place[1].cell == broken  # does not parse, but sits in exercise 2's place: graded as the error it is
    nb = _with_stubs(NB01, {2: "x = 1"})
    cells = nb["cells"]
    first = next(i for i, c in enumerate(cells) if editions.STUB in editions.tags(c))
    cells.append(cells.pop(first))  # exercise 1's cell moved to the end of the notebook
    moved = grade.tasks_of(nb, "01")
    assert "def world_summary" in moved[0].cell and "def conditional_pmi_table" in moved[3].cell
    assert moved[2].cell is None  # no exercise cell defines log_partition


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    """A class of three: one solved everything (flat layout), one left the stubs, one calls the library through an
    aliased import in exercise 4 (folders)."""
    folder = tmp_path_factory.mktemp("submissions")
    _write(folder / "solver_01_mutual_information.ipynb", _solved(NB01))
    _write(folder / "empty" / "01_mutual_information.ipynb", editions.read(NB01))
    _write(folder / "aliased" / "01_mutual_information.ipynb", _with_stubs(NB01, {3: ALIASED}))
    out = folder.parent / "grades.csv"
    assert grade.main([str(folder), "--out", str(out), "--timeout", "60"]) == 0
    return _rows(out)


def test_the_grader_writes_one_row_per_student_notebook_and_exercise(graded):
    labels = ["1 world_summary", "2 pmi_and_kl", "3 log_partition", "4 conditional_pmi_table"]
    assert list(graded[0]) == list(grade.COLUMNS)
    assert [(r["student"], r["notebook"], r["exercise"], r["verdict"]) for r in graded] == [
        *[("aliased", "01_mutual_information", e, v) for e, v in zip(labels, ["not done yet"] * 3 + ["wrong"])],
        *[("empty", "01_mutual_information", e, "not done yet") for e in labels],
        *[("solver", "01_mutual_information", e, "right") for e in labels],
    ]
    assert "mipo_lib.mi.conditional_pmi" in graded[3]["message"]
    assert all(r["message"].startswith("right") for r in graded[8:])


def test_the_grader_says_what_is_wrong_with_its_input(tmp_path, capsys):
    assert grade.main([str(tmp_path), "--out", str(tmp_path / "g.csv")]) == 2
    assert "no submitted notebooks" in capsys.readouterr().err
    assert grade.main([str(tmp_path / "missing")]) == 2
    assert grade.main([str(tmp_path), "--timeout", "0"]) == 2
    assert not (tmp_path / "g.csv").exists()


@pytest.mark.slow
def test_the_grader_stops_an_endless_loop_and_survives_broken_cells(tmp_path):
    """An endless loop is stopped at the timeout, a cell that does not parse and a process killed by the student's
    code are errors, and the exercises after them are still graded (the earlier cells run again, not the broken)."""
    solved = [editions.source(e.stub) for e in editions.exercise_cells(_solved(NB01), NB01.name)]
    nb = _with_stubs(NB01, {0: "def world_summary(pi0, px, beta):\n    while True:\n        pass\n",
                            1: "def pmi_and_kl(pi0, px, beta)\n    return 0\n",
                            2: "import os\n\n\ndef log_partition(pi0, px, beta):\n    os._exit(3)\n",
                            3: solved[3]})
    _write(tmp_path / "subs" / "mallory" / "01_mutual_information.ipynb", nb)
    assert grade.main([str(tmp_path / "subs"), "--out", str(tmp_path / "g.csv"), "--timeout", "5"]) == 0
    rows = _rows(tmp_path / "g.csv")
    assert [r["verdict"] for r in rows] == ["timeout", "error", "error", "right"], rows
    assert "SyntaxError" in rows[1]["message"] and "died" in rows[2]["message"]
