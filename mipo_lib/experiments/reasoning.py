"""Reasoning with unconditional MIPO (notebook 07): choose a difficulty on validation, then ask where a gain comes from.

The paper's second claim is +1-20% on math and multiple choice with the prompt-response version of MIPO: the
negative is the base model's answer to a *different* problem (a derangement of the training prompts,
`negative="random_prompt"`). A method that only amplifies what the base model already does needs a task in the
model's informative range, so:

- `measure_difficulty` scores the base model greedily on each graded arithmetic level's *validation* split and
  `choose_level` picks the hardest level whose accuracy lies in `INFORMATIVE_RANGE` (test splits stay untouched);
- `pair_correctness` counts how often a pair's positive is correct and its negative is not: MIPO never sees labels,
  so this is the label information its pairs carry by accident;
- `answer_formats` / `format_decomposition` split an accuracy change into "more replies with a final answer"
  (format) and "more final answers correct" (correctness);
- `reply_lengths` / `choose_cap` size the evaluation's token cap from replies generated at an upper bound, so that
  the replies of every method finish (end by the model's end token) instead of being graded where the cap cut them;
- `answer_pmi` / `pmi_ranking` ask whether the base model's PMI log pi0(y|x) - log pi0(y|x') ranks its correct
  answers above its wrong ones across problems (one x' per answer), and `within_problem_pmi` / `pmi_wins` ask it
  within each problem: the same reply ending in the right answer, an operand or a random number, the premise under
  which maximizing PMI should raise accuracy, without comparing different problems' replies.
Its figures are drawn in `analysis.reasoning_plots` from the tables these functions return.
"""

from __future__ import annotations

import argparse
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.stats

from mipo_lib import cache
from mipo_lib.analysis import plots, stats
from mipo_lib import methods as registry
from mipo_lib.config import PRESETS, Preset, get_preset, repo_root, run_dir
from mipo_lib.errors import MipoError
from mipo_lib.tasks import get_task
from mipo_lib.tasks.arithmetic import GRADED_LEVELS, INFORMATIVE_RANGE, LEVELS, ParsedAnswer, parse_answer, task_name
from mipo_lib.tasks.base import Example, Task
from mipo_lib.tasks.numbers import numbers_in

#: The preset whose figures and tables are the committed reference of notebook 07.
REFERENCE_PRESET = "cpu-reasoning"
#: How a reply committed to a number (`ArithmeticTask.parse`): the `Answer: N` line the graded levels ask for, or the
#: plain task's lenient readings; "none" means no final answer.
PARSE_KINDS: tuple[str, ...] = ("answer_line", "final_mark", "answer_phrase", "last_number", "none")
#: The share of every method's replies that must finish within the evaluation's token cap (`choose_cap`).
FINISHED_SHARE = 1 - stats.CUT_BUDGET
#: The largest evaluation cap `choose_cap` may pick: replies are generated at this cap to measure their lengths. It
#: was 128 (the first protocol's bound) until MIPO's validation replies, on all three seeds, reached only 93%
#: finished there, their curve still rising; every choice made at the bound (difficulty, tuning, cap) was then made
#: again at 256.
CAP_UPPER_BOUND = 256


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
            level=level, parsed_how=[_parse(task, r).how for r in responses])
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
def _parse(task: Task, response: str) -> ParsedAnswer:
    """The final answer as `task` grades it (`ArithmeticTask.parse`), or the lenient `parse_answer` for a numeric task
    without its own parser (GSM8K, SVAMP)."""
    parse = getattr(task, "parse", None)
    return parse(response) if parse is not None else parse_answer(response)


def with_parse(records: pd.DataFrame) -> pd.DataFrame:
    """`records` plus `parsed_how` (how the final answer was found, as each row's task grades it) and `parseable`
    (1.0 when the reply has a final answer)."""
    tasks = {name: get_task(name) for name in records["task"].unique()}
    how = [_parse(tasks[t], str(r)).how for t, r in zip(records["task"], records["response"].fillna(""))]
    return records.assign(parsed_how=how, parseable=[float(h != "none") for h in how])


def answer_formats(records: pd.DataFrame) -> pd.DataFrame:
    """Per method and seed: accuracy, the share of replies with a final answer (`parseable`), the share of each way of
    committing to a number, accuracy among replies with a final answer (NaN when none has one), the share of replies
    cut by the token cap (`unfinished`: the record's `truncated` flag, the model never ended them), accuracy among
    finished ones, and mean words."""
    if "truncated" not in records:
        raise MipoError("answer_formats needs the records' `truncated` column (evaluate.records writes it)")
    rec = with_parse(records)
    rec = rec.assign(unfinished=rec["truncated"].astype(float))
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

    accuracy = parseable x accuracy_parseable (a reply without a final answer is wrong), so the change splits into
    format = (parseable_a - parseable_b) x accuracy_parseable_b (more final answers given, at b's hit rate) and
    correctness = parseable_a x (accuracy_parseable_a - accuracy_parseable_b) (final answers more often right).
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


# ------------------------------------------------------------------------------------------------ the token cap
def reply_lengths(tokenizer: Any, records: pd.DataFrame) -> pd.DataFrame:
    """`records` plus `n_tokens`: how many new tokens the model generated to finish each reply, its end token included
    (the reply's text re-encoded, plus one); infinite for a reply the cap cut (`truncated`: it never ended).

    Under a cap of c new tokens a reply finishes (ends by the model's end token, within the cap) exactly when
    n_tokens <= c, so lengths measured on replies generated at an upper bound say how the same greedy replies would
    fare under every smaller cap.
    """
    texts = records["response"].fillna("").astype(str).tolist()
    counts = [len(tokenizer.encode(t, add_special_tokens=False)) + 1 for t in texts]
    return records.assign(n_tokens=np.where(records["truncated"].astype(bool), np.inf, counts))


def finished_shares(lengths: pd.DataFrame, caps: Sequence[int]) -> pd.DataFrame:
    """Per method (and `setting` when present) and cap: the share of replies that finish within the cap
    (`n_tokens <= cap`), one row per (method, cap)."""
    keys = [k for k in ("method", "setting") if k in lengths]
    rows = []
    for group, part in lengths.groupby(keys, sort=False):
        group = group if isinstance(group, tuple) else (group,)
        n = part["n_tokens"].to_numpy(float)
        rows += [{**dict(zip(keys, group)), "cap": int(c), "n": len(n), "finished": float((n <= c).mean())}
                 for c in caps]
    return pd.DataFrame(rows)


def choose_cap(lengths: pd.DataFrame, share: float = FINISHED_SHARE, upper: int = CAP_UPPER_BOUND) -> int:
    """The smallest cap (new tokens, at most `upper`) at which at least `share` of EVERY method's replies finish, or
    `upper` itself where some method falls short even there.

    `lengths` comes from `reply_lengths` on replies generated at `upper`. The bound is part of the rule (a cap past it
    costs every method's rambling replies their time), so a shortfall is not fixed here by raising it: the caller
    reports it (`shortfall`), and the test run's cut shares show what it costs.
    """
    table = finished_shares(lengths, range(1, upper + 1))
    worst = table.groupby("cap")["finished"].min()
    ok = worst[worst >= share - 1e-12]
    return int(ok.index.min()) if not ok.empty else upper


def shortfall(table: pd.DataFrame, cap: int, share: float = FINISHED_SHARE) -> dict[str, float]:
    """{method: its finished share at `cap`} for the methods of a `finished_shares` table below `share` there: empty
    when the cap meets the rule."""
    at = table[table["cap"] == cap]
    return {str(m): float(f) for m, f in zip(at["method"], at["finished"]) if f < share - 1e-12}


def tables_dir(preset: Preset) -> Path:
    """Where the validation choices' tables of notebook 07 go: the repository's `figures/` for the reasoning reference
    (they are committed, as `make tune`'s are), else the preset's runs folder (`plots.figures_dir`)."""
    if preset.name == REFERENCE_PRESET and not os.environ.get("MIPO_FIGURES_DIR"):  # tests redirect every figure
        return repo_root() / "figures"
    return plots.figures_dir(preset)


def cap_path(preset: Preset) -> Path:
    """`reasoning_cap_<preset>.csv`: the finished shares behind the evaluation cap's choice (`tables_dir`)."""
    return tables_dir(preset) / f"reasoning_cap_{figures_preset(preset)}.csv"


def choose_cap_on_validation(preset: Preset, seeds: Sequence[int] | None = None, share: float = FINISHED_SHARE,
                             upper: int = CAP_UPPER_BOUND, progress: bool = True) -> tuple[int, pd.DataFrame]:
    """The evaluation cap (`choose_cap`) from the validation replies of the very models the test run evaluates: the
    base model and MIPO's and SFT's adapters of EVERY seed (default: the preset's), trained at the settings `make
    tune` chose (`pipeline.train_for_seed`: cached, so `make reasoning` reuses them), each answering `make tune`'s
    validation problems at `upper` new tokens. Each method's replies are pooled over the seeds.

    Why every seed: the first version of this choice read seed 0's tuning replies only (96% of MIPO's finished at
    106 tokens), and the test run then cut 15% of MIPO's replies: the adapters of seeds 1 and 2 write longer ones.
    Returns (cap, the finished share of each method at every cap from 8 to `upper`, with the share required and the
    chosen cap flagged), written to `cap_path`; where no cap up to `upper` meets the rule, the cap is `upper` and
    `shortfall` names who falls short.
    """
    from mipo_lib.experiments import pipeline, tune
    from mipo_lib.models import load_for_preset

    task = get_task(preset.task)
    seeds = list(preset.seeds if seeds is None else seeds)
    methods = methods_for(task)
    trained = [m for m in methods if registry.get_method(m).training]
    for method in trained:
        for seed in seeds:
            pipeline.train_for_seed(preset, method, seed, progress=progress)
    found = pipeline.stored_adapters(preset, trained, seeds)
    at_upper = preset.with_overrides(eval_max_new_tokens=upper)
    records = pipeline.evaluate_stored(at_upper, task, tune.validation_examples(preset), found, seeds, methods,
                                       progress=progress, cache_dir=pipeline.variant_dir(preset, "cap-validation"))
    lengths = reply_lengths(load_for_preset(preset)[1], records)
    cap = choose_cap(lengths, share, upper)
    caps = sorted({*range(8, upper + 1, 8), cap})
    table = finished_shares(lengths, caps).assign(seeds=" ".join(map(str, seeds)), required=share,
                                                  chosen=lambda t: t["cap"] == cap)
    stats.write_table(table, cap_path(preset))
    return cap, table


# ------------------------------------------------------------------------------------------------ PMI and correctness
def _first_seed_replies(preset: Preset, records: pd.DataFrame, method: str) -> tuple[dict[str, Example], pd.DataFrame]:
    """({example id: held-out example}, `method`'s records of its first seed, ordered by example id): what the PMI
    measurements score, one seed being enough to rank replies under the base model."""
    examples = {e.id: e for e in get_task(preset.task).examples("test", preset.n_test_prompts)}
    mine = records[records["method"] == method]
    part = mine[mine["seed"] == mine["seed"].min()].sort_values("example_id").reset_index(drop=True)
    if part.empty:
        raise MipoError(f"no records of {method!r}; evaluate it first (pipeline.evaluate_all)")
    return examples, part


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
    examples, part = _first_seed_replies(preset, records, method)
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


# ------------------------------------------------------------------------------------------------ PMI within a problem
#: The final numbers a reply is made to end with in `within_problem_pmi`, the right answer first.
VARIANTS: tuple[str, ...] = ("right", "operand", "random")
#: Random final numbers are drawn from 0..RANDOM_MAX (the word level's answers are 0-40).
RANDOM_MAX = 40
#: Other problems x' per problem whose mean log pi0(N | x', prefix) estimates log pi0(N | prefix): each costs one more
#: scored sequence per variant (3 x 200 more on the reference run). The same x' serve all three variants of a problem,
#: so their noise is shared by the paired comparison.
OTHER_PROBLEMS = 2


def answer_prefix(reply: str) -> str:
    """The reply up to its final number: the text through its last `Answer:` (the format the graded levels ask
    for), or the whole reply followed by a new line `Answer:` when it has none, so every variant of it ends in the
    same `Answer: N` line and differs only in N."""
    marks = list(re.finditer(r"answer\s*:", reply, re.IGNORECASE))
    if marks:
        return reply[: marks[-1].end()]
    return reply.rstrip() + "\nAnswer:"


def answer_variants(example: Example, rng: np.random.Generator) -> dict[str, int] | None:
    """The numbers a reply to `example` is made to end with: the right answer, an operand of the problem (a number
    in its text other than the answer, drawn at random when there are several) and a random number in
    0..`RANDOM_MAX` that is neither. The operand is the wrong answer a reply most plausibly gives by restating the
    problem; the random number is the wrong answer with no link to it. None when every number of the problem is its
    answer ("What is 0 + 0?"): there is no operand to compare with."""
    right = int(float(example.answer))
    operands = sorted({int(v) for v in numbers_in(example.request) if v != right})
    if not operands:
        return None
    others = [v for v in range(RANDOM_MAX + 1) if v != right and v not in operands]
    return {"right": right, "operand": int(rng.choice(operands)), "random": int(rng.choice(others))}


def answer_logprobs(model: Any, tokenizer: Any, prompts: Sequence[Any], prefixes: Sequence[str],
                    numbers: Sequence[int], batch_size: int = 16, progress: bool = False) -> np.ndarray:
    """log pi(N | x, reply prefix) for each (prompt x, prefix, number N): the summed log-probability of the tokens that
    `prefix + " N"` adds to `prefix`, after x's chat prompt (the assistant turn as generation starts it).

    The answer's tokens are those where the encodings of `prefix + " N"` and `prefix` part, so nothing but the
    number (and the space before it) is scored.
    """
    from mipo_lib.generate import chat_prompt_ids
    from mipo_lib.scoring import completion_logprobs

    contexts, completions = [], []
    for prompt, prefix, number in zip(prompts, prefixes, numbers):
        full = tokenizer.encode(f"{prefix} {number}", add_special_tokens=False)
        head = tokenizer.encode(prefix, add_special_tokens=False)
        cut = next((i for i, (a, b) in enumerate(zip(full, head)) if a != b), min(len(full), len(head)))
        contexts.append(chat_prompt_ids(tokenizer, prompt) + full[:cut])
        completions.append(full[cut:])
    return completion_logprobs(model, contexts, completions, tokenizer.pad_token_id, batch_size=batch_size,
                               progress=progress, desc="answer log-probs")


def within_problem_pmi(
    task: Task, examples: Sequence[Example], replies: Sequence[str], score: Any, k_other: int = OTHER_PROBLEMS,
    seed: int = 0,
) -> pd.DataFrame:
    """PMI of a reply's final number, per problem and variant: log pi0(N | x, prefix) - mean over `k_other` other
    problems x' of log pi0(N | x', prefix), with the same reply prefix (`answer_prefix`) and N the right answer, an
    operand or a random number (`answer_variants`).

    Each problem's variants share everything but N, so comparing them within the problem asks whether the model's
    PMI prefers the right number, with no difference of length, wording or problem to explain it. The x' are drawn
    per problem (seeded) among the other problems; a problem whose numbers all equal its answer has no operand and is
    left out. `score(prompts, prefixes, numbers)` returns the log-probabilities
    (`answer_logprobs` bound to a model). Columns: example_id, variant, number, logp_x, logp_x_prime, pmi.
    """
    if k_other < 1 or k_other >= len(examples):
        raise MipoError(f"k_other={k_other} needs 1 <= k_other < {len(examples)} problems")
    rng = np.random.default_rng(seed)
    rows, prompts, prefixes, numbers = [], [], [], []
    for i, (example, reply) in enumerate(zip(examples, replies)):
        prefix = answer_prefix(str(reply))
        others = rng.choice([j for j in range(len(examples)) if j != i], size=k_other, replace=False)
        variants = answer_variants(example, rng)
        for variant, number in (variants or {}).items():  # a problem without an operand is left out
            rows.append({"example_id": example.id, "variant": variant, "number": number})
            for x in [example, *(examples[j] for j in others)]:
                prompts.append(task.prompt(x))
                prefixes.append(prefix)
                numbers.append(number)
    lp = np.asarray(score(prompts, prefixes, numbers), dtype=float).reshape(len(rows), 1 + k_other)
    out = pd.DataFrame(rows)
    return out.assign(logp_x=lp[:, 0], logp_x_prime=lp[:, 1:].mean(axis=1), pmi=lp[:, 0] - lp[:, 1:].mean(axis=1))


def base_reply_pmi(preset: Preset, records: pd.DataFrame, method: str, k_other: int = OTHER_PROBLEMS, seed: int = 0,
                   progress: bool = True) -> pd.DataFrame:
    """`within_problem_pmi` of `method`'s held-out replies (its first seed) under the base model, cached like
    `answer_pmi` (`cache` stage 'pmi')."""
    from mipo_lib import evaluate
    from mipo_lib.models import load_for_preset

    task = get_task(preset.task)
    examples, part = _first_seed_replies(preset, records, method)
    exs, replies = [examples[i] for i in part["example_id"]], part["response"].fillna("").astype(str).tolist()
    key = cache.stage_key(
        "pmi", preset, f"within-problem answer PMI of the {method} replies (x' seed {seed}, {k_other} x')",
        prompts=cache.prompts_digest(task, exs), responses=cache.content_digest(replies)[:16],
        k_other=k_other, seed=seed, variants=list(VARIANTS), random_max=RANDOM_MAX,
    )

    def make() -> pd.DataFrame:
        model, tokenizer = load_for_preset(preset)

        def score(prompts: Sequence[Any], prefixes: Sequence[str], numbers: Sequence[int]) -> np.ndarray:
            return answer_logprobs(model, tokenizer, prompts, prefixes, numbers, batch_size=preset.score_batch_size,
                                   progress=progress)

        return within_problem_pmi(task, exs, replies, score, k_other=k_other, seed=seed)

    folder = run_dir(preset, preset.task, "eval")
    slug = registry.get_method(method).slug
    return evaluate.evaluate_cached(folder / f"within-problem-pmi-{slug}-{key.digest}.jsonl", make, key=key)


def pmi_wins(frame: pd.DataFrame, measures: Sequence[str] = ("pmi", "logp_x"), n_boot: int = 2_000,
             seed: int = 0) -> pd.DataFrame:
    """How often the right answer's measure beats a wrong variant's within the same problem (ties count one half),
    per wrong variant and measure, with a bootstrap 95% CI over problems (paired: each problem's comparison is one
    unit) and a two-sided sign test's p-value (ties dropped). 0.5 is chance."""
    wide = {m: frame.pivot(index="example_id", columns="variant", values=m) for m in measures}
    rng = np.random.default_rng(seed)
    rows = []
    for measure, table in wide.items():
        for wrong in [v for v in VARIANTS if v != "right" and v in table]:
            diff = (table["right"] - table[wrong]).to_numpy(float)
            win = np.where(diff > 0, 1.0, np.where(diff < 0, 0.0, 0.5))
            idx = rng.integers(0, len(win), size=(n_boot, len(win)))
            lo, hi = np.quantile(win[idx].mean(axis=1), [0.025, 0.975])
            wins, losses = int((diff > 0).sum()), int((diff < 0).sum())
            p = scipy.stats.binomtest(wins, wins + losses).pvalue if wins + losses else float("nan")
            rows.append({"measure": measure, "versus": wrong, "n": len(win), "win_rate": float(win.mean()),
                         "lo": float(lo), "hi": float(hi), "mean_difference": float(diff.mean()), "p_sign": float(p)})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------------ command line
def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    """`python -m mipo_lib.experiments.reasoning --preset cpu-reasoning --set dtype=float32`: measure every level on
    validation at the cap's upper bound (`CAP_UPPER_BOUND` new tokens, so that replies finish), write
    `reasoning_difficulty_<preset>.csv` (with the `chosen` level) into the preset's figures folder (`figures/..._cpu`
    for the reference), print the table and the chosen level.

    `--cap`: instead, choose the evaluation cap from every seed's validation replies at the chosen settings
    (`choose_cap_on_validation`; run `make tune PRESET=cpu-reasoning` with the same `--set` first, and `--seeds` to
    pick the seeds) and write `reasoning_cap_<preset>.csv`."""
    from mipo_lib.config import parse_assignments

    parser = argparse.ArgumentParser(prog="python -m mipo_lib.experiments.reasoning", description=main.__doc__)
    parser.add_argument("--preset", default=REFERENCE_PRESET, help=f"model and settings (default {REFERENCE_PRESET})")
    parser.add_argument("--n", type=int, default=100, help="validation problems per level (default 100)")
    parser.add_argument("--levels", nargs="*", default=list(GRADED_LEVELS), help="levels to measure (default: all)")
    parser.add_argument("--cap", action="store_true", help="choose the evaluation cap from validation replies instead")
    parser.add_argument("--seeds", default=None, help="--cap: the seeds whose adapters answer, e.g. 0,1,2 (default: "
                        "the preset's)")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="FIELD=VALUE",
                        help="change one preset field, e.g. --set dtype=float32 (repeatable)")
    args = parser.parse_args(argv)
    overrides = parse_assignments(args.overrides)
    if args.cap:
        preset = get_preset(args.preset, **overrides)
        seeds = None if args.seeds is None else [int(s) for s in args.seeds.split(",")]
        cap, table = choose_cap_on_validation(preset, seeds, progress=False)
        print(table.pivot(index="cap", columns="method", values="finished").to_string())
        print(f"wrote {cap_path(preset).name}; chosen cap: {cap} new tokens")
        if short := shortfall(table, cap):
            print(f"no cap up to {cap} lets {FINISHED_SHARE:.0%} of every method's replies finish: "
                  + ", ".join(f"{m} {f:.0%}" for m, f in short.items()) + f" at {cap}; the cap is the bound")
        return table
    preset = get_preset(args.preset, **{"eval_max_new_tokens": CAP_UPPER_BOUND, **overrides})
    summary, _ = measure_difficulty(preset, args.levels, args.n, progress=False)
    summary["chosen"] = summary["level"] == choose_level(summary)  # the level notebook 07's summary names
    name = figures_preset(preset)
    path = stats.write_table(summary, tables_dir(preset) / f"reasoning_difficulty_{name}.csv")
    print(summary.to_string(index=False))
    print(f"wrote {path.name}; chosen level: {choose_level(summary)}")
    return summary


if __name__ == "__main__":
    main()
