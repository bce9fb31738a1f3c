"""Each pair's prompt run once per DPO step (`shared_prompt`): the same hidden states at every scored position as the
full forward, the same loss, metrics and LoRA gradients as TRL's own step, and a plain fallback for batches without
the pair layout."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

from mipo_lib import dpo, models, shared_prompt
from mipo_lib.config import get_preset
from mipo_lib.models import build_tiny_model, load_for_preset

pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(prompt_lens, reply_lens, width=14, seed=0):
    """A TRL-layout batch: rows i and n + i share a prompt of prompt_lens[i]; reply_lens per row; right-padded."""
    n = len(prompt_lens)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 200, (2 * n, width), generator=gen)
    attention, completion = torch.zeros_like(ids), torch.zeros_like(ids)
    for row, reply in enumerate(reply_lens):
        prompt = prompt_lens[row % n]
        if row >= n:
            ids[row, :prompt] = ids[row - n, :prompt]
        attention[row, : prompt + reply] = 1
        completion[row, prompt : prompt + reply] = 1
    return ids, attention, completion


def _scored(attention, completion):
    """The positions TRL's LM head scores: the last prompt token and every reply token but the last."""
    scored = completion.bool().clone()
    last_prompt = completion.argmax(1) - 1
    scored[torch.arange(len(scored)), last_prompt] = True
    lengths = attention.sum(1)
    scored[torch.arange(len(scored)), lengths - 1] = False
    return scored


@pytest.mark.parametrize("architecture", models.TINY_ARCHITECTURES)
def test_hidden_states_equal_the_full_forward_where_scored(architecture):
    model = build_tiny_model(architecture).eval()
    ids, attention, completion = _batch([4, 7, 5], [5, 3, 6, 2, 6, 1])
    with torch.no_grad():
        full = model.base_model(input_ids=ids, attention_mask=attention).last_hidden_state
        once = shared_prompt.hidden_states(model.base_model.forward, ids, attention, completion)
    scored = _scored(attention, completion)
    assert once.shape == full.shape
    torch.testing.assert_close(once[scored], full[scored], atol=1e-5, rtol=1e-5)
    assert (once[~attention.bool()] == 0).all()  # padding stays zero


@pytest.mark.parametrize("change", ["different prompts", "odd rows", "empty reply", "left padding"])
def test_batches_without_the_pair_layout_are_left_alone(change):
    ids, attention, completion = _batch([4, 6], [3, 2, 4, 5])
    if change == "different prompts":
        ids[2, 1] += 1
    elif change == "odd rows":
        ids, attention, completion = ids[:3], attention[:3], completion[:3]
    elif change == "empty reply":
        completion[3] = 0
        attention[3, 6:] = 0
    else:
        attention, completion = attention.flip(1), completion.flip(1)
    assert shared_prompt.pair_layout(ids, attention, completion) is None
    assert shared_prompt.hidden_states(lambda **kw: pytest.fail("the body ran"), ids, attention, completion) is None


@pytest.fixture(scope="module")
def preset():
    return get_preset("smoke", n_train_prompts=8, batch_size=4, dtype="float32")


@pytest.fixture(scope="module")
def pairs(smoke_pairs):
    return smoke_pairs


def _trl_step(preset, pairs, workdir, share: bool, monkeypatch):
    """Loss, logged metrics and LoRA gradients of one training-mode DPO step on a LoRA with nonzero B matrices (at
    init B = 0 and the gradients of A vanish), with or without the prompt run once; counts the shared passes."""
    from peft import get_peft_model

    base, tok = load_for_preset(preset)
    torch.manual_seed(1)
    policy = get_peft_model(base, models.lora_config(preset))
    for name, p in policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    trainer = dpo._one_batch_trainer(policy, tok, pairs[:4], preset, workdir)
    monkeypatch.setattr(type(trainer), "share_prompt", share)
    used = []
    real = shared_prompt.hidden_states
    monkeypatch.setattr(shared_prompt, "hidden_states", lambda *a: used.append(1) or real(*a))
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss.item(), metrics, grads, len(used)


def test_dpo_step_equals_trls_own(preset, pairs, tmp_path, monkeypatch):
    loss, metrics, grads, used = _trl_step(preset, pairs, tmp_path / "shared", True, monkeypatch)
    trl_loss, trl_metrics, trl_grads, trl_used = _trl_step(preset, pairs, tmp_path / "trl", False, monkeypatch)
    assert (used, trl_used) == (1, 0)  # the shared path ran once, and only when asked for
    assert loss == pytest.approx(trl_loss, abs=1e-5)
    assert metrics == pytest.approx(trl_metrics, rel=1e-4, abs=1e-5)
    scale = max(g.abs().max().item() for g in trl_grads.values())
    assert scale > 0
    assert max((grads[n] - trl_grads[n]).abs().max().item() for n in trl_grads) < 1e-4 * scale


def test_forward_is_restored_after_each_batch(preset, pairs, tmp_path, monkeypatch):
    _trl_step(preset, pairs, tmp_path / "restore", True, monkeypatch)
    model = build_tiny_model()
    with dpo._prompt_run_once(model, torch.zeros(2, 3, dtype=torch.long)):
        assert "forward" in model.base_model.__dict__
    assert "forward" not in model.base_model.__dict__


def test_cache_key_names_the_dpo_forward():
    """A stored adapter is reused only under the forward that made it (rounding differences grow over a run)."""
    plain, checkpointed = get_preset("smoke"), get_preset("smoke", gradient_checkpointing=True)
    assert dpo.training_extras("dpo", plain)["forward"] == "shared-prompt"
    assert dpo.training_extras("dpo", checkpointed)["forward"] == "trl"
    assert "forward" not in dpo.training_extras("sft", plain)
    assert not dpo.shares_prompt(True, torch.device("cpu"))
    assert dpo.shares_prompt(False, torch.device("cpu"))


def test_gpus_keep_trls_forward(monkeypatch):
    """On a GPU the shared-prompt forward made the paper preset's step about twice as slow (H200,
    benchmarks/results_gpu.md): GPUs run TRL's own forward, and the cache key says so."""
    assert not dpo.shares_prompt(False, torch.device("cuda"))
    monkeypatch.setattr(dpo, "select_device", lambda: torch.device("cuda"))
    assert dpo.training_extras("dpo", get_preset("smoke"))["forward"] == "trl"
