"""The held-out-preference-types comparison as its own target (`make heldout`), its records committed next to the
results.

Why: notebook 05 also asks whether MIPO teaches following preferences in general or only the types it was trained
on (`personalization_unseen_types`: MIPO trained on five preference types, tested with the other five). That costs a
pairs run, two MIPO trainings (the epoch sweep below and the chosen run) and six evaluations, about a third of
`make reproduce` on 2 cores, so it runs as its own target and `make reproduce` reads its records from
`figures/heldout_types_<preset>.csv`, as it reads the settings `make tune` chose from `figures/choices_<preset>.csv`.

MIPO trained on half the preference types is another model than the one `make tune` chose epochs for, so this run
chooses its own: one MIPO training of `tune.EPOCH_GRID`'s largest epochs with a snapshot after each, scored on its
own validation split (validation requests with the *seen* types: the held-out types are touched only by the test),
with `make tune`'s rule (`tune.choose`); the learning rate stays the one `make tune` chose. The sweep goes to
`figures/heldout_tuning_<preset>.csv` and the choice to `figures/heldout_choices_<preset>.csv`.

The table carries, per row, the cache key digest of the evaluation that made it (`key`). `records` reuses it only if
every method and seed it needs is there with the key the current settings give (model, dtype, chosen epochs, DPO
forward, prompts ...); otherwise it says, before computing, why (the fields whose values differ from the ones the
held-out choice records in `tuned_under`, where they explain it) and what it recomputes, then computes the records
through the pipeline (as notebook 05 always did), so a stale table is never read as a result of other settings.
Like every cached evaluation, the replies it reads are judged on read by the task's current judge
(`evaluate.judged`): the file's `score` column is for its readers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from mipo_lib import config, evaluate
from mipo_lib.experiments import pipeline, tune
from mipo_lib.config import Preset, get_preset, repo_root
from mipo_lib.tasks import get_task

TASK = "personalization_unseen_types"
METHODS: tuple[str, ...] = ("prompting", "MIPO")
#: How many of the preset's seeds train MIPO for it (each costs a pairs run and a full training). Three: a transfer
#: claim on one seed cannot tell a seed's luck from the method (issue 29).
DEFAULT_SEEDS = 3
#: How many of them choose the epochs on validation (an 8-epoch sweep each): the first, as `make tune` (SEEDS=0).
TUNING_SEEDS = 1


def records_path(preset_name: str) -> Path:
    """`figures/heldout_types_<preset>.csv`: the committed per-prompt records of `make heldout`."""
    return repo_root() / "figures" / f"heldout_types_{preset_name}.csv"


def choices_path(preset_name: str) -> Path:
    """`figures/heldout_choices_<preset>.csv`: the held-out-types run's MIPO epochs, chosen on its validation split."""
    return repo_root() / "figures" / f"heldout_choices_{preset_name}.csv"


def tuning_path(preset_name: str) -> Path:
    """`figures/heldout_tuning_<preset>.csv`: its validation rate after each number of epochs of the grid."""
    return repo_root() / "figures" / f"heldout_tuning_{preset_name}.csv"


def load_choices(preset_name: str) -> dict[str, Any]:
    """`{"epochs": n}` from the committed choice; {} without one."""
    return config.load_choices(preset_name, choices_path(preset_name))


def task_preset(preset: Preset, choices: dict[str, Any] | None = None) -> Preset:
    """The preset on the held-out-types task: same model and settings, MIPO's epochs from `choices` (default: the
    committed `heldout_choices_<preset>.csv`, if any)."""
    return preset.with_overrides(task=TASK, **(load_choices(preset.name) if choices is None else choices))


def choose_epochs(preset: Preset, seeds: Sequence[int], progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(validation summary, choices table with the `epochs` row) for MIPO on the held-out-types task's own validation
    split, by `make tune`'s rule over `seeds`."""
    held = preset.with_overrides(task=TASK)
    frames = [tune.sweep_epochs(held, "MIPO", int(s), tune.EPOCH_GRID, progress=progress) for s in seeds]
    summary = tune.summarize(pd.concat(frames, ignore_index=True))
    choices = tune.choose(summary, list(seeds))
    return summary, choices[choices["field"] == tune.TUNED_FIELDS["MIPO"]].reset_index(drop=True)


def expected_keys(preset: Preset, seeds: Sequence[int], choices: dict[str, Any] | None = None) -> dict[tuple[str, int], str]:
    """{(method, seed): the evaluation key digest the current settings (and the held-out epochs) give}."""
    held = task_preset(preset, choices)
    return {(m, int(s)): pipeline.evaluation_key(held, m, int(s)).digest for m in METHODS for s in seeds}


def compute(preset: Preset, seeds: Sequence[int], progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(records with a `key` column, validation summary, choices): the epoch sweep on validation, then pairs, MIPO
    training with the chosen epochs and both test evaluations on the held-out types (each cached under runs/)."""
    summary, choices = choose_epochs(preset, list(seeds)[:TUNING_SEEDS], progress=progress)
    chosen = config.typed_choices(zip(choices["field"], choices["value"]))
    frame = pipeline.evaluate_all(task_preset(preset, chosen), list(seeds), methods=list(METHODS), progress=progress)
    keys = expected_keys(preset, seeds, chosen)
    return frame.assign(key=[keys[(m, int(s))] for m, s in zip(frame["method"], frame["seed"])]), summary, choices


def committed(preset: Preset, seeds: Sequence[int], path: Path | None = None) -> tuple[pd.DataFrame | None, str]:
    """(the committed records, "") if they match the current settings for every method and seed, else (None, why)."""
    path = path or records_path(preset.name)
    if not path.exists():
        return None, f"no {path.name} (`make heldout` writes it)"
    rows = config.read_choices(choices_path(preset.name))
    if not rows:
        return None, f"no {choices_path(preset.name).name} (`make heldout` writes it)"
    chosen = {c.field: c.value for c in rows}
    frame = pd.read_csv(path, keep_default_na=False, na_values=[""])
    frame["response"] = frame["response"].fillna("")
    stored = {(m, int(s)): set(k) for (m, s), k in frame.groupby(["method", "seed"])["key"]}
    expected = expected_keys(preset, seeds, chosen)
    for wanted, key in expected.items():
        if wanted not in stored:
            return None, f"{path.name} has no {wanted[0]} records for seed {wanted[1]}"
        if stored[wanted] != {key}:
            held = task_preset(preset, chosen)  # the settings the held-out choice records it was made under
            differences = {f: d for c in rows for f, d in config.tuning_differences(held, c.tuned_under).items()}
            if differences:
                was, now = config.differences_text(differences)
                return None, f"{path.name} was made with {was}; this run has {now}"
            return None, f"{path.name} was made with other settings ({wanted[0]}, seed {wanted[1]}: key {sorted(stored[wanted])[0]} != {key})"
    keep = frame[[(m, int(s)) in expected for m, s in zip(frame["method"], frame["seed"])]]
    held, task = task_preset(preset, chosen), get_task(TASK)
    return evaluate.judged(keep.reset_index(drop=True), task, task.examples("test", held.n_test_prompts)), ""


def records(preset: Preset, seeds: Sequence[int], progress: bool = True) -> tuple[pd.DataFrame, str]:
    """(records, where they came from and MIPO's epochs): the committed table when it matches, else computed now (not
    written)."""
    frame, why = committed(preset, seeds)
    if frame is not None:
        return frame, (f"read from {records_path(preset.name).name} (`make heldout`; keys match the current settings); "
                       f"MIPO trained {task_preset(preset).epochs} epochs, chosen on its validation split "
                       f"({choices_path(preset.name).name})")
    print(f"{why}: recomputing the held-out-types results for seeds {list(seeds)}: per seed, MIPO's pairs and a "
          f"{max(tune.EPOCH_GRID)}-epoch training scored on that task's validation split after each of "
          f"{', '.join(map(str, tune.EPOCH_GRID))} epochs (to choose them), a training with the chosen epochs, and the "
          f"test evaluations of {' and '.join(METHODS)} (stages already under runs/ are reused)", flush=True)
    frame, _, choices = compute(preset, seeds, progress=progress)
    return frame, f"computed now ({why}); MIPO trained {choices['value'].iloc[0]} epochs, chosen on its validation split now"


def run(preset_name: str = "cpu", seeds: Sequence[int] | None = None, overrides: dict[str, Any] | None = None,
        progress: bool = True) -> pd.DataFrame:
    """`make heldout`: choose the epochs and compute the records for the first `DEFAULT_SEEDS` seeds (or `seeds`);
    write the records, the validation sweep and the choice."""
    preset = get_preset(preset_name, **(overrides or {}))
    seeds = list(seeds) if seeds is not None else list(preset.seeds)[:DEFAULT_SEEDS]
    frame, summary, choices = compute(preset, seeds, progress=progress)
    path = records_path(preset.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)
    summary.to_csv(tuning_path(preset.name), index=False, float_format="%.6g")
    tune.write_choices(choices, preset.with_overrides(task=TASK), choices_path(preset.name))
    return frame
