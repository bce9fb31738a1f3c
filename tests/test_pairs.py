"""MIPO pairs: negative assignment (derangements), the stored fields, reuse, and resuming a killed generation without
losing or duplicating anything. Everything runs on the smoke preset's tiny model."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
from collections import Counter

import numpy as np
import pytest

from mipo_lib import cache
from mipo_lib import pairs as pairs_mod
from mipo_lib.config import get_preset
from mipo_lib.errors import MipoError
from mipo_lib.pairs import (
    BatchLog,
    build_pairs,
    derangement,
    grouped_derangement,
    load_pairs,
    negative_sources,
    pairs_dir,
)
from mipo_lib.scoring import sequence_logprobs
from mipo_lib.tasks import get_task
from mipo_lib.tasks.base import Example

N = 16
REAL_GENERATE_BATCHES = pairs_mod.generate_reply_batches


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def preset():
    return get_preset("smoke", n_train_prompts=N, gen_batch_size=4)


@pytest.fixture
def fresh_runs(tmp_path, monkeypatch):
    """A runs folder of this test's own (the session-wide one is shared by every test)."""
    monkeypatch.setenv("MIPO_RUNS_DIR", str(tmp_path / "runs"))
    return tmp_path / "runs"


# ------------------------------------------------------------------------------------------------- derangements
@pytest.mark.parametrize("n", [2, 3, 5, 16, 61])
def test_derangement_has_no_fixed_points(n):
    for seed in range(200):
        perm = derangement(n, np.random.default_rng(seed))
        assert sorted(perm.tolist()) == list(range(n))
        assert not np.any(perm == np.arange(n)), (n, seed)


def test_derangement_is_not_always_the_same():
    perms = {tuple(derangement(6, np.random.default_rng(s))) for s in range(50)}
    assert len(perms) > 10


def test_derangement_needs_two():
    with pytest.raises(MipoError, match="at least 2"):
        derangement(1, np.random.default_rng(0))


def test_grouped_derangement_stays_inside_groups():
    groups = ["a"] * 4 + ["b"] * 3 + ["a"] * 2 + ["c"] * 2
    for seed in range(100):
        perm = grouped_derangement(groups, np.random.default_rng(seed))
        assert sorted(perm.tolist()) == list(range(len(groups)))
        for i, j in enumerate(perm):
            assert j != i and groups[j] == groups[i]


def test_grouped_derangement_singleton_group_fails():
    with pytest.raises(MipoError):
        grouped_derangement(["a", "a", "b"], np.random.default_rng(0))


def _examples(requests):
    return [Example(id=f"e{i}", request=r, context=f"c{i}") for i, r in enumerate(requests)]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_negative_sources_random_prompt_k_distinct(k):
    exs = _examples([f"q{i}" for i in range(8)])
    for seed in range(30):
        src = negative_sources(exs, "random_prompt", k, np.random.default_rng(seed))
        assert len(src) == len(exs)
        for i, s in enumerate(src):
            assert len(s) == k and len(set(s)) == k
            assert i not in s


def test_negative_sources_random_context_same_request():
    exs = _examples(["tea"] * 4 + ["run"] * 4)
    for seed in range(30):
        src = negative_sources(exs, "random_context", 3, np.random.default_rng(seed))
        for i, s in enumerate(src):
            assert len(set(s)) == 3 and i not in s
            assert all(exs[j].request == exs[i].request for j in s)


def test_negative_sources_errors():
    exs = _examples(["a", "b", "c"])
    with pytest.raises(MipoError, match="distinct negatives"):
        negative_sources(exs, "random_prompt", 3, np.random.default_rng(0))  # only 2 disjoint derangements of 3 exist
    with pytest.raises(MipoError, match="does not reuse"):
        negative_sources(exs, "context_drop", 1, np.random.default_rng(0))


# ------------------------------------------------------------------------------------------------------ build_pairs
def _request_id(example_id: str) -> str:
    return example_id.split("-")[0]


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("negative", ["context_drop", "random_context", "random_prompt"])
def test_build_pairs_fields(tiny, task, preset, fresh_runs, negative, k):
    model, tok = tiny
    p = preset.with_overrides(negative=negative, k_negatives=k)
    rows = build_pairs(model, tok, task, p, seed=0, progress=False)
    assert len(rows) == N * k
    examples = {e.id: e for e in task.examples("train", N, seed=0)}
    assert Counter(r["example_id"] for r in rows) == {i: k for i in examples}
    assert len({r["pair_id"] for r in rows}) == len(rows)
    chosen_of = {r["example_id"]: r["chosen"] for r in rows}
    for r in rows:
        ex = examples[r["example_id"]]
        assert r["prompt"] == task.prompt(ex)
        assert r["chosen"] == chosen_of[r["example_id"]]  # one positive per prompt, shared by its K pairs
        for side in ("chosen", "rejected"):
            ref, neg = r[f"ref_{side}_logps"], r[f"{side}_logps_neg_prompt"]
            assert np.isfinite(ref) and ref < 0 and np.isfinite(neg)
            assert r[f"pmi_{side}"] == pytest.approx(ref - neg, abs=1e-9)
            assert r[f"{side}_tokens"] >= 1
            assert r[f"{side}_score"] in (0.0, 1.0)
        if negative == "context_drop":
            assert r["negative_source"] == "context_drop"
            assert r["negative_prompt"] == task.prompt(ex, with_context=False)
        else:
            src = r["negative_source"]
            assert src != r["example_id"]
            assert r["rejected"] == chosen_of[src]  # the negative is another prompt's positive
            assert r["negative_prompt"] == task.prompt(examples[src])
            if negative == "random_context":
                assert _request_id(src) == _request_id(r["example_id"])
    if negative != "context_drop":
        for ex_id in examples:
            sources = [r["negative_source"] for r in rows if r["example_id"] == ex_id]
            assert len(set(sources)) == k
    cut_of = {r["example_id"]: r["chosen_truncated"] for r in rows}
    for r in rows:
        assert isinstance(r["chosen_truncated"], bool) and isinstance(r["rejected_truncated"], bool)
        if negative != "context_drop":
            assert r["rejected_truncated"] == cut_of[r["negative_source"]]  # the flag travels with the reply
    manifest = pairs_mod.load_manifest(p, 0)
    assert manifest["n_pairs"] == N * k and manifest["n_prompts"] == N
    assert manifest["truncated_chosen"] == sum(r["chosen_truncated"] for r in rows)
    assert manifest["truncated_rejected"] == sum(r["rejected_truncated"] for r in rows)
    stored = load_pairs(pairs_dir(p, 0) / "pairs.jsonl")
    assert not {"chosen_score", "rejected_score"} & set(stored[0])  # replies are stored, verdicts judged on read
    assert pairs_mod.judged_pairs(task, list(examples.values()), stored) == rows


def test_truncated_flags_are_the_generators_per_reply(tiny, task, preset, fresh_runs, monkeypatch):
    """Each side's `*_truncated` is the generator's cut-off flag of that very reply (here: scripted, every third
    reply cut), and on a random model with a 3-token cap nearly every reply is cut."""
    model, tok = tiny

    def scripted(*args, **kwargs):
        for batch, texts, _ in REAL_GENERATE_BATCHES(*args, **kwargs):
            yield batch, texts, [(kwargs["desc"] == "positive responses") == (row % 3 == 0) for row in batch.rows]

    monkeypatch.setattr(pairs_mod, "generate_reply_batches", scripted)
    rows = build_pairs(model, tok, task, preset, seed=0, progress=False)
    order = [e.id for e in task.examples("train", N, seed=0)]
    for r in rows:
        row = order.index(r["example_id"])
        assert r["chosen_truncated"] == (row % 3 == 0) and r["rejected_truncated"] == (row % 3 != 0), r["pair_id"]
    monkeypatch.setattr(pairs_mod, "generate_reply_batches", REAL_GENERATE_BATCHES)
    short = build_pairs(model, tok, task, preset.with_overrides(max_new_tokens=3), seed=0, progress=False)
    assert sum(r["chosen_truncated"] for r in short) >= N - 2


def test_reference_logps_match_independent_scoring(tiny, task, preset, fresh_runs):
    model, tok = tiny
    rows = build_pairs(model, tok, task, preset, seed=0, progress=False)[:5]
    lp_c, _ = sequence_logprobs(model, tok, [r["prompt"] for r in rows], [r["chosen"] for r in rows], max_length=preset.max_length, batch_size=2)
    lp_r, _ = sequence_logprobs(model, tok, [r["negative_prompt"] for r in rows], [r["rejected"] for r in rows], max_length=preset.max_length, batch_size=1)
    for r, c, n in zip(rows, lp_c, lp_r):
        assert r["ref_chosen_logps"] == pytest.approx(c, abs=1e-4)
        assert r["rejected_logps_neg_prompt"] == pytest.approx(n, abs=1e-4)


def test_random_prompt_needs_no_context(tiny, preset, fresh_runs):
    model, tok = tiny
    arith = get_task("arithmetic")
    with pytest.raises(MipoError, match="random_prompt"):
        build_pairs(model, tok, arith, preset.with_overrides(task="arithmetic"), seed=0, progress=False)
    with pytest.raises(MipoError, match="unknown negative"):
        build_pairs(model, tok, get_task("personalization"), preset.with_overrides(negative="nope"), seed=0, progress=False)


def _forbid(*args, **kwargs):
    raise AssertionError("nothing should be generated or scored here")


def test_second_call_reuses_the_file(tiny, task, preset, fresh_runs, monkeypatch):
    model, tok = tiny
    first = build_pairs(model, tok, task, preset, seed=0, progress=False)
    monkeypatch.setattr(pairs_mod, "generate_reply_batches", _forbid)
    monkeypatch.setattr(pairs_mod, "sequence_logprobs", _forbid)
    assert build_pairs(model, tok, task, preset, seed=0, progress=False) == first


def test_changed_sampling_settings_get_their_own_pairs(tiny, task, preset, fresh_runs, caplog):
    model, tok = tiny
    first = build_pairs(model, tok, task, preset, seed=0, progress=False)
    hotter = preset.with_overrides(temperature=1.3)
    assert pairs_dir(hotter, 0) != pairs_dir(preset, 0)  # side by side, neither replaces the other
    with caplog.at_level("INFO", logger="mipo_lib.cache"):
        rows = build_pairs(model, tok, task, hotter, seed=0, progress=False)
    assert "computing pairs (seed 0)" in caplog.text and "temperature 0.8 -> 1.3" in caplog.text
    assert pairs_mod.load_manifest(hotter, 0)["settings"]["temperature"] == 1.3
    assert len(rows) == N and rows != first
    assert pairs_mod.cached_pairs(preset, 0) == first and pairs_mod.cached_pairs(hotter, 0) == rows


def test_changed_scoring_settings_rescore_without_generating(tiny, task, preset, fresh_runs, monkeypatch, caplog):
    model, tok = tiny
    first = build_pairs(model, tok, task, preset, seed=0, progress=False)
    smaller = preset.with_overrides(score_batch_size=3)
    assert pairs_dir(smaller, 0) == pairs_dir(preset, 0)  # same responses: same folder
    assert pairs_mod.cached_pairs(smaller, 0) is None
    counter = _Counting()
    monkeypatch.setattr(pairs_mod, "generate_reply_batches", counter)
    with caplog.at_level("INFO", logger="mipo_lib.cache"):
        rows = build_pairs(model, tok, task, smaller, seed=0, progress=False)
        cache.say_reused()
    assert counter.yielded == []  # every batch came from the stored responses
    assert "other settings (score_batch_size 16 -> 3)" in caplog.text and "reusing generated responses" in caplog.text
    assert [(r["chosen"], r["rejected"]) for r in rows] == [(r["chosen"], r["rejected"]) for r in first]
    # the same responses, rescored: padding in other batches moves the log-probs in the last digits only
    assert [r["ref_chosen_logps"] for r in rows] == pytest.approx([r["ref_chosen_logps"] for r in first], rel=1e-5)
    assert pairs_mod.cached_pairs(preset, 0) is None  # the folder now holds the rescored pairs


# ------------------------------------------------------------------------------------------------ kill and resume
class _Counting:
    """Stands in for `generate_reply_batches`: counts the batches it yields and can 'crash' after `crash_after`."""

    def __init__(self, crash_after=None):
        self.real = REAL_GENERATE_BATCHES
        self.crash_after = crash_after
        self.yielded: list[tuple[str, int]] = []

    def __call__(self, *args, **kwargs):
        for batch, texts, cut in self.real(*args, **kwargs):
            if self.crash_after is not None and len(self.yielded) >= self.crash_after:
                raise KeyboardInterrupt  # the user pressed stop (or the kernel died) mid-generation
            self.yielded.append((kwargs["desc"], batch.index))
            yield batch, texts, cut


def _reference_run(tiny, task, preset, tmp_path, monkeypatch):
    monkeypatch.setenv("MIPO_RUNS_DIR", str(tmp_path / "reference-runs"))
    counter = _Counting()
    monkeypatch.setattr(pairs_mod, "generate_reply_batches", counter)
    rows = build_pairs(*tiny, task, preset, seed=1, progress=False)
    monkeypatch.setenv("MIPO_RUNS_DIR", str(tmp_path / "runs"))
    return rows, counter.yielded


def _same_pairs(a, b):
    assert [r["pair_id"] for r in a] == [r["pair_id"] for r in b]
    for x, y in zip(a, b):
        for key in ("example_id", "negative_source", "prompt", "negative_prompt", "chosen", "rejected"):
            assert x[key] == y[key], key
        for key in ("ref_chosen_logps", "ref_rejected_logps", "pmi_chosen", "pmi_rejected"):
            assert x[key] == pytest.approx(y[key], abs=1e-5), key


def _check_complete(rows, k=1):
    assert len(rows) == N * k
    assert set(Counter(r["example_id"] for r in rows).values()) == {k}
    assert len({r["pair_id"] for r in rows}) == len(rows)


def test_kill_and_resume_gives_the_uninterrupted_pairs(tiny, task, preset, tmp_path, monkeypatch):
    reference, ref_batches = _reference_run(tiny, task, preset, tmp_path, monkeypatch)
    assert len(ref_batches) == 8  # 16 prompts / 4 per batch, positives and context-free negatives

    crashing = _Counting(crash_after=2)
    monkeypatch.setattr(pairs_mod, "generate_reply_batches", crashing)
    with pytest.raises(KeyboardInterrupt):
        build_pairs(*tiny, task, preset, seed=1, progress=False)
    folder = pairs_dir(preset, 1)
    assert not (folder / "pairs.jsonl").exists() and not (folder / "manifest.json").exists()
    logged = [json.loads(line) for line in (folder / "responses.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["batch"]) for r in logged] == [("positive", 0), ("positive", 1)]

    resumed_counter = _Counting()
    monkeypatch.setattr(pairs_mod, "generate_reply_batches", resumed_counter)
    resumed = build_pairs(*tiny, task, preset, seed=1, progress=False)
    assert sorted(resumed_counter.yielded) == sorted(set(ref_batches) - set(crashing.yielded))  # only the missing ones
    assert len(resumed_counter.yielded) == 6
    _check_complete(resumed)
    _same_pairs(resumed, reference)
    lines = (folder / "responses.jsonl").read_text().splitlines()
    keys = [(json.loads(line)["stage"], json.loads(line)["batch"]) for line in lines]
    assert len(keys) == len(set(keys)) == 8


def test_torn_last_line_is_dropped_and_regenerated(tiny, task, preset, tmp_path, monkeypatch):
    reference, _ = _reference_run(tiny, task, preset, tmp_path, monkeypatch)
    monkeypatch.setattr(pairs_mod, "generate_reply_batches", _Counting(crash_after=3))
    with pytest.raises(KeyboardInterrupt):
        build_pairs(*tiny, task, preset, seed=1, progress=False)
    log = pairs_dir(preset, 1) / "responses.jsonl"
    lines = log.read_text().splitlines()
    assert len(lines) == 3
    # the process died while writing the third batch: half a line, no newline
    log.write_text(lines[0] + "\n" + lines[1] + "\n" + lines[2][: len(lines[2]) // 2])

    counter = _Counting()
    monkeypatch.setattr(pairs_mod, "generate_reply_batches", counter)
    resumed = build_pairs(*tiny, task, preset, seed=1, progress=False)
    assert ("positive responses", 2) in counter.yielded  # the torn batch was regenerated
    assert len(counter.yielded) == 6
    _check_complete(resumed)
    _same_pairs(resumed, reference)
    for line in log.read_text().splitlines():
        json.loads(line)


def test_partial_run_resumes_only_under_its_own_key(tiny, task, preset, fresh_runs, monkeypatch, caplog):
    crashing = _Counting(crash_after=1)
    monkeypatch.setattr(pairs_mod, "generate_reply_batches", crashing)
    with pytest.raises(KeyboardInterrupt):
        build_pairs(*tiny, task, preset, seed=0, progress=False)
    log = pairs_dir(preset, 0) / "responses.jsonl"
    assert len(log.read_text().splitlines()) == 1
    # other sampling settings start afresh in a folder of their own and leave the partial run alone
    other = _Counting()
    monkeypatch.setattr(pairs_mod, "generate_reply_batches", other)
    _check_complete(build_pairs(*tiny, task, preset.with_overrides(top_p=0.5), seed=0, progress=False))
    assert len(other.yielded) == 8 and len(log.read_text().splitlines()) == 1
    # a partial log whose stored key no longer matches (as after a code change) is discarded, and the log says why
    key_path = cache.key_file(log)
    stored = json.loads(key_path.read_text())
    key_path.write_text(json.dumps({**stored, "values": {**stored["values"], "top_p": 0.25}}))
    again = _Counting()
    monkeypatch.setattr(pairs_mod, "generate_reply_batches", again)
    with caplog.at_level("INFO", logger="mipo_lib.cache"):
        _check_complete(build_pairs(*tiny, task, preset, seed=0, progress=False))
    assert "generated responses (seed 0)" in caplog.text and "top_p 0.25 -> 0.95" in caplog.text
    assert len(again.yielded) == 8  # nothing resumed from the stale log


def test_keys_stored_next_to_the_pairs(tiny, task, preset, fresh_runs, monkeypatch):
    build_pairs(*tiny, task, preset, seed=0, progress=False)
    folder = pairs_dir(preset, 0)
    assert folder.name == f"pairs-{pairs_mod.generation_key(preset, 0).digest}"
    stored = json.loads(cache.key_file(folder / "pairs.jsonl").read_text())
    assert stored["values"] == dict(pairs_mod.pairs_key(preset, 0).values)
    assert pairs_mod.load_manifest(preset, 0)["settings_digest"] == stored["digest"]
    (folder / "pairs.jsonl.key.json").unlink()  # a pairs file without its key is never taken for finished
    assert pairs_mod.cached_pairs(preset, 0) is None


def test_batch_log_ignores_duplicates_and_torn_lines(tmp_path):
    path = tmp_path / "responses.jsonl"
    rec = {"stage": "positive", "batch": 0, "rows": [1, 0], "texts": ["b", "a"], "cut": [True, False]}
    path.write_text(json.dumps(rec) + "\n" + json.dumps({**rec, "texts": ["x", "y"]}) + "\n" + '{"stage": "pos')
    log = BatchLog(path)
    assert log.finished("positive") == {0}
    assert log.replies("positive", 2) == (["a", "b"], [False, True])
    assert path.read_text() == json.dumps(rec) + "\n"
    with pytest.raises(RuntimeError, match="missing"):
        log.replies("positive", 3)


# ------------------------------------------------------------------------------------------------------ load_pairs
def test_load_pairs_names_the_malformed_line(tmp_path):
    good = {"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b", "ref_chosen_logps": -1.0, "ref_rejected_logps": -2.0}
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n" + '{"prompt": oops\n')
    with pytest.raises(MipoError, match=r"pairs.jsonl line 3 .*redo"):
        load_pairs(path)
    missing = {k: v for k, v in good.items() if k != "ref_rejected_logps"}
    path.write_text(json.dumps(good) + "\n" + json.dumps(missing) + "\n")
    with pytest.raises(MipoError, match=r"line 2 lacks \['ref_rejected_logps'\]"):
        load_pairs(path)
    path.write_text(json.dumps(good) + "\n")
    assert load_pairs(path) == [good]
