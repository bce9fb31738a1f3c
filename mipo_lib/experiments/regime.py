"""The paper's training regime as rows of the results (`make regime`), its records committed next to the results.

Why: the paper trained every parameter of its models for one epoch; the workbook's MIPO trains a LoRA adapter for the
epochs and learning rate `make tune` chose on validation (2 epochs at 8e-4 on the `cpu` preset). Two rows say what
the paper's regime gives at this size, each against prompting:
- `ONE_EPOCH`: MIPO's LoRA adapter trained for one epoch, with the learning rate chosen on validation *at one epoch*
  (the committed sweep's 1-epoch rates stop at its largest rate, 8e-4, so the grid goes two steps higher);
- `FULL`: MIPO on every parameter of the 135M model (no LoRA: the opt-in method "MIPO (full fine-tuning)",
  `methods.py`), with its learning rate and epochs chosen on validation (the paper used 5e-7 for one epoch on 7B
  models; the grid spans 1e-6 to 1e-4).

Each regime is chosen like `make tune`'s settings: one training per learning rate on the tuning seed (`TUNING_SEEDS`)
for the regime's largest number of epochs with a snapshot after each (`tune.sweep_epochs`), scored on the validation
prompts, and `tune.within_one_se`'s one-standard-error rule picks the cheapest setting within one standard error of
the best. Then every seed trains the chosen setting and is evaluated once on the test prompts, with prompting, the
baseline. The comparisons are their own family (`FAMILY`): a question about the paper's regime, read apart from the
headline's Holm family ("main: MIPO vs baselines"), so adding them changes none of the headline's adjusted p-values.

A grid that grows is swept again without the test runs (`choose_again`, `make regime-sweep`): only the learning
rates that lack the new epochs are trained, and it says whether the committed test records still match the choices.

It costs more than `make reproduce`'s budget (the sweep alone trains seven models), so it is its own target and
notebook 05 reads its committed records (`figures/regime_<preset>.csv`) while their cache keys match the current
settings, as it reads the held-out types' (`heldout.py`); otherwise it says why and shows no rows. The sweep goes to
`figures/regime_tuning_<preset>.csv`, the choices to `figures/regime_choices_<preset>.csv` and the paired
differences (`stats.results_table`, the results' seed-aware designs) to `figures/regime_results_<preset>.csv`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from mipo_lib import config, evaluate, memory
from mipo_lib.analysis import stats
from mipo_lib.config import Preset, get_preset, repo_root
from mipo_lib.errors import MipoError
from mipo_lib.experiments import ledger, pipeline, tune
from mipo_lib.tasks import get_task

BASELINE = "prompting"
FAMILY = "paper regime: MIPO as the paper trained it vs prompting"
"""The Holm family of the regime rows: their own, not the headline's (`stats.MAIN_FAMILY`)."""
#: Seeds that choose each regime's setting on validation: the first, as `make tune` (SEEDS=0).
TUNING_SEEDS = 1
#: Presets whose `make regime` tables are the committed reference: their test evaluation gets a ledger row.
REFERENCE_PRESETS = ("cpu",)


@dataclass(frozen=True)
class Regime:
    """One row of the paper's regime: its label in the tables, the registered method that trains it, and the grids
    of epochs (snapshots of one training) and learning rates its setting is chosen from on validation."""

    label: str
    method: str
    epoch_grid: tuple[int, ...]
    lr_grid: tuple[float, ...]


ONE_EPOCH = Regime("MIPO, 1 epoch", "MIPO", (1,), (2e-4, 8e-4, 2e-3, 4e-3))
FULL = Regime("MIPO, full fine-tuning", "MIPO (full fine-tuning)", (1, 2, 4), (1e-6, 1e-5, 1e-4))
REGIMES: tuple[Regime, ...] = (ONE_EPOCH, FULL)
CHOICE_COLUMNS = ("regime", "method", "epochs", "learning_rate", "validation_rate", "best_rate", "se", "n_validation",
                  "seeds", "epoch_grid", "lr_grid", "rule", "tuned_under")


def records_path(preset_name: str) -> Path:
    """`figures/regime_<preset>.csv`: the committed per-prompt test records of `make regime`."""
    return repo_root() / "figures" / f"regime_{preset_name}.csv"


def tuning_path(preset_name: str) -> Path:
    """`figures/regime_tuning_<preset>.csv`: every candidate setting's validation rate."""
    return repo_root() / "figures" / f"regime_tuning_{preset_name}.csv"


def choices_path(preset_name: str) -> Path:
    """`figures/regime_choices_<preset>.csv`: each regime's epochs and learning rate chosen on validation."""
    return repo_root() / "figures" / f"regime_choices_{preset_name}.csv"


def results_path(preset_name: str) -> Path:
    """`figures/regime_results_<preset>.csv`: per-seed rates and the paired differences to prompting."""
    return repo_root() / "figures" / f"regime_results_{preset_name}.csv"


def get_regime(label: str) -> Regime:
    for regime in REGIMES:
        if regime.label == label:
            return regime
    raise MipoError(f"unknown regime {label!r}; the regimes are {', '.join(r.label for r in REGIMES)}")


def sweep(preset: Preset, regime: Regime, seeds: Sequence[int], progress: bool = True) -> pd.DataFrame:
    """The validation summary of `regime` (`tune.summarize`, a `regime` column added): one training per seed and
    learning rate for the grid's largest epochs, scored after each epoch of the grid. A learning rate whose every
    epoch of the grid is already scored on the same seeds under the same settings, in `make tune`'s committed sweep
    (`swept_by_tune`) or in this regime's own (`swept_before`), is read from there, not trained again; one that
    lacks an epoch (the grid grew) is trained again over the whole grid."""
    done = pd.concat([swept_by_tune(preset, regime, seeds), swept_before(preset, regime, seeds)], ignore_index=True)
    done = done.drop_duplicates(["value", "learning_rate"]).reset_index(drop=True)
    complete = [lr for lr in regime.lr_grid
                if set(done.loc[done["learning_rate"] == lr, "value"]) >= set(map(float, regime.epoch_grid))]
    done = done[done["learning_rate"].isin(complete)]
    todo = [lr for lr in regime.lr_grid if lr not in complete]
    frames = [tune.sweep_epochs(preset, regime.method, int(s), regime.epoch_grid, progress=progress, learning_rate=lr)
              for s in seeds for lr in todo]
    swept = tune.summarize(pd.concat(frames, ignore_index=True)) if frames else done.iloc[:0]
    return (pd.concat([done, swept], ignore_index=True).sort_values(["value", "learning_rate"])
            .reset_index(drop=True).assign(regime=regime.label))


def swept_before(preset: Preset, regime: Regime, seeds: Sequence[int]) -> pd.DataFrame:
    """The rows of this regime's committed sweep (`figures/regime_tuning_<preset>.csv`) at an epoch and learning rate
    of its grid, if its committed choice was made on `seeds` under the settings `preset` has (`tuned_under`), else
    none: extending a grid trains only the learning rates that lack the new epochs."""
    empty = pd.DataFrame(columns=["method", "setting", "value", "learning_rate"])
    path = tuning_path(preset.name)
    choice = next((c for c in read_choices(preset.name) if c["regime"] == regime.label), None)
    if not path.exists() or choice is None or str(choice["seeds"]).split() != [str(s) for s in seeds]:
        return empty
    if config.tuning_differences(preset, json.loads(choice["tuned_under"])):
        return empty
    sweep_ = pd.read_csv(path, dtype={"per_seed": str})  # the seeds' rates as written ("0.440")
    keep = ((sweep_["regime"] == regime.label) & sweep_["value"].isin(regime.epoch_grid)
            & sweep_["learning_rate"].isin(regime.lr_grid))
    return sweep_[keep].drop(columns=["regime"]).reset_index(drop=True)


def swept_by_tune(preset: Preset, regime: Regime, seeds: Sequence[int]) -> pd.DataFrame:
    """The rows of `make tune`'s committed sweep (`figures/tuning_<preset>.csv`) that are settings of `regime`: its
    method, at every epoch of its grid, for a learning rate of its grid; only if that sweep ran on `seeds` under the
    settings `preset` has (its choices' `tuned_under`, `config.tuning_differences`), else none.

    With the schedule constant after warm-up (`dpo.LR_SCHEDULE`), `make tune`'s snapshot after e epochs is an e-epoch
    run, so MIPO at one epoch needs no new training for the rates `make tune` already tried (2e-4 and 8e-4)."""
    path, empty = tune.tuning_path(preset.name), pd.DataFrame(columns=["method", "setting", "value", "learning_rate"])
    rows = [c for c in config.read_choices(config.choices_path(preset.name)) if c.field == tune.TUNED_FIELDS.get(regime.method)]
    if not path.exists() or not rows or config.tuning_differences(preset, rows[0].tuned_under):
        return empty
    committed = pd.read_csv(config.choices_path(preset.name), dtype={"seeds": str})
    if committed["seeds"].iloc[0].split() != [str(s) for s in seeds]:
        return empty
    sweep_ = pd.read_csv(path)
    keep = ((sweep_["method"] == regime.method) & sweep_["value"].isin(regime.epoch_grid)
            & sweep_["learning_rate"].isin(regime.lr_grid))
    return sweep_[keep].reset_index(drop=True)


def choose(summary: pd.DataFrame, regime: Regime, seeds: Sequence[int]) -> dict[str, Any]:
    """The setting `tune.within_one_se` picks among `regime`'s rows of a summary, as one choices row (less
    `tuned_under`)."""
    sub = summary[(summary["regime"] == regime.label) & summary["rate"].notna()]
    if sub.empty:
        raise MipoError(f"the validation sweep has no rows of {regime.label!r}; run make regime")
    chosen, best, se = tune.within_one_se(sub.sort_values(["value", "learning_rate"]))
    return {"regime": regime.label, "method": regime.method, "epochs": int(chosen["value"]),
            "learning_rate": float(chosen["learning_rate"]), "validation_rate": round(float(chosen["rate"]), 4),
            "best_rate": round(best, 4), "se": round(se, 4), "n_validation": int(chosen["n"]),
            "seeds": " ".join(map(str, seeds)), "epoch_grid": " ".join(map(str, regime.epoch_grid)),
            "lr_grid": " ".join(f"{v:g}" for v in regime.lr_grid), "rule": tune.RULE}


def regime_preset(preset: Preset, choice: dict[str, Any]) -> Preset:
    """`preset` with a regime's chosen epochs and learning rate (MIPO's fields, which both regimes train with)."""
    return preset.with_overrides(epochs=int(choice["epochs"]), learning_rate=float(choice["learning_rate"]))


def expected_keys(preset: Preset, seeds: Sequence[int], choices: Sequence[dict[str, Any]]) -> dict[tuple[str, int], str]:
    """{(row label, seed): the evaluation key digest the current settings and `choices` give}; prompting's label is
    `BASELINE`."""
    keys = {(BASELINE, int(s)): pipeline.evaluation_key(preset, BASELINE, int(s)).digest for s in seeds}
    for choice in choices:
        setting = regime_preset(preset, choice)
        keys.update({(choice["regime"], int(s)): pipeline.evaluation_key(setting, choice["method"], int(s)).digest
                     for s in seeds})
    return keys


def test_records(preset: Preset, seeds: Sequence[int], choices: Sequence[dict[str, Any]],
                 progress: bool = True) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """(records with `method` = the row label and a `key` column, each regime's cost: the seconds of its trainings
    and evaluations, each training's seconds and the largest resident memory a training of it reached, `memory.stage`'s
    peak, None where every training was read from the cache): every seed trains each chosen setting and is evaluated
    once on the test prompts."""
    frames = [pipeline.evaluate_all(preset, list(seeds), methods=[BASELINE], progress=progress)]
    costs = []
    for choice in choices:
        setting, start = regime_preset(preset, choice), time.perf_counter()
        part = pipeline.evaluate_all(setting, list(seeds), methods=[choice["method"]], progress=progress)
        frames.append(part.assign(method=choice["regime"]))
        trainings = [m.peak_rss_mb for m in memory.recorded() if m.stage.startswith(f"train {choice['method']} (seed")]
        costs.append({"regime": choice["regime"], "seconds": round(time.perf_counter() - start, 1),
                      "train_seconds": [pipeline.train_for_seed(setting, choice["method"], int(s)).seconds for s in seeds],
                      "train_peak_rss_mb": round(max(trainings)) if trainings else None})
    frame = pd.concat(frames, ignore_index=True)
    keys = expected_keys(preset, seeds, choices)
    return frame.assign(key=[keys[(m, int(s))] for m, s in zip(frame["method"], frame["seed"])]), costs


def read_choices(preset_name: str) -> list[dict[str, Any]]:
    """The committed choices as dicts (epochs int, learning rate float); [] without the file."""
    path = choices_path(preset_name)
    if not path.exists():
        return []
    frame = pd.read_csv(path, dtype={"seeds": str, "epoch_grid": str, "lr_grid": str})
    return [{**row, "epochs": int(row["epochs"]), "learning_rate": float(row["learning_rate"])}
            for row in frame.to_dict("records")]


def committed(preset: Preset, seeds: Sequence[int]) -> tuple[pd.DataFrame | None, str]:
    """(the committed records of those of `seeds` the table holds, "") if they hold every row of each such seed with
    the key the current settings give, else (None, why): a table made under other settings is never read as this
    run's. A seed the table lacks is left out rather than computed (`make regime` costs more than a notebook may):
    the records' `seed` column says which seeds are shown."""
    path = records_path(preset.name)
    choices = read_choices(preset.name)
    if not path.exists() or not choices:
        return None, f"no {path.name} or {choices_path(preset.name).name} (`make regime` writes them)"
    frame = pd.read_csv(path, keep_default_na=False, na_values=[""])
    frame["response"] = frame["response"].fillna("")
    stored = {(m, int(s)): set(k) for (m, s), k in frame.groupby(["method", "seed"])["key"]}
    held = sorted({s for _, s in stored})
    seeds = [int(s) for s in seeds if int(s) in held]
    if not seeds:
        return None, f"{path.name} holds seeds {held}, none of this run's (`make regime SEEDS=...`)"
    expected = expected_keys(preset, seeds, choices)
    for (label, seed), key in expected.items():
        if (label, seed) not in stored:
            return None, f"{path.name} has no {label} records for seed {seed} (`make regime SEEDS=...`)"
        if stored[(label, seed)] != {key}:
            return None, (f"{path.name} was made with other settings ({label}, seed {seed}: key "
                          f"{sorted(stored[(label, seed)])[0]} != {key}); `make regime` recomputes it")
    keep = frame[[(m, int(s)) in expected for m, s in zip(frame["method"], frame["seed"])]].reset_index(drop=True)
    task = get_task(preset.task)
    return evaluate.judged(keep, task, task.examples("test", preset.n_test_prompts)), ""


def results(records: pd.DataFrame, n_boot: int = 10_000) -> pd.DataFrame:
    """Per-seed rates and each regime's paired difference to prompting, in the results' seed-aware designs
    (`stats.RESULTS_DESIGNS`), Holm-adjusted within `FAMILY`."""
    comparisons = [(r.label, BASELINE) for r in REGIMES if r.label in set(records["method"])]
    return stats.results_table(records, comparisons=comparisons, n_boot=n_boot, family=FAMILY)


def run(preset_name: str = "cpu", seeds: Sequence[int] | None = None, overrides: dict[str, Any] | None = None,
        progress: bool = True, write: bool = True) -> tuple[pd.DataFrame, pd.DataFrame, list[dict[str, Any]]]:
    """`make regime`: choose each regime's setting on validation (the first `TUNING_SEEDS` seeds), train and evaluate
    it on every seed (default: the preset's), and write the records, sweep, choices and results tables. Returns
    (records, results, costs): each stage's seconds and, for the test trainings, their peak resident memory."""
    preset = get_preset(preset_name, **(overrides or {}))
    seeds = list(seeds) if seeds is not None else list(preset.seeds)
    tuning_seeds, costs = seeds[:TUNING_SEEDS], []
    summaries, choices = [], []
    for regime in REGIMES:
        start = time.perf_counter()
        summaries.append(sweep(preset, regime, tuning_seeds, progress))
        choices.append(choose(summaries[-1], regime, tuning_seeds))
        costs.append({"stage": f"{regime.label}: validation sweep", "seconds": round(time.perf_counter() - start, 1)})
        print(f"{regime.label}: chose {choices[-1]['epochs']} epoch(s) at learning rate {choices[-1]['learning_rate']:g} "
              f"(validation {choices[-1]['validation_rate']:.1%}; best {choices[-1]['best_rate']:.1%}, se "
              f"{choices[-1]['se']:.1%})", flush=True)
    records, test_costs = test_records(preset, seeds, choices, progress)
    costs += _stage_costs(test_costs, len(seeds))
    table = results(records)
    if write:
        _write(preset, pd.concat(summaries, ignore_index=True), choices, records, table)
        if preset.name in REFERENCE_PRESETS:  # every evaluation of the test split has its row (docs/ledger.md)
            ledger.record(results_path(preset.name).name, ledger.PENDING, protocol(preset, seeds, choices),
                          ledger.headline(results_path(preset.name)))
    return records, table, costs


def choose_again(preset_name: str = "cpu", seeds: Sequence[int] | None = None, overrides: dict[str, Any] | None = None,
                 progress: bool = True) -> tuple[list[dict[str, Any]], str, list[dict[str, Any]]]:
    """`make regime-sweep`: each regime's validation sweep (only what the committed sweeps lack is trained, see
    `sweep`) and choice, the sweep and choices tables written; nothing is evaluated on the test prompts.

    Why: a grid that grows (full fine-tuning's epochs went from 1-2 to 1-2-4, its best at the old edge) must be
    swept again before its choice can be trusted, and the test runs cost most of `make regime`. If the choices
    stay as they were, the committed test records still hold (their keys depend on the chosen epochs and learning
    rate only); if one moved, `committed` stops reading them and this says so: `make regime` recomputes them.
    Returns (choices, "" or why the committed records no longer match, each regime's sweep seconds)."""
    preset = get_preset(preset_name, **(overrides or {}))
    seeds = list(seeds) if seeds is not None else list(preset.seeds)
    summaries, choices, costs = [], [], []
    for regime in REGIMES:
        start = time.perf_counter()
        summaries.append(sweep(preset, regime, seeds[:TUNING_SEEDS], progress))
        choices.append(choose(summaries[-1], regime, seeds[:TUNING_SEEDS]))
        costs.append({"stage": f"{regime.label}: validation sweep", "seconds": round(time.perf_counter() - start, 1)})
    _write_choices(preset, pd.concat(summaries, ignore_index=True), choices)
    return choices, committed(preset, seeds)[1], costs  # as notebook 05 reads them: the run's seeds the table holds


def add_seeds(preset_name: str, seeds: Sequence[int], overrides: dict[str, Any] | None = None,
              progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame, list[dict[str, Any]]]:
    """`make regime-seeds SEEDS=3,4`: the committed choices trained and evaluated on `seeds` the committed records
    lack, their records added to those the table holds, and the results (and a ledger row) rewritten from all of them.

    Why: `make regime` sweeps each regime on the tuning seed again before its test runs (an hour of full fine-tuning
    on 2 cores when the cache is gone); more seeds need none of it. The committed seeds' records are kept as they
    are, read only while their keys match the current settings (`committed`), and nothing is chosen again: the
    choices stay the committed ones, made on the tuning seed. Returns (records, results, costs) as `run` does."""
    preset = get_preset(preset_name, **(overrides or {}))
    choices = read_choices(preset.name)
    path = records_path(preset.name)
    if not choices or not path.exists():
        raise MipoError(f"no committed {path.name} to add seeds to; run make regime first")
    held = sorted({int(s) for s in pd.read_csv(path, usecols=["seed"])["seed"]})
    old, why = committed(preset, held)
    if old is None:
        raise MipoError(f"cannot add seeds: {why}")
    new = [int(s) for s in seeds if int(s) not in held]
    if not new:
        raise MipoError(f"{path.name} already holds seeds {held}; name seeds it lacks (e.g. SEEDS={max(held) + 1})")
    added, test_costs = test_records(preset, new, choices, progress)
    records = pd.concat([old, added], ignore_index=True)
    table = results(records)
    _write_records(preset, records, table)
    all_seeds = held + new
    if preset.name in REFERENCE_PRESETS:
        ledger.record(results_path(preset.name).name, ledger.PENDING,
                      f"{protocol(preset, all_seeds, choices)}; seeds {' '.join(map(str, new))} added to the committed "
                      f"{' '.join(map(str, held))} (make regime-seeds)", ledger.headline(results_path(preset.name)))
    return records, table, _stage_costs(test_costs, len(new))


def _stage_costs(test_costs: Sequence[dict[str, Any]], n_seeds: int) -> list[dict[str, Any]]:
    """`test_records`' costs as the stage rows `run` and `add_seeds` return."""
    return [{"stage": f"{c['regime']}: train and test ({n_seeds} seeds)", "seconds": c["seconds"],
             "train_seconds": c["train_seconds"], "train_peak_rss_mb": c["train_peak_rss_mb"]} for c in test_costs]


def protocol(preset: Preset, seeds: Sequence[int], choices: Sequence[dict[str, Any]]) -> str:
    """The ledger's protocol line of a `make regime` run: the preset's (`ledger.protocol_of`) and each regime's
    setting as chosen on validation, and its family."""
    chosen = "; ".join(f"{c['regime']}: {c['epochs']} epoch(s) at learning rate {c['learning_rate']:g} (grid epochs "
                       f"{c['epoch_grid']} x rates {c['lr_grid']}, chosen on validation, seed {c['seeds']})"
                       for c in choices)
    return f"{ledger.protocol_of(preset, seeds)}; the paper's regime (make regime): {chosen}; Holm family: {FAMILY}"


def _write(preset: Preset, summary: pd.DataFrame, choices: list[dict[str, Any]], records: pd.DataFrame,
           table: pd.DataFrame) -> None:
    """Write the four committed tables of a `make regime` run."""
    _write_records(preset, records, table)
    _write_choices(preset, summary, choices)


def _write_choices(preset: Preset, summary: pd.DataFrame, choices: list[dict[str, Any]]) -> None:
    """Write the validation sweep and the choices, each choice with the settings its sweep read (`tuned_under`)."""
    summary[["regime", *[c for c in summary.columns if c != "regime"]]].to_csv(tuning_path(preset.name), index=False,
                                                                               float_format="%.6g")
    under = [json.dumps(tune.tuned_under(preset, c["method"], ("epochs", "learning_rate")), separators=(",", ":"))
             for c in choices]
    pd.DataFrame([{**c, "tuned_under": u} for c, u in zip(choices, under)], columns=list(CHOICE_COLUMNS)).to_csv(
        choices_path(preset.name), index=False)


def _write_records(preset: Preset, records: pd.DataFrame, table: pd.DataFrame) -> None:
    """Write the per-prompt records and the results table."""
    path = records_path(preset.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = ["task", "method", "seed", "example_id", "group", "response", "score", "n_words", "truncated", "key"]
    records[columns].to_csv(path, index=False)
    stats.write_table(table, results_path(preset.name))
