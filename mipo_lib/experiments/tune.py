"""Settings chosen on the validation split (`make tune`), never on the test set.

What is chosen, each method at its own best:
- MIPO's epochs and learning rate (`epochs`, `learning_rate`) and the SFT baseline's (`sft_epochs`,
  `sft_learning_rate`), over `EPOCH_GRID` x `LR_FACTORS` (multiples of the preset's own rate). Each method is trained
  once per seed and learning rate for the largest number of epochs, with the adapter kept after every epoch of the
  grid (`dpo.snapshot_dir`); the learning rate is constant after warm-up (`dpo.LR_SCHEDULE`), so the snapshot after
  e epochs is an e-epoch run. A larger rate can reach in a few epochs what the preset's reaches in many, which makes
  every later run cheaper; whether it does is the validation split's to say.
- context-aware decoding's strength (`cad_alpha`) over `CAD_GRID` (a = 1/beta, MIPO's decode-time twin, is one of
  them and stays a named variant in the ablations).

Each setting is scored on the validation prompts (requests never used for training or testing) with the judge, and
the rule is the one-standard-error rule (`RULE`, `choose`): the best setting's rate p is measured on n = validation
prompts x tuning seeds judged replies, so its binomial standard error sqrt(p(1-p)/n) (about 7 points on 50 prompts)
says which other settings it does not beat; among those within one standard error of it, the cheapest is chosen
(fewest epochs, then the highest rate, then the smaller learning rate; CAD: the weakest strength). The highest rate
alone would buy a noise-sized gain with four times the training. The sweep is written to
`figures/tuning_<preset>.csv` and the choices to `figures/choices_<preset>.csv` (`rechoose` re-applies the rule to a
committed sweep without training anything), which `config.get_preset` reads for that preset: `make reproduce` then touches the
test set once, with these settings. Each row of the choices carries the settings its tuning read (`tuned_under`), so a
run under other settings is told that the choices were not made for it (`config.resolve_preset`). Everything is cached
and resumable like the pipeline's own stages.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd

from mipo_lib import cache, dpo, evaluate
from mipo_lib.experiments import pipeline
from mipo_lib import methods as registry
from mipo_lib.config import Preset, choices_path, get_preset, repo_root, resolved_dtype
from mipo_lib.errors import MipoError
from mipo_lib.models import load_for_preset
from mipo_lib.tasks import get_task

EPOCH_GRID: tuple[int, ...] = (1, 2, 4, 8)
#: Presets tuned over a shorter epoch grid: cpu-reasoning's sweep is 1 and 2 epochs (its pilot ran 2), because each
#: snapshot's evaluation decodes 50 replies of up to 128 tokens, and on the shared 2-core machine of 2026-12-07 the
#: sweep with 4 and 8 epochs would not have finished in the session (a limit of that day, not a finding).
EPOCH_GRIDS: dict[str, tuple[int, ...]] = {"cpu-reasoning": (1, 2)}
#: Learning rates tried for each trained method, as multiples of the preset's own (each costs one longest training).
LR_FACTORS: tuple[float, ...] = (1.0, 4.0)
CAD_GRID: tuple[float, ...] = (0.5, 1.0, 2.0, 5.0, 10.0)
#: The preset field each tuned method's main setting lives in (epochs; CAD's strength).
TUNED_FIELDS: dict[str, str] = {"MIPO": "epochs", "SFT": "sft_epochs", "CAD": "cad_alpha"}
#: The learning-rate field of each trained method, chosen jointly with its epochs.
LR_FIELDS: dict[str, str] = {"MIPO": "learning_rate", "SFT": "sft_learning_rate"}
N_VALIDATION = 50  # 5 of the 10 validation requests x 10 preferences (a fixed draw; 100 would double the cost)
CHOICES_COLUMNS = ("field", "value", "method", "validation_rate", "grid", "seeds", "n_validation", "best_rate", "se",
                   "rule")
RULE = ("one-standard-error rule: among the settings whose mean validation rate is within one standard error of the "
        "best setting's rate p (se = sqrt(p(1-p)/n), n = validation prompts x tuning seeds of that setting), the "
        "cheapest: fewest epochs, then the highest rate, then the smaller learning rate; CAD: the weakest strength")


def tuned_fields() -> set[str]:
    """Every preset field `make tune` may set (the choices table's `field` column takes only these)."""
    return set(TUNED_FIELDS.values()) | set(LR_FIELDS.values())


def trained_fields(method: str) -> tuple[str, str]:
    """(epochs field, learning-rate field) a trained method reads: the SFT kind's own, else DPO's (MIPO and its
    variants, e.g. full fine-tuning, which `make regime` sweeps)."""
    if registry.get_method(method).training == "sft":
        return TUNED_FIELDS["SFT"], LR_FIELDS["SFT"]
    return TUNED_FIELDS["MIPO"], LR_FIELDS["MIPO"]


def tuning_path(preset_name: str) -> Path:
    return repo_root() / "figures" / f"tuning_{preset_name}.csv"


def validation_examples(preset: Preset, n: int = N_VALIDATION) -> list[Any]:
    """The first `n` validation prompts of the preset's task: what every tuned setting is scored on (a fixed draw)."""
    task = get_task(preset.task)
    try:
        examples = task.examples("validation")
    except MipoError as err:
        raise MipoError(f"task {preset.task!r} has no validation split to tune on ({err})") from None
    return task.examples("validation", min(n, len(examples)))


def _records(preset: Preset, method: str, seed: int, label: str, key: cache.Key, folder: Path, adapter: Path | None,
             n: int, progress: bool) -> pd.DataFrame:
    """Validation records of one setting: greedy replies (cached under `key`) judged like the test set's, on read."""
    m, task = registry.get_method(method), get_task(preset.task)
    examples = validation_examples(preset, n)

    def make() -> pd.DataFrame:
        model, tokenizer = load_for_preset(preset)
        if adapter is not None:
            model = dpo.load_adapted(model, adapter)
        texts, cut = evaluate.generate_replies(
            model, tokenizer, task, examples, preset, with_context=m.with_context,
            cad_alpha=preset.cad_strength if m.decoding == "cad" else None, progress=progress, desc=label)
        return evaluate.records(task, examples, texts, method, seed, cut)

    frame = evaluate.cached_records(folder / f"{m.slug}-{key.digest}.jsonl", key, make, task, examples)
    return frame.assign(seed=seed)


def _eval_key(preset: Preset, method: str, seed: int, n: int, adapter: cache.Key | None, **extra: Any) -> cache.Key:
    """A setting's validation records: `evaluate.evaluation_key` on the validation prompts (`extra`: the snapshot)."""
    return evaluate.evaluation_key(preset, f"{method} validation (seed {seed})", validation_examples(preset, n), adapter,
                                   method=method, **extra)


def sweep_epochs(preset: Preset, method: str, seed: int, grid: Sequence[int] = EPOCH_GRID, n: int = N_VALIDATION,
                 progress: bool = True, learning_rate: float | None = None) -> pd.DataFrame:
    """Validation records of a trained method after each number of epochs in `grid`, from one run of max(grid) at
    `learning_rate` (default: the preset's rate for that method); the rate used is the `learning_rate` column."""
    m = registry.get_method(method)
    if m.trainer is None:
        raise MipoError(f"{method!r} is not trained; epochs are tuned for {[t.name for t in registry.trained()]}")
    field, lr_field = trained_fields(method)
    if learning_rate is not None:
        preset = preset.with_overrides(**{lr_field: learning_rate})
    longest = preset.with_overrides(**{field: max(grid)})
    base_key = pipeline.training_key(longest, method, seed)
    key = cache.Key(base_key.stage, base_key.label + " with epoch snapshots",
                    {**base_key.values, "snapshot_epochs": sorted(grid)})
    folder = pipeline.variant_dir(preset, "tune", f"seed{seed}") / dpo.adapter_name(m.trainer, key)
    pairs = pipeline.pairs_for_seed(preset, seed, progress=progress)
    if dpo.finished_run(folder, key) is None:
        model, tokenizer = load_for_preset(preset)
        dpo.train(m.trainer, model, tokenizer, pairs, longest, seed, folder, key=key, progress=progress, snapshot_epochs=grid)
    frames = []
    for epochs in sorted(grid):
        setting = preset.with_overrides(**{field: epochs})
        ekey = _eval_key(setting, method, seed, n, key, snapshot=epochs)
        rec = _records(setting, method, seed, f"{method} after {epochs} epochs (validation)", ekey,
                       pipeline.variant_dir(preset, "tune", "eval"), dpo.snapshot_dir(folder, epochs), n, progress)
        frames.append(rec.assign(setting=field, value=float(epochs), learning_rate=float(getattr(preset, lr_field))))
    return pd.concat(frames, ignore_index=True)


def sweep_cad(preset: Preset, grid: Sequence[float] = CAD_GRID, n: int = N_VALIDATION, progress: bool = True) -> pd.DataFrame:
    """Validation records of context-aware decoding at every strength in `grid` (deterministic: no seed)."""
    frames = []
    for alpha in grid:
        setting = preset.with_overrides(cad_alpha=alpha)
        key = _eval_key(setting, "CAD", 0, n, None)
        rec = _records(setting, "CAD", 0, f"CAD a={alpha:g} (validation)", key,
                       pipeline.variant_dir(preset, "tune", "eval"), None, n, progress)
        frames.append(rec.assign(setting="cad_alpha", value=float(alpha)))
    return pd.concat(frames, ignore_index=True)


def sweep(preset: Preset, seeds: Sequence[int], epoch_grid: Sequence[int] = EPOCH_GRID,
          cad_grid: Sequence[float] = CAD_GRID, n: int = N_VALIDATION, progress: bool = True,
          lr_factors: Sequence[float] = LR_FACTORS) -> pd.DataFrame:
    """Every tuned setting's validation records (columns of `evaluate.records` + `setting`, `value`,
    `learning_rate`), and prompting's as the untuned reference line. CAD is swept only on a task with a context."""
    frames = [sweep_epochs(preset, m, s, epoch_grid, n, progress, learning_rate=getattr(preset, LR_FIELDS[m]) * f)
              for s in seeds for m in ("MIPO", "SFT") for f in lr_factors]
    if get_task(preset.task).conditional:  # without a context, CAD contrasts a prompt with itself: greedy decoding
        frames.append(sweep_cad(preset, cad_grid, n, progress))
    prompting = _records(preset, "prompting", 0, "prompting (validation)", _eval_key(preset, "prompting", 0, n, None),
                         pipeline.variant_dir(preset, "tune", "eval"), None, n, progress)
    frames.append(prompting.assign(setting="none", value=float("nan")))
    return pd.concat(frames, ignore_index=True)


def _with_learning_rate(frame: pd.DataFrame) -> pd.DataFrame:
    """`frame` with a `learning_rate` column (empty where none was swept: CAD, prompting, an older sweep's rows)."""
    return frame if "learning_rate" in frame else frame.assign(learning_rate=float("nan"))


def summarize(records: pd.DataFrame) -> pd.DataFrame:
    """Per (method, setting, value, learning rate): validation rate (mean over seeds), per-seed rates, truncated
    share, n. The learning rate is empty for settings without one (CAD, prompting)."""
    per_seed = (_with_learning_rate(records).groupby(["method", "setting", "value", "learning_rate", "seed"], dropna=False)
                .agg(rate=("score", "mean"), truncated=("truncated", "mean"), mean_words=("n_words", "mean"), n=("score", "size"))
                .reset_index())
    out = (per_seed.groupby(["method", "setting", "value", "learning_rate"], dropna=False)
           .agg(rate=("rate", "mean"), truncated=("truncated", "mean"), mean_words=("mean_words", "mean"),
                n=("n", "first"), n_seeds=("seed", "nunique"),
                per_seed=("rate", lambda r: " / ".join(f"{x:.3f}" for x in r)))
           .reset_index())
    return out


def standard_error(rate: float, n: int) -> float:
    """The binomial standard error of a success rate measured on `n` judged replies: how far apart two settings'
    validation rates can be by chance alone."""
    return math.sqrt(rate * (1 - rate) / n)


def within_one_se(sub: pd.DataFrame) -> tuple[pd.Series, float, float]:
    """(the chosen row, the best rate, its standard error) of one method's rows of a summary, by `RULE`.

    The best row's n is its prompts x seeds (`n` x `n_seeds`). The order among the candidates puts cost first: the
    fewest epochs (for CAD the weakest strength, the `value` column either way), then the highest rate, then the
    smaller learning rate, which costs nothing but moves the adapter less."""
    best = sub.loc[sub["rate"].idxmax()]
    se = standard_error(float(best["rate"]), int(best["n"]) * int(best["n_seeds"]))
    candidates = sub[sub["rate"] >= best["rate"] - se - 1e-12]  # the margin: rounding, not a looser rule
    ordered = candidates.assign(minus_rate=-candidates["rate"]).sort_values(
        ["value", "minus_rate", "learning_rate"], na_position="last", kind="stable")
    return ordered.iloc[0], float(best["rate"]), se


def choose(summary: pd.DataFrame, seeds: Sequence[int]) -> pd.DataFrame:
    """The choices table: per tuned method, the setting `RULE` picks (`within_one_se`), one row per field: epochs (or
    CAD's strength) and, where it was swept, the learning rate chosen with them; each row states the best rate and its
    standard error, so the table shows which settings the chosen one was allowed to replace."""
    summary = _with_learning_rate(summary)
    rows = []
    for method, field in TUNED_FIELDS.items():
        sub = summary[(summary["method"] == method) & summary["rate"].notna()].sort_values(["value", "learning_rate"])
        if sub.empty:
            continue
        chosen, best_rate, se = within_one_se(sub)
        common = {"method": method, "validation_rate": round(float(chosen["rate"]), 4),
                  "seeds": " ".join(map(str, seeds)), "n_validation": int(chosen["n"]),
                  "best_rate": round(best_rate, 4), "se": round(se, 4), "rule": RULE}
        value = f"{int(chosen['value'])}" if field != "cad_alpha" else f"{float(chosen['value']):g}"  # as --set spells it
        rows.append({"field": field, "value": value, "grid": " ".join(f"{v:g}" for v in sub["value"].unique()), **common})
        if method in LR_FIELDS and pd.notna(chosen["learning_rate"]):
            rates = sorted(sub["learning_rate"].dropna().unique())
            rows.append({"field": LR_FIELDS[method], "value": f"{float(chosen['learning_rate']):g}",
                         "grid": " ".join(f"{v:g}" for v in rates), **common})
    return pd.DataFrame(rows, columns=list(CHOICES_COLUMNS))


def rechoose(tuning: Path, choices: Path) -> pd.DataFrame:
    """Apply `choose` to a committed sweep (`tuning`) and rewrite the committed `choices` table with the result:
    nothing is trained or evaluated. The seeds, the fields chosen (the held-out-types table holds only `epochs`) and
    each row's `tuned_under` stay those of the committed table, since the sweep that made them is the same."""
    for path in (tuning, choices):
        if not path.exists():
            raise MipoError(f"{path.name} is missing; run the target that sweeps and chooses (make tune, make heldout)")
    committed = pd.read_csv(choices, dtype=str, keep_default_na=False)
    seeds = [int(s) for s in committed["seeds"].iloc[0].split()]
    new = choose(pd.read_csv(tuning), seeds)
    new = new[new["field"].isin(committed["field"])].reset_index(drop=True)
    under = dict(zip(committed["field"], committed["tuned_under"]))
    new = new.assign(tuned_under=[under[f] for f in new["field"]])
    new.to_csv(choices, index=False)
    return new


def tuned_under(preset: Preset, method: str, chosen: Iterable[str]) -> dict[str, Any]:
    """The preset fields the tuning of `method` read, as `preset` has them (dtype resolved on this machine), less the
    `chosen` fields the table sets and `n_test_prompts` (validation draws its own prompts).

    Read from the cache's declaration of what each stage depends on (`cache.STAGE_FIELDS`): a trained method's pairs
    (generation, scoring), its training and its evaluation; a decoding method's evaluation."""
    m = registry.get_method(method)
    stages = ["evaluation-cad" if m.decoding == "cad" else "evaluation"]
    if m.training is not None:
        stages += ["generation", "pairs", m.training]
    fields = {f for stage in stages for f in cache.STAGE_FIELDS[stage]} - set(chosen) - {"n_test_prompts"}
    values = {f: resolved_dtype(preset) if f == "dtype" else getattr(preset, f) for f in sorted(fields)}
    return json.loads(json.dumps(values))  # tuples as lists, as the table stores them


def write_choices(choices: pd.DataFrame, preset: Preset, path: Path) -> None:
    """Write a choices table with, per row, the settings its tuning read (`tuned_under`: compact JSON) under
    `preset`, the preset the sweep ran with."""
    chosen = set(choices["field"])
    under = [json.dumps(tuned_under(preset, m, chosen), separators=(",", ":")) for m in choices["method"]]
    path.parent.mkdir(parents=True, exist_ok=True)
    choices.assign(tuned_under=under).to_csv(path, index=False)


def run(preset_name: str = "cpu", seeds: Sequence[int] | None = None, overrides: dict[str, Any] | None = None,
        progress: bool = True, write: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`make tune`: sweep on validation, write `figures/tuning_<preset>.csv` and `figures/choices_<preset>.csv`.

    The sweep starts from the preset *without* its committed choices (`tuned=False`), so tuning never feeds on its
    own earlier output. Returns (summary, choices).
    """
    preset = get_preset(preset_name, tuned=False, **(overrides or {}))
    seeds = list(seeds) if seeds is not None else list(preset.seeds)
    grid = EPOCH_GRIDS.get(preset.name, EPOCH_GRID)
    summary = summarize(sweep(preset, seeds, epoch_grid=grid, progress=progress))
    choices = choose(summary, seeds)
    if write:
        tuning_path(preset.name).parent.mkdir(parents=True, exist_ok=True)
        summary.to_csv(tuning_path(preset.name), index=False, float_format="%.6g")
        write_choices(choices, preset, choices_path(preset.name))
    return summary, choices
