"""Notebook 07's summary (section 8), rendered from its tables: the conclusions file and the README's reasoning lines.

Three tables hold everything the summary states, and nothing else is read back:
- the results table (`figures/results_reasoning_<preset>.csv`, `stats.write_results`): accuracy per method and seed,
  and the paired differences with their Holm-adjusted verdicts;
- the difficulty table (`figures/reasoning_difficulty_<preset>.csv`, `experiments.reasoning.main`): the base model's
  validation accuracy per level, which levels were in the informative range, and the `chosen` one;
- the findings table (`figures/reasoning_<preset>_findings.csv`, `stats.FINDINGS_COLUMNS`, written by notebook 07):
  the setup (training problems, the token caps and training settings chosen on validation, the informative range),
  format vs correctness and the replies cut by the cap per method, how often the pairs are correct, and how well PMI
  ranks correct answers, across problems and within each problem.
`lines` renders the summary bullets through `render`; which caveat applies is chosen by the tables' numbers.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from mipo_lib import methods as registry
from mipo_lib.analysis import render, stats
from mipo_lib.config import repo_root
from mipo_lib.errors import MipoError
from mipo_lib.tasks.arithmetic import task_name


TABLES = {"results": "results_reasoning_{preset}.csv", "difficulty": "reasoning_difficulty_{preset}.csv",
          "findings": "reasoning_{preset}_findings.csv"}
CONCLUSIONS = "reasoning_{preset}_conclusions.md"


def table_paths(preset: str = "cpu", folder: Path | None = None) -> dict[str, Path]:
    """The summary's three tables in `folder` (default the repository's `figures/`; the reference is filed as `cpu`)."""
    folder = folder or repo_root() / "figures"
    return {name: folder / pattern.format(preset=preset) for name, pattern in TABLES.items()}


def load_tables(preset: str = "cpu", folder: Path | None = None) -> dict[str, pd.DataFrame]:
    """The three tables (`table_paths`); a missing one names the target that writes it."""
    paths = table_paths(preset, folder)
    missing = [p.name for p in paths.values() if not p.exists()]
    if missing:
        raise MipoError(f"figures/{', '.join(missing)} missing; run notebook 07 (make reasoning)")
    return {name: pd.read_csv(path) for name, path in paths.items()}


class _Findings:
    """Look-ups in a findings table: `value(section, quantity, subject)`, a missing row naming the fix."""

    def __init__(self, table: pd.DataFrame) -> None:
        self.table = table.assign(subject=table["subject"].fillna(""))

    def row(self, section: str, quantity: str, subject: str = "") -> pd.Series:
        t = self.table
        found = t[(t["section"] == section) & (t["quantity"] == quantity) & (t["subject"] == subject)]
        if found.empty:
            raise MipoError(f"the reasoning findings have no {section} / {quantity} / {subject!r} row; rerun notebook 07")
        return found.iloc[0]

    def value(self, section: str, quantity: str, subject: str = "") -> float:
        return float(self.row(section, quantity, subject)["value"])


def _base(methods: list[str]) -> str:
    """The untrained method, which stands for the base model on a task without context (`prompting`)."""
    return next(m for m in methods if m in registry.names() and registry.get_method(m).training is None)


def _finished_on_validation(f: _Findings) -> dict[str, float]:
    """{method: share of its validation replies that finish within the chosen cap} (the findings' `finished at the
    cap on validation` rows; empty for a table that predates them)."""
    t = f.table
    at_cap = t[(t["section"] == "setup") & (t["quantity"] == "finished at the cap on validation")]
    return {str(r.subject): float(r.value) for r in at_cap.itertuples()}


def _cap_rule(f: _Findings) -> str:
    """How the chosen cap met the rule: the smallest at which the required share of every method's validation replies
    finish, or the bound, with the methods that fall short there (the findings' `finished at the cap on validation`
    rows; a table without them predates the bound's fallback and met the rule)."""
    required = f.value("setup", "finished share required")
    rule = f"the smallest at which at least {required:.0%} of every method's validation replies finish"
    short = [(m, v) for m, v in _finished_on_validation(f).items() if v < required - 1e-12]
    if not short:
        return rule
    return (f"the bound: no cap up to it lets {required:.0%} of every method's validation replies finish; "
            + ", ".join(f"{m} {v:.0%}" for m, v in short) + " at the bound")


def _best_case(over: list[str], base: str, rates: pd.Series, cut: pd.Series) -> str:
    """How much the cap can hide: each over-budget trained method's accuracy and its difference from the base if every
    one of its cut replies had been right and none of the base's (the most favourable case; '' when only the base is
    over the budget). A bound on the point estimate, from the results table alone."""
    trained = [m for m in over if m != base]
    if not trained:
        return ""
    return (" If every cut reply had been right, " + "; ".join(
        f"{m} would score at most {rates[m] + cut[m]:.1%} and {m} − base would be at most "
        f"{100 * (rates[m] + cut[m] - rates[base]):+.1f} points" for m in trained)
        + " (point estimates): the cap cannot hide a larger gain.")


def lines(results: pd.DataFrame, difficulty: pd.DataFrame, findings: pd.DataFrame) -> list[str]:
    """The summary bullets (`- ...`) of a reasoning run, from its results, difficulty and findings tables."""
    f = _Findings(findings)
    per_seed = results[results["kind"] == "per_seed"]
    rates = per_seed.groupby("method", sort=False)["rate"].mean()
    cut = per_seed.groupby("method", sort=False)["truncated"].mean()
    base = _base(list(rates.index))
    methods = [base, "SFT", "MIPO"]
    task = str(per_seed["task"].iloc[0])
    chosen = str(difficulty.loc[difficulty["chosen"].astype(bool), "level"].iloc[0])
    low, high = f.value("setup", "informative range, low"), f.value("setup", "informative range, high")
    levels = ", ".join(f"{r.description} {r.accuracy:.0%}"
                       for r in difficulty.sort_values("accuracy", ascending=False).itertuples())
    diffs = stats.comparisons_from_results(results).set_index(["a", "b"], drop=False)
    no_answer = {m: 1 - f.value("formats", "final answer given", m) for m in methods}
    pmi, logp = f.row("pmi", "AUC", "pmi"), f.row("pmi", "AUC", "logp_x")
    setting = {m: (f.value("setup", "epochs", m), f.value("setup", "learning rate", m)) for m in ("MIPO", "SFT")}
    cap, chosen_cap = f.value("setup", "new-token cap"), f.value("setup", "cap chosen on validation")
    out = [
        f"- Task: {task} ({'chosen on validation' if task == task_name(chosen) else 'not the chosen level'}), "
        f"{int(per_seed['n'].iloc[0])} held-out problems, {per_seed['seed'].nunique()} seeds, "
        f"{f.value('setup', 'training problems per seed'):.0f} training problems per seed, no labels used in training; "
        "each prompt ends with \"End your reply with 'Answer: <number>'.\" and only that line is graded (a reply "
        "without it has no final answer and counts as wrong).",
        f"- Difficulty: greedy base accuracy on each level's validation problems: {levels}; the hardest level inside "
        f"[{low:.0%}, {high:.0%}] is `{chosen}`.",
        f"- Training: MIPO {setting['MIPO'][0]:.0f} epochs at learning rate {setting['MIPO'][1]:g}, SFT "
        f"{setting['SFT'][0]:.0f} epochs at {setting['SFT'][1]:g} ("
        + ("chosen on validation by the one-standard-error rule" if f.value("setup", "training settings chosen on "
           "validation") else "not the settings chosen on validation") + f"); evaluation cap {cap:.0f} new tokens ("
        + (_cap_rule(f) if cap == chosen_cap else f"not the cap chosen on validation, {chosen_cap:.0f}")
        + f"); pairs sampled with a cap of {f.value('setup', 'pairs token cap'):.0f} "
        f"({f.value('setup', 'pairs cut'):.1%} of their replies cut).",
        f"- Accuracy: base {rates[base]:.1%}, SFT {rates['SFT']:.1%}, MIPO {rates['MIPO']:.1%}; replies cut by the "
        "cap: " + ", ".join(f"{'base' if m == base else m} {cut[m]:.1%}" for m in methods) + "; no final answer: "
        + ", ".join(f"{'base' if m == base else m} {no_answer[m]:.0%}" for m in methods) + ".",
        f"- {render.difference(diffs.loc[('MIPO', base)])}",
        f"- {render.difference(diffs.loc[('MIPO', 'SFT')])}",
        f"- Of the MIPO − base difference, {f.value('formats', 'format', 'MIPO'):+.1%} is format (more replies with "
        f"a final answer) and {f.value('formats', 'correctness', 'MIPO'):+.1%} correctness (final answers more often "
        "right).",
    ]
    over = [m for m in methods if cut[m] > stats.CUT_BUDGET]
    if over:
        on_validation = _finished_on_validation(f)
        seen = {m: on_validation[m] for m in over if m in on_validation}
        met = seen and min(seen.values()) >= 1 - stats.CUT_BUDGET - 1e-12  # the cap met the rule on validation
        out.append(f"- Caveat: the cap cut more than {stats.CUT_BUDGET:.0%} of the held-out replies of "
                   f"{', '.join(over)}; those replies have no final answer because the cap cut them, whatever their "
                   "arithmetic" + (" (finished at the same cap on validation: "
                                   + ", ".join(f"{m} {v:.0%}" for m, v in seen.items())
                                   + ("; the held-out problems drew more replies that run on" if met else "") + ")"
                                   if seen else "") + "." + _best_case(over, base, rates, cut))
    wins = {(m, v): f.row("pmi within", f"right beats {v}", m) for m in ("pmi", "logp_x") for v in ("operand", "random")}
    out += [
        f"- The pairs: positives are correct in {f.value('pairs', 'positive correct'):.0%} of pairs, negatives "
        f"(answers to other problems) in {f.value('pairs', 'negative correct'):.0%}; "
        f"{f.value('pairs', 'correct over wrong'):.0%} of pairs prefer a correct answer to a wrong one, "
        f"{f.value('pairs', 'wrong over correct'):.0%} the reverse, {f.value('pairs', 'no correctness signal'):.0%} "
        "carry no correctness signal.",
        f"- PMI within a problem (the base model's reply to each of {int(wins[('pmi', 'operand')]['n_examples'])} "
        "held-out problems, its final number replaced; PMI = log p(N | x, reply) minus its mean over "
        f"{f.value('setup', 'other problems per PMI'):.0f} other problems): the right answer scores higher than an "
        f"operand of the problem in {wins[('pmi', 'operand')]['value']:.0%} of problems [95% CI "
        f"{wins[('pmi', 'operand')]['lo']:.0%}, {wins[('pmi', 'operand')]['hi']:.0%}] and than a random number in "
        f"{wins[('pmi', 'random')]['value']:.0%} [{wins[('pmi', 'random')]['lo']:.0%}, "
        f"{wins[('pmi', 'random')]['hi']:.0%}] (50% is chance); likelihood log p(N | x, reply): "
        f"{wins[('logp_x', 'operand')]['value']:.0%} [{wins[('logp_x', 'operand')]['lo']:.0%}, "
        f"{wins[('logp_x', 'operand')]['hi']:.0%}] and {wins[('logp_x', 'random')]['value']:.0%} "
        f"[{wins[('logp_x', 'random')]['lo']:.0%}, {wins[('logp_x', 'random')]['hi']:.0%}].",
        f"- PMI across problems (whole replies of different problems, one x' each, so mostly how much of its problem "
        f"a reply restates): AUC {pmi['value']:.2f} [95% CI {pmi['lo']:.2f}, {pmi['hi']:.2f}] for correct vs wrong "
        f"base answers; likelihood log p(y|x): AUC {logp['value']:.2f} [{logp['lo']:.2f}, {logp['hi']:.2f}].",
    ]
    return out


def conclusions_text(results: pd.DataFrame, difficulty: pd.DataFrame, findings: pd.DataFrame) -> str:
    """The conclusions file notebook 07 writes next to its tables (an output that nothing reads)."""
    return "\n".join(lines(results, difficulty, findings)) + "\n"


def committed_lines(preset: str = "cpu") -> list[str]:
    """`lines` of the committed reference run."""
    tables = load_tables(preset)
    return lines(tables["results"], tables["difficulty"], tables["findings"])
