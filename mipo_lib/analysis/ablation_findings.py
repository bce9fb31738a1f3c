"""The findings of a committed ablation run (notebook 06, section 8), written from its own table and sentences.

Notebook 06 writes two small files next to its figures: `figures/ablations_<preset>.csv` (`ablations.summary_table`:
every variant's rate and paired differences with 95% CIs) and `figures/ablations_<preset>_conclusions.txt` (one
`stats.conclusion` sentence per comparison, whose verdict is Holm-adjusted within its family in a current run).
`findings` turns them into the section's bullets. Every number and every verdict is read from those files, and each
interpretation that depends on a verdict is chosen by it, direction included ("the second negative helped" only for a
detectable gain over its compute-matched control), so a rerun whose results differ cannot leave stale prose. The
module imports no training code, so the README builder (`readme.ablations_block`) can use it too.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from mipo_lib.config import repo_root
from mipo_lib.errors import MipoError

#: A conclusion sentence's value and CI: "<what>: +5.0 points [95% CI +1.0, +9.0]; ..."
_CI = re.compile(r": ([+\-]?[\d.]+)[^\[]*\[95% CI ([+\-]?[\d.]+), ([+\-]?[\d.]+)\]")


def committed_paths(preset: str = "cpu") -> tuple[Path, Path]:
    """Notebook 06's committed table and sentences for `preset` (only the `cpu` reference run writes `figures/`)."""
    figures = repo_root() / "figures"
    return figures / f"ablations_{preset}.csv", figures / f"ablations_{preset}_conclusions.txt"


class Run:
    """One ablation run as its files state it: look-ups of rows and sentences, and their verdicts."""

    def __init__(self, table: pd.DataFrame, conclusions: str) -> None:
        self.table = table
        self.lines = conclusions.splitlines()
        if not self.lines:
            raise MipoError("the ablation conclusions file is empty; rerun notebook 06 (make ablations)")

    @property
    def header(self) -> str:
        """The run's first line: preset, model, seeds, prompts and how the CIs were drawn."""
        return self.lines[0]

    def sections(self) -> dict[str, list[str]]:
        """The sentences under each `[section]` heading, in the file's order."""
        out: dict[str, list[str]] = {}
        current = None
        for line in self.lines[1:]:
            if line.startswith("[") and line.rstrip().endswith("]"):
                current = out.setdefault(line.strip()[1:-1], [])
            elif line.strip().startswith("- ") and current is not None:
                current.append(line.strip()[2:])
        return out

    def row(self, ablation: str, variant: str) -> pd.Series | None:
        found = self.table[(self.table["ablation"] == ablation) & (self.table["variant"] == variant)]
        return found.iloc[0] if len(found) else None

    def rows(self, ablation: str) -> pd.DataFrame:
        return self.table[self.table["ablation"] == ablation].set_index("variant")

    def sentence(self, start: str) -> str | None:
        """The conclusion that starts with `start`, or None if the run has none."""
        return next((line.strip()[2:] for line in self.lines if line.strip().startswith(f"- {start}")), None)

    def cuts_recorded(self) -> bool:
        """Whether the table has each variant's share of replies cut at the token cap (runs of the current protocol)."""
        return "truncated" in self.table and bool(self.table["truncated"].notna().any())

    def has(self, start: str) -> bool:
        return self.sentence(start) is not None

    def _required(self, start: str) -> str:
        text = self.sentence(start)
        if text is None:
            raise MipoError(f"the ablation conclusions have no sentence starting {start!r}; rerun notebook 06")
        return text

    def detectable(self, start: str, direction: str = "") -> bool:
        """Whether the run's verdict on `start` is a detectable difference (of that `direction`: "gain", "loss"...)."""
        text = self.sentence(start)
        return text is not None and "no detectable" not in text and f"a detectable {direction}" in text

    def claim(self, start: str, digits: int = 1, unit: str = " points") -> str:
        """A difference as text: its value, its 95% CI and the run's own verdict."""
        text = self._required(start)
        found = _CI.search(text)
        if found is None:
            raise MipoError(f"no value with a 95% CI in the conclusion {text!r}")
        mean, lo, hi = (float(v) for v in found.groups())
        kind = re.search(r"a detectable ([^(.;]+?)(?: \(|\.|$)", text)
        if "no verdict" in text or "no conclusion" in text:
            verdict = "no verdict (one seed, or deterministic on both sides)"
        elif kind and "no detectable" not in text:
            verdict = f"a detectable {kind.group(1)}"
        else:
            verdict = "no detectable effect"
        return f"{mean:+.{digits}f}{unit} [{lo:+.{digits}f}, {hi:+.{digits}f}], {verdict}"


def _k_negatives(run: Run) -> str | None:
    k1, k2, k4 = (run.row("K", v) for v in ("K=1", "K=2", "K=4"))
    if k1 is None or k2 is None:
        return None
    control = run.row("K", "K=1, 2x epochs")
    text = (f"**Number of negatives.** K = 1 reached {k1['rate']:.1%}, K = 2 {k2['rate']:.1%}"
            + (f", K = 4 {k4['rate']:.1%}" if k4 is not None else "") + f". K = 2 - K = 1: {run.claim('K=2 - K=1:')}")
    if k4 is not None and run.has("K=4 - K=2"):
        text += f"; K = 4 - K = 2: {run.claim('K=4 - K=2')}"
    if control is not None:  # one negative, as many optimizer steps as K = 2
        matched, longer = "K=2 - K=1, 2x epochs", "K=1, 2x epochs - K=1"
        text += (f". At equal optimizer steps (K = 1 trained twice as long, {control['rate']:.1%}): K = 2 - control "
                 f"{run.claim(matched)}; the longer training alone (control - K = 1) {run.claim(longer)}. ")
        if run.detectable(matched, "gain"):
            text += "So the second negative helped beyond training longer."
        elif run.detectable(matched, "loss"):
            text += "So at equal optimizer steps the second negative hurt: one negative trained as long did better."
        elif run.detectable(longer, "gain"):
            text += "So what K = 2 adds is training length, not the second negative."
        elif run.detectable(longer, "loss"):
            text += ("Training one negative twice as long hurt (past the epochs chosen on validation), and at equal "
                     "steps the second negative made no detectable difference.")
        else:
            text += "Neither the second negative nor the longer training made a detectable difference at this size."
    else:
        text += (". This run has no compute-matched control (it predates it), so more negatives and longer training "
                 "(K pairs per prompt are K times the optimizer steps) are confounded here.")
    words = run.sentence("Mean words per MIPO reply")
    if words:
        pairs = re.findall(r"(K=\d+(?:, \d+x epochs)?): (\d+(?:\.\d+)?)", words)
        text += " Mean words per MIPO reply: " + ", ".join(f"{v} {float(w):.0f}" for v, w in pairs)
        if run.has("K=2 - K=1 without"):
            text += f"; without the length-sensitive preferences K = 2 - K = 1 is {run.claim('K=2 - K=1 without')}"
        text += "."
    return text


def _negative_kind(run: Run) -> str | None:
    if run.row("negative", "context_drop") is None or not run.has("random_context - context_drop"):
        return None
    text = (f"**Kind of negative.** Over prompting: context drop {run.claim('context_drop - prompting')}; random "
            f"context {run.claim('random_context - prompting')}; random prompt {run.claim('random_prompt - prompting')}. "
            f"Against context drop: random context {run.claim('random_context - context_drop')}, random prompt "
            f"{run.claim('random_prompt - context_drop')}.")
    if run.detectable("random_context - context_drop", "loss"):
        text += (" The random-context negative, which isolates the conditional PMI exactly, taught the preference "
                 "*less* well at this model size. A possible reason, not tested here: another user's context still "
                 "makes the base model answer in some personalized style, so y+ and y- differ less than with context "
                 "drop.")
    elif run.detectable("random_context - context_drop", "gain"):
        text += " The random-context negative, which isolates the conditional PMI exactly, taught the preference best."
    return text


def _beta(run: Run) -> str | None:
    betas = run.rows("beta")
    if betas.empty:
        return None
    others = [v for v in betas.index if not pd.isna(betas.loc[v, "vs_reference"])]
    reference = next(v for v in betas.index if v not in others)
    text = ("**beta.** " + ", ".join(f"{v}: {betas.loc[v, 'rate']:.1%}" for v in betas.index) + f". Against {reference}: "
            + "; ".join(f"{v} {run.claim(f'{v} - {reference}')}" for v in others) + ".")
    if betas["kl_nats"].notna().all():
        text += " KL to the base per reply: " + ", ".join(f"{v} {betas.loc[v, 'kl_nats']:.2f} nats" for v in betas.index)
        if run.has("KL at"):
            text += f"; the smallest minus the largest beta: {run.claim('KL at', digits=2, unit=' nats')}"
        text += "."
    if any(run.detectable(f"{v} - {reference}") for v in others):
        return text
    if run.detectable("KL at"):  # the policies moved detectably different distances, their success rates did not
        text += (" beta set how far the policy moved from the base, as section 3 expects once margins grow (the "
                 "weight sigma(-beta h) keeps a small beta pushing), but not detectably how often it followed the "
                 "preference.")
    else:
        text += (" beta's overall scale barely matters here, as section 3 argues: over these Adam steps the scale is "
                 "normalized away, and the margins rarely grow large enough for the weight sigma(-beta h) to differ.")
    return text


def _twin(run: Run) -> str | None:
    cost = run.sentence("CAD takes")
    if cost is None or not run.has("MIPO - CAD (quality)"):
        return None
    times, cad_s, mipo_s = re.search(r"([\d.]+)x MIPO's time per prompt \(([\d.]+) s vs ([\d.]+) s\)", cost).groups()
    return (f"**MIPO vs its decode-time twin** (context-aware decoding at notebook 04's strength): MIPO - CAD "
            f"{run.claim('MIPO - CAD (quality)')}; CAD - prompting {run.claim('CAD - prompting (quality)')}. CAD took "
            f"{float(times):.2f}x MIPO's time per prompt ({float(cad_s):.2f} vs {float(mipo_s):.2f} s on this machine); "
            "MIPO pays once, in training.")


def _diversity(run: Run) -> str | None:
    distinct, self_bleu = "distinct-2: MIPO - prompting", "Self-BLEU: MIPO - prompting"
    if not (run.has(distinct) and run.has(self_bleu)):
        return None
    return (f"**Diversity.** MIPO - prompting: distinct-2 {run.claim(distinct, digits=3, unit='')}, Self-BLEU "
            f"{run.claim(self_bleu, digits=3, unit='')}"
            + (": MIPO's replies are more alike than prompting's." if run.detectable(self_bleu, "increase") else
               ": no detectable sign of MIPO collapsing onto a template (CIs over a few seeds are wide: only a large "
               "change would show)."))


def _ties(run: Run) -> str | None:
    text = run.sentence("MIPO vs prompting: win-or-tie")
    found = text and re.search(r"win-or-tie ([\d.]+)%.*strict win ([\d.]+)%.*loss ([\d.]+)%: ties are (\d+)% of the "
                               r"'wins', and (\d+)% of the ties", text)
    if not found:
        return None
    win_or_tie, strict, loss, ties, both_failed = found.groups()
    return (f"**Ties inflate win rates.** MIPO vs prompting: win-or-tie {win_or_tie}% but strict win {strict}% (loss "
            f"{loss}%); ties are {ties}% of the \"wins\" and {both_failed}% of those ties are \"both failed\". This "
            "uses the program judge (0/1); the LLM-judge version needs a GPU preset.")


#: The results protocol's budget for replies cut at the token cap (issue: at most 5% per method).
CUT_BUDGET = 0.05


def _cut_replies(run: Run) -> str | None:
    if not run.cuts_recorded():
        return None  # a run from before truncation was recorded
    shares = run.table.drop_duplicates("variant").set_index("variant")["truncated"]
    over = shares[shares > CUT_BUDGET]
    if over.empty:
        return f"**Cut replies.** Every variant kept its replies cut at the token cap at or below {CUT_BUDGET:.0%}."
    return (f"**Cut replies.** Over the protocol's {CUT_BUDGET:.0%} of replies cut at the token cap: "
            + ", ".join(f"{v} {share:.0%}" for v, share in over.items())
            + ". The judges fail a cut reply where more text could break the preference, so the success rates above "
              "already count those as failures.")


def findings(table: pd.DataFrame, conclusions: str) -> list[str]:
    """Section 8's bullets for a run given as its table and the text of its conclusions file (`run_findings`)."""
    return run_findings(Run(table, conclusions))


def run_findings(run: Run) -> list[str]:
    """Section 8's bullets: what ran, then one per ablation the run has (sections it skipped are left out)."""
    parts = (_k_negatives, _negative_kind, _beta, _twin, _diversity, _ties, _cut_replies)
    return [f"Run: {run.header}.", *(text for part in parts if (text := part(run)) is not None)]


def load_run(csv: Path, sentences: Path) -> Run:
    """The run written to `csv` and `sentences` (`committed_paths`); a missing file names the target that writes it."""
    if not csv.exists() or not sentences.exists():
        raise MipoError(f"figures/{csv.name} or {sentences.name} is missing; run notebook 06 (make ablations)")
    return Run(pd.read_csv(csv), sentences.read_text())


def committed_findings(preset: str = "cpu") -> list[str]:
    """`findings` of the committed reference run (`committed_paths`)."""
    return run_findings(load_run(*committed_paths(preset)))
