"""The batch reproduction: execute the numbered notebooks with papermill for one preset and a list of seeds.

Each notebook runs in its own kernel with `PRESET`, `SEEDS`, `REDO` and `OVERRIDES` (preset fields to change, a dict)
injected into its `parameters` cell, and is written executed to `runs/<preset>/notebooks/`. Wall time and peak resident memory (kernel included, sampled every
0.2 s) go to `runs/<preset>/notebooks/timings.csv`. Stages reuse finished artefacts (pairs, adapters,
evaluations) unless `redo` is set, so re-running after an interruption continues where it stopped.
"""

from __future__ import annotations

import csv
import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from mipo_lib import memory
from mipo_lib.config import Resolved, repo_root, resolve_preset, run_dir, runs_dir
from mipo_lib.errors import MipoError


@dataclass
class NotebookRun:
    notebook: str
    preset: str
    wall_s: float
    peak_rss_mb: float
    ok: bool


def notebooks_dir() -> Path:
    return repo_root() / "notebooks"


#: The main job (`make reproduce`): quickstart, lessons and results. Ablations (06) and reasoning (07) are opt-in:
#: `make ablations`, `make reasoning` (`--notebooks 06` / `--notebooks 07`).
MAIN_NOTEBOOKS = ("00", "01", "02", "03", "04", "05")


def list_notebooks(names: Sequence[str] | None = None) -> list[Path]:
    """The main numbered notebooks in order (`NN_slug.ipynb`), or the ones whose name starts with one of `names`
    ('all' selects every numbered notebook)."""
    found = sorted(notebooks_dir().glob("[0-9][0-9]_*.ipynb"))
    if not names:
        return [p for p in found if p.stem[:2] in MAIN_NOTEBOOKS]
    if list(names) == ["all"]:
        return found
    chosen = [p for p in found if any(p.stem.startswith(n) or p.name == n for n in names)]
    if len(chosen) == 0:
        raise MipoError(f"no notebook matches {list(names)}; available: {[p.stem for p in found]}")
    return chosen


class PeakMemory:
    """Samples the resident memory of this process and all its children (the notebook kernel) in a thread.

    A context manager; `peak` holds the largest sum seen, in bytes. Public because the benchmarks measure with it too.
    """

    def __init__(self, interval: float = 0.2) -> None:
        import psutil

        self._proc = psutil.Process()
        self._interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        import psutil

        total = 0
        for proc in [self._proc, *self._proc.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self._interval)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@contextmanager
def _environment(values: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for a block (a kernel started in it inherits them), restored afterwards."""
    previous = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def run_notebook(
    path: Path,
    preset: str,
    seeds: Sequence[int] | None,
    redo: bool,
    out_dir: Path,
    progress: bool,
    overrides: Mapping[str, Any] | None = None,
    reference: bool = False,
) -> NotebookRun:
    """Execute one notebook with papermill; the executed copy lands in `out_dir` even when a cell fails.

    `overrides` reach the notebook as its `OVERRIDES` parameter, as JSON values (tuples become lists: papermill writes
    only JSON-like literals into the cell, and `get_preset` turns lists back into the fields' tuples).
    """
    import papermill as pm

    from mipo_lib.analysis.plots import REFERENCE_RUN_ENV

    params = {
        "PRESET": preset,
        "SEEDS": list(seeds) if seeds else None,
        "REDO": redo,
        "OVERRIDES": json.loads(json.dumps(dict(overrides or {}))),
    }
    start = time.perf_counter()
    ok = False
    # the kernel inherits this process's environment: tell its stages where to record their memory and, in the
    # reference run only (`is_reference_run`), that its reference preset writes the committed figures/ (plots.figures_dir)
    kernel_env = {REFERENCE_RUN_ENV: "1" if reference else "0", memory.LOG_ENV: str(out_dir / "memory.csv"),
                  memory.NOTEBOOK_ENV: path.stem}
    with _environment(kernel_env), PeakMemory() as mem:
        try:
            pm.execute_notebook(
                str(path),
                str(out_dir / path.name),
                parameters=params,
                cwd=str(path.parent),
                progress_bar=progress,
                kernel_name="python3",
            )
            ok = True
        finally:
            wall = time.perf_counter() - start
    return NotebookRun(path.stem, preset, round(wall, 1), round(mem.peak / 2**20, 1), ok)


def say_settings(preset: str, overrides: Mapping[str, Any] | None = None, tuned: bool = True) -> Resolved:
    """Resolve a preset as a command will run it and print each value that differs from the preset as written, with
    where it came from (`epochs = 8 (figures/choices_cpu.csv)`, `lora_r = 4 (--set)`), one per line."""
    resolved = resolve_preset(preset, overrides, tuned=tuned)
    for line in resolved.changes():
        print(f"[mipo] {resolved.preset.name}: {line}", flush=True)
    return resolved


def reproduce(
    preset: str = "cpu",
    seeds: Sequence[int] | None = None,
    notebooks: Sequence[str] | None = None,
    redo: bool = False,
    progress: bool = True,
    overrides: Mapping[str, Any] | None = None,
) -> list[NotebookRun]:
    """Run the workbook for a preset: every numbered notebook in order, stopping at the first failure.

    `overrides` change preset fields in every notebook (`--set field=value` on the command line); they are validated
    here first, so a bad value fails before the first kernel starts, and every value that differs from the preset as
    written is printed once with its source (`say_settings`). Output goes to the overridden preset's folder
    (`--set name=...` keeps a variant's notebooks apart).
    """
    effective = say_settings(preset, overrides).preset  # fail fast on an unknown name, field or value
    reference = is_reference_run(effective, overrides, seeds, [p.stem for p in list_notebooks(notebooks)])
    # only a run that computes everything measures the notebooks' cost (one that reuses its cache measures reading it)
    from_scratch = redo or not (runs_dir() / effective.name / effective.task).exists()
    out_dir = run_dir(effective, "notebooks")
    timings = out_dir / "timings.csv"
    runs: list[NotebookRun] = []
    for path in list_notebooks(notebooks):
        print(f"[mipo] {effective.name}: running {path.name} ...", flush=True)
        try:
            run = run_notebook(path, preset, seeds, redo, out_dir, progress, overrides, reference)
        except Exception:
            _append_timing(timings, NotebookRun(path.stem, preset, float("nan"), float("nan"), False))
            print(f"[mipo] {path.name} failed; the executed copy with the error is in {out_dir}", flush=True)
            raise
        _append_timing(timings, run)
        print(f"[mipo] {path.name}: {run.wall_s:.0f} s, peak {run.peak_rss_mb:.0f} MB", flush=True)
        runs.append(run)
        if reference:
            from mipo_lib.workbook.publish import publish

            publish(out_dir / path.name)
            print(f"[mipo] notebooks/{path.name} now shows this reference run's outputs", flush=True)
    writers = README_NOTEBOOKS.get(effective.name, ())
    if reference and any(r.notebook.startswith(writers) for r in runs):
        from mipo_lib.workbook.readme import update_readme  # the reference run: its numbers are the README's

        if update_readme(effective.name):
            print("[mipo] README.md's generated blocks rewritten from the committed figures/ files", flush=True)
    if reference and any(r.notebook.startswith(RESULTS_NOTEBOOK[effective.name]) for r in runs):
        from mipo_lib.experiments import ledger
        from mipo_lib.workbook.readme import results_path

        table = results_path(effective.name)  # every evaluation of the test split has its ledger row (docs/ledger.md)
        _record_test_evaluation(table, ledger.protocol_of(effective, seeds or effective.seeds), ledger.headline(table))
    if reference and effective.name in ABLATION_SEEDS and any(r.notebook.startswith(ABLATIONS_NOTEBOOK) for r in runs):
        from mipo_lib.analysis.ablation_findings import table_paths
        from mipo_lib.experiments import ledger

        table = table_paths(effective.name)["variants"]  # the committed table: its variants met the test prompts too
        _record_test_evaluation(table, ledger.protocol_of(effective, seeds or effective.seeds)
                                + f"; each ablation variant at its own epochs (figures/ablation_choices_{effective.name}.csv)",
                                ledger.ablation_headline(table))
    if reference and from_scratch and runs:
        from mipo_lib.workbook.readme import TIMINGS, update_readme, update_timings_table

        update_timings_table(timings, effective.name)
        update_readme(effective.name)  # its cost lines are rendered from the timings table
        print(f"[mipo] figures/{TIMINGS} records this from-scratch run's times", flush=True)
    return runs


def _record_test_evaluation(table: Path, protocol: str, result: str) -> None:
    """A reference run's ledger row for `table` (`ledger.record`, commit pending), and a line saying to commit both."""
    from mipo_lib.experiments import ledger

    ledger.record(table.name, ledger.PENDING, protocol, result)
    print(f"[mipo] data/ledger.csv: a row for this evaluation of the test split (commit it with {table.name})", flush=True)


#: Overrides that keep a run the reference: fp32 on a CPU with native bf16 reproduces what a CPU without it computes.
REFERENCE_OVERRIDES: frozenset[str] = frozenset({"dtype"})

#: The reference presets and the notebook that writes each one's committed results table (and so its README block):
#: `cpu` for 00-06 (`make reproduce`, `make ablations`), `cpu-reasoning` for 07 (`make reasoning`).
RESULTS_NOTEBOOK: dict[str, str] = {"cpu": "05", "cpu-reasoning": "07"}

#: The notebooks whose committed tables feed a README block (`readme.update_readme`): notebook 05's results and
#: notebook 06's ablations for `cpu`, notebook 07's results for `cpu-reasoning`.
README_NOTEBOOKS: dict[str, tuple[str, ...]] = {"cpu": ("05", "06"), "cpu-reasoning": ("07",)}


#: The seeds of notebook 06's committed run: it trains eight variants per seed, so its reference uses three seeds,
#: not the preset's five (`make ablations` passes them).
ABLATION_SEEDS: dict[str, tuple[int, ...]] = {"cpu": (0, 1, 2)}
ABLATIONS_NOTEBOOK = "06"


def is_reference_run(
    preset: Any, overrides: Mapping[str, Any] | None, seeds: Sequence[int] | None = None,
    notebooks: Sequence[str] = (),
) -> bool:
    """A reference run: a reference preset (`RESULTS_NOTEBOOK`) as committed (its validation choices included), at
    most with `dtype` set, on all of its seeds, or notebook 06 alone (`notebooks`: the notebooks' file stems) on its
    `ABLATION_SEEDS`. Only it writes the committed figures/, publishes its outputs into the committed notebooks and
    regenerates the README's results block: a one-seed quick run (`make reproduce SEEDS=0`) writes under runs/ like
    any other."""
    all_seeds = seeds is None or tuple(seeds) == tuple(preset.seeds)
    ablations_only = bool(notebooks) and all(n.startswith(ABLATIONS_NOTEBOOK) for n in notebooks)
    if ablations_only and seeds is not None and tuple(seeds) == ABLATION_SEEDS.get(preset.name):
        all_seeds = True
    return preset.name in RESULTS_NOTEBOOK and set(overrides or {}) <= REFERENCE_OVERRIDES and all_seeds


def _append_timing(path: Path, run: NotebookRun) -> None:
    new = not path.exists()
    with path.open("a", newline="") as fh:
        writer = csv.writer(fh)
        if new:
            writer.writerow(["notebook", "preset", "wall_s", "peak_rss_mb", "ok", "finished_at"])
        writer.writerow([run.notebook, run.preset, run.wall_s, run.peak_rss_mb, run.ok, time.strftime("%Y-%m-%dT%H:%M:%S")])
