"""The held-out-preference-types comparison as its own target (`make heldout`), its records committed next to the
results.

Why: notebook 05 also asks whether MIPO teaches following preferences in general or only the types it was trained
on (`personalization_unseen_types`: MIPO trained on five preference types, tested with the other five). That costs a
pairs run, a full MIPO training and two evaluations, about a fifth of `make reproduce` on 2 cores, so it runs as its
own target and `make reproduce` reads its records from `figures/heldout_types_<preset>.csv`, as it reads the
settings `make tune` chose from `figures/choices_<preset>.csv`.

The table carries, per row, the cache key digest of the evaluation that made it (`key`). `records` reuses it only if
every method and seed it needs is there with the key the current settings give (model, dtype, chosen epochs, DPO
forward, prompts ...); otherwise it computes the records through the pipeline (as notebook 05 always did) and says
why, so a stale table is never read as a result of other settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from mipo_lib import pipeline
from mipo_lib.config import Preset, get_preset, repo_root

TASK = "personalization_unseen_types"
METHODS: tuple[str, ...] = ("prompting", "MIPO")
#: How many of the preset's seeds train MIPO for it (each costs a pairs run and a full training).
DEFAULT_SEEDS = 1


def records_path(preset_name: str) -> Path:
    """`figures/heldout_types_<preset>.csv`: the committed per-prompt records of `make heldout`."""
    return repo_root() / "figures" / f"heldout_types_{preset_name}.csv"


def task_preset(preset: Preset) -> Preset:
    """The preset on the held-out-types task (same model, settings and chosen epochs)."""
    return preset.with_overrides(task=TASK)


def expected_keys(preset: Preset, seeds: Sequence[int]) -> dict[tuple[str, int], str]:
    """{(method, seed): the evaluation key digest the current settings give}."""
    held = task_preset(preset)
    return {(m, int(s)): pipeline.evaluation_key(held, m, int(s)).digest for m in METHODS for s in seeds}


def compute(preset: Preset, seeds: Sequence[int], progress: bool = True) -> pd.DataFrame:
    """Pairs, MIPO training and both evaluations on the held-out types (each cached under runs/), with a `key` column."""
    frame = pipeline.evaluate_all(task_preset(preset), list(seeds), methods=list(METHODS), progress=progress)
    keys = expected_keys(preset, seeds)
    return frame.assign(key=[keys[(m, int(s))] for m, s in zip(frame["method"], frame["seed"])])


def committed(preset: Preset, seeds: Sequence[int], path: Path | None = None) -> tuple[pd.DataFrame | None, str]:
    """(the committed records, "") if they match the current settings for every method and seed, else (None, why)."""
    path = path or records_path(preset.name)
    if not path.exists():
        return None, f"no {path.name} (`make heldout` writes it)"
    frame = pd.read_csv(path, keep_default_na=False, na_values=[""])
    frame["response"] = frame["response"].fillna("")
    stored = {(m, int(s)): set(k) for (m, s), k in frame.groupby(["method", "seed"])["key"]}
    expected = expected_keys(preset, seeds)
    for wanted, key in expected.items():
        if wanted not in stored:
            return None, f"{path.name} has no {wanted[0]} records for seed {wanted[1]}"
        if stored[wanted] != {key}:
            return None, f"{path.name} was made with other settings ({wanted[0]}, seed {wanted[1]}: key {sorted(stored[wanted])[0]} != {key})"
    keep = frame[[(m, int(s)) in expected for m, s in zip(frame["method"], frame["seed"])]]
    return keep.reset_index(drop=True), ""


def records(preset: Preset, seeds: Sequence[int], progress: bool = True) -> tuple[pd.DataFrame, str]:
    """(records, where they came from): the committed table when it matches, else computed now (not written)."""
    frame, why = committed(preset, seeds)
    if frame is not None:
        return frame, f"read from {records_path(preset.name).name} (`make heldout`; keys match the current settings)"
    return compute(preset, seeds, progress=progress), f"computed now: {why}"


def run(preset_name: str = "cpu", seeds: Sequence[int] | None = None, overrides: dict[str, Any] | None = None,
        progress: bool = True) -> pd.DataFrame:
    """`make heldout`: compute the records for the first `DEFAULT_SEEDS` seeds (or `seeds`) and write the table."""
    preset = get_preset(preset_name, **(overrides or {}))
    seeds = list(seeds) if seeds is not None else list(preset.seeds)[:DEFAULT_SEEDS]
    frame = compute(preset, seeds, progress=progress)
    path = records_path(preset.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)
    return frame
