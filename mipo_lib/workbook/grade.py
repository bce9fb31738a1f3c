"""A teacher's grader: run every exercise of a class's submitted notebooks through its checker and write one CSV row
per student, notebook and exercise: ``student, notebook, exercise, verdict, message``.

    python -m mipo_lib grade SUBMISSIONS/ --out grades.csv --timeout 60

Layout of ``SUBMISSIONS/`` (both forms may be mixed):

    SUBMISSIONS/<student>/<NN>_<slug>.ipynb       one folder per student, the notebooks under their own names
    SUBMISSIONS/<student>_<NN>_<slug>.ipynb       flat, the student's name first (it may contain underscores)

What runs: only the exercise cells (tagged ``stub``, the cells a student writes in), after the set-up every exercise
may use (`editions.SETUP`: math, numpy, pandas, torch), in the notebook's order; never any other cell, so nothing
trains and nothing loads except what a checker builds itself (the LoRA-DPO step's tiny smoke model, seconds on a
CPU). A stub cell belongs to the exercise whose function it defines, so moved cells are still found. Each notebook
runs in its own worker process, one exercise at a time, each within ``--timeout`` seconds; a worker that runs past
it is killed and a fresh one (with the earlier exercise cells run again) goes on with the next exercise.

Verdicts: ``right``; ``wrong`` (the checker's hint, e.g. a library function called instead of written);
``not done yet`` (the stub untouched, or no exercise cell defines the function); ``error`` (the exercise cell itself
fails: a syntax error, an exception while it runs); ``timeout``.

The students' code runs with the grader's permissions: grade in a container or a throw-away account.
"""

from __future__ import annotations

import argparse
import ast
import csv
import multiprocessing
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mipo_lib.errors import MipoError
from mipo_lib.workbook import editions

COLUMNS = ("student", "notebook", "exercise", "verdict", "message")
RIGHT, WRONG, NOT_DONE, ERROR, TIMEOUT = "right", "wrong", "not done yet", "error", "timeout"
_NESTED = re.compile(r"(?P<notebook>(?P<number>\d\d)_[A-Za-z][A-Za-z0-9_]*)")  # anything after: "01_x (1)"
_FLAT = re.compile(r"(?P<student>.+?)_(?P<notebook>(?P<number>\d\d)_[A-Za-z][A-Za-z0-9_]*)(?:\W.*)?")
_STARTUP_SECONDS = 300  # importing torch, pandas and the library in a fresh worker, on a busy machine


@dataclass(frozen=True)
class Submission:
    student: str
    notebook: str  # NN_slug
    path: Path


@dataclass(frozen=True)
class Task:
    """One exercise as the worker runs it: the submitted cell that defines `function` (None: no such cell)."""

    label: str
    function: str
    checker: str
    cell: str | None


def find_submissions(folder: Path) -> tuple[list[Submission], list[Path]]:
    """The submitted notebooks of numbered notebooks that have exercises, and the files that are not one."""
    from mipo_lib.workbook.exercises import EXERCISES

    found, skipped = [], []
    for path in sorted(folder.rglob("*.ipynb")):
        relative = path.relative_to(folder)
        if ".ipynb_checkpoints" in relative.parts:
            continue
        nested = len(relative.parts) == 2
        match = _NESTED.match(path.stem) if nested else _FLAT.fullmatch(path.stem)
        if len(relative.parts) > 2 or not match or match.group("number") not in EXERCISES:
            skipped.append(path)
            continue
        found.append(Submission(relative.parts[0] if nested else match.group("student"), match.group("notebook"), path))
    return found, skipped


def _defines(source: str, name: str) -> bool | None:
    """Whether a cell's code binds `name` at its top level (None: the code does not parse)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            return True
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return True
    return False


def tasks_of(nb: dict[str, Any], number: str) -> list[Task]:
    """The exercises of notebook `number` with the submitted cell of each: the last ``stub`` cell that defines its
    function; failing that, when the notebook still has one stub cell per exercise, the one in its place (so a cell
    that does not parse is reported as the error it is)."""
    from mipo_lib.workbook.exercises import EXERCISES

    stubs = [editions.source(c) for c in nb.get("cells", []) if c.get("cell_type") == "code" and editions.STUB in editions.tags(c)]
    exercises = EXERCISES[number]
    tasks = []
    for k, exercise in enumerate(exercises):
        defining = [s for s in stubs if _defines(s, exercise.function)]
        if defining:
            cell = defining[-1]
        elif len(stubs) == len(exercises) and _defines(stubs[k], exercise.function) is None:
            cell = stubs[k]
        else:
            cell = None
        tasks.append(Task(f"{k + 1} {exercise.function}", exercise.function, exercise.checker, cell))
    return tasks


# ------------------------------------------------------------------------------------------------- the worker
def _run_task(namespace: dict[str, Any], task: Task, check: bool) -> tuple[str, str]:
    """Run a task's cell in `namespace`, then (when `check`) its checker on the function the cell defined."""
    if task.cell is None:
        return NOT_DONE, f"{NOT_DONE}: no exercise cell (tagged 'stub') defines `{task.function}`: write it in the exercise's own cell"
    try:
        exec(compile(task.cell, f"<exercise {task.label}>", "exec"), namespace)
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - the student's cell failing is a verdict
        return ERROR, f"the exercise cell fails: {type(exc).__name__}: {exc}"
    if not check:
        return "", ""
    fn = namespace.get(task.function)
    if not callable(fn):
        return NOT_DONE, f"{NOT_DONE}: the exercise cell does not define `{task.function}`"
    from mipo_lib.workbook import exercises

    try:
        verdict = getattr(exercises, task.checker)(fn)
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - e.g. the function changed state the checker relies on
        return ERROR, f"the check failed: {type(exc).__name__}: {exc}"
    return {True: RIGHT, False: WRONG, None: NOT_DONE}[verdict.ok], verdict.message


def _worker(conn: Any, tasks: list[Task], first: int, skip: set[int]) -> None:
    """Runs in a fresh process: the set-up, the cells of the tasks before `first` again (no check; not those of
    `skip`, which stopped a worker), then each task from `first` on, sending ("start", i) and ("done", i, verdict,
    message). The students' output goes nowhere."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - for the life of the worker
    import torch

    torch.set_num_threads(1)  # every exercise is small; one thread per worker does not fight the others
    namespace: dict[str, Any] = {"__name__": "__main__"}
    exec(compile(editions.SETUP, "<set-up>", "exec"), namespace)
    for i in range(first):
        if i not in skip:
            _run_task(namespace, tasks[i], check=False)
    for i in range(first, len(tasks)):
        conn.send(("start", i))
        conn.send(("done", i, *_run_task(namespace, tasks[i], check=True)))
    conn.close()


def grade_notebook(tasks: list[Task], timeout: float) -> list[tuple[str, str]]:
    """(verdict, message) of each task, run by worker processes, each task within `timeout` seconds."""
    results: list[tuple[str, str]] = []
    stopped: set[int] = set()  # tasks that stopped a worker: not run again for the tasks after them
    context = multiprocessing.get_context("spawn")
    while len(results) < len(tasks):
        parent, child = context.Pipe(duplex=False)
        process = context.Process(target=_worker, args=(child, tasks, len(results), stopped), daemon=True)
        process.start()
        child.close()
        try:
            waiting_to_start = True
            while len(results) < len(tasks):
                limit = _STARTUP_SECONDS + timeout if waiting_to_start else timeout
                if not parent.poll(limit):
                    stopped.add(len(results))
                    results.append((TIMEOUT, f"stopped after {timeout:g} s (--timeout): an endless loop, or too slow?"))
                    break
                try:
                    message = parent.recv()
                except EOFError:
                    process.join()
                    stopped.add(len(results))
                    results.append((ERROR, f"the worker process died (exit code {process.exitcode}): os._exit, a crash?"))
                    break
                waiting_to_start = message[0] == "done"  # a task's own time starts at its "start"
                if message[0] == "done":
                    results.append((message[2], message[3]))
        finally:
            process.kill()
            process.join()
            parent.close()
    return results


def grade(folder: Path, timeout: float) -> list[dict[str, str]]:
    """One row per submitted notebook and exercise (see the module's docstring)."""
    submissions, skipped = find_submissions(folder)
    for path in skipped:
        print(f"skipped {path}: not <student>/<NN>_<slug>.ipynb or <student>_<NN>_<slug>.ipynb of a notebook with "
              "exercises", file=sys.stderr)
    if not submissions:
        raise MipoError(f"no submitted notebooks in {folder}: expect {folder}/<student>/01_mutual_information.ipynb "
                        f"or {folder}/<student>_01_mutual_information.ipynb")
    rows = []
    for sub in submissions:
        try:
            nb = editions.read(sub.path)
        except (ValueError, UnicodeDecodeError) as exc:
            rows.append({"student": sub.student, "notebook": sub.notebook, "exercise": "", "verdict": ERROR,
                         "message": f"not a notebook: {exc}"})
            continue
        tasks = tasks_of(nb, sub.notebook[:2])
        for task, (verdict, message) in zip(tasks, grade_notebook(tasks, timeout)):
            rows.append({"student": sub.student, "notebook": sub.notebook, "exercise": task.label, "verdict": verdict,
                         "message": message})
        print(f"{sub.student} {sub.notebook}: {sum(r['verdict'] == RIGHT for r in rows[-len(tasks):])}/{len(tasks)} right")
    return rows


def write_csv(rows: Sequence[dict[str, str]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m mipo_lib grade SUBMISSIONS/ [--out grades.csv] [--timeout 60]`"""
    parser = argparse.ArgumentParser(prog="python -m mipo_lib grade", description=__doc__.split("\n\n")[0],
                                     epilog="Layout and verdicts: mipo_lib/workbook/grade.py")
    parser.add_argument("submissions", type=Path, help="SUBMISSIONS/<student>/NN_slug.ipynb or SUBMISSIONS/<student>_NN_slug.ipynb")
    parser.add_argument("--out", type=Path, default=Path("grades.csv"), help="the CSV to write (default grades.csv)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per exercise (default 60)")
    args = parser.parse_args(argv)
    try:
        if args.timeout <= 0:
            raise MipoError(f"--timeout must be a positive number of seconds, got {args.timeout:g}")
        if not args.submissions.is_dir():
            raise MipoError(f"{args.submissions} is not a folder: pass the folder that holds the submissions")
        rows = grade(args.submissions, args.timeout)
    except MipoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_csv(rows, args.out)
    print(f"wrote {args.out}: {len(rows)} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
