"""Evaluation: context-aware decoding (exact formula, cached context-free stream), the records
table, and the whole smoke pipeline (five methods, cached on the second call)."""

import functools
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import LogitsProcessorList

from mipo_lib import cache, evaluate, methods
from mipo_lib.experiments import pipeline
from mipo_lib.config import get_preset
from mipo_lib.evaluate import ContextAwareDecoding
from mipo_lib.shared_prompt import cache_argument, cache_of
from mipo_lib.generate import chat_prompt_ids, generate_batches, generate_reply_batches
from mipo_lib.tasks import get_task


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def preset():
    return get_preset("smoke", n_train_prompts=16, n_test_prompts=10)


def _raw(tok, texts):
    return [tok.encode(t, add_special_tokens=False) for t in texts]


# Conditional prompts of different lengths, and context-free ones of other lengths (so both streams are left-padded).
COND = ["prefer short. tell me about k", "hello there, say q", "abc", "a much longer conditional prompt ending in z"]
UNCOND = ["tell me about k", "say something long here q", "abcdefg", "z"]


def _cad_factory(model, tok, uncond_ids, alpha, made=None):
    def factory(batch, prefixes):
        cad = ContextAwareDecoding(model, [uncond_ids[r] + p for r, p in zip(batch.rows, prefixes)], tok.pad_token_id, alpha)
        if made is not None:
            made.append((batch, cad))
        return LogitsProcessorList([cad])

    return factory


# ---------------------------------------------------------------------------------------------------------- CAD
def test_cad_with_alpha_zero_equals_plain_greedy(tiny):
    model, tok = tiny
    cond, uncond = _raw(tok, COND), _raw(tok, UNCOND)
    kw = dict(max_new_tokens=6, temperature=0.0, batch_size=3, progress=False)
    plain = {tuple(b.rows): t for b, t in generate_batches(model, tok, cond, **kw)}
    cad = {tuple(b.rows): t for b, t in generate_batches(model, tok, cond, logits_processor_factory=_cad_factory(model, tok, uncond, 0.0), **kw)}
    assert cad == plain
    assert all(t for texts in plain.values() for t in texts)


def test_cad_alpha_zero_in_generate_responses(tiny, task, preset):
    model, tok = tiny
    examples = task.examples("test", 10)
    plain = evaluate.generate_responses(model, tok, task, examples, preset, progress=False)
    cad = evaluate.generate_responses(model, tok, task, examples, preset, cad_alpha=0.0, progress=False)
    assert cad == plain and len(plain) == 10


def test_cad_context_free_stream_scores_only_the_last_position(tiny, task, preset, monkeypatch):
    """The context-free stream asks the model for the last position's logits only (never the whole vocabulary at every
    prompt position: 1 GB on the cpu preset), and its replies and token-cap flags are exactly those of the old path,
    which scored every position and kept the last one."""
    model, tok = tiny
    examples = task.examples("test", 10)
    positions = []
    forward = type(model).forward

    @functools.wraps(forward)  # its signature: `generate` passes logits_to_keep only to a forward that names it
    def recording(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        positions.append(out.logits.shape[1])
        return out

    monkeypatch.setattr(type(model), "forward", recording)
    kept = evaluate.generate_replies(model, tok, task, examples, preset, cad_alpha=2.0, progress=False)
    assert set(positions) == {1}

    def every_position(self, ids):  # the old ContextAwareDecoding._forward: no logits_to_keep
        positions_ = (self.mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1] :]
        out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=positions_, use_cache=True,
                         **{cache_argument(self.model.forward): self.cache})
        self.cache = cache_of(out)
        return out.logits[:, -1, :].float()

    positions.clear()
    monkeypatch.setattr(ContextAwareDecoding, "_forward", every_position)
    old = evaluate.generate_replies(model, tok, task, examples, preset, cad_alpha=2.0, progress=False)
    assert max(positions) > 1  # the old path did score every prompt position
    assert old == kept and len(set(kept[0])) > 1


def test_cad_one_step_matches_the_formula(tiny):
    model, tok = tiny
    alpha = 2.5
    cond, uncond = _raw(tok, COND), _raw(tok, UNCOND)
    width = max(map(len, cond))
    input_ids = torch.full((len(cond), width), tok.pad_token_id)
    mask = torch.zeros_like(input_ids)
    for i, r in enumerate(cond):
        input_ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        scores = model(input_ids=input_ids, attention_mask=mask, position_ids=positions).logits[:, -1].float()
    out = ContextAwareDecoding(model, uncond, tok.pad_token_id, alpha)(input_ids, scores.clone())
    for i in range(len(cond)):
        with torch.no_grad():
            logp_c = torch.log_softmax(model(input_ids=torch.tensor([cond[i]])).logits[0, -1].double(), -1)
            logp_u = torch.log_softmax(model(input_ids=torch.tensor([uncond[i]])).logits[0, -1].double(), -1)
        expected = (1 + alpha) * logp_c - alpha * logp_u
        torch.testing.assert_close(out[i].double(), expected, atol=1e-4, rtol=0)


def test_cad_context_free_stream_follows_the_generated_tokens(tiny, monkeypatch):
    """Over several sampled steps, the cached context-free logits equal a fresh forward pass of (context-free prompt +
    tokens generated so far), row by row despite left padding: the KV cache and positions are right."""
    model, tok = tiny
    cond, uncond = _raw(tok, COND), _raw(tok, UNCOND)
    recorded = []  # per step: (what the conditional stream holds, the context-free logits the processor used)
    real_forward = ContextAwareDecoding._forward
    real_call = ContextAwareDecoding.__call__
    seen_ids = []

    def recording_call(self, input_ids, scores):
        seen_ids.append(input_ids.clone())
        return real_call(self, input_ids, scores)

    def recording_forward(self, ids):
        logits = real_forward(self, ids)
        recorded.append((seen_ids[-1], logits.clone()))
        return logits

    monkeypatch.setattr(ContextAwareDecoding, "__call__", recording_call)
    monkeypatch.setattr(ContextAwareDecoding, "_forward", recording_forward)
    made = []
    steps = 5
    out = list(generate_batches(
        model, tok, cond, max_new_tokens=steps, temperature=1.0, batch_size=4, seed=3, progress=False,
        logits_processor_factory=_cad_factory(model, tok, uncond, 1.0, made),
    ))
    assert len(out) == 1 and len(made) == 1 and len(recorded) == steps
    batch = made[0][0]
    width = recorded[0][0].shape[1]  # the left-padded conditional prompts
    generated = recorded[-1][0][:, width:].tolist()  # tokens sampled at steps 0 .. steps-2
    assert len(generated[0]) == steps - 1
    eos = {tok.eos_token_id, tok.pad_token_id}
    checked = 0
    for t in range(steps):
        for i, row in enumerate(batch.rows):
            if eos & set(generated[i][:t]):
                continue  # row finished: later steps feed padding
            ids = torch.tensor([uncond[row] + generated[i][:t]])
            with torch.no_grad():
                expected = model(input_ids=ids).logits[0, -1].float()
            torch.testing.assert_close(recorded[t][1][i], expected, atol=1e-4, rtol=0)
            checked += 1
    assert checked >= 2 * len(batch.rows)


def test_cad_changes_decoding_when_strong(tiny):
    """Sanity that the processor acts: a large alpha changes the greedy continuation of the tiny model."""
    model, tok = tiny
    cond, uncond = _raw(tok, COND), _raw(tok, UNCOND)
    kw = dict(max_new_tokens=6, temperature=0.0, batch_size=4, progress=False)
    plain = [t for _, texts in generate_batches(model, tok, cond, **kw) for t in texts]
    strong = [t for _, texts in generate_batches(model, tok, cond, logits_processor_factory=_cad_factory(model, tok, uncond, 10.0), **kw) for t in texts]
    assert strong != plain


# ---------------------------------------------------------------------------------------------------------- records
def test_records_columns(task):
    examples = task.examples("test", 10)[:3]
    responses = ["Hey there, boil water.", "", "one two three"]
    frame = evaluate.records(task, examples, responses, "prompting", seed=2)
    assert list(frame.columns) == ["task", "method", "seed", "example_id", "group", "response", "score", "n_words", "truncated"]
    assert len(frame) == 3
    assert (frame.method == "prompting").all() and (frame.seed == 2).all() and (frame.task == "personalization").all()
    assert frame.example_id.tolist() == [e.id for e in examples]
    assert frame.group.tolist() == [e.meta["preference"] for e in examples]
    assert frame.n_words.tolist() == [4, 0, 3]
    assert frame.score.tolist() == [task.score(e, r) for e, r in zip(examples, responses)]


def test_cached_records_round_trip_odd_replies_and_judge_them_on_read(tmp_path, task):
    examples = task.examples("test", 10)[:2]
    frame = evaluate.records(task, examples, ["", "NA"], "SFT", seed=0).assign(response=["", "NA"])
    frame.loc[1, "response"] = 'a "quoted",\r\nbare\rreturn \x00 and 1,5'
    path, key = tmp_path / "eval" / "x.jsonl", cache.Key("evaluation", "SFT evaluation", {"n": 2})
    first = evaluate.cached_records(path, key, lambda: frame, task, examples)
    again = evaluate.cached_records(path, key, lambda: pytest.fail("should be read from the cache"), task, examples)
    assert again.response.tolist() == frame.response.tolist()  # empty stays empty, odd text survives exactly
    assert again.score.dtype == float and again.seed.dtype == int
    assert list(again.columns) == list(frame.columns) and "score" not in evaluate._read_records(path)
    pd.testing.assert_frame_equal(again, first)
    assert again.score.tolist() == [task.score(e, r) for e, r in zip(examples, frame.response)]


# --------------------------------------------------------------------------------------------------------- pipeline
def test_evaluate_all_smoke(preset, tmp_path, monkeypatch):
    monkeypatch.setenv("MIPO_RUNS_DIR", str(tmp_path / "runs"))
    frame = pipeline.evaluate_all(preset, seeds=[0], progress=False)
    assert set(frame.method) == set(methods.names())
    assert frame.groupby("method").size().to_dict() == {m: 10 for m in methods.names()}
    assert set(frame.score.unique()) <= {0.0, 1.0}
    assert (frame.seed == 0).all()
    test_ids = [e.id for e in get_task("personalization").examples("test", 10)]
    for _, part in frame.groupby("method"):
        assert sorted(part.example_id) == sorted(test_ids)

    def no_model(*args, **kwargs):
        raise AssertionError("a cached evaluation must not load a model")

    monkeypatch.setattr(pipeline, "load_for_preset", no_model)
    again = pipeline.evaluate_all(preset, seeds=[0], progress=False)
    pd.testing.assert_frame_equal(
        again.sort_values(["method", "example_id"]).reset_index(drop=True)[["method", "example_id", "score", "response"]],
        frame.sort_values(["method", "example_id"]).reset_index(drop=True)[["method", "example_id", "score", "response"]],
        check_dtype=False,
    )
    assert np.isfinite(again.score).all()


def test_cad_split_decoding_equals_one_go(tiny):
    """With `batch_new_tokens` the continued rows' context-free stream restarts from its prompt and the reply so far:
    the greedy CAD replies equal one uninterrupted decode."""
    model, tok = tiny
    cond, uncond = _raw(tok, COND), _raw(tok, UNCOND)
    kw = dict(max_new_tokens=8, temperature=0.0, batch_size=4, progress=False)
    one_go = [t for _, texts in generate_batches(model, tok, cond, logits_processor_factory=_cad_factory(model, tok, uncond, 1.0), **kw) for t in texts]
    split = [t for _, texts in generate_batches(model, tok, cond, logits_processor_factory=_cad_factory(model, tok, uncond, 1.0),
                                                batch_new_tokens=3, **kw) for t in texts]
    assert split == one_go
    assert split != [t for _, texts in generate_batches(model, tok, cond, **kw) for t in texts]  # CAD acted


def test_each_distinct_prompt_is_decoded_once_and_its_reply_shared(tiny, task, preset, monkeypatch):
    """Without context the preferences of a request are one prompt: greedy decoding decodes it once, and every
    example gets the reply (and cut flag) that decoding every row gives it."""
    model, tok = tiny
    examples = task.examples("test", 20)  # two requests x ten preferences
    free = [chat_prompt_ids(tok, task.prompt(e, with_context=False)) for e in examples]
    assert len({tuple(p) for p in free}) == 2
    kw = dict(max_new_tokens=preset.eval_max_new_tokens, temperature=0.0, batch_size=preset.eval_batch_size,
              progress=False, no_repeat_ngram_size=preset.eval_no_repeat_ngram, batch_new_tokens=preset.eval_batch_new_tokens)
    every_row = {}
    for batch, texts, cut in generate_reply_batches(model, tok, free, **kw):
        every_row.update({r: (t, c) for r, t, c in zip(batch.rows, texts, cut)})
    decoded = []
    real = evaluate.generate_reply_batches

    def counting(model, tokenizer, prompt_ids, **kwargs):
        decoded.extend(tuple(p) for p in prompt_ids)
        yield from real(model, tokenizer, prompt_ids, **kwargs)

    monkeypatch.setattr(evaluate, "generate_reply_batches", counting)
    texts, cut = evaluate.generate_replies(model, tok, task, examples, preset, with_context=False, progress=False)
    assert sorted(decoded) == sorted({tuple(p) for p in free})
    assert list(zip(texts, cut)) == [every_row[r] for r in range(len(examples))] and len(set(texts)) == 2
    decoded.clear()  # with context every example is its own prompt, with CAD too (its key adds the context-free twin)
    evaluate.generate_replies(model, tok, task, examples, preset, cad_alpha=1.0, progress=False)
    assert len(decoded) == len(examples)


def test_cad_decodes_half_the_prompts_per_batch_and_keys_its_plan(tiny, task, preset, monkeypatch):
    """CAD runs each prompt with and without context, so a batch holds half the prompts (the rows, and the memory, of
    another method's batch); the plan is in its cache key, and in fp32 the replies do not depend on it."""
    model, tok = tiny
    examples = task.examples("test", 10)
    wide = preset.with_overrides(eval_batch_size=10)
    sizes = []
    original = evaluate.generate_reply_batches

    def spy(*args, **kwargs):
        sizes.append(kwargs["batch_size"])
        return original(*args, **kwargs)

    monkeypatch.setattr(evaluate, "generate_reply_batches", spy)
    cad_half = evaluate.generate_responses(model, tok, task, examples, wide, cad_alpha=1.0, progress=False)
    plain = evaluate.generate_responses(model, tok, task, examples, wide, progress=False)
    assert sizes == [5, 10], "CAD: half the prompts per batch; other methods: eval_batch_size"
    cad_full = evaluate.generate_responses(model, tok, task, examples, wide.with_overrides(eval_batch_size=20),
                                           cad_alpha=1.0, progress=False)
    assert cad_half == cad_full and len(plain) == 10, "fp32: the batch plan must not change CAD's replies"

    def cad_key(p):
        return evaluate.evaluation_key(p, "CAD", examples, None, method="CAD").digest

    assert cad_key(wide) != cad_key(wide.with_overrides(eval_batch_size=20))
    assert "prompts_per_batch" not in str(evaluate.evaluation_key(wide, "prompting", examples, None, method="prompting").values)
