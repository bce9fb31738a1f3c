"""Each ablation variant at its own best: its epochs chosen on the validation split (`make ablation-choices`).

Why: a variant that reuses the reference's epochs is compared at the reference's optimum, not its own. K = 4 takes
four times the optimizer steps per epoch, beta = 0.05 lets the policy move further per step: either may peak at
another epoch count, and "every variant is worse than the reference" is then what one expects even if a variant is
better at its own best. So each variant gets `make tune`'s treatment, on seed 0 as `make tune SEEDS=0`:
one training of `GRID`'s largest epochs with an adapter kept after each epoch of the grid (`tune.sweep_epochs`),
each snapshot scored on the validation prompts, and `tune.within_one_se` (the one-standard-error rule) picks the
cheapest. The learning rate stays the reference's (`make tune`'s choice): one more axis would double the cost.

`GRID` is 1, 2 and 4 epochs: at the chosen learning rate the reference's own sweep rose to 4 epochs and fell at 8
(`figures/tuning_cpu.csv`), and an 8-epoch snapshot run of K = 4 costs as much as 32 reference epochs. A choice on
the grid's largest value is flagged (`at_grid_edge`): more epochs might have scored higher.

The compute-matched control (K = 1 trained as many optimizer steps as K = k) is a control, not a variant: it takes
K = k's chosen epochs times k (`ablations.variant_presets`), so it is not tuned here.

Each choice is one row of `figures/ablation_choices_<preset>.csv`, written as soon as its variant is done (a long run
that stops keeps the variants it finished), with the digest of the training it swept (`key`): a row whose key the
current settings do not give is not used, and `chosen` says why before anything is trained.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from mipo_lib.config import Preset, repo_root
from mipo_lib.errors import MipoError
from mipo_lib.experiments import pipeline, tune
from mipo_lib.files import atomic

#: The epoch counts each variant is scored after (one training of the largest).
GRID: tuple[int, ...] = (1, 2, 4)
#: The seed whose pairs and training choose (as `make tune SEEDS=0`).
SEED = 0
COLUMNS = ("variant", "method", "epochs", "validation_rate", "best_rate", "se", "grid", "seed", "n_validation",
           "at_grid_edge", "wall_s", "key", "rule")


def choices_path(preset_name: str) -> Path:
    """`figures/ablation_choices_<preset>.csv`: one row per tuned variant."""
    return repo_root() / "figures" / f"ablation_choices_{preset_name}.csv"


def tuning_path(preset_name: str) -> Path:
    """`figures/ablation_tuning_<preset>.csv`: every variant's validation rate after each epoch count of `GRID`."""
    return repo_root() / "figures" / f"ablation_tuning_{preset_name}.csv"


def sweep_key(preset: Preset, method: str, seed: int = SEED) -> str:
    """Digest of the snapshot training a variant's choice comes from (its pairs, trainer, learning rate ..., and
    `GRID`'s longest epochs)."""
    return pipeline.training_key(preset.with_overrides(epochs=max(GRID)), method, seed).digest


def _grid_text(grid: tuple[int, ...]) -> str:
    return " ".join(map(str, grid))


def read(preset_name: str) -> pd.DataFrame:
    """The committed choices (empty, with `COLUMNS`, without the file)."""
    path = choices_path(preset_name)
    if not path.exists():
        return pd.DataFrame(columns=list(COLUMNS))
    return pd.read_csv(path, keep_default_na=False, na_values=[""], dtype={"variant": str, "method": str, "key": str})


def chosen(preset: Preset, variants: Mapping[str, tuple[Preset, str]], table: pd.DataFrame | None = None
           ) -> tuple[dict[str, int], dict[str, str]]:
    """({label: chosen epochs} for the variants whose committed row matches the settings, {label: why not} for the
    others). `variants` maps a label to (variant preset, method)."""
    table = read(preset.name) if table is None else table
    rows = {r.variant: r for r in table.itertuples()}
    epochs, missing = {}, {}
    for label, (p, method) in variants.items():
        row = rows.get(label)
        if row is None:
            missing[label] = f"no row in {choices_path(preset.name).name}"
        elif (row.method != method or str(row.grid) != _grid_text(GRID)
              or row.key != sweep_key(p, method, int(row.seed))):
            missing[label] = f"its row in {choices_path(preset.name).name} was made with other settings"
        else:
            epochs[label] = int(row.epochs)
    return epochs, missing


def sweep_variant(label: str, preset: Preset, method: str, seed: int = SEED, progress: bool = True
                  ) -> tuple[dict[str, Any], pd.DataFrame]:
    """(the choice row, the validation summary) of one variant: `tune.sweep_epochs` over `GRID` at the variant's own
    settings, then the one-standard-error rule."""
    grid, start = GRID, time.monotonic()
    summary = tune.summarize(tune.sweep_epochs(preset, method, seed, grid, progress=progress))
    best_row, best_rate, se = tune.within_one_se(summary)
    row = {"variant": label, "method": method, "epochs": int(best_row["value"]),
           "validation_rate": round(float(best_row["rate"]), 4), "best_rate": round(best_rate, 4),
           "se": round(se, 4), "grid": _grid_text(grid), "seed": seed, "n_validation": int(best_row["n"]),
           "at_grid_edge": int(best_row["value"]) == max(grid), "wall_s": round(time.monotonic() - start, 1),
           "key": sweep_key(preset, method, seed), "rule": tune.RULE}
    return row, summary.assign(variant=label)


def run(preset: Preset, variants: Mapping[str, tuple[Preset, str]], progress: bool = True) -> pd.DataFrame:
    """`make ablation-choices`: sweep every variant whose committed row is missing or stale, cheapest first as given,
    writing the choices and the sweep after each (rows of other variants are kept). Returns the choices table."""
    if not variants:
        raise MipoError("no ablation variants to tune")
    table, sweeps = read(preset.name), read_sweeps(preset.name)
    _, todo = chosen(preset, variants, table)
    for label, why in todo.items():
        p, method = variants[label]
        print(f"{label}: {why}; choosing its epochs on validation (seed {SEED}, {max(GRID)}-epoch training with "
              f"snapshots after {', '.join(map(str, GRID))})", flush=True)
        row, summary = sweep_variant(label, p, method, progress=progress)
        table = pd.concat([table[table["variant"] != label], pd.DataFrame([row])], ignore_index=True)
        kept = sweeps[sweeps["variant"] != label] if len(sweeps) else sweeps
        sweeps = pd.concat([kept, summary], ignore_index=True)
        with atomic(choices_path(preset.name)) as tmp:  # an interrupted write leaves the last whole table
            table.reindex(columns=list(COLUMNS)).to_csv(tmp, index=False)
        with atomic(tuning_path(preset.name)) as tmp:
            sweeps.to_csv(tmp, index=False, float_format="%.6g")
    return table.reindex(columns=list(COLUMNS))


def read_sweeps(preset_name: str) -> pd.DataFrame:
    """The committed sweep: each variant's validation rate and cut share after each epoch count (empty without it)."""
    path = tuning_path(preset_name)
    return pd.read_csv(path) if path.exists() else pd.DataFrame()
