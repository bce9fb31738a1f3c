"""Notebook 07's summary (section 8), rendered from its tables: the conclusions file and the README's reasoning lines.

Three tables hold everything the summary states, and nothing else is read back:
- the results table (`figures/results_reasoning_<preset>.csv`, `stats.write_results`): accuracy per method and seed,
  and the paired differences with their Holm-adjusted verdicts;
- the difficulty table (`figures/reasoning_difficulty_<preset>.csv`, `experiments.reasoning.main`): the base model's
  validation accuracy per level, which levels were in the informative range, and the `chosen` one;
- the findings table (`figures/reasoning_<preset>_findings.csv`, `stats.FINDINGS_COLUMNS`, written by notebook 07):
  the setup (training problems, the evaluation's token cap, the informative range), format vs correctness, how
  often the pairs are correct, and how well PMI ranks correct answers.
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

#: How much more often MIPO's replies must be unfinished than the base model's before the summary warns that the
#: token cap, not arithmetic, may explain the difference.
UNFINISHED_MARGIN = 0.05

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


def lines(results: pd.DataFrame, difficulty: pd.DataFrame, findings: pd.DataFrame) -> list[str]:
    """The summary bullets (`- ...`) of a reasoning run, from its results, difficulty and findings tables."""
    f = _Findings(findings)
    per_seed = results[results["kind"] == "per_seed"]
    rates = per_seed.groupby("method", sort=False)["rate"].mean()
    base = _base(list(rates.index))
    task = str(per_seed["task"].iloc[0])
    chosen = str(difficulty.loc[difficulty["chosen"].astype(bool), "level"].iloc[0])
    low, high = f.value("setup", "informative range, low"), f.value("setup", "informative range, high")
    levels = ", ".join(f"{r.description} {r.accuracy:.0%}"
                       for r in difficulty.sort_values("accuracy", ascending=False).itertuples())
    diffs = stats.comparisons_from_results(results).set_index(["a", "b"], drop=False)
    unfinished = {m: f.value("formats", "unfinished", m) for m in (base, "MIPO")}
    finished = {m: f.value("formats", "accuracy among finished replies", m) for m in (base, "MIPO")}
    words = {m: f.value("formats", "mean words", m) for m in (base, "MIPO")}
    pmi, logp = f.row("pmi", "AUC", "pmi"), f.row("pmi", "AUC", "logp_x")
    out = [
        f"- Task: {task} ({'chosen on validation' if task == task_name(chosen) else 'not the chosen level'}), "
        f"{int(per_seed['n'].iloc[0])} held-out problems, {per_seed['seed'].nunique()} seeds, "
        f"{f.value('setup', 'training problems per seed'):.0f} training problems per seed, no labels used in training.",
        f"- Difficulty: greedy base accuracy on each level's validation problems: {levels}; the hardest level inside "
        f"[{low:.0%}, {high:.0%}] is `{chosen}`.",
        f"- Accuracy: base {rates[base]:.1%}, SFT {rates['SFT']:.1%}, MIPO {rates['MIPO']:.1%}.",
        f"- {render.difference(diffs.loc[('MIPO', base)])}",
        f"- {render.difference(diffs.loc[('MIPO', 'SFT')])}",
        f"- Of the MIPO − base difference, {f.value('formats', 'format', 'MIPO'):+.1%} is format and "
        f"{f.value('formats', 'correctness', 'MIPO'):+.1%} correctness; replies left unfinished (no final full stop): "
        f"base {unfinished[base]:.0%}, MIPO {unfinished['MIPO']:.0%} (mean words {words[base]:.1f} vs "
        f"{words['MIPO']:.1f}).",
    ]
    if unfinished["MIPO"] > unfinished[base] + UNFINISHED_MARGIN:
        out.append(
            f"- Caveat: with a cap of {f.value('setup', 'new-token cap'):.0f} new tokens, MIPO's longer replies are "
            f"left unfinished in {unfinished['MIPO']:.0%} of problems vs {unfinished[base]:.0%} for the base model; "
            f"among finished replies MIPO scores {finished['MIPO']:.0%} vs {finished[base]:.0%} (different subsets, "
            "not a paired comparison). Rerun with a larger `eval_max_new_tokens` (the adapters are reused) before "
            "reading the difference as arithmetic.")
    out += [
        f"- The pairs: positives are correct in {f.value('pairs', 'positive correct'):.0%} of pairs, negatives "
        f"(answers to other problems) in {f.value('pairs', 'negative correct'):.0%}; "
        f"{f.value('pairs', 'correct over wrong'):.0%} of pairs prefer a correct answer to a wrong one, "
        f"{f.value('pairs', 'wrong over correct'):.0%} the reverse, {f.value('pairs', 'no correctness signal'):.0%} "
        "carry no correctness signal.",
        f"- PMI and correctness: base-model PMI ranks held-out answers with AUC {pmi['value']:.2f} [95% CI "
        f"{pmi['lo']:.2f}, {pmi['hi']:.2f}] (mean {f.value('pmi', 'mean, correct answers', 'pmi'):.1f} nats for "
        f"correct vs {f.value('pmi', 'mean, wrong answers', 'pmi'):.1f} for wrong answers); likelihood log p(y|x): AUC "
        f"{logp['value']:.2f} [{logp['lo']:.2f}, {logp['hi']:.2f}].",
    ]
    return out


def conclusions_text(results: pd.DataFrame, difficulty: pd.DataFrame, findings: pd.DataFrame) -> str:
    """The conclusions file notebook 07 writes next to its tables (an output that nothing reads)."""
    return "\n".join(lines(results, difficulty, findings)) + "\n"


def committed_lines(preset: str = "cpu") -> list[str]:
    """`lines` of the committed reference run."""
    tables = load_tables(preset)
    return lines(tables["results"], tables["difficulty"], tables["findings"])
