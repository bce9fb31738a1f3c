"""Unit tests of mipo_lib.analysis.stats on seeded synthetic data (fast, no model)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from mipo_lib.analysis import stats
from mipo_lib.errors import MipoError

GROUPS = ["short", "banana", "digit", "bullets"]


def make_records(
    rates: dict[str, float],
    n_examples: int = 200,
    seeds: tuple[int, ...] = (0, 1, 2),
    deterministic: tuple[str, ...] = (),
    seed: int = 0,
) -> pd.DataFrame:
    """Synthetic per-example records; methods in `deterministic` get one seed (seed 0) only."""
    rng = np.random.default_rng(seed)
    rows = []
    for method, rate in rates.items():
        for s in (seeds[:1] if method in deterministic else seeds):
            for e in range(n_examples):
                score = float(rng.random() < rate)
                n_words = int(rng.integers(5, 40))
                rows.append({"task": "personalization", "method": method, "seed": s, "example_id": f"ex{e:04d}",
                             "group": GROUPS[e % len(GROUPS)], "score": score,
                             "response": " ".join(f"w{rng.integers(0, 50)}" for _ in range(n_words)),
                             "n_words": n_words})
    return pd.DataFrame(rows)


def planted(n_examples: int, delta: float = 0.1, seeds=(0, 1, 2), seed: int = 0) -> pd.DataFrame:
    """Paired data with a known difference: B ~ Bernoulli(0.3); A = B plus a flip 0->1 with prob delta/(1-0.3)."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in seeds:
        b = (rng.random(n_examples) < 0.3).astype(float)
        flip = rng.random(n_examples) < delta / 0.7
        a = np.where(b == 1, 1.0, flip.astype(float))
        for name, sc in (("MIPO", a), ("prompting", b)):
            rows += [{"task": "t", "method": name, "seed": s, "example_id": e, "group": "g", "score": v,
                      "n_words": 10} for e, v in enumerate(sc)]
    return pd.DataFrame(rows)


def test_bootstrap_ci_contains_mean_and_shrinks():
    rng = np.random.default_rng(1)
    small = rng.normal(0.5, 1.0, 30)
    large = rng.normal(0.5, 1.0, 3000)
    m1, lo1, hi1 = stats.bootstrap_ci(small, n_boot=2000, seed=0)
    m2, lo2, hi2 = stats.bootstrap_ci(large, n_boot=2000, seed=0)
    assert lo1 < m1 < hi1 and lo2 < m2 < hi2
    assert m1 == pytest.approx(small.mean())
    assert (hi2 - lo2) < 0.3 * (hi1 - lo1)  # width ~ 1/sqrt(n): 10x less
    assert lo2 < 0.5 < hi2


def test_bootstrap_ci_is_deterministic_and_handles_one_value():
    x = np.arange(20.0)
    assert stats.bootstrap_ci(x, n_boot=500, seed=3) == stats.bootstrap_ci(x, n_boot=500, seed=3)
    assert stats.bootstrap_ci([2.0], n_boot=100) == (2.0, 2.0, 2.0)
    with pytest.raises(MipoError):
        stats.bootstrap_ci([float("nan")])


def test_per_seed_metrics():
    rec = make_records({"prompting": 0.25, "MIPO": 0.45}, n_examples=100, deterministic=("prompting",))
    out = stats.per_seed_metrics(rec)
    assert list(out.columns) == ["task", "method", "seed", "n", "rate", "mean_words", "truncated"]
    assert list(out["method"]) == ["prompting", "MIPO", "MIPO", "MIPO"]  # display order, deterministic = 1 seed
    assert (out["n"] == 100).all()
    first = rec[(rec.method == "MIPO") & (rec.seed == 1)]
    assert out.set_index(["method", "seed"]).loc[("MIPO", 1), "rate"] == pytest.approx(first["score"].mean())


def test_hierarchical_bootstrap_ci_contains_mean_and_shrinks():
    small = make_records({"MIPO": 0.3}, n_examples=50)
    large = make_records({"MIPO": 0.3}, n_examples=2000, seeds=(0, 1, 2, 3, 4, 5))
    h1 = stats.hierarchical_bootstrap(small, "MIPO", n_boot=2000)
    h2 = stats.hierarchical_bootstrap(large, "MIPO", n_boot=2000)
    for h in (h1, h2):
        assert h["lo"] <= h["mean"] <= h["hi"]
    assert h1["n_seeds"] == 3 and h1["n_examples"] == 50 and len(h1["per_seed"]) == 3
    assert h2["hi"] - h2["lo"] < 0.5 * (h1["hi"] - h1["lo"])
    assert h2["lo"] < 0.3 < h2["hi"]
    assert stats.hierarchical_bootstrap(small, "MIPO", n_boot=500, seed=7) == \
        stats.hierarchical_bootstrap(small, "MIPO", n_boot=500, seed=7)


def test_hierarchical_bootstrap_sees_seed_variance():
    """Seeds that disagree widen the CI beyond what the examples alone would give."""
    rows = []
    for s, rate in zip((0, 1, 2), (0.1, 0.3, 0.5)):
        rows += [{"task": "t", "method": "MIPO", "seed": s, "example_id": e, "score": float(e < 1000 * rate)}
                 for e in range(1000)]
    h = stats.hierarchical_bootstrap(pd.DataFrame(rows), "MIPO", n_boot=2000)
    assert h["hi"] - h["lo"] > 0.2  # examples alone (3000 Bernoulli draws) would give ~0.03


def test_paired_difference_identical_methods_is_exactly_zero():
    rec = make_records({"prompting": 0.3}, n_examples=100)
    twin = rec.assign(method="MIPO")
    d = stats.paired_difference(pd.concat([rec, twin]), "MIPO", "prompting", n_boot=1000)
    assert d["mean"] == 0.0 and d["lo"] == 0.0 and d["hi"] == 0.0
    assert d["relative_gain"] == 0.0 and d["relative_lo"] == 0.0 and d["relative_hi"] == 0.0
    assert all(p["diff"] == 0.0 for p in d["per_seed"])


def test_paired_difference_recovers_planted_difference():
    d = stats.paired_difference(planted(3000), n_boot=2000, seed=0, design="crossed")
    assert d["lo"] <= 0.1 <= d["hi"]
    assert d["lo"] > 0.0
    assert d["mean"] == pytest.approx(0.1, abs=0.02)
    assert d["relative_gain"] == pytest.approx(0.1 / 0.3, abs=0.08)
    assert d["relative_lo"] < d["relative_gain"] < d["relative_hi"]
    assert d["n_seeds"] == 3 and d["n_examples"] == 3000
    assert d["p_value"] == pytest.approx(2 / 2001) and d["ci_design"] == "crossed"  # no replicate <= 0: +1 floor


def test_pairing_gives_tighter_ci_than_independent_cis():
    rec = planted(300)
    d = stats.paired_difference(rec, n_boot=2000, design="crossed")  # the same design as the rates below
    ha = stats.hierarchical_bootstrap(rec, "MIPO", n_boot=2000)
    hb = stats.hierarchical_bootstrap(rec, "prompting", n_boot=2000)
    assert d["hi"] - d["lo"] < 0.8 * math.hypot(ha["hi"] - ha["lo"], hb["hi"] - hb["lo"])


def test_paired_difference_small_n_can_include_zero():
    d = stats.paired_difference(planted(20, delta=0.05, seeds=(0,)), n_boot=2000)
    assert d["lo"] <= 0.0 <= d["hi"]


def test_deterministic_single_seed_is_paired_with_every_seed():
    rec = make_records({"prompting": 0.25, "MIPO": 0.45}, n_examples=80, deterministic=("prompting",))
    d = stats.paired_difference(rec, n_boot=500)
    assert d["n_seeds"] == 3
    base = rec[rec.method == "prompting"]["score"].mean()
    assert [p["rate_b"] for p in d["per_seed"]] == pytest.approx([base] * 3)
    # the same deterministic method stored for every seed gives the same answer
    full = pd.concat([rec[rec.method == "MIPO"]] + [rec[rec.method == "prompting"].assign(seed=s) for s in (0, 1, 2)])
    d2 = stats.paired_difference(full, n_boot=500)
    assert d2["mean"] == pytest.approx(d["mean"]) and d2["lo"] == pytest.approx(d["lo"])


def test_paired_difference_uses_common_examples_and_rejects_disjoint():
    rec = make_records({"prompting": 0.3, "MIPO": 0.4}, n_examples=50)
    dropped = rec[~((rec.method == "MIPO") & (rec.example_id == "ex0000"))]
    assert stats.paired_difference(dropped, n_boot=200)["n_examples"] == 49
    other = rec.copy()
    other.loc[other.method == "MIPO", "example_id"] += "_x"
    with pytest.raises(MipoError, match="share no example"):
        stats.paired_difference(other, n_boot=200)
    with pytest.raises(MipoError, match="duplicate"):
        stats.paired_difference(pd.concat([rec, rec]), n_boot=200)


def test_summary_table_shape():
    rec = make_records({"base (no context)": 0.03, "prompting": 0.25, "SFT": 0.25, "MIPO": 0.45, "CAD": 0.3},
                       n_examples=60, deterministic=("base (no context)", "prompting", "CAD"))
    tab = stats.summary_table(rec, n_boot=300)
    assert list(tab["method"]) == ["base (no context)", "prompting", "SFT", "MIPO", "CAD"]
    for col in ["rate", "lo", "hi", "per_seed", "n_seeds", "n_examples", "mean_words", "diff", "diff_lo", "diff_hi",
                "rel_gain", "rel_lo", "rel_hi"]:
        assert col in tab.columns
    t = tab.set_index("method")
    assert t.loc["MIPO", "n_seeds"] == 3 and t.loc["prompting", "n_seeds"] == 1
    assert (t["n_examples"] == 60).all()
    assert np.isnan(t.loc["prompting", "diff"]) and not np.isnan(t.loc["MIPO", "diff"])
    assert (tab["lo"] <= tab["rate"]).all() and (tab["rate"] <= tab["hi"]).all()
    assert t.loc["MIPO", "diff"] == pytest.approx(t.loc["MIPO", "rate"] - t.loc["prompting", "rate"])


def test_write_results_per_seed_and_paired_rows(tmp_path):
    rec = make_records({"prompting": 0.25, "SFT": 0.25, "MIPO": 0.45}, n_examples=60, deterministic=("prompting",))
    path = tmp_path / "sub" / "results_x.csv"
    tab = stats.write_results(rec, path, n_boot=300)
    back = pd.read_csv(path)
    assert list(back.columns) == list(stats.RESULTS_COLUMNS) and len(back) == len(tab)
    per = back[back["kind"] == "per_seed"]
    assert len(per) == len(stats.per_seed_metrics(rec)) == 1 + 3 + 3
    rows = back[back["kind"] == "paired_difference"]
    assert rows["ci_design"].tolist() == ["seed-aware", "seed-aware", "seed-aware cluster(group)", "seed-aware cluster(group)"]
    assert (rows["family"] == stats.MAIN_FAMILY).all() and (rows["p_holm"] >= rows["p_value"]).all()
    assert (rows["detectable"] == (rows["p_holm"] < 0.05)).all()
    paired = rows[rows["ci_design"] == "seed-aware"].set_index("baseline")
    assert list(paired.index) == ["prompting", "SFT"]  # MIPO - CAD is skipped: no CAD records
    d = stats.paired_difference(rec, "MIPO", "prompting", n_boot=300)
    assert paired.loc["prompting", "diff"] == pytest.approx(d["mean"], rel=1e-5)
    assert paired.loc["prompting", "diff_lo"] == pytest.approx(d["lo"], rel=1e-5)
    assert paired.loc["prompting", "n"] == 60 and paired.loc["prompting", "n_seeds"] == 3


def test_crossed_bootstrap_draws_prompts_once_for_every_seed():
    """Three identical seeds carry the information of one: the crossed CI keeps its width (the same prompt draw
    for every seed), the nested one shrinks it by about sqrt(3), as if each seed had brought new prompts."""
    one = planted(150, seeds=(0,))
    three = pd.concat([one.assign(seed=s) for s in (0, 1, 2)], ignore_index=True)
    width = {design: (lambda d: d["hi"] - d["lo"])(stats.paired_difference(three, n_boot=3000, design=design))
             for design in ("crossed", "nested")}
    single = stats.paired_difference(one, n_boot=3000)
    assert width["crossed"] == pytest.approx(single["hi"] - single["lo"], rel=0.1)
    assert width["nested"] < 0.7 * width["crossed"]
    with pytest.raises(MipoError, match="unknown CI design"):
        stats.paired_difference(three, n_boot=10, design="pigeonhole")


def test_cluster_bootstrap_resamples_whole_groups():
    rec = make_records({"prompting": 0.25, "MIPO": 0.45}, n_examples=80, deterministic=("prompting",))
    # one cluster per example is the crossed bootstrap itself (same draws, same numbers)
    singletons = rec.assign(group=rec["example_id"])
    crossed = stats.paired_difference(rec, n_boot=500, seed=3, design="crossed")
    per_example = stats.paired_difference(singletons, n_boot=500, seed=3, design="cluster")
    assert per_example["ci_design"] == "cluster(group)"
    assert (per_example["lo"], per_example["hi"]) == pytest.approx((crossed["lo"], crossed["hi"]))
    # a group effect shared by all its examples widens the cluster CI beyond the crossed one
    effect = rec["group"].map(dict(zip(GROUPS, (0.0, 1.0, 0.0, 1.0))))
    clustered = rec.assign(score=np.where(rec["method"] == "MIPO", effect, rec["score"]))
    w = {design: (lambda d: d["hi"] - d["lo"])(stats.paired_difference(clustered, n_boot=2000, design=design))
         for design in ("crossed", "cluster")}
    assert w["cluster"] > 1.5 * w["crossed"]
    with pytest.raises(MipoError, match="more than one 'group'"):
        stats.paired_difference(rec.assign(group=rec["seed"]), n_boot=10, design="cluster")


def seed_by_prompt(diffs: np.ndarray, groups: np.ndarray | None = None) -> pd.DataFrame:
    """Records whose paired difference MIPO - prompting is `diffs` (seeds x prompts), prompting scoring 0 throughout
    (the seed-aware formulas only see the differences); `groups` labels the prompts (a `group` column)."""
    seed, ex = np.indices(diffs.shape).reshape(2, -1)
    frame = pd.DataFrame({"task": "t", "seed": seed, "example_id": ex})
    if groups is not None:
        frame["group"] = np.asarray(groups)[ex]
    return pd.concat([frame.assign(method="MIPO", score=diffs.ravel()), frame.assign(method="prompting", score=0.0)],
                     ignore_index=True)


def test_seed_aware_is_the_t_interval_over_seeds_when_the_prompts_agree():
    """Per-seed differences of 16, 31 and 5 points, the same on every prompt: no prompt variance is left, and the
    interval is the Student-t interval over the 3 seeds, [-15.1, +49.8] (t = 4.30 on 2 degrees of freedom), where
    the crossed bootstrap, resampling 3 numbers, is far narrower."""
    rec = seed_by_prompt(np.repeat([[0.16], [0.31], [0.05]], 100, axis=1))
    d = stats.paired_difference(rec, design="seed-aware")
    mean, lo, hi, p = stats.seed_interval([0.16, 0.31, 0.05])
    assert (d["mean"], d["lo"], d["hi"], d["p_value"]) == pytest.approx((mean, lo, hi, p))
    assert (round(100 * d["lo"], 1), round(100 * d["hi"], 1)) == (-15.1, 49.8)
    assert d["df"] == pytest.approx(2.0) and d["se_prompts"] == pytest.approx(0.0, abs=1e-12) and d["seed_component"]
    assert d["ci_design"] == "seed-aware" and d["p_value"] > 0.05
    crossed = stats.paired_difference(rec, n_boot=2000, design="crossed")
    assert crossed["lo"] > 0 and crossed["hi"] - crossed["lo"] < 0.5 * (d["hi"] - d["lo"])


def test_seed_aware_is_the_t_interval_over_prompts_or_types_when_the_seeds_agree():
    """Identical seeds: no seed variance, and the interval is the one-sample t interval of the prompts' differences
    (n - 1 degrees of freedom); the cluster variant is the t interval over the type means (K - 1), the type-level
    sensitivity the workbook reports beside the prompt-level interval."""
    rng = np.random.default_rng(4)
    types = np.repeat(np.arange(10), 8)
    per_prompt = rng.normal(0.1, 0.3, 80) + np.repeat(rng.normal(0.0, 0.2, 10), 8)
    rec = seed_by_prompt(np.tile(per_prompt, (3, 1)), types)
    plain = stats.paired_difference(rec.drop(columns="group"), design="seed-aware")
    t = scipy.stats.ttest_1samp(per_prompt, 0.0)
    assert (plain["lo"], plain["hi"]) == pytest.approx(tuple(t.confidence_interval(0.95)))
    assert plain["p_value"] == pytest.approx(t.pvalue) and plain["df"] == pytest.approx(79)
    type_level = stats.paired_difference(rec, design="seed-aware-cluster")
    t_types = scipy.stats.ttest_1samp(per_prompt.reshape(10, 8).mean(axis=1), 0.0)
    assert (type_level["lo"], type_level["hi"]) == pytest.approx(tuple(t_types.confidence_interval(0.95)))
    assert type_level["df"] == pytest.approx(9) and type_level["ci_design"] == "seed-aware cluster(group)"


def test_seed_aware_prompt_level_holds_the_types_fixed():
    """With a `group` column the prompt-level interval counts only the spread within the types (they are the
    estimand's fixed strata), so the types' own spread widens the type-level interval but not the prompt-level one."""
    rng = np.random.default_rng(5)
    types = np.repeat(np.arange(10), 10)
    within = np.tile(rng.normal(0.0, 0.2, 100), (3, 1))  # identical seeds: the prompt part alone
    narrow = seed_by_prompt(within + 0.1, types)
    spread = seed_by_prompt(within + 0.1 + np.repeat(np.linspace(-0.4, 0.4, 10), 10), types)
    width = {(name, design): (lambda d: d["hi"] - d["lo"])(stats.paired_difference(rec, design=design))
             for name, rec in (("narrow", narrow), ("spread", spread))
             for design in ("seed-aware", "seed-aware-cluster")}
    assert width["spread", "seed-aware"] == pytest.approx(width["narrow", "seed-aware"], rel=0.02)
    assert width["spread", "seed-aware-cluster"] > 3 * width["narrow", "seed-aware-cluster"]
    unstratified = stats.paired_difference(spread.drop(columns="group"), design="seed-aware")
    assert unstratified["hi"] - unstratified["lo"] > 1.5 * width["spread", "seed-aware"]


def test_seed_aware_one_seed_is_prompt_only_and_flagged():
    one = planted(150, seeds=(0,))
    d = stats.paired_difference(one, design="seed-aware")
    assert d["n_seeds"] == 1 and not d["seed_component"] and math.isnan(d["se_seeds"])
    assert d["se"] == pytest.approx(d["se_prompts"]) and d["lo"] < d["mean"] < d["hi"]
    three = pd.concat([one.assign(seed=s) for s in (0, 1, 2)], ignore_index=True)
    d3 = stats.paired_difference(three, design="seed-aware")  # three identical seeds: a zero seed part, estimated
    assert d3["seed_component"] and d3["se_seeds"] == 0.0
    assert (d3["lo"], d3["hi"]) == pytest.approx((d["lo"], d["hi"]))


def test_seed_aware_deterministic_baseline_is_paired_with_every_seed():
    rec = make_records({"prompting": 0.25, "MIPO": 0.45}, n_examples=80, deterministic=("prompting",))
    d = stats.paired_difference(rec, design="seed-aware")
    full = pd.concat([rec[rec.method == "MIPO"]] + [rec[rec.method == "prompting"].assign(seed=s) for s in (0, 1, 2)])
    assert stats.paired_difference(full, design="seed-aware") == d
    per_seed_mipo = rec[rec.method == "MIPO"].groupby("seed")["score"].mean()
    assert d["se_seeds"] == pytest.approx(per_seed_mipo.std(ddof=1) / math.sqrt(3))  # the seed part is MIPO's alone


def test_seed_aware_p_value_ci_relative_gain_and_rates():
    for delta, n in ((0.1, 600), (0.02, 60), (0.0, 100), (0.05, 200)):
        d = stats.paired_difference(planted(n, delta=delta, seed=n), design="seed-aware")
        assert (d["p_value"] < 0.05) == (d["lo"] > 0 or d["hi"] < 0)
        assert d["relative_lo"] <= d["relative_gain"] <= d["relative_hi"]
        assert d["lo"] <= d["mean"] <= d["hi"] and d["mean"] - d["lo"] == pytest.approx(d["hi"] - d["mean"])
    rec = make_records({"MIPO": 0.3}, n_examples=100)
    h = stats.hierarchical_bootstrap(rec, "MIPO", design="seed-aware")
    assert h["lo"] < h["mean"] < h["hi"] and h["ci_design"] == "seed-aware" and h["p_value"] < 1e-6
    same = seed_by_prompt(np.zeros((3, 20)))
    zero = stats.paired_difference(same, design="seed-aware")
    assert (zero["lo"], zero["hi"], zero["p_value"]) == (0.0, 0.0, 1.0)
    with pytest.raises(MipoError, match="at least 2 clusters"):
        stats.paired_difference(seed_by_prompt(np.ones((3, 5)), np.zeros(5)), design="seed-aware-cluster")
    with pytest.raises(MipoError, match="at least 2 examples"):
        stats.paired_difference(seed_by_prompt(np.ones((3, 1)), np.arange(1)), design="seed-aware")


def test_results_designs_switch_is_one_constant(monkeypatch):
    """The results use the seed-aware prompt-level and type-level intervals (issue 29); `RESULTS_DESIGNS` is the one
    constant that says so, and switching it back to the crossed bootstrap switches every results table."""
    rec = make_records({"prompting": 0.25, "MIPO": 0.45}, n_examples=60, deterministic=("prompting",))
    assert stats.RESULTS_DESIGNS == ("seed-aware", "seed-aware-cluster") and stats.DEFAULT_DESIGN == "seed-aware"
    monkeypatch.setattr(stats, "RESULTS_DESIGNS", ("crossed", "cluster"))
    crossed = stats.results_table(rec, n_boot=100)
    crossed = crossed[crossed["kind"] == "paired_difference"]
    assert list(crossed["ci_design"]) == ["crossed", "cluster(group)"]
    monkeypatch.undo()
    rows = stats.results_table(rec, n_boot=100)
    rows = rows[rows["kind"] == "paired_difference"].set_index("ci_design")
    assert list(rows.index) == ["seed-aware", "seed-aware cluster(group)"]
    d = stats.paired_difference(rec, design="seed-aware")
    assert rows.loc["seed-aware", "diff_lo"] == pytest.approx(d["lo"])
    assert rows.loc["seed-aware", "p_value"] == pytest.approx(d["p_value"])


def test_p_value_agrees_with_the_ci():
    for delta, n in ((0.1, 600), (0.02, 60), (0.0, 100)):
        d = stats.paired_difference(planted(n, delta=delta), n_boot=4000)
        assert (d["p_value"] < 0.05) == (d["lo"] > 0 or d["hi"] < 0)
    same = planted(50)
    d = stats.paired_difference(pd.concat([same[same.method == "MIPO"], same[same.method == "MIPO"].assign(
        method="prompting")]), n_boot=500)
    assert d["p_value"] == 1.0  # every replicate is exactly 0


def test_holm_and_families():
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    out = stats.holm([0.02, np.nan, 0.01])
    assert np.isnan(out[1]) and out[[0, 2]] == pytest.approx([0.02, 0.02])  # NaN is not counted: m = 2
    fam = stats.adjust_family({"a": {"p_value": 0.01}, "b": {"p_value": 0.04}, "c": {"mean": 1.0}}, "toy")
    assert fam["a"] == {"p_value": 0.01, "family": "toy", "family_size": 2, "p_holm": pytest.approx(0.02)}
    assert fam["b"]["p_holm"] == pytest.approx(0.04) and np.isnan(fam["c"]["p_holm"])


def test_conclusion_uses_the_holm_adjusted_p_value():
    base = {"mean": 0.05, "lo": 0.01, "hi": 0.09, "n_seeds": 3, "n_examples": 100}
    fam = stats.adjust_family({"x": {**base, "p_value": 0.02}, "y": {**base, "p_value": 0.03}}, "toy")
    text = stats.conclusion(fam["x"], "x")
    assert 'Holm-adjusted p = 0.04 over the 2 comparisons of "toy": a detectable gain' in text
    wide = stats.adjust_family({"x": {**base, "p_value": 0.02}, "y": {**base, "p_value": 0.3}, "z": {
        **base, "p_value": 0.4}}, "toy")
    assert "no detectable effect at this size (its unadjusted CI excludes 0)" in stats.conclusion(wide["x"], "x")
    lone = stats.conclusion({**base, "mean": -0.05, "lo": -0.09, "hi": -0.01, "p_value": 0.0004}, "lone")
    assert "p < 0.001 (one comparison, nothing to adjust): a detectable loss" in lone


def test_per_group_rates():
    rec = make_records({"prompting": 0.2, "MIPO": 0.5}, n_examples=80)
    out = stats.per_group_rates(rec, n_boot=200)
    assert len(out) == 2 * len(GROUPS)
    assert set(out.columns) >= {"method", "group", "rate", "lo", "hi", "per_seed", "n_seeds", "n_examples"}
    assert (out["n_examples"] == 20).all()
    row = out[(out.method == "MIPO") & (out.group == "banana")].iloc[0]
    expect = rec[(rec.method == "MIPO") & (rec.group == "banana")]["score"].mean()
    assert row["rate"] == pytest.approx(expect)


def test_distinct_n():
    assert stats.distinct_n(["a b c", "a b c"], n=2) == pytest.approx(2 / 4)
    assert stats.distinct_n(["a b c", "d e f"], n=2) == 1.0
    assert stats.distinct_n(["a b c d"], n=1) == 1.0
    assert stats.distinct_n(["a", ""], n=2) == 0.0


def test_self_bleu_identical_and_disjoint():
    same = ["the cat sat on the mat today"] * 5
    assert stats.self_bleu(same) == pytest.approx(1.0)
    assert stats.self_bleu(["hi there"] * 3) == pytest.approx(1.0)  # shorter than 4 tokens: effective order
    disjoint = [" ".join(f"w{i}_{j}" for j in range(8)) for i in range(6)]
    assert stats.self_bleu(disjoint) < 0.05
    partial = ["the cat sat on the mat", "the cat sat on a rug", "dogs run fast in parks"]
    assert 0.05 < stats.self_bleu(partial) < 1.0
    assert math.isnan(stats.self_bleu(["only one"]))


def test_self_bleu_subsampling_is_seeded():
    rng = np.random.default_rng(0)
    resp = [" ".join(f"w{rng.integers(0, 30)}" for _ in range(10)) for _ in range(60)]
    a = stats.self_bleu(resp, sample=20, seed=1)
    assert a == stats.self_bleu(resp, sample=20, seed=1)
    assert a != stats.self_bleu(resp, sample=20, seed=2)


def test_diversity_table():
    rec = make_records({"prompting": 0.2, "MIPO": 0.4}, n_examples=30, deterministic=("prompting",))
    out = stats.diversity_table(rec, sample=20)
    assert list(out.columns) == ["task", "method", "seed", "n", "distinct_1", "distinct_2", "self_bleu", "mean_words"]
    assert len(out) == 4 and (out["n"] == 30).all()
    assert out["distinct_2"].between(0, 1).all() and out["self_bleu"].between(0, 1).all()


def test_win_rates_ties_count_as_wins():
    w = stats.win_rates([3, 4, 2, 5], [3, 3, 4, 5])
    assert w["win_or_tie"] == 0.75 and w["strict_win"] == 0.25 and w["tie"] == 0.5 and w["loss"] == 0.25
    same = stats.win_rates([1, 2, 3], [1, 2, 3])
    assert same["win_or_tie"] == 1.0 and same["strict_win"] == 0.0
    assert stats.win_rates([5, np.nan], [1, 1])["n"] == 1
    with pytest.raises(MipoError):
        stats.win_rates([1, 2], [1])


def test_win_tie_table_matches_win_rates_per_seed():
    records = make_records({"MIPO": 0.45, "prompting": 0.25})
    table = stats.win_tie_table(records, n_boot=300).set_index("metric")
    per_seed = stats.win_rates_per_seed(records)
    assert list(table.index) == list(stats.WIN_TIE_METRICS) and len(per_seed) == 3
    for metric, column in zip(stats.WIN_TIE_METRICS, ("win_or_tie", "strict_win", "tie", "loss")):
        np.testing.assert_allclose(table.loc[metric, "per_seed"], per_seed[column].to_numpy())
    assert table.loc["win-or-tie", "rate"] == pytest.approx(table.loc["strict win", "rate"] + table.loc["tie", "rate"])
    assert math.isclose(table.loc["win-or-tie", "rate"] + table.loc["loss", "rate"], 1.0)
    # a method that changed nothing wins-or-ties every time and never strictly wins
    same = records[records.method == "prompting"]
    w = stats.win_rates_per_seed(pd.concat([same, same.assign(method="MIPO")]))
    assert (w["win_or_tie"] == 1.0).all() and (w["strict_win"] == 0.0).all()


def test_win_rates_pair_a_deterministic_method_with_every_seed_and_need_both():
    records = make_records({"MIPO": 0.45, "prompting": 0.25}, deterministic=("prompting",))
    assert stats.win_rates_per_seed(records)["seed"].tolist() == [0, 1, 2]
    with pytest.raises(MipoError, match="records of both"):
        stats.win_tie_table(records, "MIPO", "SFT")


@pytest.mark.parametrize(
    "diff,expected",
    [
        ({"mean": 0.05, "lo": 0.02, "hi": 0.08, "n_seeds": 3, "n_examples": 200}, "the CI excludes 0: a detectable gain"),
        ({"mean": 0.01, "lo": -0.02, "hi": 0.04, "n_seeds": 3, "n_examples": 200}, "the CI includes 0: no detectable effect at this size"),
        ({"mean": -0.05, "lo": -0.08, "hi": -0.01, "n_seeds": 3, "n_examples": 200}, "the CI excludes 0: a detectable loss"),
        ({"mean": 0.0, "lo": 0.0, "hi": 0.0, "n_seeds": 1, "n_examples": 20}, "the CI includes 0: no detectable effect"),
        ({"mean": 0.3, "lo": 0.3, "hi": 0.3, "n_seeds": 1, "ci_over": "seeds"}, "one seed only, so no CI over seeds"),
        ({"mean": float("nan"), "lo": float("nan"), "hi": float("nan")}, "not computable"),
    ],
)
def test_conclusion_wording(diff, expected):
    text = stats.conclusion(diff, "MIPO - prompting")
    assert text.startswith("MIPO - prompting: ") and expected in text


def test_conclusion_numbers_and_units():
    text = stats.conclusion({"mean": 0.053, "lo": 0.021, "hi": 0.084, "n_seeds": 3, "n_examples": 200}, "gain")
    assert text == "gain: +5.3 points [95% CI +2.1, +8.4]; the CI excludes 0: a detectable gain (3 seeds x 200 examples)."
    kl = stats.conclusion({"mean": 1.5, "lo": 0.9, "hi": 2.2}, "KL", unit="nats", scale=1.0, digits=2,
                          words=("increase", "decrease"))
    assert kl == "KL: +1.50 nats [95% CI +0.90, +2.20]; the CI excludes 0: a detectable increase."
    tiny = stats.conclusion({"mean": 0.0004, "lo": 0.0001, "hi": 0.0007}, "tiny")
    assert tiny.startswith("tiny: +0.040 points [95% CI +0.010, +0.070]")  # more decimals, never "+0.0"


def test_seed_difference_is_over_seeds():
    d = stats.seed_difference([0.5, 0.6, 0.55], [0.3, 0.3, 0.3])
    assert d["ci_over"] == "seeds" and d["n_seeds"] == 3 and d["lo"] > 0
    assert "detectable gain" in stats.conclusion(d, "distinct-2") and not d["deterministic"]
    fixed = stats.seed_difference([0.5, 0.5, 0.5], [0.3, 0.3, 0.3])  # two deterministic methods
    assert fixed["deterministic"] and fixed["lo"] == fixed["hi"]
    assert "no verdict" in stats.conclusion(fixed, "distinct-2") and "detectable" not in stats.conclusion(fixed, "x")
    assert stats.seed_difference([np.nan], [0.3])["n_seeds"] == 0


@pytest.mark.parametrize("df, quantile", [(1, 12.706), (2, 4.303), (4, 2.776), (10, 2.228), (30, 2.042)])
def test_seed_interval_half_width_is_the_tabled_t_quantile(df, quantile):
    """The 95% CI of df + 1 seeds is the mean +- t(0.975, df) standard errors, t as printed in statistics tables."""
    x = np.random.default_rng(df).normal(0.3, 0.1, size=df + 1)
    mean, lo, hi, _ = stats.seed_interval(x)
    se = x.std(ddof=1) / np.sqrt(x.size)
    assert mean - lo == pytest.approx(hi - mean) and (hi - mean) / se == pytest.approx(quantile, abs=1e-3)


def test_seed_interval_p_value_is_the_two_sided_t_test():
    """x = (1, 2, 3): t = 2 / (1 / sqrt 3) = 2 sqrt 3 with 2 degrees of freedom, whose two-sided p-value has the
    closed form 1 - t / sqrt(t^2 + 2) = 1 - sqrt(12 / 14) (Student-t with 2 df)."""
    _, _, _, p = stats.seed_interval([1.0, 2.0, 3.0])
    assert p == pytest.approx(1 - np.sqrt(12 / 14), abs=1e-12)


def test_seed_interval_covers_with_three_seeds_where_the_bootstrap_does_not():
    """Three seeds of a metric with a true mean 0.5: the t interval covers close to 95% of the time; a percentile
    bootstrap of the same three numbers covers far less (every replicate recombines them), which is why per-seed
    metrics use `seed_interval`."""
    rng = np.random.default_rng(0)
    t_hits = boot_hits = 0
    n = 400
    for i in range(n):
        x = rng.normal(0.5, 0.1, size=3)
        _, lo, hi, _ = stats.seed_interval(x)
        t_hits += lo <= 0.5 <= hi
        _, blo, bhi = stats.bootstrap_ci(x, n_boot=300, seed=i)
        boot_hits += blo <= 0.5 <= bhi
    assert 0.92 <= t_hits / n <= 0.98
    assert boot_hits / n < 0.8


def test_three_seeds_of_one_sign_are_not_enough_when_they_are_noisy():
    d = stats.seed_difference([0.101, 0.12, 0.19], [0.1, 0.1, 0.1])  # all positive, but spread as wide as the mean
    assert d["lo"] < 0 < d["hi"] and d["p_value"] > 0.05
    assert "no detectable effect" in stats.conclusion(d, "distinct-2")


def test_kl_table_per_variant_over_seeds_and_prompts():
    rng = np.random.default_rng(0)
    kl = pd.DataFrame([{"variant": v, "seed": s, "example_id": e, "kl": rng.normal(mu, 0.2)}
                       for v, mu in (("beta=0.05", 2.0), ("beta=0.3", 0.5)) for s in (0, 1, 2) for e in range(30)])
    table = stats.kl_table(kl, ["beta=0.05", "beta=0.3", "absent"], n_boot=300).set_index("variant")
    assert list(table.index) == ["beta=0.05", "beta=0.3"] and (table["n_prompts"] == 30).all()
    assert (table["lo"] <= table["mean"]).all() and (table["mean"] <= table["hi"]).all()
    assert table.loc["beta=0.3", "hi"] < table.loc["beta=0.05", "lo"] and len(table.loc["beta=0.3", "per_seed"]) == 3


def test_cost_summary_ratio_to_mipo_in_display_order():
    cost = pd.DataFrame([{"method": m, "seed": s, "s_per_prompt": t * (1 + 0.1 * s), "mean_words": 10.0}
                         for m, t in (("CAD", 0.2), ("MIPO", 0.1), ("prompting", 0.1)) for s in (0, 1, 2)])
    out = stats.cost_summary(cost).set_index("method")
    assert list(out.index) == ["prompting", "MIPO", "CAD"]
    assert out.loc["MIPO", "x_mipo"] == pytest.approx(1.0) and out.loc["CAD", "x_mipo"] == pytest.approx(2.0)
    assert (out["n_seeds"] == 3).all() and (out["lo"] <= out["s_per_prompt"]).all()


def test_default_comparisons_read_the_method_registry():
    from mipo_lib import methods

    assert stats.default_comparisons() == (("MIPO", "prompting"), ("MIPO", "SFT"), ("MIPO", "CAD"))
    methods.register_method("MIPO-long", slug="mipo_long", training="dpo", colour="#123456")
    try:
        added = stats.default_comparisons()
        assert ("MIPO-long", "prompting") in added and ("MIPO", "MIPO-long") not in added
        records = make_records({"MIPO-long": 0.5, "prompting": 0.25}, deterministic=("prompting",))
        paired = stats.results_table(records, n_boot=100, cluster=None).query("kind == 'paired_difference'")
        assert paired[["method", "baseline"]].values.tolist() == [["MIPO-long", "prompting"]]
    finally:
        methods.unregister_method("MIPO-long")
    assert stats.default_comparisons() == (("MIPO", "prompting"), ("MIPO", "SFT"), ("MIPO", "CAD"))


def test_reported_gains_csv():
    df = stats.load_reported_gains()
    assert len(df) >= 8
    assert (df["label"] == "reported (abstract-level)").all()
    assert df["source"].str.len().gt(0).all()
    assert (df["low"] <= df["high"]).all()
    assert {"personalization", "math+MC"} <= set(df["domain"])
    v1 = df[df["source"].str.contains("v1 abstract") & (df["domain"] == "personalization")].iloc[0]
    assert (v1["low"], v1["high"]) == (3, 40)


def test_seed_aware_pools_strata_that_hold_one_example_each():
    """A tiny run whose every preference type has one prompt leaves no within-type spread: the prompt-level
    interval falls back to one stratum (s^2 / N) instead of failing, and a type-level row needs two types."""
    rec = make_records({"prompting": 0.25, "MIPO": 0.45}, n_examples=40, deterministic=("prompting",))
    own = rec.assign(group=rec["example_id"].astype(str))
    one = rec.assign(group="all")
    d_own, d_one = (stats.paired_difference(r, design="seed-aware") for r in (own, one))
    assert (d_own["lo"], d_own["hi"]) == pytest.approx((d_one["lo"], d_one["hi"]))
    table = stats.results_table(one, n_boot=50)
    assert set(table.loc[table["kind"] == "paired_difference", "ci_design"]) == {stats.DEFAULT_DESIGN}
