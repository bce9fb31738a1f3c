"""Ablations (mipo_lib.experiments.ablations): variant presets and their folders, K negatives, the cached KL to the base model and
generation cost (their cache keys), the variant comparison and summary tables. Models: the smoke preset's tiny random
model, 16 training prompts, 10 held-out prompts, one seed. The statistics and figures they use are tested in
test_stats.py and test_plots.py, the sampled KL itself in test_sampled_kl.py."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pandas as pd
import pytest

from mipo_lib.experiments import ablations, pipeline
from mipo_lib import cache
from mipo_lib.analysis import render, stats
from mipo_lib.config import get_preset
from mipo_lib.errors import MipoError
from mipo_lib.pairs import pairs_dir

SEED = 0


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def module_runs(tmp_path_factory):
    return tmp_path_factory.mktemp("ablation-runs")


@pytest.fixture(autouse=True)
def _own_runs(_isolated_runs, module_runs, monkeypatch):
    """One runs folder for this module: its tests reuse each other's pairs and adapters, nobody else's."""
    monkeypatch.setenv("MIPO_RUNS_DIR", str(module_runs))


@pytest.fixture(scope="module")
def preset():
    return get_preset("smoke", n_train_prompts=16, n_test_prompts=10, seeds=(SEED,))


# ------------------------------------------------------------------------------------------------------ variants
def test_variant_presets_are_distinct_and_land_in_distinct_folders(preset):
    k = ablations.variant_presets(preset, "K", ablations.K_VALUES)
    neg = ablations.variant_presets(preset, "negative", ablations.NEGATIVE_KINDS)
    beta = ablations.variant_presets(preset, "beta", ablations.BETAS)
    assert list(k) == ["K=1", "K=2", "K=4"]
    assert list(neg) == ["context_drop", "random_context", "random_prompt"]
    assert list(beta) == ["beta=0.05", "beta=0.1", "beta=0.3"]
    assert [p.k_negatives for p in k.values()] == [1, 2, 4]
    assert [p.negative for p in neg.values()] == list(ablations.NEGATIVE_KINDS)
    assert [p.beta for p in beta.values()] == [0.05, 0.1, 0.3]
    for group in (k, neg, beta):
        presets = list(group.values())
        assert all(a != b for i, a in enumerate(presets) for b in presets[i + 1 :])
        adapters = {pipeline.adapter_dir(p, "MIPO", SEED) for p in presets}
        evals = {pipeline._eval_path(p, "MIPO", SEED) for p in presets}
        assert len(adapters) == len(evals) == len(presets)
    # the reference variant of every ablation is the preset itself: it reuses notebooks 02-04's runs
    assert k["K=1"] == neg["context_drop"] == beta["beta=0.1"] == preset
    every = {repr(p): p for g in (k, neg, beta) for p in g.values()}.values()
    assert len({pipeline.adapter_dir(p, "MIPO", SEED) for p in every}) == len(every) == 7
    # pairs do not depend on beta (shared), but do on K and the kind of negative
    assert len({pairs_dir(p, SEED) for p in beta.values()}) == 1
    assert len({pairs_dir(p, SEED) for p in list(k.values()) + list(neg.values())}) == 5
    # CAD's twin strength follows beta
    assert [p.cad_strength for p in beta.values()] == pytest.approx([20.0, 10.0, 1 / 0.3])


def test_reference_label_and_bad_values(preset):
    assert ablations.reference_label(preset, "K", ["K=2", "K=1"]) == "K=1"
    assert ablations.reference_label(preset, "beta", ["beta=0.3", "beta=0.05"]) == "beta=0.3"
    for kind, value in (("K", 0), ("negative", "nonsense"), ("beta", -1.0), ("lr", 1)):
        with pytest.raises(MipoError):
            ablations.variant_presets(preset, kind, [value])


def test_k2_makes_twice_as_many_pairs_with_distinct_negatives(preset):
    variants = ablations.variant_presets(preset, "K", [1, 2])
    counts = ablations.pair_counts(variants, [SEED], progress=False).set_index("variant")
    assert counts.loc["K=1", "pairs"] == preset.n_train_prompts
    assert counts.loc["K=2", "pairs"] == 2 * counts.loc["K=1", "pairs"]
    assert counts.loc["K=2", "optimizer_steps"] == 2 * counts.loc["K=1", "optimizer_steps"]
    pairs = pipeline.pairs_for_seed(variants["K=2"], SEED, progress=False)
    per_prompt = pd.DataFrame(pairs).groupby("example_id")["pair_id"].nunique()
    assert (per_prompt == 2).all()


# ------------------------------------------------------------------------------------------------------------ KL
def test_kl_to_base_is_finite_after_training_and_cached(preset):
    kl = ablations.kl_to_base(preset, SEED, n_prompts=10, progress=False)
    assert len(kl) == 10 and list(kl.columns[:4]) == ["seed", "example_id", "group", "kl"]
    assert np.isfinite(kl["kl"]).all() and (kl["n_tokens"] > 0).all()
    again = ablations.kl_to_base(preset, SEED, n_prompts=10, progress=False)
    np.testing.assert_allclose(again["kl"].to_numpy(), kl["kl"].to_numpy())
    key = ablations.kl_key(preset, SEED, n_prompts=10)
    stored = pipeline.variant_dir(preset, "eval") / f"kl-seed{SEED}-{key.digest}.jsonl"
    assert stored.exists() and cache.reuse(stored, key)  # the key travels with the result
    table = stats.kl_table(kl.assign(variant="beta=0.1"), ["beta=0.1"], n_boot=200)
    assert table.loc[0, "lo"] <= table.loc[0, "mean"] <= table.loc[0, "hi"]


@pytest.mark.parametrize("key_of", [ablations.kl_key, ablations.cost_key], ids=["kl", "generation cost"])
def test_measurement_keys_follow_their_stage_fields_the_adapter_and_the_prompts(preset, key_of):
    """Keys come from the declared stage fields plus the MIPO adapter's key: a new beta (the adapter) or another
    number of prompts recomputes, a setting neither reads (the SFT learning rate) reuses."""
    base = key_of(preset, SEED, n_prompts=10)
    assert base == key_of(preset, SEED, n_prompts=10) and base.stage in cache.STAGE_FIELDS
    assert set(cache.STAGE_FIELDS[base.stage]) <= set(base.values)
    assert key_of(preset, SEED, n_prompts=5) != base
    assert key_of(preset, SEED + 1, n_prompts=10) != base
    assert key_of(preset.with_overrides(beta=0.3), SEED, n_prompts=10) != base
    assert key_of(preset.with_overrides(sft_learning_rate=1e-6), SEED, n_prompts=10) == base
    assert key_of(preset, SEED, n_prompts=10 + preset.n_test_prompts) == base  # capped at the held-out prompts


def test_kl_key_reads_the_token_cap_and_sampling_seed_and_cost_key_the_repeats(preset):
    kl = ablations.kl_key(preset, SEED)
    assert ablations.kl_key(preset, SEED, max_new_tokens=preset.eval_max_new_tokens) == kl
    assert ablations.kl_key(preset, SEED, max_new_tokens=3) != kl and ablations.kl_key(preset, SEED, sample_seed=1) != kl
    cost = ablations.cost_key(preset, SEED)
    assert ablations.cost_key(preset, SEED, repeats=3) != cost
    assert ablations.cost_key(preset.with_overrides(cad_alpha=2.0), SEED) != cost
    # timings depend on the evaluation batch, the KL's samples do not (they use the generation batch)
    assert ablations.cost_key(preset.with_overrides(eval_batch_size=3), SEED) != cost
    assert ablations.kl_key(preset.with_overrides(eval_batch_size=3), SEED) == kl


# ---------------------------------------------------------------------------------------------- runs and cost
def test_run_variants_adds_the_variant_column_and_the_baseline(preset):
    variants = {"K=1": preset}
    records = ablations.run_variants(variants, [SEED], progress=False)
    assert set(records["variant"]) == {"K=1", "prompting"}
    assert set(records["method"]) == {"MIPO", "prompting"}
    assert (records.groupby("variant").size() == preset.n_test_prompts).all()
    again = ablations.run_variants(variants, [SEED], progress=False)  # read back from the caches
    pd.testing.assert_frame_equal(again[records.columns], records, check_dtype=False)
    table = ablations.compare_variants(records, ["K=1"], reference="K=1", n_boot=200)
    assert render.difference(table.loc[0, "gain_comparison"]).startswith("K=1 - prompting: ")
    assert table.loc[0, "vs_ref_comparison"] is None  # the reference is not compared with itself


def test_generation_cost_times_three_methods_on_the_same_prompts(preset):
    cost = ablations.generation_cost(preset, SEED, n_prompts=6, progress=False)
    assert sorted(cost["method"]) == ["CAD", "MIPO", "prompting"]
    assert (cost["n_prompts"] == 6).all() and (cost["s_per_prompt"] > 0).all()
    summary = stats.cost_summary(cost)
    assert summary.set_index("method").loc["MIPO", "x_mipo"] == pytest.approx(1.0)
    again = ablations.generation_cost(preset, SEED, n_prompts=6, progress=False)  # timings are read back, not redone
    pd.testing.assert_frame_equal(again, cost)


# --------------------------------------------------------------------------------------- comparison tables
def _synthetic(rate_a: float, rate_b: float, n: int = 200, seeds=(0, 1, 2)) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for s in seeds:
        a = (rng.random(n) < rate_a).astype(float)
        rows.append(pd.DataFrame({"task": "t", "method": "MIPO", "variant": "K=2", "seed": s, "example_id": range(n),
                                  "score": a, "n_words": 12}))
        b = (np.arange(n) < int(rate_b * n)).astype(float)
        rows.append(pd.DataFrame({"task": "t", "method": "prompting", "variant": "prompting", "seed": s,
                                  "example_id": range(n), "score": b, "n_words": 20}))
    return pd.concat(rows, ignore_index=True)


def test_compare_variants_finds_a_real_gain_and_a_null():
    gain = ablations.compare_variants(_synthetic(0.45, 0.25), ["K=2"], reference=None, n_boot=500)
    row = gain.loc[0, "gain_comparison"]
    assert gain.loc[0, "gain_lo"] > 0 and row["detectable"] and "detectable gain" in render.difference(row)
    assert (row["a"], row["b"], row["variant_column"]) == ("K=2", "prompting", "vs_prompting")
    assert len(gain.loc[0, "gain_per_seed"]) == 3
    null = ablations.compare_variants(_synthetic(0.25, 0.25), ["K=2"], reference=None, n_boot=500)
    assert not null.loc[0, "gain_comparison"]["detectable"]
    assert "no detectable effect" in render.difference(null.loc[0, "gain_comparison"])


def test_compare_variants_holm_adjusts_the_table_as_one_family():
    rec = _synthetic(0.45, 0.25)
    rec = pd.concat([rec, rec[rec.variant == "K=2"].assign(variant="K=1")], ignore_index=True)
    table = ablations.compare_variants(rec, ["K=1", "K=2"], reference="K=1", n_boot=500, family="ablation: K")
    # three comparisons (K=1 and K=2 vs prompting, K=2 vs K=1): Holm multiplies the smallest p-value by 3
    p = [table.loc[0, "gain_p"], table.loc[1, "gain_p"], table.loc[1, "vs_ref_p"]]
    holm = [table.loc[0, "gain_p_holm"], table.loc[1, "gain_p_holm"], table.loc[1, "vs_ref_p_holm"]]
    assert holm == pytest.approx(list(stats.holm(p))) and min(holm) == pytest.approx(3 * min(p))
    assert 'over the 3 comparisons of "ablation: K"' in render.difference(table.loc[1, "gain_comparison"])
    assert not table.loc[1, "vs_ref_comparison"]["detectable"]  # identical variants: p = 1
    rows = ablations.variant_comparisons({"table": table}, "K negatives")  # vs prompting first, then vs the reference
    assert [r["comparison"] for r in rows] == ["K=1 - prompting", "K=2 - prompting", "K=2 - K=1"]
    assert {r["section"] for r in rows} == {"K negatives"} and rows[2]["variant_column"] == "vs_reference"


def test_summary_table_carries_every_variant_with_its_cis_and_the_kl():
    gain = ablations.compare_variants(_synthetic(0.45, 0.25), ["K=2"], reference=None, n_boot=300)
    beta = gain.assign(variant="beta=0.3")
    kl = pd.DataFrame({"variant": ["beta=0.3"], "mean": [1.2], "lo": [0.8], "hi": [1.6]})
    counts = pd.DataFrame({"variant": ["K=2", "K=2"], "seed": [0, 1], "pairs": [120, 120], "optimizer_steps": [60, 60]})
    out = ablations.summary_table({"K": {"table": gain}, "beta": {"table": beta}}, kl, counts, model="M", task="t")
    assert list(out.columns) == list(ablations.SUMMARY_COLUMNS)
    assert out["ablation"].tolist() == ["K", "beta"] and out["variant"].tolist() == ["K=2", "beta=0.3"]
    k, b = out.iloc[0], out.iloc[1]
    assert k["vs_prompting_lo"] <= k["vs_prompting"] <= k["vs_prompting_hi"] and k["vs_prompting_lo"] > 0
    assert np.isnan(k["vs_reference"]) and np.isnan(k["kl_nats"])  # no reference given; KL only for beta variants
    assert b["kl_nats"] == 1.2 and (b["kl_lo"], b["kl_hi"]) == (0.8, 1.6)
    assert len(k["per_seed_rate"].split()) == 3 and k["n_seeds"] == 3
    assert (k["mean_words"], k["optimizer_steps"], k["seeds"], k["model"], k["task"]) == (12, 60, "0 1 2", "M", "t")
    assert np.isnan(b["optimizer_steps"])  # only the K ablation counts its steps
    assert np.isnan(k["epochs"]) and k["method"] == "MIPO"  # epochs: from a run's variant presets (none here)
    named = ablations.summary_table({"K": {"table": gain.assign(variant="K=2 (InfoNCE)"),
                                           "variants": {"K=2 (InfoNCE)": get_preset("smoke", epochs=3)}}},
                                    model="M", task="t")
    assert (named.loc[0, "epochs"], named.loc[0, "method"]) == (3, "MIPO-InfoNCE")


def test_k_ablation_has_the_compute_matched_controls_it_asks_for(preset):
    k = ablations.variant_presets(preset, "K", [1, 2, 4], compute_matched=[2, 4])
    assert list(k) == ["K=1", "K=2", "K=4", "K=1, 2x epochs", "K=1, 4x epochs"]
    for factor in (2, 4):
        control = k[ablations.compute_matched_label(factor)]
        assert control.k_negatives == 1 and control.epochs == factor * preset.epochs
    assert list(ablations.variant_presets(preset, "K", [1, 2, 4], compute_matched=[2])) == ["K=1", "K=2", "K=4",
                                                                                            "K=1, 2x epochs"]
    assert list(ablations.variant_presets(preset, "K", [1, 2])) == ["K=1", "K=2"]  # none unless asked: each is long


@pytest.mark.parametrize("kind, values, matched, fix", [("beta", [0.1], [2], "K ablation only"),
                                                        ("K", [1, 2], [1], "at least 2")])
def test_compute_matched_controls_reject_what_has_no_control(preset, kind, values, matched, fix):
    with pytest.raises(MipoError, match=fix):
        ablations.variant_presets(preset, kind, values, compute_matched=matched)


def test_each_variant_reports_its_share_of_replies_cut_at_the_cap():
    rec = _synthetic(0.45, 0.25)
    rec["truncated"] = (rec["variant"] == "K=2") & (rec["example_id"] < 30)  # 30 of 200 K=2 replies cut, per seed
    table = ablations.compare_variants(rec, ["K=2"], reference=None, n_boot=200)
    assert table.loc[0, "truncated"] == pytest.approx(0.15)
    assert ablations.summary_table({"K": {"table": table}}, model="M", task="t").loc[0, "truncated"] == pytest.approx(0.15)
    assert ablations.format_table(table).loc["K=2", "cut at the cap %"] == "15"
    older = ablations.compare_variants(_synthetic(0.45, 0.25), ["K=2"], reference=None, n_boot=200)
    assert np.isnan(older.loc[0, "truncated"]) and ablations.format_table(older).loc["K=2", "cut at the cap %"] == ""
