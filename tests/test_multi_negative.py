"""The multi-negative objective (method `MIPO-InfoNCE`, `dpo.train_infonce`): -log softmax_0(beta [d+, d-_1 ... d-_K])
over a prompt's K pairs, on the smoke preset's tiny model (CPU, fp32).

It must be DPO's sigmoid loss at K = 1 (value and LoRA gradients, same batch, same model), a hand-computed number on
fixed log-ratios, log(K + 1) before training, lower after one epoch, and it must never see a prompt's K negatives split
across batches."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import math

import pytest
import torch

from mipo_lib import dpo, methods
from mipo_lib.config import get_preset
from mipo_lib.errors import MipoError
from mipo_lib.experiments import pipeline
from mipo_lib.models import load_for_preset, lora_config
from mipo_lib.pairs import build_pairs
from mipo_lib.tasks import get_task

pytestmark = pytest.mark.usefixtures("one_thread")


def _preset(k: int):
    # 8 prompts x K pairs, 4 pairs per batch, one epoch
    return get_preset("smoke", n_train_prompts=8, batch_size=4, epochs=1, k_negatives=k)


@pytest.fixture(scope="module")
def pairs_of(tmp_path_factory):
    """The seed-0 pairs of the smoke preset with K negatives per prompt, built once per K."""
    built = {}

    def pairs(k: int) -> list[dict]:
        if k not in built:
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("MIPO_RUNS_DIR", str(tmp_path_factory.mktemp(f"pairs-k{k}")))
                model, tok = load_for_preset(_preset(k))
                built[k] = build_pairs(model, tok, get_task("personalization"), _preset(k), seed=0, progress=False)
        return built[k]

    return pairs


def _policy(preset):
    """The tiny model with a LoRA adapter drawn at random (A and B, seeded: the same adapter on every call), with B
    non-zero so that policy != reference and the loss and its gradients are not at their trivial starting values."""
    from peft import get_peft_model

    model, tok = load_for_preset(preset)
    model = get_peft_model(model, lora_config(preset))
    generator = torch.Generator().manual_seed(0)
    for name, p in sorted(model.named_parameters()):
        if "lora_" in name:
            p.data = torch.randn(p.shape, generator=generator) * 0.05
    return model, tok


# ------------------------------------------------------------------------------------------------------ the loss
def test_a_fixed_batch_of_log_ratios_gives_the_hand_computed_value():
    """Two prompts, K = 2, beta = 0.5: logits beta [d+, d-_1, d-_2] = [0.5, 0, 1] and [-0.25, 0.25, -0.5]."""
    chosen = torch.tensor([1.0, 1.0, -0.5, -0.5])  # a prompt's K pairs share y+: its log-ratio twice
    rejected = torch.tensor([0.0, 2.0, 0.5, -1.0])
    first = math.log(math.exp(0.5) + math.exp(0.0) + math.exp(1.0)) - 0.5
    second = math.log(math.exp(-0.25) + math.exp(0.25) + math.exp(-0.5)) + 0.25
    loss = dpo.infonce_loss(chosen, rejected, beta=0.5, k=2)
    assert loss.item() == pytest.approx((first + second) / 2, abs=1e-6)
    pairwise = dpo.infonce_loss(chosen, rejected, beta=0.5, k=1)  # the same numbers read as 4 prompts of K = 1
    assert pairwise.item() != pytest.approx(loss.item(), abs=1e-3)  # the grouping changes the value


def test_at_k_1_loss_and_lora_gradients_equal_trls_sigmoid_dpo(pairs_of, tmp_path):
    preset, pairs = _preset(1), pairs_of(1)
    dpo_loss, dpo_grads = dpo.loss_and_gradients(dpo._one_batch_trainer(*_policy(preset), pairs, preset, tmp_path / "dpo"))
    nce_loss, nce_grads = dpo.loss_and_gradients(
        dpo._one_batch_trainer(*_policy(preset), pairs, preset, tmp_path / "infonce", negatives=1))
    assert abs(dpo_loss - math.log(2)) > 1e-3  # the random adapter moved the policy: not the trivial point
    assert nce_loss == pytest.approx(dpo_loss, abs=1e-5)
    lora = [n for n in dpo_grads if "lora_" in n]
    assert len(lora) == 2 * 4 * 2 and set(nce_grads) == set(dpo_grads)  # layers x modules x (A, B)
    assert any(dpo_grads[n].abs().max() > 1e-4 for n in lora)
    for name in lora:
        torch.testing.assert_close(nce_grads[name], dpo_grads[name], atol=1e-5, rtol=0.0)


@pytest.mark.parametrize("k", [2, 3])
def test_with_policy_equal_to_reference_the_loss_is_log_k_plus_1(pairs_of, tmp_path, k):
    model, tok = load_for_preset(_preset(k))  # no adapter: the policy is the reference the pairs were scored with
    trainer = dpo._one_batch_trainer(model, tok, pairs_of(k), _preset(k), tmp_path, negatives=k)
    sanity = dpo.initial_sanity(trainer, pairs_of(k), True, group=k)
    assert sanity["loss"] == pytest.approx(math.log(k + 1), abs=1e-4)
    assert abs(sanity["margin"]) < 1e-4


# -------------------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def trained(pairs_of, tmp_path_factory):
    preset = _preset(2)
    model, tok = load_for_preset(preset)
    return dpo.train_infonce(model, tok, pairs_of(2), preset, 0, tmp_path_factory.mktemp("infonce") / "adapter",
                             progress=False)


def test_one_epoch_starts_at_log_3_and_lowers_the_loss(trained, pairs_of, tmp_path):
    preset, pairs = _preset(2), pairs_of(2)
    assert trained.sanity["loss"] == pytest.approx(math.log(3), abs=1e-4) and abs(trained.sanity["margin"]) < 1e-4
    assert len(trained.log) == 16 // 4 and all(trained.lora_changed.values())
    assert {"rewards/margins", "rewards/accuracies"} <= set(trained.log.columns)
    base, tok = load_for_preset(preset)
    policy = dpo.load_adapted(base, trained.adapter_dir)
    after = dpo.initial_sanity(dpo._one_batch_trainer(policy, tok, pairs, preset, tmp_path, negatives=2), pairs, True,
                               n=len(pairs), group=2)
    assert after["loss"] < math.log(3) - 1e-3 and after["margin"] > 0


def test_a_finished_run_is_reused(trained, pairs_of):
    model, tok = load_for_preset(_preset(2))
    again = dpo.train_infonce(model, tok, pairs_of(2), _preset(2), 0, trained.adapter_dir, progress=False)
    assert again.reused and again.sanity == pytest.approx(trained.sanity)


# -------------------------------------------------------------------------------------------------- grouping
def test_the_sampler_shuffles_whole_prompts():
    sampler = dpo.GroupSampler(12, 3)
    torch.manual_seed(0)
    first, second = list(sampler), list(sampler)
    for order in (first, second):
        assert sorted(order) == list(range(12))
        groups = [order[i : i + 3] for i in range(0, 12, 3)]
        assert all(g == list(range(g[0], g[0] + 3)) and g[0] % 3 == 0 for g in groups)  # whole prompts, in order
    assert first != second  # a new order every epoch
    with pytest.raises(MipoError, match="whole groups of K=3"):
        dpo.GroupSampler(10, 3)


def _trainer(pairs, preset, tmp_path, k):
    DPOConfig, _, _, _ = dpo._trainer_classes()
    model, tok = load_for_preset(preset)
    args = DPOConfig(**{**dpo.dpo_config_kwargs(preset, 0, tmp_path, model, progress=False), **dpo.INFONCE_CONFIG})
    return dpo._infonce_trainer_class(k)(model=model, args=args, train_dataset=dpo.dpo_dataset(pairs),
                                         processing_class=tok, peft_config=lora_config(preset))


def test_every_training_batch_holds_whole_prompts_and_a_split_one_is_refused(pairs_of, tmp_path):
    preset, pairs = _preset(2), pairs_of(2)
    trainer = _trainer(pairs, preset, tmp_path, 2)
    batches = [trainer._prepare_inputs(b) for b in trainer.get_train_dataloader()]
    assert len(batches) == 4
    for batch in batches:
        chosen_ids, _ = batch["input_ids"].chunk(2, dim=0)
        dpo.check_batch_groups(chosen_ids, 2)
        assert torch.isfinite(trainer.compute_loss(trainer.model, batch))
    mixed = _pairs(batches[0], [1, 2, 0, 3])  # rows 1 and 2 are two prompts' pairs: each group now mixes two prompts
    with pytest.raises(MipoError, match="mixes the pairs of different prompts"):
        trainer.compute_loss(trainer.model, mixed)
    with pytest.raises(MipoError, match="splits a prompt's K=2 negatives"):
        trainer.compute_loss(trainer.model, _pairs(batches[0], [0, 1, 2]))


def _pairs(batch: dict, rows: list[int]) -> dict:
    """The pairs `rows` of a collated batch: per-pair columns by row, [chosen; rejected] columns in both halves."""
    n = batch["ref_chosen_logps"].shape[0]
    both = rows + [n + i for i in rows]
    return {key: value[both] if value.shape[0] == 2 * n else value[rows] for key, value in batch.items()}


def test_pairs_and_batch_sizes_that_would_split_a_prompt_are_refused(pairs_of, tmp_path):
    pairs = pairs_of(2)
    model, tok = load_for_preset(_preset(2))
    with pytest.raises(MipoError, match="batch_size 3 is not a multiple of k_negatives; set batch_size=2"):
        dpo.train_infonce(model, tok, pairs, _preset(2).with_overrides(batch_size=3), 0, tmp_path / "a", progress=False)
    with pytest.raises(MipoError, match="needs 3 pairs per prompt"):
        dpo.train_infonce(model, tok, pairs, _preset(3), 0, tmp_path / "b", progress=False)
    shuffled = pairs[1:] + pairs[:1]
    with pytest.raises(MipoError, match="are not the 2 pairs of one prompt"):
        dpo.train_infonce(model, tok, shuffled, _preset(2), 0, tmp_path / "c", progress=False)
    with pytest.raises(MipoError, match="InfoNCE has its own loss"):
        dpo.train_infonce(model, tok, pairs, _preset(2), 0, tmp_path / "d", progress=False,
                          trainer_args={"loss_type": "ipo"})


# -------------------------------------------------------------------------------------------------- the method
def test_infonce_is_a_registered_opt_in_method_with_its_own_adapter():
    m = methods.get_method("MIPO-InfoNCE")
    assert m.trainer == methods.Training("infonce") and not m.default
    assert "MIPO-InfoNCE" not in methods.names() and "MIPO-InfoNCE" in methods.names(opt_in=True)
    assert m not in methods.trained() and m in methods.trained(opt_in=True)
    preset = _preset(2)
    assert pipeline.adapter_dir(preset, "MIPO-InfoNCE", 0).name.startswith("infonce-")
    assert pipeline.training_key(preset, "MIPO-InfoNCE", 0).digest != pipeline.training_key(preset, "MIPO", 0).digest
