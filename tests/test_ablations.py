"""Ablations (mipo_lib.ablations): variant presets and their folders, K negatives, the Monte-Carlo KL to the base
model, generation cost, win rates and the sentences that state each conclusion. Models: the smoke preset's tiny
random model, 16 training prompts, 10 held-out prompts, one seed."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import math

import numpy as np
import pandas as pd
import pytest
import torch

from mipo_lib import ablations, pipeline, stats
from mipo_lib.config import get_preset
from mipo_lib.errors import MipoError
from mipo_lib.models import load_for_preset, lora_config
from mipo_lib.pairs import pairs_dir
from mipo_lib.tasks import get_task

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
def test_sampled_kl_is_zero_when_the_policy_is_the_base(preset):
    base, tok = load_for_preset(preset)
    task = get_task(preset.task)
    prompts = [task.prompt(e) for e in task.examples("test", 10)]
    kw = dict(max_new_tokens=6, batch_size=5, seed=3)
    same = ablations.sampled_kl(base, base, tok, prompts, **kw)
    assert len(same) == 10 and (same["kl"] == 0).all() and np.isfinite(same["logp_base"]).all()

    # an untrained LoRA adapter has B = 0: the policy is the base model, so the KL is ~0
    from peft import get_peft_model

    policy = get_peft_model(load_for_preset(preset)[0], lora_config(preset)).eval()
    fresh = ablations.sampled_kl(policy, base, tok, prompts, **kw)
    assert fresh["response"].tolist() == same["response"].tolist()  # same seed, same distribution: same samples
    assert fresh["kl"].abs().max() < 1e-4


def test_sampled_tokens_are_scored_as_sampled_from_the_unmodified_distribution(preset):
    """The sampler must draw from the model's own distribution (no top-k/top-p from a generation config), and the
    scorer must give the log-probability of exactly those tokens: then the Monte-Carlo KL is unbiased."""
    from mipo_lib.generate import chat_prompt_ids

    model, tok = load_for_preset(preset)
    task = get_task(preset.task)
    ids = [chat_prompt_ids(tok, task.prompt(e)) for e in task.examples("test", 10)[:3]]
    completions = ablations.sample_token_ids(model, tok, ids, max_new_tokens=6, batch_size=1, seed=5)
    scored = ablations.token_logprobs(model, ids, completions, tok.pad_token_id, batch_size=3)
    for i, (p, c) in enumerate(zip(ids, completions)):
        torch.manual_seed(0)
        out = model.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                             max_new_tokens=len(c), do_sample=True, temperature=1.0, top_p=1.0,
                             top_k=0, pad_token_id=tok.pad_token_id, output_scores=True, output_logits=True,
                             return_dict_in_generate=True)
        processed = torch.stack(out.scores, 1)[0]
        raw = torch.stack(out.logits, 1)[0]
        assert torch.isfinite(processed).all()  # nothing masked: the full distribution
        torch.testing.assert_close(processed.log_softmax(-1), raw.float().log_softmax(-1))
        # the scorer is a plain forward pass: check it against the model's logits on the sampled tokens
        full = torch.tensor([p + c])
        lp = model(input_ids=full).logits[0, len(p) - 1 : -1].float().log_softmax(-1)
        assert abs(float(lp.gather(-1, torch.tensor(c)[:, None]).sum()) - scored[i]) < 1e-3


def test_kl_to_base_is_finite_after_training_and_cached(preset):
    kl = ablations.kl_to_base(preset, SEED, n_prompts=10, progress=False)
    assert len(kl) == 10 and list(kl.columns[:4]) == ["seed", "example_id", "group", "kl"]
    assert np.isfinite(kl["kl"]).all() and (kl["n_tokens"] > 0).all()
    again = ablations.kl_to_base(preset, SEED, n_prompts=10, progress=False)
    np.testing.assert_allclose(again["kl"].to_numpy(), kl["kl"].to_numpy())
    table = ablations.kl_table(kl.assign(variant="beta=0.1"), ["beta=0.1"], n_boot=200)
    assert table.loc[0, "lo"] <= table.loc[0, "mean"] <= table.loc[0, "hi"]


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
    assert table.loc[0, "gain_text"].startswith("K=1 - prompting: ")
    assert table.loc[0, "vs_ref_text"] == ""  # the reference is not compared with itself


def test_generation_cost_times_three_methods_on_the_same_prompts(preset):
    cost = ablations.generation_cost(preset, SEED, n_prompts=6, progress=False)
    assert sorted(cost["method"]) == ["CAD", "MIPO", "prompting"]
    assert (cost["n_prompts"] == 6).all() and (cost["s_per_prompt"] > 0).all()
    summary = ablations.cost_summary(cost, n_boot=100)
    assert summary.set_index("method").loc["MIPO", "x_mipo"] == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------ statistics, words
def _synthetic(rate_a: float, rate_b: float, n: int = 200, seeds=(0, 1, 2)) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for s in seeds:
        a = (rng.random(n) < rate_a).astype(float)
        rows.append(pd.DataFrame({"task": "t", "method": "MIPO", "variant": "K=2", "seed": s, "example_id": range(n), "score": a}))
        b = (np.arange(n) < int(rate_b * n)).astype(float)
        rows.append(pd.DataFrame({"task": "t", "method": "prompting", "variant": "prompting", "seed": s, "example_id": range(n), "score": b}))
    return pd.concat(rows, ignore_index=True)


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
    text = ablations.conclusion(diff, "MIPO - prompting")
    assert text.startswith("MIPO - prompting: ") and expected in text


def test_conclusion_numbers_and_units():
    text = ablations.conclusion({"mean": 0.053, "lo": 0.021, "hi": 0.084, "n_seeds": 3, "n_examples": 200}, "gain")
    assert text == "gain: +5.3 points [95% CI +2.1, +8.4]; the CI excludes 0: a detectable gain (3 seeds x 200 examples)."
    kl = ablations.conclusion({"mean": 1.5, "lo": 0.9, "hi": 2.2}, "KL", unit="nats", scale=1.0, digits=2,
                              words=("increase", "decrease"))
    assert kl == "KL: +1.50 nats [95% CI +0.90, +2.20]; the CI excludes 0: a detectable increase."


def test_compare_variants_finds_a_real_gain_and_a_null():
    gain = ablations.compare_variants(_synthetic(0.45, 0.25), ["K=2"], reference=None, n_boot=500)
    assert gain.loc[0, "gain_lo"] > 0 and "detectable gain" in gain.loc[0, "gain_text"]
    assert len(gain.loc[0, "gain_per_seed"]) == 3
    null = ablations.compare_variants(_synthetic(0.25, 0.25), ["K=2"], reference=None, n_boot=500)
    assert "no detectable effect" in null.loc[0, "gain_text"]


def test_summary_table_carries_every_variant_with_its_cis_and_the_kl():
    gain = ablations.compare_variants(_synthetic(0.45, 0.25), ["K=2"], reference=None, n_boot=300)
    beta = gain.assign(variant="beta=0.3")
    kl = pd.DataFrame({"variant": ["beta=0.3"], "mean": [1.2], "lo": [0.8], "hi": [1.6]})
    out = ablations.summary_table({"K": {"table": gain}, "beta": {"table": beta}}, kl)
    assert list(out.columns) == list(ablations.SUMMARY_COLUMNS)
    assert out["ablation"].tolist() == ["K", "beta"] and out["variant"].tolist() == ["K=2", "beta=0.3"]
    k, b = out.iloc[0], out.iloc[1]
    assert k["vs_prompting_lo"] <= k["vs_prompting"] <= k["vs_prompting_hi"] and k["vs_prompting_lo"] > 0
    assert np.isnan(k["vs_reference"]) and np.isnan(k["kl_nats"])  # no reference given; KL only for beta variants
    assert b["kl_nats"] == 1.2 and (b["kl_lo"], b["kl_hi"]) == (0.8, 1.6)
    assert len(k["per_seed_rate"].split()) == 3 and k["n_seeds"] == 3


def test_seed_difference_is_over_seeds():
    d = ablations.seed_difference([0.5, 0.6, 0.55], [0.3, 0.3, 0.3], n_boot=500)
    assert d["ci_over"] == "seeds" and d["n_seeds"] == 3 and d["lo"] > 0
    assert "detectable gain" in ablations.conclusion(d, "distinct-2") and not d["deterministic"]
    fixed = ablations.seed_difference([0.5, 0.5, 0.5], [0.3, 0.3, 0.3], n_boot=200)  # two deterministic methods
    assert fixed["deterministic"] and fixed["lo"] == fixed["hi"]
    assert "no verdict" in ablations.conclusion(fixed, "distinct-2") and "detectable" not in ablations.conclusion(fixed, "x")


def test_win_tie_table_matches_stats_win_rates():
    records = _synthetic(0.45, 0.25)
    table = ablations.win_tie_table(records, n_boot=300).set_index("metric")
    per_seed = ablations.win_rates_per_seed(records)
    for metric, column in (("win-or-tie", "win_or_tie"), ("strict win", "strict_win"), ("tie", "tie"), ("loss", "loss")):
        np.testing.assert_allclose(table.loc[metric, "per_seed"], per_seed[column].to_numpy())
    assert table.loc["win-or-tie", "rate"] == pytest.approx(table.loc["strict win", "rate"] + table.loc["tie", "rate"])
    assert math.isclose(table.loc["win-or-tie", "rate"] + table.loc["loss", "rate"], 1.0)
    # a method that changed nothing wins-or-ties every time and never strictly wins
    same = records[records.method == "prompting"]
    same = pd.concat([same, same.assign(method="MIPO")])
    w = ablations.win_rates_per_seed(same)
    assert (w["win_or_tie"] == 1.0).all() and (w["strict_win"] == 0.0).all()
    assert stats.win_rates([1, 0], [0, 0])["strict_win"] == 0.5


def test_figures_have_captions_with_preset_and_seeds():
    records = _synthetic(0.45, 0.25)
    table = ablations.compare_variants(records, ["K=2"], reference=None, n_boot=200)
    base = stats.hierarchical_bootstrap(records, "prompting", n_boot=200, unit="variant")
    meta = {"preset": "smoke", "model": "tiny-random", "task": "personalization", "n_seeds": 3, "n_examples": 200}
    kl = pd.DataFrame({"variant": ["K=2"], "mean": [1.0], "lo": [0.5], "hi": [1.5], "per_seed": [[0.9, 1.0, 1.1]]})
    fig = ablations.plot_variants(table, meta, "K", baseline_row=base, reference="K=2", kl=kl)
    assert fig.mipo_caption.startswith("Preset smoke | tiny-random | task: personalization | 3 seeds x 200")
    fig2 = ablations.plot_win_rates(ablations.win_tie_table(records, n_boot=200), meta)
    assert "needs a GPU preset" in fig2.mipo_caption
    import matplotlib.pyplot as plt

    plt.close("all")
