"""Ablation variants at their own best (mipo_lib.experiments.ablation_epochs, issue 29): which variants are tuned and
with which method, how a variant's own epochs reach its preset (and the compute-matched control's), when a committed
choice is used, and `make ablation-choices` end to end on the smoke preset (tiny model), resumable and key-checked."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pandas as pd
import pytest

from mipo_lib.config import get_preset
from mipo_lib.errors import MipoError
from mipo_lib.experiments import ablation_epochs, ablations, tune

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def preset():
    return get_preset("smoke", n_train_prompts=8, seeds=(0,))


@pytest.fixture
def tables(tmp_path, monkeypatch):
    """The committed tables live in a temporary folder."""
    monkeypatch.setattr(ablation_epochs, "choices_path", lambda name: tmp_path / f"ablation_choices_{name}.csv")
    monkeypatch.setattr(ablation_epochs, "tuning_path", lambda name: tmp_path / f"ablation_tuning_{name}.csv")
    return tmp_path


def test_tunable_variants_are_every_variant_but_the_references_cheapest_first(preset):
    tunable = ablations.tunable_variants(preset)
    assert list(tunable) == ["random_context", "random_prompt", "beta=0.05", "beta=0.3", "K=2", "K=2 (InfoNCE)",
                             "K=4", "K=4 (InfoNCE)"]
    assert {label: m for label, (_, m) in tunable.items() if m != "MIPO"} == {
        "K=2 (InfoNCE)": "MIPO-InfoNCE", "K=4 (InfoNCE)": "MIPO-InfoNCE"}
    assert tunable["K=4 (InfoNCE)"][0] == tunable["K=4"][0]  # the same pairs and settings: only the objective differs
    assert tunable["beta=0.3"][0].beta == 0.3 and tunable["random_prompt"][0].negative == "random_prompt"


def test_own_epochs_reach_the_variants_and_the_control_matches_its_k(preset):
    variants = ablations.variant_presets(preset, "K", (1, 2, 4), compute_matched=(2,), infonce=(2,),
                                         epochs={"K=2": 3, "K=2 (InfoNCE)": 5})
    assert {label: p.epochs for label, p in variants.items()} == {
        "K=1": preset.epochs, "K=2": 3, "K=4": preset.epochs, "K=2 (InfoNCE)": 5, "K=1, 2x epochs": 6}
    assert variants["K=1, 2x epochs"].k_negatives == 1
    plain = ablations.variant_presets(preset, "K", (1, 2), compute_matched=(2,))
    assert plain["K=1, 2x epochs"].epochs == 2 * preset.epochs  # without choices: the reference's epochs, as before
    with pytest.raises(MipoError, match="K ablation only"):
        ablations.variant_presets(preset, "beta", (0.1,), infonce=(2,))
    with pytest.raises(MipoError, match="at least 2"):
        ablations.variant_presets(preset, "K", (1,), infonce=(1,))


def test_a_control_that_repeats_a_variant_is_that_variant(preset):
    """K=2 at half the reference's epochs takes K=1's steps: its control would be K=1's adapter again, so it is not a
    second row, and `matched_control` names K=1; the InfoNCE variant's control is never a DPO one."""
    half = ablations.variant_presets(preset.with_overrides(epochs=2), "K", (1, 2), compute_matched=(2,), infonce=(2,),
                                     epochs={"K=2": 1, "K=2 (InfoNCE)": 1})
    assert list(half) == ["K=1", "K=2", "K=2 (InfoNCE)"] and ablations.matched_control(half, 2) == "K=1"
    longer = ablations.variant_presets(preset.with_overrides(epochs=2), "K", (1, 2), compute_matched=(2,))
    assert ablations.matched_control(longer, 2) == "K=1, 2x epochs" and longer["K=1, 2x epochs"].epochs == 4
    with pytest.raises(MipoError, match="compute_matched=\\[2\\]"):
        ablations.matched_control(ablations.variant_presets(preset, "K", (1, 2)), 2)


def test_a_committed_choice_is_used_only_with_the_key_the_settings_give(preset, tables, monkeypatch):
    variants = {"beta=0.3": (preset.with_overrides(beta=0.3), "MIPO")}
    epochs, missing = ablation_epochs.chosen(preset, variants)
    assert epochs == {} and "no row" in missing["beta=0.3"]
    row = {c: "" for c in ablation_epochs.COLUMNS}
    row.update(variant="beta=0.3", method="MIPO", epochs=4, seed=0, grid=" ".join(map(str, ablation_epochs.GRID)),
               key=ablation_epochs.sweep_key(preset.with_overrides(beta=0.3), "MIPO"))
    pd.DataFrame([row]).to_csv(ablation_epochs.choices_path(preset.name), index=False)
    assert ablation_epochs.chosen(preset, variants) == ({"beta=0.3": 4}, {})
    moved = {"beta=0.3": (preset.with_overrides(beta=0.3, learning_rate=1e-3), "MIPO")}
    epochs, missing = ablation_epochs.chosen(preset, moved)
    assert epochs == {} and "other settings" in missing["beta=0.3"]
    other_method = {"beta=0.3": (preset.with_overrides(beta=0.3), "MIPO-InfoNCE")}
    assert "other settings" in ablation_epochs.chosen(preset, other_method)[1]["beta=0.3"]
    monkeypatch.setattr(ablation_epochs, "GRID", (1, 2))  # chosen on another grid: swept again
    assert "other settings" in ablation_epochs.chosen(preset, variants)[1]["beta=0.3"]


def test_ablation_choices_end_to_end_resumable(preset, tables, monkeypatch):
    """Two variants swept on the tiny model: a row each with the rule's choice and its sweep; a second run trains
    nothing (rows kept); a stale row is swept again without touching the other."""
    monkeypatch.setattr(ablation_epochs, "GRID", (1, 2))
    grid = (1, 2)
    variants = {"beta=0.3": (preset.with_overrides(beta=0.3), "MIPO"),
                "K=2 (InfoNCE)": (preset.with_overrides(k_negatives=2), "MIPO-InfoNCE")}
    calls = []
    real = tune.sweep_epochs

    def counted(p, method, seed, g, **kw):
        calls.append((method, p.beta, p.k_negatives, tuple(g)))
        return real(p, method, seed, g, **kw)

    monkeypatch.setattr(tune, "sweep_epochs", counted)
    table = ablation_epochs.run(preset, variants, progress=False)
    assert list(table["variant"]) == ["beta=0.3", "K=2 (InfoNCE)"]
    assert calls == [("MIPO", 0.3, 1, grid), ("MIPO-InfoNCE", preset.beta, 2, grid)]
    assert set(table["epochs"]) <= set(grid) and (table["grid"] == "1 2").all()
    assert (table["validation_rate"] >= table["best_rate"] - table["se"] - 1e-9).all()  # the rule's candidate set
    sweeps = pd.read_csv(ablation_epochs.tuning_path(preset.name))
    assert sorted(sweeps["variant"].unique()) == ["K=2 (InfoNCE)", "beta=0.3"] and set(sweeps["value"]) == set(grid)
    assert ablation_epochs.chosen(preset, variants)[1] == {}

    calls.clear()
    again = ablation_epochs.run(preset, variants, progress=False)
    kept = ["variant", "epochs", "validation_rate", "wall_s", "key"]
    assert calls == [] and again[kept].astype(str).values.tolist() == table[kept].astype(str).values.tolist()

    stale = {**variants, "beta=0.3": (preset.with_overrides(beta=0.3, learning_rate=2 * preset.learning_rate), "MIPO")}
    ablation_epochs.run(preset, stale, progress=False)
    assert [c[0] for c in calls] == ["MIPO"]
    assert list(ablation_epochs.read(preset.name)["variant"]) == ["K=2 (InfoNCE)", "beta=0.3"]


def test_no_variants_is_an_error(preset, tables):
    with pytest.raises(MipoError, match="no ablation variants"):
        ablation_epochs.run(preset, {})


def test_the_docs_block_shows_each_choice_and_names_the_variants_without_one(tables):
    from mipo_lib.workbook import readme

    assert "Not run yet (`make ablation-choices`)" in readme.ablation_choices_block("cpu")
    row = {c: "" for c in ablation_epochs.COLUMNS}
    row.update(variant="K=2", method="MIPO", epochs=4, validation_rate=0.5, best_rate=0.5, se=0.07, grid="1 2 4",
               seed=0, n_validation=50, at_grid_edge=True, wall_s=600.0, key="0123")
    pd.DataFrame([row]).to_csv(ablation_epochs.choices_path("cpu"), index=False)
    assert "| K=2 | MIPO | 4 (the grid's largest) | 50% | 50% ± 7% | — | 10.0 min |" in readme.ablation_choices_block("cpu")
    pd.DataFrame({"variant": ["K=2", "K=2"], "value": [2, 4], "truncated": [0.0, 0.14]}).to_csv(
        ablation_epochs.tuning_path("cpu"), index=False)
    block = readme.ablation_choices_block("cpu")
    assert "| K=2 | MIPO | 4 (the grid's largest) | 50% | 50% ± 7% | 14 | 10.0 min |" in block  # the chosen epochs' cut share
    assert "No choice yet (the reference's epochs): random_context, random_prompt, beta=0.05, beta=0.3, K=2 (InfoNCE)" in block
    # a chosen snapshot over the cut budget is named with its sweep's other shares; one within it is not
    assert "Over the 5% budget for replies cut at the cap in the chosen snapshot: K=2 (14% cut; 0% at 2 epochs)." in block
    pd.DataFrame({"variant": ["K=2", "K=2"], "value": [2, 4], "truncated": [0.5, 0.05]}).to_csv(
        ablation_epochs.tuning_path("cpu"), index=False)
    assert "Over the 5% budget" not in readme.ablation_choices_block("cpu")
