"""One-off conversion, run once (2026-12-06): the committed conclusions text of notebooks 06 and 07 -> result tables.

Why it exists: until then the Holm-adjusted p-values, families and verdicts of notebook 06's comparisons, and most
numbers of notebook 07's summary (format vs correctness, pair correctness, PMI AUC), existed only inside the sentences
of `figures/ablations_cpu_conclusions.txt` and `figures/reasoning_cpu_conclusions.md`, and the library read those
sentences back with regular expressions to write more prose. Now result tables are the record and every sentence is
rendered from them (`mipo_lib.analysis.render`, `ablation_findings`, `reasoning_findings`); the notebooks write the
tables directly. Rerunning the experiments (about 6 h and 23 min on 2 cores) only to get tables of numbers the
project already has was not worth it, so this script parsed the committed text ONE time and wrote:

- `figures/ablations_cpu_comparisons.csv`: every comparison sentence as a row (`stats.COMPARISON_COLUMNS`); where the
  variant table already had the number with 6 significant digits (vs prompting, vs reference, KL) that number is used;
- `figures/ablations_cpu_findings.csv`: seconds per prompt and win rates (the tie rate is win-or-tie minus strict win);
- `figures/ablations_cpu.csv`: the columns the prose needs added (mean words and optimizer steps where the text stated
  them, the run's seeds, model and task from its header line);
- `figures/reasoning_cpu_findings.csv`: the summary's setup, format, pairs and PMI numbers;
- `figures/reasoning_difficulty_cpu.csv`: its `chosen` column, computed by `reasoning.choose_level` (not parsed).

Numbers the old files stated only in prose are stored at the precision the prose showed ("+4.7 points" -> 0.047,
"58%" -> 0.58). Unadjusted p-values were never written, so `p_value` is empty in converted rows; the word for the
opposite sign of each verdict ("loss" for "gain") is the one notebook 06's code used. Every file it wrote renders back
to the committed text (`tests/test_readme.py`). Nothing imports this script; run from the repository root:
`PYTHONPATH=$PWD python tools/convert_conclusions_to_tables.py` (it refuses to run again on converted tables).
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from mipo_lib.analysis import render, stats
from mipo_lib.experiments.reasoning import choose_level

FIGURES = Path("figures")
SECTION_ABLATION = {"K negatives": "K", "kind of negative": "negative", "beta": "beta"}
SENTENCE = re.compile(r"^(?P<what>.+?): (?P<mean>[+\-]\d+\.\d+)(?: (?P<unit>points|nats|s))? "
                      r"\[95% CI (?P<lo>[+\-]\d+\.\d+), (?P<hi>[+\-]\d+\.\d+)\]; (?P<rest>.*)$")
HOLM = re.compile(r"Holm-adjusted p = (?P<p>[\d.e\-]+) over the (?P<size>\d+) comparisons of \"(?P<family>[^\"]+)\"")
SIZE = re.compile(r"\((?P<seeds>\d+) seeds?(?: x (?P<examples>\d+) examples)?\)\.$")
UNITS = {"points": (100.0, 1), "nats": (1.0, 2), "s": (1.0, 3), "": (1.0, 3)}


def _words(what: str, unit: str) -> tuple[str, str]:
    """The words notebook 06's code gave each kind of comparison for a positive and a negative difference."""
    if what.startswith("KL(policy || base)"):
        return "move away from the base", "negative KL (estimator noise)"
    if unit == "s":
        return "extra cost for CAD", "saving for CAD"
    return ("gain", "loss") if unit == "points" else ("increase", "decrease")


def _sides(what: str) -> tuple[str, str]:
    """(a, b) of a comparison's name."""
    name = what.split(": ", 1)[1] if what.startswith(("distinct-2: ", "Self-BLEU: ")) else what
    for suffix in (" without the length-sensitive preferences", " (quality)", " (seconds per prompt)"):
        name = name.removesuffix(suffix)
    if name.startswith("KL(policy || base) at "):
        return name.removeprefix("KL(policy || base) at "), ""
    a, b = name.split(" - ", 1)
    return a.removeprefix("KL at "), b.removeprefix("KL at ")


def _comparison(section: str, line: str) -> dict | None:
    found = SENTENCE.match(line)
    if found is None:
        return None
    what, unit, rest = found["what"], found["unit"] or "", found["rest"]
    scale, digits = UNITS[unit]
    up, down = _words(what, unit)
    holm, size = HOLM.search(rest), SIZE.search(rest)
    a, b = _sides(what)
    detectable = "a detectable" in rest and "no detectable" not in rest
    if detectable:
        assert f"a detectable {up if float(found['mean']) > 0 else down}" in rest, line
    return {
        "section": section, "family": holm["family"] if holm else "", "comparison": what, "a": a, "b": b,
        "estimate": float(found["mean"]) / scale, "lo": float(found["lo"]) / scale, "hi": float(found["hi"]) / scale,
        "unit": unit, "scale": scale, "digits": digits, "up": up, "down": down,
        "design": render.SEEDS_DESIGN if unit in ("s", "") else "crossed", "p_value": float("nan"),
        "p_holm": float(holm["p"]) if holm else float("nan"), "family_size": int(holm["size"]) if holm else 0,
        "n_seeds": int(size["seeds"]), "n_examples": float(size["examples"]) if size["examples"] else float("nan"),
        "deterministic": "identical in every seed" in rest, "variant_column": "", "detectable": detectable,
    }


def _in_variant_table(row: dict, variants: pd.DataFrame) -> None:
    """Mark a comparison the variant table shows as a cell, and take that cell's 6-digit numbers."""
    ablation = SECTION_ABLATION.get(row["section"])
    rows = variants[(variants["ablation"] == ablation) & (variants["variant"] == row["a"])]
    if rows.empty:
        return
    v = rows.iloc[0]
    reference = variants.loc[(variants["ablation"] == ablation) & variants["vs_reference"].isna(), "variant"].iloc[0]
    if row["unit"] == "nats" and row["b"] == "":
        column, lo, hi = "kl_nats", "kl_lo", "kl_hi"
    elif row["comparison"] == f"{row['a']} - prompting":
        column, lo, hi = "vs_prompting", "vs_prompting_lo", "vs_prompting_hi"
    elif row["comparison"] == f"{row['a']} - {reference}":
        column, lo, hi = "vs_reference", "vs_reference_lo", "vs_reference_hi"
    else:
        return
    row.update(variant_column=column, estimate=v[column], lo=v[lo], hi=v[hi])


def convert_ablations() -> None:
    text = (FIGURES / "ablations_cpu_conclusions.txt").read_text()
    variants = pd.read_csv(FIGURES / "ablations_cpu.csv")
    assert "mean_words" not in variants, "already converted: this script ran once"
    header, *body = text.splitlines()
    model = header.split(", ")[1]
    task = re.search(r"task (\w+)", header)[1]
    seeds = re.search(r"seeds \[([\d, ]+)\]", header)[1].replace(",", "")
    comparisons, findings, section = [], [], ""
    words, steps = {}, {}
    for raw in body:
        line = raw.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        if not line.startswith("- "):
            continue
        line = line[2:]
        row = _comparison(section, line)
        if row is not None:
            _in_variant_table(row, variants)
            comparisons.append(row)
        elif line.startswith("Mean words per MIPO reply: "):
            words = {v: float(w) for v, w in re.findall(r"(K=\d+(?:, \d+x epochs)?): (\d+\.\d)", line)}
        elif line.startswith("Caveat: K pairs"):
            steps = {v: float(s) for v, s in re.findall(r"(K=\d+(?:, \d+x epochs)?): (\d+)", line)}
        elif line.startswith("CAD takes"):
            ratio, cad, mipo = re.search(r"([\d.]+)x MIPO's time per prompt \(([\d.]+) s vs ([\d.]+) s\)", line).groups()
            findings += [{"section": section, "quantity": "seconds per prompt", "subject": "MIPO", "value": float(mipo)},
                         {"section": section, "quantity": "seconds per prompt", "subject": "CAD", "value": float(cad)},
                         {"section": section, "quantity": "time relative to MIPO", "subject": "CAD",
                          "value": float(ratio)}]
        elif "win-or-tie" in line:
            subject = line.split(": ", 1)[0]
            w, wlo, whi, s, slo, shi, loss, _, failed = (float(x) / 100 for x in re.search(
                r"win-or-tie ([\d.]+)% \[95% CI ([\d.]+), ([\d.]+)\], strict win ([\d.]+)% \[95% CI ([\d.]+), "
                r"([\d.]+)\], loss ([\d.]+)%: ties are (\d+)% of the 'wins', and (\d+)%", line).groups())
            findings += [{"section": section, "quantity": q, "subject": subject, "value": v, "lo": lo, "hi": hi}
                         for q, v, lo, hi in (("win-or-tie", w, wlo, whi), ("strict win", s, slo, shi),
                                              ("tie", round(w - s, 6), None, None), ("loss", loss, None, None),
                                              ("both failed (share of ties)", failed, None, None))]
        else:
            assert line.startswith("This uses the program judge"), line
    for row in comparisons:  # a deterministic row names no family; it belongs to its section's (diversity's)
        if row["deterministic"]:
            peer = next(r for r in comparisons if r["section"] == row["section"] and r["family"])
            row.update(family=peer["family"], family_size=peer["family_size"])
    variants["mean_words"] = variants["variant"].map(words).where(variants["ablation"] == "K")
    variants["optimizer_steps"] = variants["variant"].map(steps).where(variants["ablation"] == "K")
    variants = variants.assign(seeds=seeds, model=model, task=task)
    stats.write_table(variants, FIGURES / "ablations_cpu.csv")
    stats.write_table(stats.comparison_table(comparisons), FIGURES / "ablations_cpu_comparisons.csv")
    stats.write_table(stats.findings_table(findings), FIGURES / "ablations_cpu_findings.csv")


def _percent(text: str) -> float:
    return float(text.rstrip("%")) / 100


def convert_reasoning() -> None:
    text = (FIGURES / "reasoning_cpu_conclusions.md").read_text()
    difficulty = pd.read_csv(FIGURES / "reasoning_difficulty_cpu.csv")
    assert "chosen" not in difficulty, "already converted: this script ran once"
    difficulty["chosen"] = difficulty["level"] == choose_level(difficulty)
    bullets = [line[2:] for line in text.splitlines() if line.startswith("- ")]

    def line(start: str) -> str:
        return next(b for b in bullets if b.startswith(start))

    base, rows = "prompting", []

    def add(section: str, quantity: str, value: float, subject: str = "", lo=None, hi=None) -> None:
        rows.append({"section": section, "quantity": quantity, "subject": subject, "value": value, "lo": lo, "hi": hi})

    add("setup", "training problems per seed", float(re.search(r"(\d+) training problems", line("Task:"))[1]))
    low, high, chosen = re.search(r"inside \[(\d+%), (\d+%)\] is `(\w+)`", line("Difficulty:")).groups()
    assert chosen == difficulty.loc[difficulty["chosen"], "level"].iloc[0]
    add("setup", "informative range, low", _percent(low))
    add("setup", "informative range, high", _percent(high))
    add("setup", "new-token cap", float(re.search(r"a cap of (\d+) new tokens", line("Caveat:"))[1]))
    fmt, cor, unf_b, unf_m, w_b, w_m = re.search(
        r"([+\-][\d.]+%) is format and ([+\-][\d.]+%) correctness; .*base (\d+%), MIPO (\d+%) \(mean words ([\d.]+) "
        r"vs ([\d.]+)\)", line("Of the MIPO − base difference")).groups()
    add("formats", "format", _percent(fmt), "MIPO")
    add("formats", "correctness", _percent(cor), "MIPO")
    for subject, unfinished, words in ((base, unf_b, w_b), ("MIPO", unf_m, w_m)):
        add("formats", "unfinished", _percent(unfinished), subject)
        add("formats", "mean words", float(words), subject)
    fin_m, fin_b = re.search(r"MIPO scores (\d+%) vs (\d+%)", line("Caveat:")).groups()
    add("formats", "accuracy among finished replies", _percent(fin_b), base)
    add("formats", "accuracy among finished replies", _percent(fin_m), "MIPO")
    pos, neg, agree, disagree, none = re.findall(r"(\d+%)", line("The pairs:"))
    for quantity, value in (("positive correct", pos), ("negative correct", neg), ("correct over wrong", agree),
                            ("wrong over correct", disagree), ("no correctness signal", none)):
        add("pairs", quantity, _percent(value))
    auc, lo, hi, correct, wrong, auc2, lo2, hi2 = re.search(
        r"AUC ([\d.]+) \[95% CI ([\d.]+), ([\d.]+)\] \(mean ([\d.]+) nats for correct vs ([\d.]+) for wrong answers\); "
        r"likelihood log p\(y\|x\): AUC ([\d.]+) \[([\d.]+), ([\d.]+)\]", line("PMI and correctness:")).groups()
    add("pmi", "AUC", float(auc), "pmi", float(lo), float(hi))
    add("pmi", "AUC", float(auc2), "logp_x", float(lo2), float(hi2))
    add("pmi", "mean, correct answers", float(correct), "pmi")
    add("pmi", "mean, wrong answers", float(wrong), "pmi")
    stats.write_table(difficulty, FIGURES / "reasoning_difficulty_cpu.csv")
    stats.write_table(stats.findings_table(rows), FIGURES / "reasoning_cpu_findings.csv")


if __name__ == "__main__":
    convert_ablations()
    convert_reasoning()
