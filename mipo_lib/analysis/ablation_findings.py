"""Notebook 06's reports, rendered from its three tables: the conclusions file, section 8's findings, the README's lines.

Notebook 06 writes three tables next to its figures (`write_run`), and they are all that is read back:
- `figures/ablations_<preset>.csv`, the variants (`ablations.summary_table`): rates and differences vs prompting and
  vs the reference variant with 95% CIs, the KL to the base, the share of replies cut at the token cap, mean words,
  optimizer steps, and the run's seeds, model and task;
- `..._comparisons.csv`, every comparison with its family, Holm-adjusted p-value and verdict (`stats.comparison_row`,
  a `section` naming the heading it is read under);
- `..._findings.csv`, the descriptive numbers (seconds per prompt, win rates; `stats.FINDINGS_COLUMNS`).
`conclusions_text` renders the run's conclusions file (`..._conclusions.txt`, an output that nothing reads), `findings`
section 8's bullets and `sections` the lines the README block quotes, all through `render`. Each interpretation that
depends on a verdict is chosen by the comparison rows' `detectable` and sign columns, direction included ("the second
negative helped" only for a detectable gain over its compute-matched control), so a rerun whose results differ cannot
leave stale prose. The module imports no training code, so the README builder (`workbook.readme`) can use it too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from mipo_lib import methods as registry
from mipo_lib.analysis import render, stats
from mipo_lib.config import repo_root
from mipo_lib.errors import MipoError

#: The headings of notebook 06's reports, in their order; every comparison and finding names one as its `section`.
SECTIONS: tuple[str, ...] = ("K negatives", "kind of negative", "beta", "MIPO vs CAD", "diversity",
                             "win-or-tie vs strict win")


#: One line of a report: its text, and whether the README's summary quotes it (False for a number the README's
#: variant table already shows, or a diversity row of an ablation variant rather than of a method).
Line = tuple[str, bool]


@dataclass(frozen=True)
class AblationRun:
    """One ablation run as its tables state it (`load_run`, or the notebook's own tables before `write_run`)."""

    preset: str
    variants: pd.DataFrame
    comparisons: pd.DataFrame
    findings: pd.DataFrame

    def __post_init__(self) -> None:
        if self.variants.empty:
            raise MipoError("the ablation run has no variants; run at least one of the K, negative or beta ablations")
        unknown = sorted({*self.comparisons["section"], *self.findings["section"]} - set(SECTIONS))
        if unknown:
            raise MipoError(f"unknown report section(s) {unknown}; use one of {list(SECTIONS)}")

    def variant(self, ablation: str, variant: str) -> pd.Series | None:
        found = self.variants[(self.variants["ablation"] == ablation) & (self.variants["variant"] == variant)]
        return found.iloc[0] if len(found) else None

    def ablation(self, ablation: str) -> pd.DataFrame:
        return self.variants[self.variants["ablation"] == ablation].set_index("variant")

    def comparison(self, name: str) -> pd.Series | None:
        """The comparison row named `name`, or None if the run has none."""
        found = self.comparisons[self.comparisons["comparison"] == name]
        return found.iloc[0] if len(found) else None

    def claim(self, name: str) -> str:
        """A comparison as a clause (`render.claim`); a run without it names the fix."""
        row = self.comparison(name)
        if row is None:
            raise MipoError(f"the ablation comparisons have no row {name!r}; rerun notebook 06 (make ablations)")
        return render.claim(row)

    def detectable(self, name: str, sign: int = 0) -> bool:
        """Whether the run's verdict on `name` is a detectable difference (of that sign: +1, -1; 0: either)."""
        row = self.comparison(name)
        return row is not None and render.is_detectable(row, sign)

    def finding(self, section: str, quantity: str, subject: str) -> pd.Series | None:
        f = self.findings
        found = f[(f["section"] == section) & (f["quantity"] == quantity) & (f["subject"] == subject)]
        return found.iloc[0] if len(found) else None


# ------------------------------------------------------------------------------------------------ files
TABLES = {"variants": "ablations_{preset}.csv", "comparisons": "ablations_{preset}_comparisons.csv",
          "findings": "ablations_{preset}_findings.csv"}
CONCLUSIONS = "ablations_{preset}_conclusions.txt"


def table_paths(preset: str = "cpu", folder: Path | None = None) -> dict[str, Path]:
    """The run's three tables in `folder` (default the repository's `figures/`, where only the `cpu` reference run
    writes)."""
    folder = folder or repo_root() / "figures"
    return {name: folder / pattern.format(preset=preset) for name, pattern in TABLES.items()}


def load_run(preset: str = "cpu", folder: Path | None = None) -> AblationRun:
    """The run whose tables are in `folder` (`table_paths`); a missing table names the target that writes it."""
    paths = table_paths(preset, folder)
    missing = [p.name for p in paths.values() if not p.exists()]
    if missing:
        raise MipoError(f"figures/{', '.join(missing)} missing; run notebook 06 (make ablations)")
    frames = {name: pd.read_csv(path, keep_default_na=False, na_values=[""]) for name, path in paths.items()}
    return AblationRun(preset, frames["variants"], frames["comparisons"], frames["findings"])


def write_run(run: AblationRun, folder: Path) -> list[Path]:
    """Write the run's three tables and its conclusions file, rendered from them, into `folder`."""
    paths = table_paths(run.preset, folder)
    written = [stats.write_table(getattr(run, name), path) for name, path in paths.items()]
    conclusions = folder / CONCLUSIONS.format(preset=run.preset)
    conclusions.write_text(conclusions_text(run))
    return [*written, conclusions]


# ------------------------------------------------------------------------------------------------ the conclusions
def header(run: AblationRun) -> str:
    """What ran and how its CIs were drawn, from the variant table's seeds, model, task and example counts."""
    first = run.variants.iloc[0]
    seeds = ", ".join(str(first["seeds"]).split())
    return (f"preset {run.preset}, {first['model']}, task {first['task']}, seeds [{seeds}], "
            f"{int(first['n_examples'])} held-out prompts; 95% CIs: paired crossed bootstrap over prompts and seeds "
            "(diversity and seconds: Student-t over seeds); detectable = Holm-adjusted p < 0.05 within each family")


def _named(value: object) -> bool:
    """A text cell with something in it (an empty cell is "" in a fresh table, NaN after a CSV round trip)."""
    return isinstance(value, str) and bool(value)


def _in_variant_table(row: pd.Series) -> bool:
    """A comparison the variant table shows as a cell (its `variant_column`), or the diversity of an ablation variant
    rather than of a method: the README's summary leaves both out."""
    shown = _named(row["variant_column"])
    variant_diversity = row["section"] == "diversity" and row["a"] not in registry.names()
    return shown or variant_diversity


def _comparison_lines(rows: pd.DataFrame) -> list[Line]:
    return [(render.difference(r), not _in_variant_table(r)) for _, r in rows.iterrows()]


def _k_lines(run: AblationRun, rows: pd.DataFrame) -> list[Line]:
    """The K variants' comparisons (the variant table's cells), their mean words, the follow-up checks, the caveat."""
    k = run.ablation("K")
    first = rows["variant_column"].map(_named)
    lines = _comparison_lines(rows[first])
    words = k["mean_words"].dropna()
    if len(words):
        lines.append(("Mean words per MIPO reply: " + ", ".join(f"{v}: {w:.1f}" for v, w in words.items()) + ".", True))
    lines += _comparison_lines(rows[~first])
    steps = k["optimizer_steps"].dropna()
    if len(steps):
        equal = _equal_steps(steps)
        lines.append(("Caveat: K pairs per prompt also mean more optimizer steps (" +
                      ", ".join(f"{v}: {s:.0f}" for v, s in steps.items()) +
                      "), so K vs K=1 mixes more negatives with longer training; K vs its compute-matched control "
                      "(K=1 for K x the epochs) separates them." +
                      (f" At their own epochs {', '.join(equal)} took as many steps as K=1: there K - K=1 is itself "
                       "the compute-matched comparison." if equal else ""), True))
    return lines


def _equal_steps(steps: pd.Series) -> list[str]:
    """The K variants (by label) that trained as many optimizer steps as the reference K=1 (fewer epochs for more
    pairs): for them K - K=1 already holds compute fixed, and no separate control is trained (`matched_control`)."""
    if "K=1" not in steps.index:
        return []
    return [v for v, n in steps.items() if v != "K=1" and n == steps["K=1"]]


def _twin_lines(run: AblationRun, rows: pd.DataFrame) -> list[Line]:
    lines = _comparison_lines(rows)
    ratio = run.finding("MIPO vs CAD", "time relative to MIPO", "CAD")
    cad, mipo = (run.finding("MIPO vs CAD", "seconds per prompt", m) for m in ("CAD", "MIPO"))
    if ratio is not None and cad is not None and mipo is not None:
        lines.append((f"CAD takes {ratio['value']:.2f}x MIPO's time per prompt ({cad['value']:.3f} s vs "
                      f"{mipo['value']:.3f} s).", True))
    return lines


WIN_SECTION = "win-or-tie vs strict win"
WIN_QUANTITIES = ("win-or-tie", "strict win", "tie", "loss", "both failed (share of ties)")


def _win_rates(run: AblationRun, subject: str) -> dict[str, pd.Series] | None:
    """The win-rate findings of `subject` (e.g. "MIPO vs prompting"), or None if the run lacks one of them."""
    rates = {q: run.finding(WIN_SECTION, q, subject) for q in WIN_QUANTITIES}
    return None if any(r is None for r in rates.values()) else rates  # type: ignore[return-value]


def _win_lines(run: AblationRun, rows: pd.DataFrame) -> list[Line]:
    lines = _comparison_lines(rows)
    subjects = run.findings.loc[run.findings["section"] == WIN_SECTION, "subject"]
    for subject in dict.fromkeys(subjects):
        rate = _win_rates(run, subject)
        if rate is None:
            continue
        w, s = rate["win-or-tie"], rate["strict win"]
        lines.append((f"{subject}: win-or-tie {100 * w['value']:.1f}% [95% CI {100 * w['lo']:.1f}, "
                      f"{100 * w['hi']:.1f}], strict win {100 * s['value']:.1f}% [95% CI {100 * s['lo']:.1f}, "
                      f"{100 * s['hi']:.1f}], loss {100 * rate['loss']['value']:.1f}%: ties are "
                      f"{100 * rate['tie']['value'] / w['value']:.0f}% of the 'wins', and "
                      f"{100 * rate['both failed (share of ties)']['value']:.0f}% of the ties are 'both failed'.", True))
    lines.append(("This uses the program judge (0/1); the LLM-judge (1-5) version needs a GPU preset (t4 / paper).",
                  True))
    return lines


_SECTION_LINES = {"K negatives": _k_lines, "MIPO vs CAD": _twin_lines, "win-or-tie vs strict win": _win_lines}


def sections(run: AblationRun) -> dict[str, list[Line]]:
    """Every section the run has, in `SECTIONS` order, with its lines (comparisons rendered by `render.difference`,
    descriptive lines from the variant and findings tables)."""
    present = {*run.comparisons["section"], *run.findings["section"]}
    out = {}
    for name in (s for s in SECTIONS if s in present):
        rows = run.comparisons[run.comparisons["section"] == name]
        out[name] = _SECTION_LINES.get(name, lambda _, r: _comparison_lines(r))(run, rows)
    return out


def conclusions_text(run: AblationRun) -> str:
    """The run's conclusions file: the header, then every section's lines under its `[heading]`."""
    text = [header(run)]
    for name, lines in sections(run).items():
        text += [f"\n[{name}]", *(f"  - {line}" for line, _ in lines)]
    return "\n".join(text) + "\n"


# ------------------------------------------------------------------------------------------------ section 8
def _k_negatives(run: AblationRun) -> str | None:
    k1, k2, k4 = (run.variant("K", v) for v in ("K=1", "K=2", "K=4"))
    if k1 is None or k2 is None:
        return None
    control = run.variant("K", "K=1, 2x epochs")
    text = (f"**Number of negatives.** K = 1 reached {k1['rate']:.1%}, K = 2 {k2['rate']:.1%}"
            + (f", K = 4 {k4['rate']:.1%}" if k4 is not None else "") + f". K = 2 - K = 1: {run.claim('K=2 - K=1')}")
    if k4 is not None and run.comparison("K=4 - K=2") is not None:
        text += f"; K = 4 - K = 2: {run.claim('K=4 - K=2')}"
    if control is not None:  # one negative, as many optimizer steps as K = 2
        matched, longer = "K=2 - K=1, 2x epochs", "K=1, 2x epochs - K=1"
        text += (f". At equal optimizer steps (K = 1 trained twice as long, {control['rate']:.1%}): K = 2 - control "
                 f"{run.claim(matched)}; the longer training alone (control - K = 1) {run.claim(longer)}. ")
        if run.detectable(matched, +1):
            text += "So the second negative helped beyond training longer."
        elif run.detectable(matched, -1):
            text += "So at equal optimizer steps the second negative hurt: one negative trained as long did better."
        elif run.detectable(longer, +1):
            text += "So what K = 2 adds is training length, not the second negative."
        elif run.detectable(longer, -1):
            text += ("Training one negative twice as long hurt (past the epochs chosen on validation), and at equal "
                     "steps the second negative made no detectable difference.")
        else:
            text += "Neither the second negative nor the longer training made a detectable difference at this size."
    elif "K=2" in _equal_steps(run.ablation("K")["optimizer_steps"].dropna()):
        text += (". At its own epochs (chosen on validation) K = 2 took as many optimizer steps as K = 1, so K = 2 - "
                 "K = 1 compares one and two negatives at equal compute; K = 1 is K = 2's compute-matched control.")
    else:
        text += (". This run has no compute-matched control, so more negatives and longer training (K pairs per "
                 "prompt are K times the optimizer steps) are confounded here.")
    words = run.ablation("K")["mean_words"].dropna()
    if len(words):
        text += " Mean words per MIPO reply: " + ", ".join(f"{v} {w:.0f}" for v, w in words.items())
        without = "K=2 - K=1 without the length-sensitive preferences"
        if run.comparison(without) is not None:
            text += f"; without the length-sensitive preferences K = 2 - K = 1 is {run.claim(without)}"
        text += "."
    return text


def _negative_kind(run: AblationRun) -> str | None:
    if run.variant("negative", "context_drop") is None or run.comparison("random_context - context_drop") is None:
        return None
    text = (f"**Kind of negative.** Over prompting: context drop {run.claim('context_drop - prompting')}; random "
            f"context {run.claim('random_context - prompting')}; random prompt {run.claim('random_prompt - prompting')}. "
            f"Against context drop: random context {run.claim('random_context - context_drop')}, random prompt "
            f"{run.claim('random_prompt - context_drop')}.")
    if run.detectable("random_context - context_drop", -1):
        text += (" The random-context negative, which isolates the conditional PMI exactly, taught the preference "
                 "*less* well at this model size. A possible reason, not tested here: another user's context still "
                 "makes the base model answer in some personalized style, so y+ and y- differ less than with context "
                 "drop.")
    elif run.detectable("random_context - context_drop", +1):
        text += " The random-context negative, which isolates the conditional PMI exactly, taught the preference best."
    return text


def _kl_difference(run: AblationRun) -> pd.Series | None:
    """The beta section's difference of two KLs (the one KL comparison the variant table has no cell for)."""
    c = run.comparisons
    found = c[(c["section"] == "beta") & (c["unit"] == "nats") & ~c["variant_column"].map(_named)]
    return found.iloc[0] if len(found) else None


def _beta(run: AblationRun) -> str | None:
    betas = run.ablation("beta")
    if betas.empty:
        return None
    others = [v for v in betas.index if not pd.isna(betas.loc[v, "vs_reference"])]
    reference = next(v for v in betas.index if v not in others)
    text = ("**beta.** " + ", ".join(f"{v}: {betas.loc[v, 'rate']:.1%}" for v in betas.index) + f". Against {reference}: "
            + "; ".join(f"{v} {run.claim(f'{v} - {reference}')}" for v in others) + ".")
    kl = _kl_difference(run)
    if betas["kl_nats"].notna().all():
        text += " KL to the base per reply: " + ", ".join(f"{v} {betas.loc[v, 'kl_nats']:.2f} nats" for v in betas.index)
        if kl is not None:
            text += f"; the smallest minus the largest beta: {render.claim(kl)}"
        text += "."
    if any(run.detectable(f"{v} - {reference}") for v in others):
        return text
    if kl is not None and render.is_detectable(kl):  # the policies moved detectably different distances
        text += (" beta set how far the policy moved from the base, as section 3 expects once margins grow (the "
                 "weight sigma(-beta h) keeps a small beta pushing), but not detectably how often it followed the "
                 "preference.")
    else:
        text += (" beta's overall scale barely matters here, as section 3 argues: over these Adam steps the scale is "
                 "normalized away, and the margins rarely grow large enough for the weight sigma(-beta h) to differ.")
    return text


def _twin(run: AblationRun) -> str | None:
    ratio = run.finding("MIPO vs CAD", "time relative to MIPO", "CAD")
    cad, mipo = (run.finding("MIPO vs CAD", "seconds per prompt", m) for m in ("CAD", "MIPO"))
    if ratio is None or cad is None or mipo is None or run.comparison("MIPO - CAD (quality)") is None:
        return None
    return (f"**MIPO vs its decode-time twin** (context-aware decoding at notebook 04's strength): MIPO - CAD "
            f"{run.claim('MIPO - CAD (quality)')}; CAD - prompting {run.claim('CAD - prompting (quality)')}. CAD took "
            f"{ratio['value']:.2f}x MIPO's time per prompt ({cad['value']:.2f} vs {mipo['value']:.2f} s on this "
            "machine); MIPO pays once, in training.")


def _diversity(run: AblationRun) -> str | None:
    distinct, self_bleu = "distinct-2: MIPO - prompting", "Self-BLEU: MIPO - prompting"
    if run.comparison(distinct) is None or run.comparison(self_bleu) is None:
        return None
    return (f"**Diversity.** MIPO - prompting: distinct-2 {run.claim(distinct)}, Self-BLEU {run.claim(self_bleu)}"
            + (": MIPO's replies are more alike than prompting's." if run.detectable(self_bleu, +1) else
               ": no detectable sign of MIPO collapsing onto a template (CIs over a few seeds are wide: only a large "
               "change would show)."))


def _ties(run: AblationRun) -> str | None:
    rate = _win_rates(run, "MIPO vs prompting")
    if rate is None:
        return None
    w = rate["win-or-tie"]["value"]
    return (f"**Ties inflate win rates.** MIPO vs prompting: win-or-tie {100 * w:.1f}% but strict win "
            f"{100 * rate['strict win']['value']:.1f}% (loss {100 * rate['loss']['value']:.1f}%); ties are "
            f"{100 * rate['tie']['value'] / w:.0f}% of the \"wins\" and "
            f"{100 * rate['both failed (share of ties)']['value']:.0f}% of those ties are \"both failed\". This uses "
            "the program judge (0/1); the LLM-judge version needs a GPU preset.")


def _cut_replies(run: AblationRun) -> str:
    shares = run.variants.drop_duplicates("variant").set_index("variant")["truncated"]
    over = shares[shares > stats.CUT_BUDGET]
    if over.empty:
        return (f"**Cut replies.** Every variant kept its replies cut at the token cap at or below "
                f"{stats.CUT_BUDGET:.0%}.")
    return (f"**Cut replies.** Over the protocol's {stats.CUT_BUDGET:.0%} of replies cut at the token cap: "
            + ", ".join(f"{v} {share:.0%}" for v, share in over.items())
            + ". The judges fail a cut reply where more text could break the preference, so the success rates above "
              "already count those as failures.")


def findings(run: AblationRun) -> list[str]:
    """Section 8's bullets: what ran, then one per ablation the run has (sections it skipped are left out)."""
    parts = (_k_negatives, _negative_kind, _beta, _twin, _diversity, _ties, _cut_replies)
    return [f"Run: {header(run)}.", *(text for part in parts if (text := part(run)) is not None)]


def committed_findings(preset: str = "cpu") -> list[str]:
    """`findings` of the committed reference run (`load_run`)."""
    return findings(load_run(preset))
