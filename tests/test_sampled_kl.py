"""Token-level sampling (`generate.sample_token_ids`) and the Monte-Carlo KL between two models
(`scoring.sampled_kl`): the sampler draws from the model's own distribution, the scorer gives the log-probability of
exactly the sampled tokens, and a policy equal to the reference has a KL of zero. Models: the smoke preset's tiny
random model on 10 held-out prompts."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch

from mipo_lib.config import get_preset
from mipo_lib.generate import chat_prompt_ids, eos_ids, generate_batches, sample_token_ids
from mipo_lib.models import load_for_preset, lora_config
from mipo_lib.scoring import completion_logprobs, sampled_kl
from mipo_lib.tasks import get_task

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def preset():
    return get_preset("smoke", n_test_prompts=10)


@pytest.fixture(scope="module")
def prompts(preset):
    task = get_task(preset.task)
    return [task.prompt(e) for e in task.examples("test", 10)]


def test_sampled_kl_is_zero_when_the_policy_is_the_base(preset, prompts):
    base, tok = load_for_preset(preset)
    kw = dict(max_new_tokens=6, batch_size=5, seed=3)
    same = sampled_kl(base, base, tok, prompts, **kw)
    assert len(same) == 10 and (same["kl"] == 0).all() and np.isfinite(same["logp_base"]).all()

    # an untrained LoRA adapter has B = 0: the policy is the base model, so the KL is ~0
    from peft import get_peft_model

    policy = get_peft_model(load_for_preset(preset)[0], lora_config(preset)).eval()
    fresh = sampled_kl(policy, base, tok, prompts, **kw)
    assert fresh["response"].tolist() == same["response"].tolist()  # same seed, same distribution: same samples
    assert fresh["kl"].abs().max() < 1e-4


def test_sampled_tokens_are_scored_as_sampled_from_the_unmodified_distribution(preset, prompts):
    """The sampler must draw from the model's own distribution (no top-k/top-p from a generation config), and the
    scorer must give the log-probability of exactly those tokens: then the Monte-Carlo KL is unbiased."""
    model, tok = load_for_preset(preset)
    ids = [chat_prompt_ids(tok, p) for p in prompts[:3]]
    completions = sample_token_ids(model, tok, ids, max_new_tokens=6, batch_size=1, seed=5)
    scored = completion_logprobs(model, ids, completions, tok.pad_token_id, batch_size=3)
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


def test_sampled_ids_end_at_the_first_eos_and_decode_like_generate_batches(preset, prompts):
    """Token ids stop right after the first end-of-sequence token; the texts `generate_batches` yields for the same
    plan and seed are exactly those ids decoded without it (one EOS set and one padding for both)."""
    model, tok = load_for_preset(preset)
    ids = [chat_prompt_ids(tok, p) for p in prompts]
    eos = eos_ids(model, tok)
    sampled = sample_token_ids(model, tok, ids, max_new_tokens=8, batch_size=4, seed=2)
    for c in sampled:
        assert 0 < len(c) <= 8 and all(t not in eos for t in c[:-1])
    texts = [""] * len(ids)
    for batch, out in generate_batches(model, tok, ids, max_new_tokens=8, temperature=1.0, batch_size=4, seed=2,
                                       progress=False):
        for row, text in zip(batch.rows, out):
            texts[row] = text
    decoded = [tok.decode([t for t in c if t not in eos], skip_special_tokens=True).strip() for c in sampled]
    assert texts == decoded
