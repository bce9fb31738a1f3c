"""Notebook 06's section 8 is written from the committed run: every number and verdict comes from its files, and each
interpretation follows the verdict, direction included."""

from __future__ import annotations

import pandas as pd
import pytest

from mipo_lib.analysis import ablation_findings
from mipo_lib.errors import MipoError

HEADER = "preset cpu, SmolLM2-135M-Instruct, seeds [0, 1, 2], 100 held-out prompts; 95% CIs: paired crossed bootstrap"
NONE = "Holm-adjusted p = 0.6 over the 4 comparisons of \"x\": no detectable effect at this size (3 seeds x 100 examples)."


def _said(what: str, value: str, verdict: str = "none") -> str:
    """A conclusion sentence as `stats.conclusion` writes it, with the verdict `none`, `gain` or `loss`."""
    tail = NONE if verdict == "none" else f"Holm-adjusted p = 0.001 over the 4 comparisons of \"x\": a detectable {verdict} (3 seeds x 100 examples)."
    return f"  - {what}: {value} points [95% CI -1.0, +2.0]; {tail}"


def _table(control: bool = True) -> pd.DataFrame:
    rows = [("K", "K=1", .47, None), ("K", "K=2", .38, -.09), ("K", "K=4", .35, -.12),
            ("negative", "context_drop", .47, None), ("negative", "random_context", .30, -.17),
            ("negative", "random_prompt", .28, -.19), ("beta", "beta=0.05", .46, -.01), ("beta", "beta=0.1", .47, None),
            ("beta", "beta=0.3", .45, -.02)]
    if control:
        rows.insert(3, ("K", "K=1, 2x epochs", .40, -.07))
    frame = pd.DataFrame(rows, columns=["ablation", "variant", "rate", "vs_reference"])
    frame["kl_nats"] = [1.5 if a == "beta" else None for a in frame["ablation"]]
    return frame


def _conclusions(matched: str = "none", longer: str = "none", random_context: str = "loss", bleu: str = "none",
                 kl: str = "none") -> str:
    lines = [HEADER, "", "[K negatives]", _said("K=2 - K=1", "-9.0", "loss"), _said("K=4 - K=2", "-3.0"),
             _said("K=1, 2x epochs - K=1", "-7.0", longer), "  - Mean words per MIPO reply: K=1: 17.3, K=2: 24.0, "
             "K=4: 30.1, K=1, 2x epochs: 21.0.", _said("K=2 - K=1, 2x epochs", "-2.0", matched),
             _said("K=2 - K=1 without the length-sensitive preferences", "-8.0", "loss"), "", "[kind of negative]",
             _said("context_drop - prompting", "+24.3", "gain"), _said("random_context - prompting", "+7.0", "gain"),
             _said("random_prompt - prompting", "+5.0"), _said("random_context - context_drop", "-17.0", random_context),
             _said("random_prompt - context_drop", "-19.0", "loss"), "", "[beta]", _said("beta=0.05 - beta=0.1", "-1.0"),
             _said("beta=0.3 - beta=0.1", "-2.0"), "  - KL at beta=0.05 - KL at beta=0.3: +0.20 nats [95% CI -0.05, +0.50]; "
             + ("a detectable increase (3 seeds x 50 examples)." if kl == "increase" else
                "no detectable effect at this size (3 seeds x 50 examples)."), "", "[MIPO vs CAD]",
             _said("MIPO - CAD (quality)", "+0.3"), _said("CAD - prompting (quality)", "+24.0", "gain"),
             "  - CAD takes 1.95x MIPO's time per prompt (0.487 s vs 0.249 s).", "", "[diversity]",
             f"  - distinct-2: MIPO - prompting: -0.037 [95% CI -0.051, -0.025]; {NONE}",
             f"  - Self-BLEU: MIPO - prompting: +0.030 [95% CI +0.010, +0.050]; "
             + ("a detectable increase (3 seeds)." if bleu == "increase" else NONE), "", "[win-or-tie vs strict win]",
             "  - MIPO vs prompting: win-or-tie 95.3% [95% CI 92.7, 97.7], strict win 18.0% [95% CI 13.7, 22.7], loss "
             "4.7%: ties are 81% of the 'wins', and 72% of the ties are 'both failed'."]
    return "\n".join(lines) + "\n"


def _k(bullets: list[str]) -> str:
    return next(b for b in bullets if b.startswith("**Number of negatives"))


READINGS = ("helped beyond", "second negative hurt", "training length, not", "twice as long hurt", "Neither the second")


@pytest.mark.parametrize("matched, longer, reading", [
    ("gain", "none", "the second negative helped beyond training longer"),
    ("loss", "none", "at equal optimizer steps the second negative hurt"),
    ("none", "gain", "what K = 2 adds is training length, not the second negative"),
    ("none", "loss", "Training one negative twice as long hurt"),
    ("none", "none", "Neither the second negative nor the longer training"),
])
def test_the_k_reading_follows_the_compute_matched_verdicts(matched, longer, reading):
    bullets = ablation_findings.findings(_table(), _conclusions(matched, longer))
    k = _k(bullets)
    assert reading in k
    assert sum(r in k for r in READINGS) == 1  # exactly one reading
    assert "K = 1 reached 47.0%, K = 2 38.0%, K = 4 35.0%" in k and "K = 1 trained twice as long, 40.0%" in k
    assert "K = 2 - K = 1: -9.0 points [-1.0, +2.0], a detectable loss" in k
    assert "K=1, 2x epochs 21" in k  # the control's mean words, parsed with its comma


def test_a_run_without_the_control_says_the_two_are_confounded():
    k = _k(ablation_findings.findings(_table(control=False), _conclusions()))
    assert "no compute-matched control" in k and "At equal optimizer steps" not in k


@pytest.mark.parametrize("verdict, expected", [("loss", "taught the preference *less* well"),
                                               ("gain", "taught the preference best"), ("none", None)])
def test_the_negative_reading_follows_its_direction(verdict, expected):
    neg = next(b for b in ablation_findings.findings(_table(), _conclusions(random_context=verdict))
               if b.startswith("**Kind of negative"))
    assert "context drop +24.3 points [-1.0, +2.0], a detectable gain" in neg
    readings = ("less* well", "taught the preference best")
    assert [r for r in readings if r in neg] == ([] if expected is None else [r for r in readings if r in expected])


def test_diversity_and_ties_and_header_come_from_the_files():
    bullets = ablation_findings.findings(_table(), _conclusions(bleu="increase"))
    assert bullets[0] == f"Run: {HEADER}."
    assert any("more alike than prompting's" in b for b in bullets)
    assert any("win-or-tie 95.3% but strict win 18.0% (loss 4.7%); ties are 81%" in b for b in bullets)
    assert any("CAD took 1.95x MIPO's time per prompt (0.49 vs 0.25 s" in b for b in bullets)
    beta = next(b for b in bullets if b.startswith("**beta"))
    assert "beta's overall scale barely matters" in beta and "+0.20 nats [-0.05, +0.50]" in beta
    assert "no detectable sign of MIPO collapsing" in next(b for b in ablation_findings.findings(_table(), _conclusions())
                                                if b.startswith("**Diversity"))


@pytest.mark.parametrize("kl, reading", [("none", "beta's overall scale barely matters"),
                                         ("increase", "beta set how far the policy moved from the base")])
def test_the_beta_reading_follows_the_kl_verdict(kl, reading):
    """Equal success rates with detectably different KLs must not be read as "beta's scale is normalized away"."""
    beta = next(b for b in ablation_findings.findings(_table(), _conclusions(kl=kl)) if b.startswith("**beta"))
    readings = ("beta's overall scale barely matters", "beta set how far the policy moved from the base")
    assert [r for r in readings if r in beta] == [reading]


def test_sections_a_run_skipped_are_left_out_and_a_missing_sentence_names_the_fix():
    only_k = _table()[_table()["ablation"] == "K"]
    text = _conclusions().split("[kind of negative]")[0]
    bullets = ablation_findings.findings(only_k, text)
    assert [b.split("**")[1] for b in bullets[1:]] == ["Number of negatives."]
    with pytest.raises(MipoError, match="rerun notebook 06"):
        ablation_findings.findings(_table(), text.replace("K=2 - K=1: ", "K=2 minus K=1: "))
    with pytest.raises(MipoError, match="empty"):
        ablation_findings.findings(_table(), "")


def test_the_committed_run_reads():
    bullets = ablation_findings.committed_findings("cpu")
    assert bullets[0].startswith("Run: preset cpu") and len(bullets) >= 4


def test_cut_replies_are_named_when_a_variant_exceeds_the_budget():
    assert not any(b.startswith("**Cut replies") for b in ablation_findings.findings(_table(), _conclusions()))
    table = _table().assign(truncated=0.01)
    bullets = ablation_findings.findings(table, _conclusions())
    assert "at or below 5%" in bullets[-1]
    table.loc[table["variant"] == "K=4", "truncated"] = 0.19
    assert "cut at the token cap: K=4 19%." in ablation_findings.findings(table, _conclusions())[-1]
