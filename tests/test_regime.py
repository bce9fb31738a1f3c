"""The paper's regime as rows (`make regime`): the full fine-tuning method entry and its training path on the smoke
model, the choice rule at one epoch, and the committed records read back only while their keys match."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pandas as pd
import pytest
import torch

from mipo_lib import dpo, evaluate, methods
from mipo_lib.analysis import stats
from mipo_lib.config import get_preset
from mipo_lib.errors import MipoError
from mipo_lib.experiments import pipeline, regime, tune
from mipo_lib.models import load_for_preset
from mipo_lib.pairs import build_pairs
from mipo_lib.tasks import get_task

FULL = "MIPO (full fine-tuning)"


# --------------------------------------------------------------------------------------------- the method entry
def test_full_fine_tuning_is_one_opt_in_entry_trained_by_dpo():
    m = methods.get_method(FULL)
    assert m.trainer == methods.Training("dpo", (), "full") and not m.default
    assert FULL not in methods.names() and FULL in methods.names(opt_in=True)
    assert methods.get_method("MIPO").trainer.weights == "lora"


@pytest.mark.parametrize("kwargs, fix", [
    ({"training": "sft", "weights": "full"}, "training='dpo' only"),
    ({"training": "dpo", "weights": "qlora"}, "use one of"),
])
def test_register_method_refuses_weights_it_cannot_train(kwargs, fix):
    with pytest.raises(MipoError, match=fix):
        methods.register_method("X", slug="x_full", colour="#123456", **kwargs)


def test_full_fine_tuning_has_its_own_adapter_key_and_lora_keys_stay_as_they_were():
    preset = get_preset("smoke")
    lora = dpo.adapter_key(methods.get_method("MIPO").trainer, preset, 0)
    full = dpo.adapter_key(methods.get_method(FULL).trainer, preset, 0)
    assert "weights" not in lora.values and full.values["weights"] == "full"  # LoRA caches are still found
    assert lora.digest != full.digest and "full fine-tuning" in full.label


def test_train_hands_full_weights_to_dpo_and_refuses_them_elsewhere(monkeypatch):
    called = []
    monkeypatch.setattr(dpo, "train_dpo", lambda *args, **kwargs: called.append(kwargs))
    dpo.train(methods.Training("dpo", (), "full"), "model", "tok", [], "preset", 0, "dir")
    assert called == [{"trainer_args": {}, "weights": "full"}]
    with pytest.raises(MipoError, match="DPO only"):
        dpo.train(methods.Training("sft", (), "full"), "model", "tok", [], "preset", 0, "dir")


# ------------------------------------------------------------------------------- full fine-tuning on the smoke model
@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """One full fine-tuning of the smoke model (8 pairs, 2 steps) and the model it trained in place."""
    workdir = tmp_path_factory.mktemp("full")
    preset = get_preset("smoke", n_train_prompts=8, batch_size=4, epochs=1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MIPO_RUNS_DIR", str(workdir / "runs"))
        model, tok = load_for_preset(preset)
        pairs = build_pairs(model, tok, get_task("personalization"), preset, seed=0, progress=False)
    model, tok = load_for_preset(preset)
    result = dpo.train_dpo(model, tok, pairs, preset, 0, workdir / "full", progress=False, weights="full")
    return preset, result, model


@pytest.mark.usefixtures("one_thread")
def test_full_fine_tuning_trains_every_parameter_and_saves_the_model(full_run):
    preset, result, _ = full_run
    fresh, _ = load_for_preset(preset)
    n_parameters = len(list(fresh.parameters()))  # tied embeddings count once, as named_parameters lists them
    assert len(result.lora_changed) == n_parameters and all(result.lora_changed.values())
    assert not (result.adapter_dir / "adapter_config.json").exists()
    assert list(result.adapter_dir.glob("*.safetensors"))


@pytest.mark.usefixtures("one_thread")
def test_load_adapted_puts_the_fine_tuned_weights_into_a_fresh_model(full_run):
    preset, result, trained = full_run
    fresh, _ = load_for_preset(preset)
    loaded = dpo.load_adapted(fresh, result.adapter_dir)
    want = {n: p.detach() for n, p in trained.named_parameters()}
    got = dict(loaded.named_parameters())
    assert want.keys() == got.keys()
    assert all(torch.equal(want[n], got[n].detach()) for n in want)
    assert not torch.equal(got["model.embed_tokens.weight"], dict(load_for_preset(preset)[0].named_parameters())[
        "model.embed_tokens.weight"])


def test_load_adapted_refuses_a_folder_without_weights(tmp_path):
    with pytest.raises(MipoError, match="neither a LoRA adapter nor a model's weights"):
        dpo.load_adapted(torch.nn.Linear(1, 1), tmp_path)


# ---------------------------------------------------------------------------------------------------- the choice
def summary(regime_: regime.Regime, rows: list[tuple[int, float, float]], n: int = 50) -> pd.DataFrame:
    """A validation summary of `regime_` with (epochs, learning rate, rate) rows on `n` prompts of one seed."""
    return pd.DataFrame([{"method": regime_.method, "setting": "epochs", "value": float(e), "learning_rate": lr,
                          "rate": r, "n": n, "n_seeds": 1, "regime": regime_.label} for e, lr, r in rows])


def test_one_epoch_choice_is_the_one_standard_error_rule_at_one_epoch():
    # the committed sweep's 1-epoch rates (0.24 at 2e-4, 0.34 at 8e-4) and two larger rates
    rows = [(1, 2e-4, 0.24), (1, 8e-4, 0.34), (1, 2e-3, 0.40), (1, 4e-3, 0.30)]
    chosen = regime.choose(summary(regime.ONE_EPOCH, rows), regime.ONE_EPOCH, [0])
    # best 0.40, se sqrt(.4 * .6 / 50) = 0.069: 0.34 is within it, 0.30 is not; at equal epochs the higher rate wins
    assert (chosen["epochs"], chosen["learning_rate"], chosen["best_rate"], chosen["se"]) == (1, 2e-3, 0.4, 0.0693)
    rows[2] = (1, 2e-3, 0.36)  # now 0.34 and 0.36 are within one se of each other: still the highest rate
    assert regime.choose(summary(regime.ONE_EPOCH, rows), regime.ONE_EPOCH, [0])["learning_rate"] == 2e-3


def test_full_fine_tuning_choice_takes_the_fewest_epochs_within_one_standard_error():
    rows = [(1, 1e-6, 0.20), (2, 1e-6, 0.22), (4, 1e-6, 0.24), (1, 1e-5, 0.30), (2, 1e-5, 0.36), (4, 1e-5, 0.30)]
    chosen = regime.choose(summary(regime.FULL, rows), regime.FULL, [0])
    assert (chosen["epochs"], chosen["learning_rate"]) == (1, 1e-5)  # 0.30 >= 0.36 - 0.068
    assert chosen["method"] == FULL and chosen["epoch_grid"] == " ".join(map(str, regime.FULL.epoch_grid))


def test_a_regime_without_sweep_rows_is_refused():
    with pytest.raises(MipoError, match="make regime"):
        regime.choose(summary(regime.FULL, [(1, 1e-6, 0.2)]), regime.ONE_EPOCH, [0])


# ------------------------------------------------------------------------- reusing make tune's committed sweep
@pytest.fixture
def committed_tune(monkeypatch, tmp_path):
    """A committed `make tune` sweep and choices for the smoke preset (MIPO at 1 and 2 epochs, rates 2e-4 and 8e-4,
    seed 0) in tmp_path, and `tune.sweep_epochs` replaced by a spy returning one seed's fake records."""
    preset = get_preset("smoke")
    sweep_ = pd.DataFrame([{"method": "MIPO", "setting": "epochs", "value": float(e), "learning_rate": lr,
                            "rate": 0.3, "truncated": 0.0, "mean_words": 20.0, "n": 50, "n_seeds": 1, "per_seed": "0.300"}
                           for e in (1, 2) for lr in (2e-4, 8e-4)])
    sweep_.to_csv(tmp_path / "tuning.csv", index=False)
    choices = pd.DataFrame([{"field": "epochs", "value": "2", "method": "MIPO", "validation_rate": 0.3, "grid": "1 2",
                             "seeds": "0", "n_validation": 50, "best_rate": 0.3, "se": 0.06, "rule": tune.RULE}])
    tune.write_choices(choices, preset, tmp_path / "choices.csv")
    monkeypatch.setattr(tune, "tuning_path", lambda name: tmp_path / "tuning.csv")
    monkeypatch.setattr(regime.config, "choices_path", lambda name: tmp_path / "choices.csv")
    calls = []

    def sweep_epochs(preset, method, seed, grid, progress=True, learning_rate=None):
        calls.append((method, seed, tuple(grid), learning_rate))
        return pd.DataFrame({"method": method, "setting": "epochs", "value": 1.0, "learning_rate": learning_rate,
                             "seed": seed, "score": [1.0, 0.0], "truncated": False, "n_words": 10})

    monkeypatch.setattr(tune, "sweep_epochs", sweep_epochs)
    return calls


def test_one_epoch_sweep_trains_only_the_rates_make_tune_did_not_try(committed_tune):
    summary_ = regime.sweep(get_preset("smoke"), regime.ONE_EPOCH, [0], progress=False)
    assert committed_tune == [("MIPO", 0, (1,), 2e-3), ("MIPO", 0, (1,), 4e-3)]
    assert summary_["learning_rate"].tolist() == [2e-4, 8e-4, 2e-3, 4e-3] and set(summary_["value"]) == {1.0}
    assert summary_["rate"].tolist() == [0.3, 0.3, 0.5, 0.5] and set(summary_["regime"]) == {regime.ONE_EPOCH.label}


@pytest.mark.parametrize("change, seeds", [({"beta": 0.3}, [0]), ({}, [1])])
def test_make_tunes_rows_are_not_reused_under_other_settings_or_seeds(committed_tune, change, seeds):
    regime.sweep(get_preset("smoke", **change), regime.ONE_EPOCH, seeds, progress=False)
    assert [c[3] for c in committed_tune] == list(regime.ONE_EPOCH.lr_grid)


def test_full_fine_tuning_reuses_nothing_of_make_tune(committed_tune):
    regime.sweep(get_preset("smoke"), regime.FULL, [0], progress=False)
    assert committed_tune == [(FULL, 0, regime.FULL.epoch_grid, lr) for lr in regime.FULL.lr_grid]


@pytest.fixture
def committed_regime_sweep(committed_tune, monkeypatch, tmp_path):
    """Besides `committed_tune`: a committed regime sweep of full fine-tuning at 1 and 2 epochs for every rate of its
    grid, and its choice (2 epochs at 1e-5) made on seed 0 under the smoke preset's settings, in tmp_path."""
    preset = get_preset("smoke")
    rows = [{"regime": regime.FULL.label, "method": FULL, "setting": "epochs", "value": float(e), "learning_rate": lr,
             "rate": 0.4, "truncated": 0.0, "mean_words": 20.0, "n": 50, "n_seeds": 1, "per_seed": "0.400"}
            for e in (1, 2) for lr in regime.FULL.lr_grid]
    pd.DataFrame(rows).to_csv(tmp_path / "regime_tuning.csv", index=False)
    monkeypatch.setattr(regime, "tuning_path", lambda name: tmp_path / "regime_tuning.csv")
    monkeypatch.setattr(regime, "choices_path", lambda name: tmp_path / "regime_choices.csv")
    choice = {"regime": regime.FULL.label, "method": FULL, "epochs": 2, "learning_rate": 1e-5, "validation_rate": 0.4,
              "best_rate": 0.4, "se": 0.07, "n_validation": 50, "seeds": "0", "epoch_grid": "1 2",
              "lr_grid": "1e-06 1e-05 0.0001", "rule": tune.RULE}
    regime._write_choices(preset, pd.DataFrame(rows), [choice])
    return committed_tune


def test_a_grown_epoch_grid_trains_every_rate_again_over_the_whole_grid(committed_regime_sweep):
    """The committed sweep lacks the grid's 4 epochs for every rate, so each rate is trained again (snapshots at 1, 2
    and 4 epochs): a rate is read from a committed sweep only when every epoch of the grid is there."""
    summary_ = regime.sweep(get_preset("smoke"), regime.FULL, [0], progress=False)
    assert committed_regime_sweep == [(FULL, 0, regime.FULL.epoch_grid, lr) for lr in regime.FULL.lr_grid]
    assert set(summary_["rate"]) == {0.5}  # the new training's rows, none of the committed 0.4


def test_a_complete_committed_regime_sweep_is_read_not_trained(committed_regime_sweep, tmp_path):
    sweep_ = pd.read_csv(tmp_path / "regime_tuning.csv")
    four = sweep_[sweep_["value"] == 2.0].assign(value=4.0)
    pd.concat([sweep_, four]).to_csv(tmp_path / "regime_tuning.csv", index=False)
    summary_ = regime.sweep(get_preset("smoke"), regime.FULL, [0], progress=False)
    assert committed_regime_sweep == [] and len(summary_) == 9 and set(summary_["rate"]) == {0.4}
    regime.sweep(get_preset("smoke", beta=0.3), regime.FULL, [0], progress=False)  # other settings: trained again
    assert [c[3] for c in committed_regime_sweep] == list(regime.FULL.lr_grid)


def test_choose_again_writes_the_choices_and_says_whether_the_test_records_still_hold(fake_run, monkeypatch):
    regime.run("smoke", seeds=[0, 1], progress=False)
    choices, stale, _ = regime.choose_again("smoke", seeds=[0, 1], progress=False)
    assert stale == "" and [c["epochs"] for c in regime.read_choices("smoke")] == [1, max(regime.FULL.epoch_grid)]

    def lower_best(preset, regime_, seeds, progress=True):  # the best full fine-tuning moves to 1 epoch
        return summary(regime_, [(e, lr, 0.9 if (e, lr) == (1, 1e-6) else 0.1)
                                 for e in regime_.epoch_grid for lr in regime_.lr_grid])

    monkeypatch.setattr(regime, "sweep", lower_best)
    choices, stale, _ = regime.choose_again("smoke", seeds=[0, 1], progress=False)
    assert (choices[1]["epochs"], choices[1]["learning_rate"]) == (1, 1e-6) and "made with other settings" in stale
    assert regime.committed(get_preset("smoke"), [0, 1])[0] is None


# ------------------------------------------------------------------------------------ the committed records
@pytest.fixture
def fake_run(monkeypatch, tmp_path):
    """`regime.run` on the smoke preset with its sweeps, trainings and evaluations replaced by cheap fakes (MIPO at
    1 epoch better than prompting on every prompt), its tables in tmp_path."""
    def evaluate_all(preset, seeds, methods=None, progress=True):
        task = get_task(preset.task)
        examples = task.examples("test", preset.n_test_prompts)[:6]
        replies = ["hi"] * len(examples)
        return pd.concat([evaluate.records(task, examples, replies, m, s, [False] * len(examples))
                          .assign(score=float(m != "prompting")) for s in seeds for m in methods], ignore_index=True)

    def sweep(preset, regime_, seeds, progress=True):
        return summary(regime_, [(e, lr, 0.1 * i) for i, (e, lr) in
                                 enumerate((e, lr) for e in regime_.epoch_grid for lr in regime_.lr_grid)])

    class Trained:
        seconds = 1.0

    monkeypatch.setattr(pipeline, "evaluate_all", evaluate_all)
    monkeypatch.setattr(pipeline, "train_for_seed", lambda *args, **kwargs: Trained())
    monkeypatch.setattr(evaluate, "judged", lambda frame, task, examples: frame)  # the fake scores stand
    monkeypatch.setattr(regime, "sweep", sweep)
    for name in ("records_path", "tuning_path", "choices_path", "results_path"):
        monkeypatch.setattr(regime, name, lambda preset_name, name=name: tmp_path / f"{name}_{preset_name}.csv")


def test_run_writes_tables_that_read_back_while_the_settings_match(fake_run):
    records, table, _ = regime.run("smoke", seeds=[0, 1], progress=False)
    choices = regime.read_choices("smoke")
    # each regime's largest learning rate at its largest epochs scored best in the fake sweep
    assert [(c["epochs"], c["learning_rate"]) for c in choices] == [(1, 4e-3), (max(regime.FULL.epoch_grid), 1e-4)]
    frame, why = regime.committed(get_preset("smoke"), [0, 1])
    assert why == "" and len(frame) == len(records) == 3 * 2 * 6
    diffs = table[table["kind"] == "paired_difference"]
    assert set(diffs["method"]) == {r.label for r in regime.REGIMES} and set(diffs["baseline"]) == {"prompting"}
    assert set(diffs["family"]) == {regime.FAMILY} != {stats.MAIN_FAMILY}  # their own Holm family
    assert set(diffs["ci_design"]) == {"seed-aware", "seed-aware cluster(group)"}
    written = pd.read_csv(regime.results_path("smoke"))
    assert len(written) == len(table)


@pytest.mark.parametrize("change, seeds, reason", [
    ({"beta": 0.3}, [0, 1], "made with other settings"),
    ({}, [2, 3], "holds seeds [0, 1], none of this run's"),
])
def test_records_of_other_settings_are_not_read(fake_run, change, seeds, reason):
    regime.run("smoke", seeds=[0, 1], progress=False)
    frame, why = regime.committed(get_preset("smoke", **change), seeds)
    assert frame is None and reason in why


def test_a_run_with_more_seeds_reads_the_seeds_the_table_holds(fake_run):
    regime.run("smoke", seeds=[0, 1], progress=False)
    frame, why = regime.committed(get_preset("smoke"), [0, 1, 2, 3, 4])
    assert why == "" and sorted(frame["seed"].unique()) == [0, 1]


def test_a_row_missing_for_a_seed_the_table_holds_is_not_read(fake_run):
    regime.run("smoke", seeds=[0, 1], progress=False)
    path = regime.records_path("smoke")
    table = pd.read_csv(path)
    table[~((table["method"] == "MIPO, 1 epoch") & (table["seed"] == 1))].to_csv(path, index=False)
    frame, why = regime.committed(get_preset("smoke"), [0, 1])
    assert frame is None and "has no MIPO, 1 epoch records for seed 1" in why


def test_without_committed_tables_it_says_which_target_writes_them(fake_run):
    frame, why = regime.committed(get_preset("smoke"), [0])
    assert frame is None and "make regime" in why


def test_the_regimes_train_with_mipos_fields():
    for r in regime.REGIMES:
        assert tune.trained_fields(r.method) == ("epochs", "learning_rate")
    preset = regime.regime_preset(get_preset("smoke"), {"epochs": 1, "learning_rate": 2e-3})
    assert (preset.epochs, preset.learning_rate) == (1, 2e-3)
    assert tune.trained_fields("SFT") == ("sft_epochs", "sft_learning_rate")


def test_a_reference_run_records_its_test_evaluation_in_the_ledger(fake_run, monkeypatch):
    rows = []
    monkeypatch.setattr(regime.ledger, "record", lambda *args, **kwargs: rows.append(args))
    regime.run("smoke", seeds=[0], progress=False)
    assert rows == []  # smoke is no reference preset: its tables are no evaluation of the reference test split
    monkeypatch.setattr(regime, "REFERENCE_PRESETS", ("smoke",))
    regime.run("smoke", seeds=[0], progress=False)
    (table, commit, protocol, result), = rows
    assert (table, commit) == ("results_path_smoke.csv", regime.ledger.PENDING)
    assert "MIPO, 1 epoch: 1 epoch(s) at learning rate 0.004" in protocol and regime.FAMILY in protocol
    assert "MIPO, full fine-tuning" in result and "vs prompting" in result


def test_adding_seeds_keeps_the_committed_ones_sweeps_nothing_and_records_the_evaluation(fake_run, monkeypatch):
    regime.run("smoke", seeds=[0, 1], progress=False)
    path = regime.records_path("smoke")
    before, choices_before = pd.read_csv(path), regime.choices_path("smoke").read_text()
    monkeypatch.setattr(regime, "sweep", lambda *args, **kwargs: pytest.fail("adding seeds swept again"))
    evaluated = []
    real = pipeline.evaluate_all
    monkeypatch.setattr(pipeline, "evaluate_all", lambda preset, seeds, **kw: evaluated.append(list(seeds)) or
                        real(preset, seeds, **kw))
    rows = []
    monkeypatch.setattr(regime, "REFERENCE_PRESETS", ("smoke",))
    monkeypatch.setattr(regime.ledger, "record", lambda *args, **kwargs: rows.append(args))
    records, table, costs = regime.add_seeds("smoke", [1, 2], progress=False)
    assert evaluated == [[2]] * 3  # prompting and both regimes, on the new seed only
    after = pd.read_csv(path)
    assert sorted(after["seed"].unique()) == [0, 1, 2] and len(after) == len(before) * 3 // 2
    pd.testing.assert_frame_equal(after[after["seed"] < 2].reset_index(drop=True), before)  # kept as they were
    assert regime.choices_path("smoke").read_text() == choices_before  # nothing chosen again
    assert set(table.loc[table["kind"] == "paired_difference", "n_seeds"]) == {3}
    assert len(rows) == 1 and "seeds 2 added to the committed 0 1" in rows[0][2]
    assert [c["stage"] for c in costs] == [f"{r.label}: train and test (1 seeds)" for r in regime.REGIMES]
    with pytest.raises(MipoError, match="already holds seeds"):
        regime.add_seeds("smoke", [0, 2], progress=False)
    with pytest.raises(MipoError, match="made with other settings"):
        regime.add_seeds("smoke", [3], {"beta": 0.3}, progress=False)
