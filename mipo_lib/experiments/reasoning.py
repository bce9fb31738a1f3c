"""Reasoning with unconditional MIPO (notebook 07): choose a difficulty on validation, then ask where a gain comes from.

The paper's second claim is +1-20% on math and multiple choice with the prompt-response version of MIPO: the
negative is the base model's answer to a *different* problem (a derangement of the training prompts,
`negative="random_prompt"`). A method that only amplifies what the base model already does needs a task in the
model's informative range, so:

- `measure_difficulty` scores the base model greedily on each graded arithmetic level's *validation* split and
  `choose_level` picks the hardest level whose accuracy lies in `INFORMATIVE_RANGE` (test splits stay untouched);
- `pair_correctness` counts how often a pair's positive is correct and its negative is not: MIPO never sees labels,
  so this is the label information its pairs carry by accident;
- `answer_formats` / `format_decomposition` split an accuracy change into "more replies parseable" (format) and "more
  parseable replies correct" (correctness);
- `answer_pmi` / `pmi_ranking` ask whether the base model's PMI log pi0(y|x) - log pi0(y|x') ranks its correct
  answers above its wrong ones, the premise under which maximizing PMI should raise accuracy.
Its figures are drawn in `analysis.reasoning_plots` from the tables these functions return.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.stats

from mipo_lib import cache
from mipo_lib.analysis import plots, stats
from mipo_lib import methods as registry
from mipo_lib.config import PRESETS, Preset, get_preset, run_dir
from mipo_lib.errors import MipoError
from mipo_lib.tasks import get_task
from mipo_lib.tasks.arithmetic import GRADED_LEVELS, INFORMATIVE_RANGE, LEVELS, parse_answer, task_name
from mipo_lib.tasks.base import Task

#: The preset whose figures and tables are the committed reference of notebook 07.
REFERENCE_PRESET = "cpu-reasoning"
#: How a reply committed to a number (`tasks.arithmetic.parse_answer`); "none" means unparseable.
PARSE_KINDS: tuple[str, ...] = ("final_mark", "answer_phrase", "last_number", "none")


# ------------------------------------------------------------------------------------------------ presets, methods
def reasoning_twin(preset: Preset, /, **overrides: Any) -> Preset:
    """The preset notebook 07 runs for `preset`: itself when its task is unconditional (plain prompt-response MI),
    else its reasoning twin `<name>-reasoning` with the same `overrides` (so PRESET "auto" on a laptop, which resolves
    to `cpu`, `--notebooks all` and the smoke tests all run 07 on a reasoning task).

    A preset whose task has a context and that has no twin fails naming the fix.
    """
    if not get_task(preset.task).conditional:
        return preset
    twin = f"{preset.name}-reasoning"
    if twin not in PRESETS:
        raise MipoError(f"preset {preset.name!r} runs the conditional task {preset.task!r}; notebook 07 needs a "
                        "reasoning task: use a *-reasoning preset, or OVERRIDES = {'task': 'gsm8k', 'negative': "
                        "'random_prompt'} (or task=arithmetic_<level>)")
    print(f"preset {preset.name!r} runs {preset.task!r}, which has a context; notebook 07 uses its reasoning twin "
          f"{twin!r}")
    return get_preset(twin, **overrides)


def figures_preset(preset: Preset) -> str:
    """The preset name figures are filed under: the reasoning reference (`cpu-reasoning`) writes into the repository's
    `figures/` like the `cpu` reference does; every other preset into its own runs folder (see `plots.figures_dir`)."""
    return plots.REFERENCE_PRESET if preset.name == REFERENCE_PRESET else preset.name


def methods_for(task: Task) -> list[str]:
    """The registered methods that are distinct on `task`, in display order.

    Without a context (`task.conditional` False) the prompt with and without context is the same text, so every
    untrained greedy method is the same base model on the same prompt: `prompting` (the base model with the task's
    full prompt) stands for all of them. Context-aware decoding contrasts a prompt with itself there, which is plain
    greedy decoding, so it is dropped.
    """
    if task.conditional:
        return list(registry.names())
    untrained = [m for m in registry.all_methods() if m.training is None and m.decoding == "greedy"]
    base = next((m for m in untrained if m.with_context), untrained[0] if untrained else None)
    return [m.name for m in registry.all_methods() if m.training is not None or m == base]


def base_method(task: Task) -> str:
    """The untrained method that stands for the base model on `task` (`prompting` on a task without context)."""
    return next(m for m in methods_for(task) if registry.get_method(m).training is None)


# ------------------------------------------------------------------------------------------------ difficulty
def measure_difficulty(
    preset: Preset, levels: Sequence[str] = GRADED_LEVELS, n: int = 100, progress: bool = True
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The base model's greedy accuracy on each level's validation split (`n` problems, or all if fewer).

    Returns (summary, records): one summary row per level (accuracy with a bootstrap CI over problems, parseable
    share, mean words, seconds) and the per-problem records. Uses the preset's model and evaluation settings
    (`eval_max_new_tokens`, `eval_batch_size`, dtype), whatever its task: only validation problems are read.
    """
    from mipo_lib import evaluate
    from mipo_lib.models import load_for_preset

    unknown = [lv for lv in levels if lv not in LEVELS]
    if unknown:
        raise MipoError(f"unknown arithmetic level(s) {unknown}; choose from {', '.join(GRADED_LEVELS)}")
    model, tokenizer = load_for_preset(preset)
    rows, frames = [], []
    for level in levels:
        task = get_task(task_name(level))
        available = len(task.examples("validation"))
        examples = task.examples("validation", min(n, available))
        start = time.perf_counter()
        responses = evaluate.generate_responses(model, tokenizer, task, examples, preset, progress=progress,
                                                desc=f"{level} (validation)")
        seconds = time.perf_counter() - start
        rec = evaluate.records(task, examples, responses, "base", 0).assign(
            level=level, parsed_how=[parse_answer(r).how for r in responses])
        mean, lo, hi = stats.bootstrap_ci(rec["score"].to_numpy(), seed=0)
        rows.append({
            "level": level, "task": task.name, "description": LEVELS[level].description, "n": len(examples),
            "accuracy": mean, "lo": lo, "hi": hi, "parseable": float((rec["parsed_how"] != "none").mean()),
            "mean_words": float(rec["n_words"].mean()), "seconds": round(seconds, 1),
        })
        frames.append(rec)
    summary = pd.DataFrame(rows)
    low, high = INFORMATIVE_RANGE
    summary["in_range"] = summary["accuracy"].between(low, high)
    return summary, pd.concat(frames, ignore_index=True)


def choose_level(table: pd.DataFrame, informative: tuple[float, float] = INFORMATIVE_RANGE) -> str:
    """The hardest level (lowest validation accuracy) whose accuracy lies in `informative`.

    Why the hardest: it leaves the most room to improve while the base model still gets enough right for MIPO to
    amplify. No level in range fails with the measured accuracies, so the range or the levels can be revised.
    """
    low, high = informative
    inside = table[table["accuracy"].between(low, high)]
    if inside.empty:
        measured = ", ".join(f"{r.level} {r.accuracy:.0%}" for r in table.itertuples())
        raise MipoError(f"no level has a base accuracy in [{low:.0%}, {high:.0%}] ({measured}); widen the range or "
                        "add a level between the two closest")
    return str(inside.sort_values(["accuracy", "level"]).iloc[0]["level"])


# ------------------------------------------------------------------------------------------------ pairs
def pair_correctness(pairs: pd.DataFrame) -> pd.DataFrame:
    """Per seed: how often the positive y+ and the negative y- are correct *for the pair's prompt x*.

    `pairs` holds the pairs' rows (`chosen_score`, `rejected_score`, judged against x's answer) with a `seed` column.
    A pair teaches "correct over wrong" only when y+ is right and y- is not (`agree`); "wrong over right" when the
    reverse holds (`disagree`: y- answers another problem, so this needs a coincidence); the rest carry no
    correctness signal. MIPO never sees these labels: this is the label information its pairs carry by accident.
    """
    rows = []
    for seed, p in pairs.groupby("seed", sort=True):
        pos, neg = p["chosen_score"].to_numpy(float) > 0.5, p["rejected_score"].to_numpy(float) > 0.5
        rows.append({
            "seed": seed, "n_pairs": len(p), "positive_correct": pos.mean(), "negative_correct": neg.mean(),
            "agree": (pos & ~neg).mean(), "disagree": (~pos & neg).mean(), "both_correct": (pos & neg).mean(),
            "both_wrong": (~pos & ~neg).mean(),
        })
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------------ format vs correctness
def with_parse(records: pd.DataFrame) -> pd.DataFrame:
    """`records` plus `parsed_how` (how the answer was found) and `parseable` (1.0 when a number was found)."""
    how = [parse_answer(str(r)).how for r in records["response"].fillna("")]
    return records.assign(parsed_how=how, parseable=[float(h != "none") for h in how])


def unfinished(response: str) -> bool:
    """Whether a reply stops without ending a sentence (no final '.', '!' or '?', closing quotes and brackets
    aside): with one-sentence answers that almost always means the token cap cut it, and a cut reply's last number
    is often an operand ("so Leo now has 7 + 5 ="), not its answer."""
    return not str(response).rstrip().rstrip("\"')]*").endswith((".", "!", "?"))


def answer_formats(records: pd.DataFrame) -> pd.DataFrame:
    """Per method and seed: accuracy, parseable share, share of each way of committing to a number, accuracy among
    parseable replies (NaN when none is parseable), the share of unfinished (cut) replies, accuracy among finished
    ones, and mean words."""
    rec = with_parse(records)
    rec = rec.assign(unfinished=[float(unfinished(r)) for r in rec["response"].fillna("")])
    rows = []
    for (method, seed), r in rec.groupby(["method", "seed"], sort=False):
        parseable, finished = r[r["parseable"] > 0], r[r["unfinished"] == 0]
        row = {"method": method, "seed": seed, "n": len(r), "accuracy": r["score"].mean(),
               "parseable": r["parseable"].mean(),
               "accuracy_parseable": parseable["score"].mean() if len(parseable) else float("nan"),
               "unfinished": r["unfinished"].mean(),
               "accuracy_finished": finished["score"].mean() if len(finished) else float("nan"),
               "mean_words": float(r["response"].fillna("").str.split().str.len().mean())}
        row.update({f"share_{k}": float((r["parsed_how"] == k).mean()) for k in PARSE_KINDS})
        rows.append(row)
    out = pd.DataFrame(rows)
    order = {m: i for i, m in enumerate(stats.ordered_methods(out["method"]))}
    out = out.sort_values(["method", "seed"], key=lambda s: s.map(order) if s.name == "method" else s)
    return out.reset_index(drop=True)


def format_decomposition(formats: pd.DataFrame, a: str, b: str) -> pd.DataFrame:
    """Per seed, accuracy(a) - accuracy(b) = format + correctness, exactly:

    accuracy = parseable x accuracy_parseable, so the change splits into
    format = (parseable_a - parseable_b) x accuracy_parseable_b (more answers found, at b's hit rate) and
    correctness = parseable_a x (accuracy_parseable_a - accuracy_parseable_b) (found answers more often right).
    An untrained `b` stored for one seed is paired with every seed of `a`.
    """
    fa, fb = formats[formats["method"] == a].set_index("seed"), formats[formats["method"] == b].set_index("seed")
    if fa.empty or fb.empty:
        present = sorted(set(formats["method"]))
        raise MipoError(f"format_decomposition needs rows of both {a!r} and {b!r}; present: {present}")
    rows = []
    for seed, ra in fa.iterrows():
        rb = fb.loc[seed] if seed in fb.index else fb.iloc[0]
        acc_pb = 0.0 if np.isnan(rb["accuracy_parseable"]) else rb["accuracy_parseable"]
        acc_pa = 0.0 if np.isnan(ra["accuracy_parseable"]) else ra["accuracy_parseable"]
        rows.append({"seed": seed, "difference": ra["accuracy"] - rb["accuracy"],
                     "format": (ra["parseable"] - rb["parseable"]) * acc_pb,
                     "correctness": ra["parseable"] * (acc_pa - acc_pb)})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------------ PMI and correctness
def answer_pmi(
    preset: Preset, records: pd.DataFrame, method: str, seed: int = 0, progress: bool = True
) -> pd.DataFrame:
    """log pi0(y|x), log pi0(y|x') and PMI = their difference for `method`'s held-out replies, under the base model.

    x' is another held-out problem (a seeded derangement, as MIPO's negatives are built), so the PMI is a one-sample
    estimate of log pi0(y|x) - log pi0(y). Cached like the pipeline's other PMI tables (`cache` stage 'pmi').
    Columns: example_id, group, correct, logp_x, logp_x_prime, pmi, n_tokens.
    """
    from mipo_lib import evaluate
    from mipo_lib.models import load_for_preset
    from mipo_lib.pairs import derangement
    from mipo_lib.scoring import sequence_logprobs

    task = get_task(preset.task)
    examples = {e.id: e for e in task.examples("test", preset.n_test_prompts)}
    mine = records[records["method"] == method]
    part = mine[mine["seed"] == mine["seed"].min()].sort_values("example_id").reset_index(drop=True)
    if part.empty:
        raise MipoError(f"no records of {method!r}; evaluate it first (pipeline.evaluate_all)")
    order = derangement(len(part), np.random.default_rng(seed))
    replies = [[str(i), str(r)] for i, r in zip(part["example_id"], part["response"].fillna(""))]
    key = cache.stage_key(
        "pmi", preset, f"answer PMI of the {method} replies (x' seed {seed})",
        prompts=cache.prompts_digest(task, list(examples.values())),
        responses=cache.content_digest(replies)[:16],
        x_prime=[int(i) for i in order],
    )

    def make() -> pd.DataFrame:
        model, tokenizer = load_for_preset(preset)
        exs = [examples[i] for i in part["example_id"]]
        ys = part["response"].fillna("").tolist()
        prompts = [task.prompt(e) for e in exs] + [task.prompt(exs[j]) for j in order]
        lp, n_tok = sequence_logprobs(model, tokenizer, prompts, ys + ys, max_length=preset.max_length,
                                      batch_size=preset.score_batch_size, progress=progress, desc="answer PMI")
        m = len(exs)
        return pd.DataFrame({"example_id": part["example_id"], "group": part["group"],
                             "logp_x": lp[:m], "logp_x_prime": lp[m:], "pmi": lp[:m] - lp[m:], "n_tokens": n_tok[:m]})

    folder = run_dir(preset, preset.task, "eval")
    slug = registry.get_method(method).slug
    scored = evaluate.evaluate_cached(folder / f"answer-pmi-{slug}-{key.digest}.jsonl", make, key=key)
    # correctness comes from the records, judged on read like every score, never from the cached PMI table
    correct = dict(zip(part["example_id"], part["score"]))
    return scored.drop(columns="correct", errors="ignore").assign(correct=scored["example_id"].map(correct))


def auc(scores: Sequence[float] | np.ndarray, labels: Sequence[float] | np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties counting one half (Mann-Whitney U / n1 n0).

    0.5 is chance; NaN when one class is empty (nothing to rank).
    """
    s, y = np.asarray(scores, dtype=float), np.asarray(labels, dtype=float) > 0.5
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    return float(scipy.stats.mannwhitneyu(s[y], s[~y], method="asymptotic").statistic / (n1 * n0))


def pmi_ranking(
    frame: pd.DataFrame, measures: Sequence[str] = ("pmi", "logp_x"), n_boot: int = 2_000, seed: int = 0
) -> pd.DataFrame:
    """How well each measure ranks correct answers above wrong ones: AUC with a bootstrap 95% CI over answers, and
    the measure's mean over correct and over wrong answers.

    `pmi` is what MIPO maximizes; `logp_x` (plain likelihood) is the comparison: if PMI ranks correctness better
    than likelihood, subtracting log pi0(y|x') removes something that is not about the problem (length, style).
    """
    y = frame["correct"].to_numpy(float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(frame), size=(n_boot, len(frame)))
    rows = []
    for name in measures:
        s = frame[name].to_numpy(float)
        boots = np.array([auc(s[i], y[i]) for i in idx])
        boots = boots[np.isfinite(boots)]
        lo, hi = (np.quantile(boots, [0.025, 0.975]) if boots.size else (np.nan, np.nan))
        rows.append({"measure": name, "auc": auc(s, y), "lo": float(lo), "hi": float(hi),
                     "mean_correct": float(s[y > 0.5].mean()) if (y > 0.5).any() else float("nan"),
                     "mean_wrong": float(s[y <= 0.5].mean()) if (y <= 0.5).any() else float("nan"),
                     "n_correct": int((y > 0.5).sum()), "n_wrong": int((y <= 0.5).sum())})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------------ command line
def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    """`python -m mipo_lib.experiments.reasoning --preset cpu --n 100`: measure every level on validation, write
    `reasoning_difficulty_<preset>.csv` (with the `chosen` level) into the preset's figures folder, print the table
    and the chosen level."""
    parser = argparse.ArgumentParser(prog="python -m mipo_lib.experiments.reasoning", description=main.__doc__)
    parser.add_argument("--preset", default="cpu", help="model and evaluation settings to measure with (default cpu)")
    parser.add_argument("--n", type=int, default=100, help="validation problems per level (default 100)")
    parser.add_argument("--levels", nargs="*", default=list(GRADED_LEVELS), help="levels to measure (default: all)")
    args = parser.parse_args(argv)
    preset = get_preset(args.preset)
    summary, _ = measure_difficulty(preset, args.levels, args.n, progress=False)
    summary["chosen"] = summary["level"] == choose_level(summary)  # the level notebook 07's summary names
    path = stats.write_table(summary, plots.figures_dir(preset) / f"reasoning_difficulty_{preset.name}.csv")
    print(summary.to_string(index=False))
    print(f"wrote {path.name}; chosen level: {choose_level(summary)}")
    return summary


if __name__ == "__main__":
    main()
