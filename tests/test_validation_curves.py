"""DPO diagnostics: the shared validation pairs (validation prompts only, the same for every seed), their evaluation
during training (in the log, and changing nothing the run trains), and the figure drawn from it."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from mipo_lib import dpo
from mipo_lib.config import get_preset
from mipo_lib.experiments import pipeline
from mipo_lib.models import load_for_preset
from mipo_lib.pairs import N_VALIDATION_PROMPTS, VALIDATION_SEED, build_pairs, pairs_key
from mipo_lib.tasks import get_task

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def preset():
    # 16 pairs, 4 per step, 2 epochs: 8 optimizer steps, the validation pairs evaluated every 4 steps
    return get_preset("smoke", n_train_prompts=16, batch_size=4, epochs=2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("validation-runs")


@pytest.fixture(scope="module")
def validation(preset, runs):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MIPO_RUNS_DIR", str(runs))
        return pipeline.validation_pairs(preset, progress=False)


def _with_and_without(preset, pairs, validation, folder, trainer_args=None):
    """The same DPO run twice from fresh models: without the validation pairs, then with them."""
    results = {}
    for name, eval_pairs in (("without", None), ("with", validation)):
        model, tok = load_for_preset(preset)
        results[name] = dpo.train_dpo(model, tok, pairs, preset, 0, folder / name, progress=False,
                                      eval_pairs=eval_pairs, trainer_args=trainer_args)
    return results


@pytest.fixture(scope="module")
def runs_with_and_without(preset, smoke_pairs, validation, tmp_path_factory):
    return _with_and_without(preset, smoke_pairs, validation, tmp_path_factory.mktemp("adapters"))


def _lora_tensors_differing(runs):
    without, with_eval = (load_file(runs[k].adapter_dir / "adapter_model.safetensors") for k in ("without", "with"))
    assert without.keys() == with_eval.keys() and without
    return [name for name in without if not torch.equal(without[name], with_eval[name])]


def test_validation_pairs_come_from_the_validation_prompts_only(preset, validation):
    task = get_task(preset.task)
    ids = {p["example_id"] for p in validation}
    validation_ids = {e.id for e in task.examples("validation")}
    other_ids = {e.id for split in ("train", "test") for e in task.examples(split)}
    assert ids <= validation_ids and not ids & other_ids
    assert len(ids) == min(N_VALIDATION_PROMPTS, len(validation_ids))
    assert len(validation) == len(ids) * preset.k_negatives


def test_validation_pairs_are_the_same_for_every_seed(preset, validation, tmp_path, monkeypatch):
    monkeypatch.setenv("MIPO_RUNS_DIR", str(tmp_path))
    model, tok = load_for_preset(preset)
    built_for_seed_3 = build_pairs(model, tok, get_task(preset.task), preset, 3, split="validation", progress=False)
    assert built_for_seed_3 == validation
    assert pairs_key(preset, 3, split="validation") == pairs_key(preset, VALIDATION_SEED, split="validation")
    assert pairs_key(preset, 0, split="validation") != pairs_key(preset, 0)  # not the training pairs' key


def test_validation_pairs_are_cached(preset, validation, runs, monkeypatch):
    monkeypatch.setenv("MIPO_RUNS_DIR", str(runs))
    monkeypatch.setattr(pipeline, "load_for_preset", lambda *a, **k: pytest.fail("cached pairs need no model"))
    assert pipeline.validation_pairs(preset, progress=False) == validation


def test_evaluating_validation_pairs_changes_no_lora_weight(runs_with_and_without):
    different = _lora_tensors_differing(runs_with_and_without)
    assert not different, different
    losses = [runs_with_and_without[k].log["loss"].tolist() for k in ("without", "with")]
    assert losses[0] == losses[1]


def test_evaluating_changes_no_lora_weight_of_a_run_with_dropout(preset, smoke_pairs, validation, tmp_path):
    """With dropout the masks come from torch's generator, which an evaluation draws from: without `dpo._rng_untouched`
    every LoRA tensor differs here."""
    runs = _with_and_without(preset.with_overrides(lora_dropout=0.2), smoke_pairs, validation, tmp_path,
                             trainer_args={"disable_dropout": False})
    different = _lora_tensors_differing(runs)
    assert not different, different


def test_validation_metrics_are_in_the_training_log(runs_with_and_without, preset):
    log = runs_with_and_without["with"].log
    for column in ("eval_loss", "eval_rewards/margins", "eval_rewards/accuracies"):
        assert column in log, column
    measured = log.dropna(subset=["eval_loss"])
    assert measured["step"].tolist() == [4, 8]  # 4 steps an epoch, 2 epochs: evaluated once an epoch
    assert measured["eval_loss"].gt(0).all() and measured["eval_rewards/accuracies"].between(0, 1).all()
    assert len(log) == len(runs_with_and_without["without"].log)  # one row per step still
    assert "eval_loss" not in runs_with_and_without["without"].log


def test_an_adapter_trained_without_validation_pairs_is_reused_with_them(runs_with_and_without, preset, smoke_pairs,
                                                                          validation, monkeypatch):
    monkeypatch.setattr(dpo, "_trainer_classes", lambda: pytest.fail("a finished run must not build a trainer"))
    model, tok = load_for_preset(preset)
    folder = runs_with_and_without["without"].adapter_dir
    again = dpo.train_dpo(model, tok, smoke_pairs, preset, 0, folder, progress=False, eval_pairs=validation)
    assert again.reused


def test_eval_schedule_is_twice_an_epoch_for_one_epoch_runs_and_once_otherwise():
    # the cpu preset's 60 pairs in steps of 4: 15 steps an epoch
    assert dpo.evaluation_args(get_preset("cpu", epochs=1), 60)["eval_steps"] == 8
    for epochs in (2, 4, 8):
        assert dpo.evaluation_args(get_preset("cpu", epochs=epochs), 60)["eval_steps"] == 15
    assert dpo.evaluation_args(get_preset("smoke", batch_size=4, epochs=1), 16)["eval_steps"] == 2
