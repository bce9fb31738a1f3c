"""The confirmatory test (`make confirm`): the plan's adapters evaluated once on requests nobody tuned on.

Why: the `cpu` preset's test prompts were evaluated under several protocols (`docs/ledger.md`), so they no longer
test anything nobody looked at. `docs/confirmatory-plan.md` fixed in advance, in the commit that added
`data/confirm/requests.csv`, what a fresh test compares and how it is read; this module carries it out as written:

- the adapters of the first reference run with >= `MIN_SEEDS` seeds committed after the plan (`find_reference`, from
  git history; the working tree must hold that run's results, validation choices, plan and requests unchanged);
- the plan's requests crossed with the preference types the preset trains on, prompted and judged by the
  personalization task's own template and judge (`examples`), answered by prompting, SFT and MIPO with the preset's
  evaluation settings (`pipeline.evaluate_stored`); nothing is trained here;
- the paired differences of `HYPOTHESES` from `stats.results_table`, H1 read on the interval design of the reference
  run's headline row (`verdicts`).

Once only: before the first reply is generated, `run` writes the lock (`data/confirm/plan.lock`: the plan's digest, the
adapters' commit and keys, the seeds, the start time; the finish time once the results are written). While a lock
exists every later run is refused, with the lock's content in the one-line message, and
`python -m mipo_lib.experiments.confirm --status` prints it. A results table that carries the plan's digest refuses a
run too, should the lock be lost. The run records itself in the ledger (`experiments.ledger.record`).

This is the only module that reads `data/confirm/`, and no module imports it: tests check both, so no tuning or
training code can see the requests.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import hashlib
import json
import subprocess
import sys
from dataclasses import dataclass
from io import StringIO
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from mipo_lib import files
from mipo_lib.analysis import stats
from mipo_lib.config import Preset, get_preset, parse_assignments, repo_root
from mipo_lib.errors import MipoError
from mipo_lib.experiments import ledger, pipeline
from mipo_lib.tasks import get_task
from mipo_lib.tasks.base import Example
from mipo_lib.tasks.personalization import PREFERENCES, PersonalizationTask

PLAN = "docs/confirmatory-plan.md"
REQUESTS = "data/confirm/requests.csv"
LOCK = "data/confirm/plan.lock"
#: The plan's "multi-seed" reference run: its MIPO vs prompting comparison has at least this many seeds.
MIN_SEEDS = 5
#: Evaluated methods: prompting (greedy, so once, paired with every seed), then each seed's SFT and MIPO adapters.
METHODS: tuple[str, ...] = ("prompting", "SFT", "MIPO")
#: The plan's comparisons: H1 is the confirmatory one, H2 secondary.
HYPOTHESES: dict[tuple[str, str], str] = {("MIPO", "prompting"): "H1", ("MIPO", "SFT"): "H2"}
FAMILY = "confirmatory: docs/confirmatory-plan.md"


@dataclass(frozen=True)
class Paths:
    """Where the plan, its requests, the lock and the outputs are (tests point them into a temporary folder)."""

    plan: Path
    requests: Path
    lock: Path
    results: Path
    records: Path
    ledger_csv: Path
    ledger_doc: Path

    @classmethod
    def for_preset(cls, preset_name: str) -> "Paths":
        root = repo_root()
        return cls(root / PLAN, root / REQUESTS, root / LOCK, root / "figures" / f"confirm_{preset_name}.csv",
                   root / "figures" / f"confirm_records_{preset_name}.csv", ledger.csv_path(), ledger.doc_path())


@dataclass(frozen=True)
class Reference:
    """The reference run whose adapters the plan evaluates: its commit, seeds and headline interval design."""

    commit: str
    seeds: tuple[int, ...]
    design: str


# ------------------------------------------------------------------------------------------------ plan and requests
def plan_digest(paths: Paths) -> str:
    """A digest of the plan and its requests as they are now: what the lock and the results are tied to."""
    return hashlib.sha256(paths.plan.read_bytes() + b"\0" + paths.requests.read_bytes()).hexdigest()[:16]


def read_requests(path: Path) -> list[tuple[str, str]]:
    """(id, request) pairs of the plan's requests file (columns `id,request`, ids unique, requests non-empty)."""
    with Path(path).open(newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames != ["id", "request"]:
            raise MipoError(f"{path} has columns {reader.fieldnames}; the plan's requests file has id,request")
        rows = [(r["id"].strip(), r["request"].strip()) for r in reader]
    ids = [i for i, _ in rows]
    if not rows or len(set(ids)) != len(ids) or not all(i and text for i, text in rows):
        raise MipoError(f"{path}: every row needs a unique id and a request; fix the file before the plan is committed")
    return rows


def examples(task: PersonalizationTask, requests: Sequence[tuple[str, str]]) -> list[Example]:
    """Each request crossed with the preference types the task trains on, as the task builds its own examples (id
    `c07-banana`, the preference sentence as context), so its `prompt` and `score` apply unchanged."""
    return [Example(id=f"{rid}-{key}", request=text, context=PREFERENCES[key][0],
                    meta={"preference": key, "request_id": rid})
            for rid, text in requests for key in task.preference_keys("train")]


# ----------------------------------------------------------------------------------------------- the reference run
def _git(root: Path, *args: str) -> str:
    try:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        raise MipoError(f"git {' '.join(args[:2])} failed ({err}); run make confirm in a full clone (not shallow)"
                        ) from None


def headline_design(table: pd.DataFrame, task: str) -> str:
    """The interval design of a results table's MIPO vs prompting headline row (its first such row)."""
    rows = table[(table["kind"] == "paired_difference") & (table["task"] == task) & (table["method"] == "MIPO")
                 & (table["baseline"] == "prompting")]
    if rows.empty:
        raise MipoError(f"the results table has no MIPO vs prompting row for {task}; it is no reference run's table")
    return str(rows["ci_design"].iloc[0])


def reference_in(table: pd.DataFrame, commit: str, task: str) -> Reference | None:
    """The table's run as the plan's reference: its MIPO seeds and headline design, or None with < MIN_SEEDS seeds."""
    seeds = sorted({int(s) for s in table[(table["kind"] == "per_seed") & (table["task"] == task)
                                          & (table["method"] == "MIPO")]["seed"]})
    if len(seeds) < MIN_SEEDS:
        return None
    return Reference(commit[:12], tuple(seeds), headline_design(table, task))


def find_reference(preset_name: str, task: str, root: Path | None = None) -> Reference:
    """The first commit after the plan's that changed `figures/results_<preset>.csv` to a run of >= MIN_SEEDS seeds,
    following only descendants of the plan's commit; the working tree must hold that commit's results, validation
    choices, plan and requests unchanged (so the preset resolves to the settings that trained its adapters)."""
    root = root or repo_root()
    added = _git(root, "log", "--diff-filter=A", "--format=%H", "--", PLAN).split()
    if not added:
        raise MipoError(f"{PLAN} is not committed; commit the plan with its requests before evaluating anything")
    plan_commit, table_file = added[-1], f"figures/results_{preset_name}.csv"
    # descendants of the plan's commit only, merges left out: a merge can bring in a table committed before the plan
    after = _git(root, "rev-list", "--reverse", "--ancestry-path", "--no-merges", f"{plan_commit}..HEAD", "--",
                 table_file).split()
    for commit in after:
        table = pd.read_csv(StringIO(_git(root, "show", f"{commit}:{table_file}")))
        found = reference_in(table, commit, task)
        if found is not None:
            changed = [p for p in (table_file, f"figures/choices_{preset_name}.csv", PLAN, REQUESTS)
                       if _git(root, "diff", "--name-only", commit, "--", p).strip()]
            if changed:
                raise MipoError(f"{', '.join(changed)} differ from the reference run's commit {commit[:12]}; restore "
                                f"them (git checkout {commit[:12]} -- {' '.join(changed)}) to evaluate its adapters")
            return found
    raise MipoError(f"no reference run with >= {MIN_SEEDS} seeds is committed after the plan ({plan_commit[:12]}); "
                    f"commit one first (make reproduce SEEDS=0,1,2,3,4)")


# ---------------------------------------------------------------------------------------------------- run once
def read_lock(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def status(paths: Paths) -> str:
    """Whether the plan has been run: the lock's content, or that it is unused."""
    lock = read_lock(paths.lock)
    if lock is None:
        return f"unused: no {paths.lock.name}; make confirm evaluates the plan once (plan digest {plan_digest(paths)})"
    state = f"finished {lock['finished_at']}" if lock.get("finished_at") else "started, never finished"
    same = "this plan" if lock["plan_digest"] == plan_digest(paths) else "a plan since changed"
    return (f"used: {paths.lock} records a run of {same} (digest {lock['plan_digest']}) on the adapters of "
            f"{lock['adapters_commit']}, seeds {lock['seeds']}, started {lock['started_at']}, {state}; "
            f"results: {lock['results']}")


def refuse_if_used(paths: Paths) -> None:
    """A confirmatory plan is evaluated once: refuse when its lock exists or its results carry its digest."""
    if paths.lock.exists():
        raise MipoError(f"refused, a confirmatory test runs once. {status(paths)}. A new test needs a new plan with "
                        "new requests (removing the lock is a visible commit the ledger records)")
    if paths.results.exists():
        committed = pd.read_csv(paths.results, dtype=str)
        if plan_digest(paths) in set(committed.get("plan_digest", pd.Series(dtype=str)).dropna()):
            raise MipoError(f"refused, a confirmatory test runs once: {paths.results} already holds this plan's "
                            f"results (digest {plan_digest(paths)}) though {paths.lock} is gone")


def _write_lock(path: Path, content: dict[str, Any]) -> None:
    files.write_text(path, json.dumps(content, indent=1) + "\n")


def _shown(path: Path) -> str:
    """A path as the lock records it: relative to the repository when inside it (the lock is committed)."""
    return str(path.relative_to(repo_root())) if path.is_relative_to(repo_root()) else str(path)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------------- evaluation
def verdicts(table: pd.DataFrame, design: str) -> pd.DataFrame:
    """The plan's reading of each comparison: on `design`'s rows, H1 "confirmed" when its CI's lower bound is above
    0 ("not confirmed" otherwise, "not confirmed (upper bound below 0)" for a CI below 0), H2 "supported" or "not
    supported" alike; the other designs' rows are "sensitivity"."""
    if design not in set(table["ci_design"].dropna()):
        raise MipoError(f"stats.results_table computes no {design!r} interval, the committed results' design; "
                        "evaluate with the library version of the reference run")

    def read(row: pd.Series) -> str:
        hypothesis = HYPOTHESES.get((row["method"], row["baseline"]), "")
        if row["kind"] != "paired_difference" or not hypothesis:
            return ""
        if row["ci_design"] != design:
            return "sensitivity"
        yes, no = ("confirmed", "not confirmed") if hypothesis == "H1" else ("supported", "not supported")
        if row["diff_lo"] > 0:
            return yes
        return f"{no} (upper bound below 0)" if row["diff_hi"] < 0 else no

    hypotheses = [HYPOTHESES.get((m, b), "") if k == "paired_difference" else ""
                  for k, m, b in zip(table["kind"], table["method"], table["baseline"])]
    return table.assign(hypothesis=hypotheses, verdict=table.apply(read, axis=1))


def run(
    preset_name: str = "cpu", *, overrides: dict[str, Any] | None = None, reference: Reference | None = None,
    paths: Paths | None = None, progress: bool = True,
) -> pd.DataFrame:
    """`make confirm`: evaluate the plan's adapters once on its requests; write the results (with the plan's digest,
    the adapters' commit and the verdicts), every reply, the lock and a ledger row. Returns the results table.

    `reference` defaults to `find_reference` (git history); tests pass one, with `paths` in a temporary folder."""
    paths = paths or Paths.for_preset(preset_name)
    refuse_if_used(paths)
    preset = get_preset(preset_name, **(overrides or {}))
    task = get_task(preset.task)
    if not isinstance(task, PersonalizationTask) or task.name != "personalization":
        raise MipoError(f"the confirmatory plan is about the personalization task, not {preset.task!r}; "
                        "use the cpu preset")
    reference = reference or find_reference(preset_name, task.name)
    found = pipeline.stored_adapters(preset, METHODS, reference.seeds)  # before the lock: a missing adapter does not use the plan up
    exs, digest = examples(task, read_requests(paths.requests)), plan_digest(paths)
    lock = {"plan_digest": digest, "adapters_commit": reference.commit, "seeds": list(reference.seeds),
            "adapters": {f"{m} seed {s}": p.name for (m, s), p in found.items()}, "preset": preset.name,
            "started_at": _now(), "finished_at": None, "results": _shown(paths.results)}
    _write_lock(paths.lock, lock)
    records = pipeline.evaluate_stored(preset, task, exs, found, reference.seeds, METHODS, progress=progress)
    table = stats.results_table(records, comparisons=list(HYPOTHESES), family=FAMILY)
    table = verdicts(table, reference.design).assign(plan_digest=digest, adapters_commit=reference.commit)
    stats.write_table(table, paths.results)
    paths.records.parent.mkdir(parents=True, exist_ok=True)
    records.assign(plan_digest=digest).to_csv(paths.records, index=False)
    _write_lock(paths.lock, {**lock, "finished_at": _now()})
    _record_in_ledger(paths, preset, reference, len(exs), digest, table)
    return table


def _record_in_ledger(paths: Paths, preset: Preset, reference: Reference, n_prompts: int, digest: str,
                      table: pd.DataFrame) -> None:
    """The run's ledger row: the preset's protocol on the new prompts, H1's verdict and the headline."""
    h1 = table[(table["hypothesis"] == "H1") & (table["ci_design"] == reference.design)]["verdict"].iloc[0]
    protocol = (f"{ledger.protocol_of(preset, reference.seeds)}; evaluated on {n_prompts} new prompts instead "
                f"(data/confirm, plan {digest}), adapters of {reference.commit}, verdict on the {reference.design} "
                "interval")
    ledger.record(paths.results.name, ledger.PENDING, protocol, f"H1 {h1}: {ledger.headline(paths.results)}",
                  source=paths.ledger_csv, doc=paths.ledger_doc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mipo_lib.experiments.confirm", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="preset field overrides, as the reference run had them (e.g. dtype=float32)")
    parser.add_argument("--status", action="store_true", help="say whether the plan has been run, and do nothing")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.status:
            print(status(Paths.for_preset(args.preset)))
            return 0
        table = run(args.preset, overrides=parse_assignments(args.set), progress=not args.no_progress)
        shown = table[table["hypothesis"] != ""][["hypothesis", "method", "baseline", "ci_design", "rate",
                                                  "baseline_rate", "diff", "diff_lo", "diff_hi", "verdict"]]
        print(shown.to_string(index=False, float_format="{:.3f}".format))
    except MipoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
