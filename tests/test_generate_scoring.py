"""Batched generation (order, determinism, seeds, resumable batches) and sequence log-probs (TRL's tokenization,
batched == one at a time), on the tiny random model."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mipo_lib import generate as gen
from mipo_lib import scoring
from mipo_lib.config import TINY_MODEL
from mipo_lib.models import load_model_and_tokenizer


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    return load_model_and_tokenizer(TINY_MODEL, dtype="float32")


def _prompts(n: int) -> list[list[dict[str, str]]]:
    """Chat prompts of pairwise different lengths (so the length sort does not depend on the input order)."""
    return [[{"role": "user", "content": "tell me " + "x" * (3 * i + 1) + f" #{i}"}] for i in range(n)]


# ---------------------------------------------------------------------------------------------------- plan_batches
def test_plan_batches_sorts_by_length_and_covers_each_index_once():
    rng = np.random.default_rng(0)
    ids = [list(range(int(n))) for n in rng.integers(1, 40, size=23)]
    plan = gen.plan_batches(ids, batch_size=5, seed=7)
    rows = [r for b in plan for r in b.rows]
    assert sorted(rows) == list(range(23))
    lengths = [len(ids[r]) for r in rows]
    assert lengths == sorted(lengths, reverse=True)
    assert [len(b.rows) for b in plan] == [5, 5, 5, 5, 3]
    assert [b.index for b in plan] == list(range(5))
    assert len({b.seed for b in plan}) == len(plan)
    assert gen.plan_batches(ids, 5, 7) == plan  # deterministic
    assert [b.seed for b in gen.plan_batches(ids, 5, 8)] != [b.seed for b in plan]


def test_plan_batches_ties_keep_input_order():
    ids = [[1, 2], [1], [3, 4], [5]]
    plan = gen.plan_batches(ids, batch_size=10, seed=0)
    assert plan[0].rows == [0, 2, 1, 3]


def test_plan_batches_empty():
    assert gen.plan_batches([], batch_size=4, seed=0) == []


# -------------------------------------------------------------------------------------------------------- generate
# The tiny model has random, tied embeddings, so greedy decoding copies the last prompt token: after a chat prompt
# (which ends in "assistant\n") it only emits newlines, which decode to "". Order tests therefore sample (every
# batch has its own seed), and greedy tests use raw prompts whose last characters differ ("...k" -> "kkkk").
def _raw_ids(tok, n: int) -> list[list[int]]:
    return [tok.encode("say " + "ab" * i + "klmnopqrst"[i], add_special_tokens=False) for i in range(n)]


def _texts(model, tok, ids, **kw) -> list[str]:
    out = [None] * len(ids)
    for batch, texts in gen.generate_batches(model, tok, ids, progress=False, **kw):
        for row, text in zip(batch.rows, texts):
            assert out[row] is None
            out[row] = text
    assert None not in out
    return out


def test_generate_returns_responses_in_prompt_order(tiny):
    model, tok = tiny
    prompts = _prompts(7)
    kw = dict(max_new_tokens=6, temperature=1.0, batch_size=3, seed=11, progress=False)
    forward = gen.generate(model, tok, prompts, **kw)
    perm = [4, 0, 6, 2, 5, 1, 3]
    permuted = gen.generate(model, tok, [prompts[i] for i in perm], **kw)
    assert len(forward) == 7 and all(isinstance(t, str) for t in forward)
    assert len(set(forward)) == 7  # distinct texts, so a mix-up could not go unnoticed
    assert permuted == [forward[i] for i in perm]


def test_greedy_order_and_batching_do_not_change_responses(tiny):
    """A greedy response does not depend on the prompt order nor on the batch (and left padding) it ran in."""
    model, tok = tiny
    ids = _raw_ids(tok, 6)
    batched = _texts(model, tok, ids, max_new_tokens=5, batch_size=4)
    assert all(batched) and len(set(batched)) > 1  # non-empty, prompt-dependent responses
    singles = _texts(model, tok, ids, max_new_tokens=5, batch_size=1)
    reordered = _texts(model, tok, ids[::-1], max_new_tokens=5, batch_size=4)
    assert singles == batched
    assert reordered == batched[::-1]


def test_greedy_is_deterministic(tiny):
    model, tok = tiny
    prompts = _prompts(5)
    a = gen.generate(model, tok, prompts, max_new_tokens=8, batch_size=2, progress=False)
    torch.manual_seed(1234)  # the global RNG state must not matter for greedy decoding
    b = gen.generate(model, tok, prompts, max_new_tokens=8, batch_size=2, progress=False)
    assert a == b
    ids = _raw_ids(tok, 5)
    x = _texts(model, tok, ids, max_new_tokens=6, batch_size=2)
    torch.manual_seed(4321)
    assert _texts(model, tok, ids, max_new_tokens=6, batch_size=2) == x
    assert all(x)


def test_sampling_is_reproducible_per_seed(tiny):
    model, tok = tiny
    prompts = _prompts(6)
    kw = dict(max_new_tokens=8, temperature=1.0, top_p=1.0, batch_size=2, progress=False)
    a = gen.generate(model, tok, prompts, seed=3, **kw)
    torch.manual_seed(999)
    b = gen.generate(model, tok, prompts, seed=3, **kw)
    c = gen.generate(model, tok, prompts, seed=4, **kw)
    assert a == b
    assert a != c


def test_skip_batches_skips_and_leaves_other_batches_unchanged(tiny):
    model, tok = tiny
    ids = [gen.chat_prompt_ids(tok, p) for p in _prompts(7)]
    kw = dict(max_new_tokens=6, temperature=1.0, batch_size=3, seed=5, progress=False)
    full = {b.index: (b.rows, texts) for b, texts in gen.generate_batches(model, tok, ids, **kw)}
    assert set(full) == {0, 1, 2}
    stats = gen.GenerationStats()
    partial = {b.index: (b.rows, texts) for b, texts in gen.generate_batches(model, tok, ids, skip_batches={0, 2}, stats=stats, **kw)}
    assert set(partial) == {1}
    assert partial[1] == full[1]  # each batch has its own seed: a resumed run samples the same texts
    assert stats.batches == 1 and 0 < stats.new_tokens <= len(full[1][0]) * 6
    assert list(gen.generate_batches(model, tok, ids, skip_batches={0, 1, 2}, **kw)) == []


def test_chat_prompt_ids_end_with_assistant_header(tiny):
    _, tok = tiny
    ids = gen.chat_prompt_ids(tok, [{"role": "user", "content": "Hi"}])
    assert isinstance(ids, list) and all(isinstance(i, int) for i in ids)
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")


# ------------------------------------------------------------------------------------------------------- tokenization
PAIRS = [
    ([{"role": "user", "content": "How do I make tea?"}], "Boil water. Add tea."),
    ([{"role": "user", "content": "Be brief.\n\nSuggest a hobby."}], "Knitting 🧶, naïvely."),
    ([{"role": "system", "content": "You are kind."}, {"role": "user", "content": "Hi"}], ""),
    ([{"role": "user", "content": "x"}], "  spaces around  "),
]


def _trl_like(tok, prompt, response):
    """TRL's conversational tokenization, written out: template(prompt, generation header) and template(prompt +
    assistant message); the completion is what follows their common prefix."""
    p = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    full = tok.apply_chat_template(prompt + [{"role": "assistant", "content": response}], tokenize=True, return_dict=True)["input_ids"]
    n = 0
    while n < min(len(p), len(full)) and p[n] == full[n]:
        n += 1
    return list(p[:n]), list(full[n:])


@pytest.mark.parametrize("prompt,response", PAIRS)
def test_pair_tokens_match_trl_style_tokenization(tiny, prompt, response):
    _, tok = tiny
    assert scoring.pair_tokens(tok, prompt, response) == _trl_like(tok, prompt, response)


def test_pair_tokens_match_trl_dataset_preparation(tiny):
    """The same check against TRL's own code: DPOTrainer._prepare_dataset, called without building a trainer."""
    from datasets import Dataset
    from trl import DPOTrainer

    _, tok = tiny
    ds = Dataset.from_dict({
        "prompt": [p for p, _ in PAIRS],
        "chosen": [[{"role": "assistant", "content": r}] for _, r in PAIRS],
        "rejected": [[{"role": "assistant", "content": PAIRS[(i + 1) % len(PAIRS)][1]}] for i in range(len(PAIRS))],
    })
    args = SimpleNamespace(dataset_num_proc=None, max_length=None, truncation_mode="keep_start")
    try:
        out = DPOTrainer._prepare_dataset(SimpleNamespace(), ds, tok, args, "train")
    except (AttributeError, TypeError) as err:
        pytest.fail(f"TRL's DPOTrainer._prepare_dataset changed ({err}); re-check scoring.pair_tokens against TRL")
    for i, (row, (prompt, response)) in enumerate(zip(out, PAIRS)):
        p, c = scoring.pair_tokens(tok, prompt, response)
        assert row["prompt_ids"] == p
        assert row["chosen_ids"] == c
        assert row["rejected_ids"] == scoring.pair_tokens(tok, prompt, PAIRS[(i + 1) % len(PAIRS)][1])[1]


def test_pair_tokens_truncate_like_trl_collator(tiny):
    """keep_start truncation: prompt + completion cut at max_length, as TRL's DataCollatorForPreference does."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    _, tok = tiny
    prompt, response = PAIRS[0]
    p_full, c_full = scoring.pair_tokens(tok, prompt, response)
    max_length = len(p_full) + 5
    p, c = scoring.pair_tokens(tok, prompt, response, max_length=max_length)
    assert p == p_full and c == c_full[:5]
    batch = DataCollatorForPreference(pad_token_id=tok.pad_token_id, max_length=max_length)(
        [{"prompt_ids": p_full, "chosen_ids": c_full, "rejected_ids": c_full}]
    )
    assert int(batch["completion_mask"][0].sum()) == len(c)
    # a response that fits is left alone
    assert scoring.pair_tokens(tok, prompt, response, max_length=10_000) == (p_full, c_full)


# ------------------------------------------------------------------------------------------------------- log-probs
def _naive_logprob(model, tok, prompt, response, max_length=None):
    p, c = scoring.pair_tokens(tok, prompt, response, max_length)
    ids = torch.tensor([p + c])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    return sum(float(logp[len(p) + j - 1, tok_id]) for j, tok_id in enumerate(c)), len(c)


def test_sequence_logprobs_equal_one_at_a_time(tiny):
    model, tok = tiny
    rng = np.random.default_rng(0)
    prompts = [[{"role": "user", "content": "q" * int(rng.integers(1, 30))}] for _ in range(8)]
    responses = ["" if i == 3 else "answer " * int(rng.integers(1, 6)) + str(i) for i in range(8)]
    lp, n = scoring.sequence_logprobs(model, tok, prompts, responses, batch_size=3)
    assert lp.shape == (8,) and n.shape == (8,)
    for i in range(8):
        expected, length = _naive_logprob(model, tok, prompts[i], responses[i])
        assert n[i] == length
        assert lp[i] == pytest.approx(expected, abs=1e-4), i
        assert lp[i] < 0


def test_sequence_logprobs_respect_max_length(tiny):
    model, tok = tiny
    prompts = [[{"role": "user", "content": "short"}], [{"role": "user", "content": "a much longer prompt here"}]]
    responses = ["a long answer " * 4, "another long answer " * 3]
    max_length = 40
    lp, n = scoring.sequence_logprobs(model, tok, prompts, responses, batch_size=2, max_length=max_length)
    for i in range(2):
        expected, length = _naive_logprob(model, tok, prompts[i], responses[i], max_length)
        assert n[i] == length
        assert lp[i] == pytest.approx(expected, abs=1e-4)
    full, n_full = scoring.sequence_logprobs(model, tok, prompts, responses, batch_size=2)
    assert (n <= n_full).all() and (n < n_full).any()


# ------------------------------------------------------------------------------------- batch_new_tokens (two stages)
def _token_rows(model, tok, ids, **kw) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in ids]
    for batch, rows in gen.generate_token_batches(model, tok, ids, temperature=0.0, progress=False, **kw):
        for r, row in zip(batch.rows, rows):
            out[r] = row
    return out


@pytest.mark.parametrize("ngram", [0, 2])
def test_split_greedy_decoding_equals_one_go(tiny, ngram):
    """Continuing the unfinished rows from their prompt and reply so far gives the tokens one uninterrupted greedy
    decode gives (the n-gram rule sees the same tokens), and rows that ended in the first stage are not continued."""
    model, tok = tiny
    ids = _raw_ids(tok, 6)
    plain = _token_rows(model, tok, ids, max_new_tokens=9, batch_size=3, no_repeat_ngram_size=ngram)
    others = {t for row in plain[1:] for t in row}
    # an end token that row 0 emits within the first stage and no other row emits: only row 0 ends early
    stop = next(t for t in plain[0][:3] if t not in others)
    calls = []
    real = type(model).generate

    def counting(self, *args, **kwargs):
        calls.append((kwargs["input_ids"].shape[0], kwargs["max_new_tokens"]))
        return real(self, *args, **kwargs)

    stats = gen.GenerationStats()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(model.generation_config, "eos_token_id", [tok.eos_token_id, stop])
        one_go = _token_rows(model, tok, ids, max_new_tokens=9, batch_size=3, no_repeat_ngram_size=ngram)
        assert one_go[0][-1] == stop and len(one_go[0]) <= 3 and one_go[1:] == plain[1:]
        mp.setattr(type(model), "generate", counting)
        split = _token_rows(model, tok, ids, max_new_tokens=9, batch_size=3, no_repeat_ngram_size=ngram,
                            batch_new_tokens=4, stats=stats)
    assert split == one_go
    # two batches of 3 decode 4 tokens together; then 3 and 2 unfinished rows (the ended one is left out) decode 5 more
    assert sorted(calls) == sorted([(3, 4), (3, 4), (3, 5), (2, 5)])
    assert stats.batches == 2 and stats.new_tokens == sum(map(len, one_go))


def test_split_decoding_flags_only_rows_cut_at_the_full_cap(tiny):
    model, tok = tiny
    ids = _raw_ids(tok, 3)
    for batch, texts, cut in gen.generate_reply_batches(model, tok, ids, max_new_tokens=6, batch_new_tokens=2,
                                                         temperature=0.0, batch_size=3, progress=False):
        assert cut == [True] * 3  # the copying model never ends: cut at 6, not at the stage's 2
        assert all(len(tok.encode(t, add_special_tokens=False)) >= 3 for t in texts)


@pytest.mark.parametrize("bad", [-1])
def test_batch_new_tokens_must_not_be_negative(tiny, bad):
    model, tok = tiny
    with pytest.raises(gen.MipoError, match="batch_new_tokens"):
        list(gen.generate_token_batches(model, tok, _raw_ids(tok, 2), max_new_tokens=4, batch_new_tokens=bad, progress=False))
