"""Notebook 06's reports are rendered from its tables: every number and verdict is a table cell, and each interpretation
follows the verdict and sign columns of the comparisons table (no sentence is searched or parsed)."""

from __future__ import annotations

import pandas as pd
import pytest

from mipo_lib.analysis import ablation_findings, render, stats
from mipo_lib.errors import MipoError

VERDICT = {"gain": (0.09, 0.03, 0.15, 0.001), "loss": (-0.09, -0.15, -0.03, 0.001), "none": (0.01, -0.05, 0.07, 0.6)}


def _row(section: str, family: str, name: str, verdict: str = "none", column: str = "", **kw) -> dict:
    """A comparison row as the notebook writes it (`stats.comparison_row`), with the verdict `gain`, `loss` or `none`."""
    mean, lo, hi, p = VERDICT[verdict]
    a, _, b = name.split(": ")[-1].partition(" - ")  # "distinct-2: MIPO K=2 - prompting" compares MIPO K=2
    diff = {"mean": mean, "lo": lo, "hi": hi, "p_value": p, "p_holm": p, "family": family, "family_size": 4,
            "n_seeds": 3, "n_examples": 100, "a": a, "b": b}
    return stats.comparison_row(diff, name, section=section, variant_column=column, **kw)


def _variants(control: bool = True) -> pd.DataFrame:
    rows = [("K", "K=1", .47, None, 17.3, 120), ("K", "K=2", .38, -.09, 24.0, 240), ("K", "K=4", .35, -.12, 30.1, 480),
            ("negative", "context_drop", .47, None, None, None), ("negative", "random_context", .30, -.17, None, None),
            ("negative", "random_prompt", .28, -.19, None, None), ("beta", "beta=0.05", .46, -.01, None, None),
            ("beta", "beta=0.1", .47, None, None, None), ("beta", "beta=0.3", .45, -.02, None, None)]
    if control:
        rows.insert(3, ("K", "K=1, 2x epochs", .40, -.07, 21.0, 240))
    frame = pd.DataFrame(rows, columns=["ablation", "variant", "rate", "vs_reference", "mean_words", "optimizer_steps"])
    return frame.assign(kl_nats=[1.5 if a == "beta" else None for a in frame["ablation"]], truncated=0.01,
                        seeds="0 1 2", model="SmolLM2-135M-Instruct", task="personalization", n_examples=100)


def _comparisons(matched="none", longer="none", random_context="loss", bleu="none", kl="none", control=True) -> list:
    k, neg, beta = "K negatives", "kind of negative", "beta"
    rows = [_row(k, "ablation: K", "K=2 - K=1", "loss", "vs_reference"),
            *([_row(k, "ablation: K", "K=1, 2x epochs - K=1", longer, "vs_reference")] if control else []),
            _row(k, "K: follow-up checks", "K=4 - K=2"),
            *([_row(k, "K: follow-up checks", "K=2 - K=1, 2x epochs", matched)] if control else []),
            _row(k, "K: follow-up checks", "K=2 - K=1 without the length-sensitive preferences", "loss"),
            _row(neg, "ablation: negative", "context_drop - prompting", "gain", "vs_prompting"),
            _row(neg, "ablation: negative", "random_context - prompting", "gain", "vs_prompting"),
            _row(neg, "ablation: negative", "random_prompt - prompting", "none", "vs_prompting"),
            _row(neg, "ablation: negative", "random_context - context_drop", random_context, "vs_reference"),
            _row(neg, "ablation: negative", "random_prompt - context_drop", "loss", "vs_reference"),
            _row(beta, "ablation: beta", "beta=0.05 - beta=0.1", column="vs_reference"),
            _row(beta, "ablation: beta", "beta=0.3 - beta=0.1", column="vs_reference"),
            _row(beta, "beta: KL to the base", "KL at beta=0.05 - KL at beta=0.3", "gain" if kl == "increase" else "none",
                 unit="nats", scale=1, digits=2, words=("increase", "decrease")),
            _row("MIPO vs CAD", "MIPO vs CAD", "MIPO - CAD (quality)"),
            _row("MIPO vs CAD", "MIPO vs CAD", "CAD - prompting (quality)", "gain"),
            _row("diversity", "diversity vs prompting", "distinct-2: MIPO - prompting", unit="", scale=1, digits=3,
                 words=("increase", "decrease")),
            _row("diversity", "diversity vs prompting", "Self-BLEU: MIPO - prompting", "gain" if bleu == "increase"
                 else "none", unit="", scale=1, digits=3, words=("increase", "decrease")),
            _row("diversity", "diversity vs prompting", "distinct-2: MIPO K=2 - prompting", unit="", scale=1, digits=3,
                 words=("increase", "decrease"))]
    return rows


FINDINGS = [
    {"section": "MIPO vs CAD", "quantity": "seconds per prompt", "subject": "MIPO", "value": 0.249},
    {"section": "MIPO vs CAD", "quantity": "seconds per prompt", "subject": "CAD", "value": 0.487},
    {"section": "MIPO vs CAD", "quantity": "time relative to MIPO", "subject": "CAD", "value": 1.95},
    *({"section": "win-or-tie vs strict win", "quantity": q, "subject": "MIPO vs prompting", "value": v, "lo": lo,
       "hi": hi} for q, v, lo, hi in (("win-or-tie", .953, .927, .977), ("strict win", .18, .137, .227),
                                      ("tie", .773, None, None), ("loss", .047, None, None),
                                      ("both failed (share of ties)", .72, None, None))),
]


def _run(variants=None, comparisons=None, findings=FINDINGS, **verdicts) -> ablation_findings.AblationRun:
    return ablation_findings.AblationRun("cpu", _variants() if variants is None else variants,
                                         stats.comparison_table(comparisons or _comparisons(**verdicts)),
                                         stats.findings_table(findings))


def _bullet(bullets: list[str], start: str) -> str:
    return next(b for b in bullets if b.startswith(start))


READINGS = ("helped beyond", "second negative hurt", "training length, not", "twice as long hurt", "Neither the second")


@pytest.mark.parametrize("matched, longer, reading", [
    ("gain", "none", "the second negative helped beyond training longer"),
    ("loss", "none", "at equal optimizer steps the second negative hurt"),
    ("none", "gain", "what K = 2 adds is training length, not the second negative"),
    ("none", "loss", "Training one negative twice as long hurt"),
    ("none", "none", "Neither the second negative nor the longer training"),
])
def test_the_k_reading_follows_the_compute_matched_verdicts(matched, longer, reading):
    k = _bullet(ablation_findings.findings(_run(matched=matched, longer=longer)), "**Number of negatives")
    assert reading in k
    assert sum(r in k for r in READINGS) == 1  # exactly one reading
    assert "K = 1 reached 47.0%, K = 2 38.0%, K = 4 35.0%" in k and "K = 1 trained twice as long, 40.0%" in k
    assert "K = 2 - K = 1: -9.0 points [-15.0, -3.0], a detectable loss" in k
    assert "K=1, 2x epochs 21" in k  # the control's mean words, from the variant table


def test_a_verdict_is_read_from_its_column_not_from_its_numbers():
    """Same numbers, the `detectable` cell flipped: the reading flips with it (nothing re-derives the verdict)."""
    rows = _comparisons(matched="loss")
    assert "second negative hurt" in _bullet(ablation_findings.findings(_run(comparisons=rows)), "**Number")
    next(r for r in rows if r["comparison"] == "K=2 - K=1, 2x epochs")["detectable"] = False
    assert "Neither the second" in _bullet(ablation_findings.findings(_run(comparisons=rows)), "**Number")


def test_a_run_without_the_control_says_the_two_are_confounded():
    k = _bullet(ablation_findings.findings(_run(_variants(control=False), _comparisons(control=False))), "**Number")
    assert "no compute-matched control" in k and "At equal optimizer steps" not in k


def test_a_k2_at_k1s_steps_is_read_as_compute_matched_without_a_control():
    """K=2 at half K=1's epochs trains as many steps: K=1 is its control, so neither text calls them confounded."""
    equal = _variants(control=False)
    equal.loc[equal["variant"] == "K=2", "optimizer_steps"] = 120
    run = _run(equal, _comparisons(control=False))
    k = _bullet(ablation_findings.findings(run), "**Number")
    assert "K = 2 took as many optimizer steps as K = 1" in k and "no compute-matched control" not in k
    assert "At their own epochs K=2 took as many steps as K=1" in ablation_findings.conclusions_text(run)
    assert "At their own epochs" not in ablation_findings.conclusions_text(_run())  # 120 vs 240 steps: not equal


@pytest.mark.parametrize("verdict, expected", [("loss", "taught the preference *less* well"),
                                               ("gain", "taught the preference best"), ("none", None)])
def test_the_negative_reading_follows_its_direction(verdict, expected):
    neg = _bullet(ablation_findings.findings(_run(random_context=verdict)), "**Kind of negative")
    assert "context drop +9.0 points [+3.0, +15.0], a detectable gain" in neg
    readings = ("less* well", "taught the preference best")
    assert [r for r in readings if r in neg] == ([] if expected is None else [r for r in readings if r in expected])


def test_diversity_ties_twin_and_header_come_from_the_tables():
    bullets = ablation_findings.findings(_run(bleu="increase"))
    assert bullets[0] == ("Run: preset cpu, SmolLM2-135M-Instruct, task personalization, seeds [0, 1, 2], 100 held-out "
                          "prompts; 95% CIs: paired crossed bootstrap over prompts and seeds (diversity and seconds: "
                          "Student-t over seeds); detectable = Holm-adjusted p < 0.05 within each family.")
    assert "more alike than prompting's" in _bullet(bullets, "**Diversity")
    assert "win-or-tie 95.3% but strict win 18.0% (loss 4.7%); ties are 81%" in _bullet(bullets, "**Ties")
    assert "CAD took 1.95x MIPO's time per prompt (0.49 vs 0.25 s" in _bullet(bullets, "**MIPO vs its")
    beta = _bullet(bullets, "**beta")
    assert "beta's overall scale barely matters" in beta
    assert "+0.010 nats [-0.050, +0.070]" in beta  # tiny values get more decimals
    assert "no detectable sign of MIPO collapsing" in _bullet(ablation_findings.findings(_run()), "**Diversity")


@pytest.mark.parametrize("kl, reading", [("none", "beta's overall scale barely matters"),
                                         ("increase", "beta set how far the policy moved from the base")])
def test_the_beta_reading_follows_the_kl_verdict(kl, reading):
    """Equal success rates with detectably different KLs must not be read as "beta's scale is normalized away"."""
    beta = _bullet(ablation_findings.findings(_run(kl=kl)), "**beta")
    readings = ("beta's overall scale barely matters", "beta set how far the policy moved from the base")
    assert [r for r in readings if r in beta] == [reading]


def test_sections_a_run_skipped_are_left_out_and_a_missing_comparison_names_the_fix():
    only_k = [r for r in _comparisons() if r["section"] == "K negatives"]
    variants = _variants()[_variants()["ablation"] == "K"]
    bullets = ablation_findings.findings(_run(variants, only_k, findings=[]))
    assert [b.split("**")[1] for b in bullets[1:]] == ["Number of negatives.", "Cut replies."]
    assert list(ablation_findings.sections(_run(variants, only_k, findings=[]))) == ["K negatives"]
    renamed = [{**r, "comparison": "K=2 minus K=1"} if r["comparison"] == "K=2 - K=1" else r for r in only_k]
    with pytest.raises(MipoError, match="rerun notebook 06"):
        ablation_findings.findings(_run(variants, renamed, findings=[]))
    with pytest.raises(MipoError, match="no variants"):
        _run(variants.iloc[:0])
    with pytest.raises(MipoError, match="unknown report section"):
        _run(comparisons=[{**only_k[0], "section": "K"}])


def test_cut_replies_are_named_when_a_variant_exceeds_the_budget():
    assert "at or below 5%" in ablation_findings.findings(_run())[-1]
    variants = _variants()
    variants.loc[variants["variant"] == "K=4", "truncated"] = 0.19
    assert "cut at the token cap: K=4 19%." in ablation_findings.findings(_run(variants))[-1]


def test_conclusions_file_renders_every_row_in_its_section_and_the_readme_lines_skip_the_table_cells():
    run = _run()
    text = ablation_findings.conclusions_text(run)
    lines = text.splitlines()
    assert lines[0] == ablation_findings.header(run) and lines[2] == "[K negatives]"
    start = lines.index("[K negatives]") + 1
    k = lines[start: lines.index("", start)]
    words = next(i for i, line in enumerate(k) if "Mean words per MIPO reply: K=1: 17.3" in line)
    assert k[words - 1].startswith("  - K=1, 2x epochs - K=1: ") and k[words + 1].startswith("  - K=4 - K=2: ")
    assert "(K=1: 120, K=2: 240, K=4: 480, K=1, 2x epochs: 240)" in text
    for row in run.comparisons.itertuples():
        assert f"  - {render.difference(row._asdict())}" in lines
    assert "CAD takes 1.95x MIPO's time per prompt (0.487 s vs 0.249 s)." in text
    shown = {name: [t for t, summary in rows if summary] for name, rows in ablation_findings.sections(run).items()}
    assert not any(t.startswith(("K=2 - K=1:", "context_drop - prompting")) for t in shown["K negatives"] +
                   shown["kind of negative"])  # cells of the variant table
    assert [t.split(":")[0] for t in shown["diversity"]] == ["distinct-2", "Self-BLEU"]  # methods only, not MIPO K=2


def test_the_committed_run_reads_and_renders_its_conclusions_file():
    run = ablation_findings.load_run("cpu")
    assert ablation_findings.committed_findings("cpu")[0].startswith("Run: preset cpu")
    assert ablation_findings.conclusions_text(run).startswith("preset cpu, SmolLM2-135M-Instruct")


def test_write_run_writes_three_tables_and_the_rendered_conclusions(tmp_path):
    run = _run()
    written = ablation_findings.write_run(run, tmp_path)
    assert [p.name for p in written] == ["ablations_cpu.csv", "ablations_cpu_comparisons.csv",
                                         "ablations_cpu_findings.csv", "ablations_cpu_conclusions.txt"]
    back = ablation_findings.load_run("cpu", tmp_path)  # the CSV round trip renders the same text
    assert ablation_findings.conclusions_text(back) == written[-1].read_text() == ablation_findings.conclusions_text(run)
    assert ablation_findings.findings(back) == ablation_findings.findings(run)
    written[1].unlink()
    with pytest.raises(MipoError, match="make ablations"):
        ablation_findings.load_run("cpu", tmp_path)
