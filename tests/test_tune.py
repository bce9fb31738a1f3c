"""Settings chosen on validation (`make tune`): epoch snapshots equal shorter runs (the constant schedule is what makes
one run serve the whole sweep), the choice rule, the committed choices reaching `get_preset`, and truncation records."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from mipo_lib import config, dpo, evaluate
from mipo_lib.analysis import stats
from mipo_lib.experiments import tune
from mipo_lib.config import get_preset
from mipo_lib.generate import hit_cap
from mipo_lib.models import load_for_preset
from mipo_lib.tasks import get_task

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def preset():
    return get_preset("smoke", n_train_prompts=8, batch_size=4, epochs=2, sft_epochs=2)


@pytest.fixture(scope="module")
def pairs(smoke_pairs):
    return smoke_pairs


def _lora(folder):
    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.mark.parametrize("method", ["dpo", "sft"])
def test_epoch_snapshot_equals_a_run_of_that_many_epochs(method, preset, pairs, tmp_path):
    """The adapter after epoch 1 of a 2-epoch run is the adapter of a 1-epoch run (constant learning rate after a
    warm-up counted in steps, same data order), and differs from the 2-epoch adapter: the sweep's premise."""
    train = {"dpo": dpo.train_dpo, "sft": dpo.train_sft}[method]
    model, tok = load_for_preset(preset)
    train(model, tok, pairs, preset, 0, tmp_path / "long", progress=False, snapshot_epochs=(1, 2))
    one = preset.with_overrides(epochs=1, sft_epochs=1)
    model, tok = load_for_preset(one)
    train(model, tok, pairs, one, 0, tmp_path / "short", progress=False)
    snap, short, final = _lora(dpo.snapshot_dir(tmp_path / "long", 1)), _lora(tmp_path / "short"), _lora(tmp_path / "long")
    assert snap.keys() == short.keys() and snap
    for name in snap:
        torch.testing.assert_close(snap[name], short[name], rtol=1e-5, atol=1e-7)
    assert any(not torch.equal(snap[n], final[n]) for n in snap)
    assert dpo.snapshot_dir(tmp_path / "long", 2).exists()


def test_warmup_is_a_step_count_independent_of_epochs():
    p = get_preset("cpu", tuned=False)
    assert dpo.warmup_steps(p, 60) == dpo.warmup_steps(p.with_overrides(epochs=8), 60) == 1
    assert dpo.warmup_steps(get_preset("t4", tuned=False), 400) == 3  # 3% of 100 steps per epoch
    assert dpo.warmup_steps(p.with_overrides(warmup_ratio=0.0), 60) == 0


def _summary(rates, n=50):
    rows = [{"method": m, "setting": tune.TUNED_FIELDS[m], "value": v, "rate": r, "n": n, "n_seeds": 1}
            for m, by in rates.items() for v, r in by.items()]
    return pd.DataFrame(rows)


def _grid_rows(grid, n=50, n_seeds=1):
    rows = [{"method": m, "setting": tune.TUNED_FIELDS[m], "value": v, "learning_rate": lr, "rate": r, "n": n,
             "n_seeds": n_seeds} for (m, lr), by in grid.items() for v, r in by.items()]
    rows.append({"method": "CAD", "setting": "cad_alpha", "value": 1.0, "learning_rate": float("nan"), "rate": 0.4,
                 "n": n, "n_seeds": 1})
    return pd.DataFrame(rows)


def test_choose_picks_epochs_and_learning_rate_jointly():
    """Two rates per trained method, rates far apart (1,000 prompts: se about 1.6 points): the best (epochs, rate)
    pair wins, written as two rows; on a tie the fewer epochs win first (cheaper to run), then the smaller rate."""
    grid = {("MIPO", 2e-4): {1: 0.2, 2: 0.3, 4: 0.4, 8: 0.48}, ("MIPO", 8e-4): {1: 0.3, 2: 0.48, 4: 0.46, 8: 0.4},
            ("SFT", 2e-4): {1: 0.1, 2: 0.3, 4: 0.3, 8: 0.2}, ("SFT", 8e-4): {1: 0.3, 2: 0.2, 4: 0.1, 8: 0.1}}
    rows = _grid_rows(grid, n=1000)
    choices = tune.choose(rows, [0, 1]).set_index("field")
    assert choices.loc["epochs", "value"] == "2" and choices.loc["learning_rate", "value"] == "0.0008"
    assert choices.loc["sft_epochs", "value"] == "1" and choices.loc["sft_learning_rate", "value"] == "0.0008"
    assert choices.loc["learning_rate", "grid"] == "0.0002 0.0008" and choices.loc["epochs", "grid"] == "1 2 4 8"
    assert choices.loc["learning_rate", "validation_rate"] == choices.loc["epochs", "validation_rate"] == 0.48
    assert "cad_alpha" in choices.index and set(choices.index) <= tune.tuned_fields()
    tied = rows.assign(rate=0.5)  # everything tied: 1 epoch at the preset's own rate
    cheap = tune.choose(tied, [0]).set_index("field")
    assert cheap.loc["epochs", "value"] == "1" and cheap.loc["learning_rate", "value"] == "0.0002"


def test_one_standard_error_rule_takes_the_cheapest_setting_the_best_does_not_beat():
    """The committed sweep's shape: MIPO's best is 8 epochs at 0.48 on 50 prompts (se = sqrt(.48 x .52 / 50) = 0.0707),
    so 2 epochs at 0.42 is within one se and wins; 4 epochs at 0.40 and 1 epoch at 0.34 are not. At equal epochs
    the higher rate wins over the smaller learning rate. The highest-rate rule would take 8 epochs."""
    grid = {("MIPO", 2e-4): {1: 0.24, 2: 0.28, 4: 0.40, 8: 0.48}, ("MIPO", 8e-4): {1: 0.34, 2: 0.42, 4: 0.44, 8: 0.34},
            ("SFT", 2e-4): {1: 0.14, 2: 0.16, 4: 0.30, 8: 0.10}, ("SFT", 8e-4): {1: 0.24, 2: 0.20, 4: 0.34, 8: 0.30}}
    choices = tune.choose(_grid_rows(grid), [0]).set_index("field")
    assert (choices.loc["epochs", "value"], choices.loc["learning_rate", "value"]) == ("2", "0.0008")
    assert choices.loc["epochs", "validation_rate"] == 0.42 and choices.loc["epochs", "best_rate"] == 0.48
    assert choices.loc["epochs", "se"] == pytest.approx(0.0707, abs=1e-4)
    # SFT: best 0.34 (se 0.067): both 4-epoch settings qualify; the higher rate (8e-4) wins over the smaller rate
    assert (choices.loc["sft_epochs", "value"], choices.loc["sft_learning_rate", "value"]) == ("4", "0.0008")
    assert "one-standard-error" in choices.loc["epochs", "rule"]


def test_one_standard_error_counts_every_seeds_prompts():
    """The same rates on 3 seeds x 50 prompts: se = 0.0408, and 2 epochs at 0.42 is no longer within it of 0.48;
    4 epochs at 0.45 is, and is the cheapest that is."""
    grid = {("MIPO", 2e-4): {1: 0.30, 2: 0.42, 4: 0.45, 8: 0.48}, ("SFT", 2e-4): {1: 0.3}}
    one_seed = tune.choose(_grid_rows(grid), [0]).set_index("field")
    three = tune.choose(_grid_rows(grid, n_seeds=3), [0, 1, 2]).set_index("field")
    assert one_seed.loc["epochs", "value"] == "2" and three.loc["epochs", "value"] == "4"
    assert three.loc["epochs", "se"] == pytest.approx(tune.standard_error(0.48, 150), abs=1e-4)


def test_one_standard_error_rule_takes_the_weakest_cad_strength_within_it():
    summary = _summary({"CAD": {0.5: 0.32, 1.0: 0.42, 2.0: 0.40, 5.0: 0.38, 10.0: 0.28}})
    assert tune.choose(summary, [0]).set_index("field").loc["cad_alpha", "value"] == "1"  # 0.5: 0.32 < 0.42 - 0.0698
    weaker = _summary({"CAD": {0.5: 0.36, 1.0: 0.30, 2.0: 0.42}})
    assert tune.choose(weaker, [0]).set_index("field").loc["cad_alpha", "value"] == "0.5"


def test_sweep_trains_once_per_rate_and_the_choices_reach_the_preset(preset, tmp_path, monkeypatch):
    """The whole `make tune` path on the smoke model, with small grids: one training per method, seed and rate; every
    (epochs, rate) pair scored on validation; the choices are valid fields that get_preset applies."""
    monkeypatch.setenv("MIPO_RUNS_DIR", str(tmp_path / "runs"))
    trained = []

    def counting(train, field):
        def wrapper(model, tokenizer, pairs, p, *args, **kwargs):
            trained.append((field, getattr(p, field)))
            return train(model, tokenizer, pairs, p, *args, **kwargs)
        return wrapper

    monkeypatch.setattr(dpo, "train_dpo", counting(dpo.train_dpo, "learning_rate"))
    monkeypatch.setattr(dpo, "train_sft", counting(dpo.train_sft, "sft_learning_rate"))
    small = dict(n_train_prompts=8, batch_size=4)
    records = tune.sweep(get_preset("smoke", tuned=False, **small), [0], epoch_grid=(1, 2), cad_grid=(1.0,), n=4,
                         progress=False)
    base_lr = get_preset("smoke", tuned=False).learning_rate
    assert sorted(trained) == sorted((f, base_lr * x) for f in ("learning_rate", "sft_learning_rate")
                                     for x in tune.LR_FACTORS)  # MIPO and SFT, once per rate, at that rate
    summary = tune.summarize(records)
    mipo = summary[summary["method"] == "MIPO"]
    assert sorted(mipo["learning_rate"].unique()) == pytest.approx([base_lr * f for f in tune.LR_FACTORS])
    assert len(mipo) == 2 * len(tune.LR_FACTORS) and (mipo["n"] == 4).all()
    choices = tune.choose(summary, [0])
    assert set(choices["field"]) == tune.tuned_fields()
    overrides = {r.field: config.conform(r.field, r.value) for r in choices.itertuples()}
    get_preset("smoke", **overrides)  # valid values of valid fields


def test_choose_takes_the_cheaper_setting_on_ties_among_far_apart_rates():
    summary = _summary({"MIPO": {1: 0.2, 2: 0.3, 4: 0.5, 8: 0.5}, "SFT": {1: 0.4, 2: 0.3, 4: 0.2, 8: 0.1},
                        "CAD": {0.5: 0.25, 1.0: 0.3, 2.0: 0.1, 5.0: 0.0, 10.0: 0.3}}, n=2000)
    choices = tune.choose(summary, [0]).set_index("field")
    assert choices.loc["epochs", "value"] == "4" and choices.loc["sft_epochs", "value"] == "1"
    assert choices.loc["cad_alpha", "value"] == "1"
    assert choices.loc["epochs", "validation_rate"] == 0.5 and choices.loc["epochs", "grid"] == "1 2 4 8"


@pytest.mark.parametrize("tuning, choices", [("tuning_cpu.csv", "choices_cpu.csv"),
                                             ("heldout_tuning_cpu.csv", "heldout_choices_cpu.csv")])
def test_committed_choices_are_the_rule_applied_to_the_committed_sweep(tuning, choices, tmp_path):
    """`rechoose` on a copy of the committed tables leaves the committed choices unchanged: they are what the rule
    gives on the committed sweep (and each row keeps the `tuned_under` its sweep recorded)."""
    figures = config.repo_root() / "figures"
    copy = tmp_path / choices
    copy.write_text((figures / choices).read_text())
    tune.rechoose(figures / tuning, copy)
    assert copy.read_text() == (figures / choices).read_text()


def test_rechoose_rewrites_choices_made_by_another_rule(tmp_path):
    """A choices table made by the highest-rate rule (8 epochs) is replaced by the rule's choice; seeds, fields and
    `tuned_under` stay."""
    figures = config.repo_root() / "figures"
    summary = pd.read_csv(figures / "tuning_cpu.csv")
    mipo = summary[summary["method"] == "MIPO"]
    best = mipo.loc[mipo["rate"].idxmax()]
    old = pd.DataFrame([{"field": "epochs", "value": f"{int(best['value'])}", "method": "MIPO", "seeds": "0",
                         "tuned_under": '{"beta":0.1}'}])
    path = tmp_path / "choices.csv"
    old.to_csv(path, index=False)
    new = tune.rechoose(figures / "tuning_cpu.csv", path)
    assert list(new["field"]) == ["epochs"] and new["tuned_under"].tolist() == ['{"beta":0.1}']
    assert int(new["value"].iloc[0]) < int(best["value"])  # fewer epochs than the best's


def test_committed_choices_reach_get_preset_unless_overridden(tmp_path, monkeypatch):
    path = tmp_path / "figures" / "choices_cpu.csv"
    path.parent.mkdir()
    pd.DataFrame([{"field": "epochs", "value": "4"}, {"field": "sft_epochs", "value": "8"},
                  {"field": "cad_alpha", "value": "0.5"}]).to_csv(path, index=False)
    monkeypatch.setattr(config, "repo_root", lambda: tmp_path)
    p = get_preset("cpu")
    assert (p.epochs, p.sft_epochs, p.cad_alpha) == (4, 8, 0.5)
    assert get_preset("cpu", epochs=1).epochs == 1  # the caller's value wins
    assert get_preset("cpu", tuned=False).epochs == config.PRESETS["cpu"].epochs
    assert get_preset("smoke").epochs == config.PRESETS["smoke"].epochs  # no choices file for smoke


def test_written_choices_record_what_each_methods_tuning_read(tmp_path):
    """Each row's `tuned_under`: the fields its method's stages read (pairs, training, evaluation; CAD: its decoding
    only), dtype as resolved, less the fields the table sets and the test's size (validation draws its own)."""
    rows = _grid_rows({("MIPO", 2e-4): {1: 0.2}, ("SFT", 2e-4): {1: 0.1}})
    path = tmp_path / "choices_smoke.csv"
    tune.write_choices(tune.choose(rows, [0]), get_preset("smoke", dtype="auto", tuned=False), path)
    under = {c.field: c.tuned_under for c in config.read_choices(path)}
    assert under["epochs"] == under["learning_rate"] and under["sft_epochs"] == under["sft_learning_rate"]
    assert {"lora_r", "beta", "temperature", "n_train_prompts", "max_length", "eval_max_new_tokens"} <= set(under["epochs"])
    assert not set(under["epochs"]) & (tune.tuned_fields() | {"n_test_prompts", "seeds", "name"})
    assert "beta" not in under["sft_epochs"] and "lora_r" in under["sft_epochs"]  # SFT has no beta
    assert "lora_r" not in under["cad_alpha"] and {"beta", "eval_no_repeat_ngram"} <= set(under["cad_alpha"])
    assert under["cad_alpha"]["dtype"] == config.resolved_dtype(get_preset("smoke", dtype="auto"))  # not "auto"
    assert under["epochs"]["lora_target_modules"] == list(config.PRESETS["smoke"].lora_target_modules)


def test_committed_cpu_choices_are_valid_fields():
    for field, value in config.load_choices("cpu").items():
        assert field in tune.tuned_fields()
        config.PRESETS["cpu"].with_overrides(**{field: value})


# ----------------------------------------------------------------------------------------------------- truncation
def test_hit_cap_needs_the_whole_budget_and_no_end_token():
    eos = {2}
    assert hit_cap([5, 6, 7], eos, 3) and not hit_cap([5, 6, 2], eos, 3) and not hit_cap([5, 2], eos, 3)


def test_records_judge_cut_off_replies_and_tables_report_the_truncated_share():
    task = get_task("personalization")
    examples = [e for e in task.examples("test") if e.meta["preference"] == "two_sentences"][:2]
    rec = evaluate.records(task, examples, ["Boil water. Pour it.", "Boil water. Pour it."], "MIPO", 0, [False, True])
    assert rec["score"].tolist() == [1.0, 0.0] and rec["truncated"].tolist() == [False, True]
    per = stats.per_seed_metrics(rec)
    assert per["truncated"].iloc[0] == 0.5
    table = stats.results_table(pd.concat([rec, rec.assign(method="prompting")]), n_boot=200)
    assert "truncated" in table.columns and np.allclose(table.loc[table["kind"] == "per_seed", "truncated"], 0.5)


def test_records_without_flags_count_nothing_as_truncated():
    task = get_task("personalization")
    rec = evaluate.records(task, task.examples("test", 10), ["ok."] * 10, "prompting", 0)
    assert not rec["truncated"].any()


def test_generate_replies_flags_replies_that_hit_the_cap(tiny, preset, task):
    model, tok = tiny
    examples = task.examples("test", 4)
    short = preset.with_overrides(eval_max_new_tokens=2, eval_batch_size=4)
    texts, cut = evaluate.generate_replies(model, tok, task, examples, short, progress=False)
    assert len(texts) == len(cut) == 4 and all(isinstance(c, bool) for c in cut)
    # a random tiny model rarely ends within 2 tokens: most replies are cut, and a 2-token reply never exceeds the cap
    assert sum(cut) >= 2
