"""Negative constraints on the test side (`make constraints`): does MIPO's reward pull replies towards what the user
asked them to avoid?

Why: MIPO's reward is the base model's PMI of the reply with the user's context, and restating the context is the
cheapest way to raise it (notebook 05, section 5b). Every trained preference names something to include ("mention
bananas"), where saying the named thing is also following it. A user who writes "do not mention coffee" names the
thing to avoid, and the same reward pays for saying it. A user test outside the project saw exactly that.

What it evaluates: the test requests the preset evaluates (the `cpu` preset's 10), each crossed with the test-only
`tasks.personalization.NEGATIVE_CONSTRAINTS` (never trained or tuned on: `NegativeConstraintsTask`), answered greedily
by prompting, SFT and MIPO with the preset's evaluation settings, MIPO and SFT by the adapters the pipeline stored for
every seed of the preset (`pipeline.stored_adapters`: a missing one stops the run; nothing is trained here). Each
method's replies are cached under `runs/<preset>/personalization_constraints/eval/`, so a rerun continues.

What it writes: every reply with its verdict (`score`: 1 when the reply keeps its constraint), whether it echoes the
constraint sentence (`echo`, `echoes_constraint`) to `figures/negative_constraints_<preset>.csv`; MIPO - prompting and
MIPO - SFT as paired differences with the results' intervals (`stats.results_table`, their own Holm family, not the
headline's) to `figures/negative_constraints_results_<preset>.csv`; a ledger row (an evaluation of the test requests).
`per_constraint` summarises the records: per constraint and method, the share of replies that violate it and the share
that echo it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from mipo_lib.analysis import stats
from mipo_lib.config import Preset, get_preset, repo_root, run_dir
from mipo_lib.errors import MipoError
from mipo_lib.experiments import ledger, pipeline
from mipo_lib.tasks import get_task
from mipo_lib.tasks.base import Example
from mipo_lib.tasks.personalization import NEGATIVE_CONSTRAINTS, echoes_constraint

TASK = "personalization_constraints"
#: The preset's task whose test requests and adapters are used.
SOURCE_TASK = "personalization"
#: Prompting (decoded once, paired with every seed), then each seed's SFT and MIPO adapters.
METHODS: tuple[str, ...] = ("prompting", "SFT", "MIPO")
COMPARISONS: tuple[tuple[str, str], ...] = (("MIPO", "prompting"), ("MIPO", "SFT"))
FAMILY = "negative constraints: MIPO vs prompting and SFT on test-only constraints"


def records_path(preset_name: str) -> Path:
    """`figures/negative_constraints_<preset>.csv`: every reply, its verdict and whether it echoes its constraint."""
    return repo_root() / "figures" / f"negative_constraints_{preset_name}.csv"


def results_path(preset_name: str) -> Path:
    """`figures/negative_constraints_results_<preset>.csv`: the per-seed rates and the paired differences."""
    return repo_root() / "figures" / f"negative_constraints_results_{preset_name}.csv"


def examples(preset: Preset) -> list[Example]:
    """The requests of the preset's test prompts, each crossed with every negative constraint (ids `r02-no_coffee`)."""
    if preset.task != SOURCE_TASK:
        raise MipoError(f"negative constraints are asked on the {SOURCE_TASK} task's test requests, with its "
                        f"adapters; preset {preset.name!r} trains {preset.task!r}: use the cpu preset")
    requests = {e.meta["request_id"] for e in get_task(SOURCE_TASK).examples("test", preset.n_test_prompts)}
    exs = get_task(TASK).examples("test", len(requests) * len(NEGATIVE_CONSTRAINTS))
    if {e.meta["request_id"] for e in exs} != requests:  # both subsets are one draw with the same seed
        raise MipoError(f"the constraints' test subset is not on the preset's {len(requests)} test requests; "
                        "NegativeConstraintsTask must draw its subset as PersonalizationTask does")
    return exs


def with_measures(records: pd.DataFrame) -> pd.DataFrame:
    """The records with `request_id`, `violated` (1 - score) and `echo` (the reply repeats three consecutive words of
    its constraint sentence, `echoes_constraint`)."""
    echo = [echoes_constraint(g, str(r)) for g, r in zip(records["group"], records["response"].fillna(""))]
    return records.assign(request_id=records["example_id"].str.split("-").str[0], violated=1.0 - records["score"],
                          echo=echo)


def per_constraint(records: pd.DataFrame) -> pd.DataFrame:
    """Per constraint and method (over seeds and requests): replies `n`, the share that violate the constraint, the
    share that echo its sentence, the share cut at the token cap."""
    measured = records if "echo" in records else with_measures(records)
    table = (measured.assign(echo=measured["echo"].astype(float), truncated=measured["truncated"].astype(float))
             .groupby(["group", "method"], sort=False)
             .agg(n=("score", "size"), violated=("violated", "mean"), echo=("echo", "mean"),
                  truncated=("truncated", "mean")).reset_index().rename(columns={"group": "constraint"}))
    order = {m: i for i, m in enumerate(stats.ordered_methods(table["method"]))}
    keys = {k: i for i, k in enumerate(NEGATIVE_CONSTRAINTS)}
    return table.sort_values(["constraint", "method"], key=lambda s: s.map(keys if s.name == "constraint" else order),
                             ignore_index=True)


def run(preset_name: str = "cpu", overrides: dict[str, Any] | None = None, seeds: Sequence[int] | None = None,
        progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame, float]:
    """`make constraints`: evaluate the stored adapters of `seeds` (default: the preset's) on the negative
    constraints; write the records, the results table and a ledger row. Returns (records, results, seconds taken)."""
    preset = get_preset(preset_name, **(overrides or {}))
    seeds = list(seeds) if seeds is not None else list(preset.seeds)
    exs = examples(preset)
    found = pipeline.stored_adapters(preset, METHODS, seeds)  # before any generation: nothing is trained here
    start = time.perf_counter()
    records = pipeline.evaluate_stored(preset, get_task(TASK), exs, found, seeds, METHODS, progress=progress,
                                       cache_dir=run_dir(preset, TASK, "eval"))
    records = with_measures(records)
    table = stats.results_table(records, comparisons=list(COMPARISONS), family=FAMILY)
    seconds = time.perf_counter() - start
    path = records_path(preset.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    records.to_csv(path, index=False)
    stats.write_table(table, results_path(preset.name))
    _record_in_ledger(preset, seeds, exs)
    return records, table, seconds


def _record_in_ledger(preset: Preset, seeds: Sequence[int], exs: Sequence[Example]) -> None:
    """The run's ledger row: the preset's protocol on the constraint prompts, and the comparisons."""
    requests = len({e.meta["request_id"] for e in exs})
    protocol = (f"{ledger.protocol_of(preset, seeds)}; evaluated instead on its {requests} test requests x "
                f"{len(NEGATIVE_CONSTRAINTS)} test-only negative constraints ({len(exs)} prompts: "
                f"{', '.join(NEGATIVE_CONSTRAINTS)}), the stored adapters of these seeds, nothing trained")
    ledger.record(results_path(preset.name).name, ledger.PENDING, protocol, ledger.headline(results_path(preset.name)))
