"""Reasoning (notebook 07): graded arithmetic levels, answer extraction, the difficulty choice, the reasoning presets and
the analyses of mipo_lib.experiments.reasoning (pair correctness, format vs correctness, PMI ranking)."""

from __future__ import annotations

import itertools
import math
import re

import numpy as np
import pandas as pd
import pytest

from mipo_lib import cache
from mipo_lib.experiments import reasoning
from mipo_lib.config import PRESETS, get_preset, repo_root
from mipo_lib.errors import MipoError
from mipo_lib.tasks import get_task, task_names
from mipo_lib.tasks.arithmetic import (
    ANSWER_FORMAT, DEFAULT_LEVEL, GRADED_LEVELS, LEVELS, SPLITS, ArithmeticTask, extract_answer,
    final_answer, parse_answer, task_name,
)
from mipo_lib.tasks.base import Example

DIFFICULTY_CSV = repo_root() / "figures" / "reasoning_difficulty_cpu.csv"
CAP_CSV = repo_root() / "figures" / "reasoning_cap_cpu.csv"


# ------------------------------------------------------------------------------------------------ answer extraction
@pytest.mark.parametrize("reply,value,how", [
    ("= 7", 7, "last_number"),
    ("3 + 4 = 7", 7, "last_number"),
    ("It is 7.", 7, "last_number"),
    ("7", 7, "last_number"),
    ("#### 7", 7, "final_mark"),
    ("2 + 2 = 4\n#### 4\nThe answer is: 1", 4, "final_mark"),  # the mark wins over a later, cut-off phrase
    ("The answer is 7", 7, "answer_phrase"),
    ("Answer: 7", 7, "answer_phrase"),
    ("the answer would be 7.", 7, "answer_phrase"),
    ("The answer is 14 (7 × 2).", 14, "answer_phrase"),
    ("The answer is 8. I hope these 2 tips help!", 8, "answer_phrase"),  # trailing text with a number
    ("3 + 4 = 7. I hope this helps!", 7, "last_number"),  # trailing text without one
    ("So she makes $1,200 in total.", 1200, "last_number"),
    ("The answer is $1,200.50.", 1200.5, "answer_phrase"),
    ("3 - 8 = -5", -5, "last_number"),
    ("It is \u22125.", -5, "last_number"),  # Unicode minus
    ("12 - 7 is 5", 5, "last_number"),  # a spaced minus is an operator, not a sign
    ("I don't know.", None, "none"),
    ("", None, "none"),
])
def test_parse_answer_phrasings(reply, value, how):
    parsed = parse_answer(reply)
    assert (parsed.value, parsed.how) == (value, how)
    assert extract_answer(reply) == value


@pytest.mark.parametrize("reply,value", [
    ("Sam has 7 + 5 = 12 apples.\nAnswer: 12", 12),
    ("Answer: 12 apples.", 12),
    ("**Answer:** 12", 12),
    ("answer: $12", 12),
    ("Answer: 3. Check: 3 + 4 = 7. Answer: 7", 7),  # the last answer line counts
    ("Answer: \u22125", -5),
    ("Sam has 7 + 5 = 12 apples.", None),  # no answer line: no final answer, even with numbers in it
    ("The answer is 12.", None),
    ("Leo has 7 + 5 =", None),  # cut by the cap before the answer line
    ("Answer: <number>", None),
    ("Answer:", None),
])
def test_final_answer_reads_only_the_answer_line(reply, value):
    parsed = final_answer(reply)
    assert (parsed.value, parsed.how) == (value, "none" if value is None else "answer_line")


def test_graded_levels_score_only_the_final_answer_line():
    task = get_task("arithmetic_two_step")
    ex = next(e for e in task.examples("test") if e.answer == "20")
    assert task.score(ex, "6 × 3 + 2 = 20\nAnswer: 20") == task.score(ex, "Answer: 20.") == 1.0
    assert task.score(ex, "6 × 3 + 2 = 20") == 0.0  # right number, no final answer: wrong (the old grading said 1)
    assert task.score(ex, "The answer is 20.") == 0.0
    assert task.score(ex, "Answer: 19, no, 20") == 0.0  # the number right after the answer line
    assert task.parse("6 × 3 + 2 = 20").how == "none"
    plain = get_task("arithmetic")  # the original task keeps its lenient reading
    ex = plain.examples("test", 1)[0]
    assert plain.score(ex, f"It is {ex.answer}.") == 1.0 and plain.parse("It is 5.").how == "last_number"


# ------------------------------------------------------------------------------------------------ levels and splits
def _value(request: str) -> int:
    """The answer of a `What is ...?` problem, computed independently of the task code."""
    expr = request.removeprefix("What is ").removesuffix("?").replace("×", "*")
    assert re.fullmatch(r"[\d +*-]+", expr), expr
    return int(eval(expr))  # noqa: S307 - digits and + - * only, checked above


@pytest.mark.parametrize("level", list(LEVELS))
def test_levels_have_disjoint_deterministic_splits_and_right_answers(level):
    task = ArithmeticTask(level)
    splits = {s: task.examples(s) for s in SPLITS}
    ids = {s: [e.id for e in ex] for s, ex in splits.items()}
    requests = {s: {e.request for e in ex} for s, ex in splits.items()}
    for a, b in itertools.combinations(SPLITS, 2):
        assert not set(ids[a]) & set(ids[b]) and not requests[a] & requests[b], f"{level}: {a} and {b} overlap"
    assert all(len(v) == len(set(v)) > 0 for v in ids.values())
    # held-out splits ignore the seed; train subsets are seeded and nested
    for s in ("validation", "test"):
        assert [e.id for e in task.examples(s, 5, seed=0)] == [e.id for e in task.examples(s, 5, seed=7)] == ids[s][:5]
    t0 = [e.id for e in task.examples("train", 10, seed=0)]
    assert t0 == [e.id for e in ArithmeticTask(level).examples("train", 10, seed=0)]
    assert t0 != [e.id for e in task.examples("train", 10, seed=1)]
    assert t0[:4] == [e.id for e in task.examples("train", 4, seed=0)]
    for e in splits["test"][:200]:
        assert int(e.answer) >= 0 and e.meta["level"] == level
        if not level == "word":
            assert _value(e.request) == int(e.answer)
    with pytest.raises(MipoError, match="out of range"):
        task.examples("validation", len(ids["validation"]) + 1)
    with pytest.raises(MipoError, match="unknown split"):
        task.examples("dev")


def test_carry_levels_are_what_they_say():
    def carries(e):
        a, op, b = e.request.removeprefix("What is ").removesuffix("?").split()
        a, b = int(a), int(b)
        return (a % 10 + b % 10 >= 10) if op == "+" else (a % 10 < b % 10)

    no_carry, carry = ArithmeticTask("two_digit_no_carry").examples("test"), ArithmeticTask("two_digit_carry").examples("test")
    assert not any(carries(e) for e in no_carry) and all(carries(e) for e in carry)
    assert all(int(e.answer) < 100 for e in no_carry if "+" in e.request)  # no carry into the hundreds either


def test_word_problems_have_the_right_answer():
    for e in ArithmeticTask("word").examples("test"):
        a, b = map(int, re.findall(r"\d+", e.request))
        assert int(e.answer) == (a + b if "more" in e.request else a - b)


def test_levels_are_registered_tasks_with_their_instruction():
    assert [task_name(lv) for lv in GRADED_LEVELS] == [n for n in task_names() if n.startswith("arithmetic_")]
    for level in GRADED_LEVELS:
        task = get_task(task_name(level))
        assert not task.conditional and task.name == task_name(level)
        ex = task.examples("test", 1)[0]
        assert task.prompt(ex) == task.prompt(ex, with_context=False) == [
            {"role": "user", "content": f"{ex.request} {ANSWER_FORMAT}"}]
        assert task.level.answer_format
        with pytest.raises(MipoError, match="random_prompt"):
            task.prompt(ex, context="x")
    plain = get_task("arithmetic")
    assert not plain.level.answer_format
    assert plain.level.name == DEFAULT_LEVEL and plain.prompt(plain.examples("test", 1)[0])[0]["content"].endswith("?")
    with pytest.raises(MipoError, match="unknown arithmetic level"):
        ArithmeticTask("calculus")


# ------------------------------------------------------------------------------------------------ difficulty, presets
def test_choose_level_prefers_the_hardest_level_in_range():
    table = pd.DataFrame({"level": ["a", "b", "c", "d"], "accuracy": [0.9, 0.65, 0.25, 0.05]})
    assert reasoning.choose_level(table) == "c"
    assert reasoning.choose_level(table, (0.5, 1.0)) == "b"
    with pytest.raises(MipoError, match="no level has a base accuracy"):
        reasoning.choose_level(table, (0.3, 0.6))


def test_committed_difficulty_table_chose_the_reasoning_preset_level():
    table = pd.read_csv(DIFFICULTY_CSV)
    assert list(table["level"]) == list(GRADED_LEVELS) and (table["n"] >= 20).all()
    assert table["accuracy"].between(0, 1).all() and (table["lo"] <= table["accuracy"]).all()
    assert PRESETS["cpu-reasoning"].task == task_name(reasoning.choose_level(table))


def test_reasoning_presets_keep_the_measured_settings():
    cpu, reas = PRESETS["cpu"], PRESETS["cpu-reasoning"]
    for name in ("model_id", "dtype"):
        assert getattr(reas, name) == getattr(cpu, name), name
    # the evaluation cap chosen on validation (figures/reasoning_cap_cpu.csv), the pairs' cap within the upper bound
    caps = pd.read_csv(CAP_CSV)
    assert reas.eval_max_new_tokens == int(caps.loc[caps["chosen"], "cap"].iloc[0]) <= reasoning.CAP_UPPER_BOUND
    assert reas.max_new_tokens <= reasoning.CAP_UPPER_BOUND and (reas.eval_batch_size, reas.eval_no_repeat_ngram) == (100, 0)
    at_cap = caps[caps["cap"] == reas.eval_max_new_tokens]
    assert set(at_cap["method"]) == {"prompting", "SFT", "MIPO"}
    # the rule met, or the cap at its bound with the shortfall in the table (notebook 07 and the findings say it)
    met = (at_cap["finished"] >= reasoning.FINISHED_SHARE).all()
    assert met or reas.eval_max_new_tokens == reasoning.CAP_UPPER_BOUND
    assert set(caps["seeds"].astype(str)) == {" ".join(map(str, reas.seeds))}  # every seed's adapters answered
    for p in (reas, PRESETS["smoke-reasoning"]):
        assert p.negative == "random_prompt" and not get_task(p.task).conditional and len(p.seeds) == 3
        assert p.n_test_prompts <= len(get_task(p.task).examples("test"))
        assert p.n_train_prompts <= len(get_task(p.task).examples("train"))


def test_reasoning_twin_of_a_preset_with_context(capsys):
    reas = get_preset("cpu-reasoning")
    assert reasoning.reasoning_twin(reas) is reas
    twin = reasoning.reasoning_twin(get_preset("smoke", beta=0.3), beta=0.3)
    assert (twin.name, twin.beta) == ("smoke-reasoning", 0.3) and "reasoning twin" in capsys.readouterr().out
    word = get_preset("cpu", task="arithmetic_word", negative="random_prompt")
    assert reasoning.reasoning_twin(word) is word
    with pytest.raises(MipoError, match="needs a reasoning task"):
        reasoning.reasoning_twin(get_preset("t4"))


def test_figures_of_the_reasoning_reference_go_with_the_cpu_reference():
    assert reasoning.figures_preset(PRESETS["cpu-reasoning"]) == "cpu"
    assert reasoning.figures_preset(PRESETS["smoke-reasoning"]) == "smoke-reasoning"


def test_methods_for_a_task_without_context():
    assert reasoning.methods_for(get_task("arithmetic_word")) == ["prompting", "SFT", "MIPO"]
    assert reasoning.base_method(get_task("arithmetic_word")) == "prompting"
    assert "CAD" in reasoning.methods_for(get_task("personalization"))


# ------------------------------------------------------------------------------------------------ analyses
def test_pair_correctness_counts_each_kind():
    pairs = pd.DataFrame({"seed": [0] * 4 + [1] * 2, "chosen_score": [1, 1, 0, 0, 1, 0],
                          "rejected_score": [0, 1, 1, 0, 0, 0]})
    t = reasoning.pair_correctness(pairs).set_index("seed")
    assert t.loc[0, ["agree", "disagree", "both_correct", "both_wrong"]].tolist() == [0.25] * 4
    assert (t.loc[1, "positive_correct"], t.loc[1, "agree"], t.loc[1, "n_pairs"]) == (0.5, 0.5, 2)


def _records(method, seed, responses, scores, truncated=None):
    return pd.DataFrame({"task": "arithmetic_word", "method": method, "seed": seed,
                         "example_id": [f"e{i}" for i in range(len(scores))], "group": "g", "response": responses,
                         "score": scores, "n_words": 1,
                         "truncated": [False] * len(scores) if truncated is None else truncated})


def test_format_decomposition_adds_up():
    base = _records("prompting", 0, ["Answer: 7", "no idea", "no idea.", "It is 5"], [1.0, 0.0, 0.0, 0.0],
                    truncated=[False, True, False, True])
    mipo = pd.concat([_records("MIPO", 0, ["Answer: 7", "Answer: 8", "Answer: 9", "no"], [1.0, 1.0, 0.0, 0.0]),
                      _records("MIPO", 1, ["Answer: 7", "Answer: 8", "Answer: 9", "Answer: 6"], [1.0, 0.0, 0.0, 1.0])])
    formats = reasoning.answer_formats(pd.concat([mipo, base]))
    assert list(formats["method"].unique()) == ["prompting", "MIPO"]
    b = formats[formats["method"] == "prompting"].iloc[0]
    # "It is 5" has a number but no answer line: no final answer
    assert (b["parseable"], b["accuracy_parseable"], b["share_none"], b["share_answer_line"]) == (0.25, 1.0, 0.75, 0.25)
    assert (b["unfinished"], b["accuracy_finished"], b["mean_words"]) == (0.5, 0.5, 2.25)  # the truncated flag
    dec = reasoning.format_decomposition(formats, "MIPO", "prompting")
    assert np.allclose(dec["difference"], dec["format"] + dec["correctness"])
    assert np.allclose(dec["difference"], [0.25, 0.25])
    with pytest.raises(MipoError, match="needs rows of both"):
        reasoning.format_decomposition(formats, "SFT", "prompting")
    with pytest.raises(MipoError, match="truncated"):
        reasoning.answer_formats(base.drop(columns="truncated"))


class _Tokens:
    """A tokenizer stand-in: one token per character."""

    def encode(self, text, add_special_tokens=False):
        return list(text)


def test_reply_lengths_and_the_smallest_cap_at_which_every_method_finishes():
    rec = pd.concat([_records("prompting", 0, ["a" * 9, "a" * 4, "a" * 2, "a" * 3], [0.0] * 4),
                     _records("MIPO", 0, ["a" * 5, "a" * 6, "a" * 7, "a" * 20], [0.0] * 4, truncated=[0, 0, 0, 1])])
    lengths = reasoning.reply_lengths(_Tokens(), rec)
    assert lengths["n_tokens"].tolist()[:4] == [10, 5, 3, 4]  # characters + the end token
    assert math.isinf(lengths["n_tokens"].iloc[-1])  # cut: never finishes, whatever the cap
    shares = reasoning.finished_shares(lengths, [4, 8]).set_index(["method", "cap"])["finished"]
    assert shares[("prompting", 4)] == 0.5 and shares[("MIPO", 8)] == 0.75
    assert reasoning.choose_cap(lengths, share=0.75, upper=10) == 8  # MIPO needs 8 (3 of 4), prompting 5
    assert reasoning.choose_cap(lengths.iloc[:4], share=1.0, upper=10) == 10
    # the cut reply never finishes: no cap up to the bound meets the rule, so the cap is the bound, and MIPO falls short
    assert reasoning.choose_cap(lengths, share=0.95, upper=10) == 10
    table = reasoning.finished_shares(lengths, [8, 10])
    assert reasoning.shortfall(table, 10, 0.95) == {"MIPO": 0.75} and reasoning.shortfall(table, 10, 0.75) == {}


def test_answer_prefix_and_variants():
    assert reasoning.answer_prefix("Sam has 12.\nAnswer: 12") == "Sam has 12.\nAnswer:"
    assert reasoning.answer_prefix("Sam has 12.  ") == "Sam has 12.\nAnswer:"
    ex = Example(id="wa-7+5", request="Sam has 7 apples. He gets 5 more apples. How many?", answer="12")
    seen = set()
    for seed in range(30):
        v = reasoning.answer_variants(ex, np.random.default_rng(seed))
        assert v["right"] == 12 and v["operand"] in (7, 5) and v["random"] not in (12, 7, 5)
        assert 0 <= v["random"] <= reasoning.RANDOM_MAX
        seen.add(v["operand"])
    assert seen == {5, 7}
    assert reasoning.answer_variants(Example(id="x", request="What is 3 + 3 - 3?", answer="3"),
                                     np.random.default_rng(0)) is None  # no operand to compare with


def test_within_problem_pmi_is_the_answer_logprob_given_x_minus_its_mean_given_other_problems():
    task = get_task("arithmetic_word")
    examples = task.examples("validation", 4)
    answer = {task.prompt(e)[0]["content"]: int(e.answer) for e in examples}
    calls = []

    def score(prompts, prefixes, numbers):  # a made-up model: log p(N | x, prefix) = -|N - the answer of x|
        calls.append(len(prompts))
        return [-abs(n - answer[p[0]["content"]]) for p, n in zip(prompts, numbers)]

    frame = reasoning.within_problem_pmi(task, examples, ["x\nAnswer: 3"] * 4, score, k_other=2, seed=0)
    assert calls == [4 * 3 * 3] and len(frame) == 12 and list(frame["variant"][:3]) == list(reasoning.VARIANTS)
    assert np.allclose(frame["pmi"], frame["logp_x"] - frame["logp_x_prime"])
    right = frame[frame["variant"] == "right"]
    assert (right["logp_x"] == 0).all() and right["number"].tolist() == [int(e.answer) for e in examples]
    wrong = frame[frame["variant"] != "right"]
    assert (wrong["logp_x"] < 0).all()
    wins = reasoning.pmi_wins(frame, n_boot=200).set_index(["measure", "versus"])
    assert wins.loc[("logp_x", "operand"), "win_rate"] == 1.0 and wins.loc[("logp_x", "random"), "n"] == 4
    with pytest.raises(MipoError, match="k_other"):
        reasoning.within_problem_pmi(task, examples, ["x"] * 4, score, k_other=4)
    zero = Example(id="z", request="What is 0 + 0?", answer="0")  # no operand: left out
    answer[task.prompt(zero)[0]["content"]] = 0
    frame = reasoning.within_problem_pmi(task, [*examples, zero], ["x"] * 5, score, k_other=2, seed=0)
    assert sorted(set(frame["example_id"])) == sorted(e.id for e in examples)


def test_pmi_wins_counts_ties_as_half_and_pairs_within_problems():
    frame = pd.DataFrame({"example_id": ["a"] * 3 + ["b"] * 3 + ["c"] * 3, "variant": list(reasoning.VARIANTS) * 3,
                          "pmi": [2.0, 1.0, 3.0, 0.0, -1.0, -1.0, 5.0, 5.0, 9.0],
                          "logp_x": [0.0, -1.0, -1.0, 0.0, -1.0, -1.0, 0.0, -1.0, -1.0]})
    w = reasoning.pmi_wins(frame, n_boot=500).set_index(["measure", "versus"])
    assert w.loc[("pmi", "operand"), "win_rate"] == pytest.approx(2.5 / 3)  # a wins, b wins, c ties
    assert w.loc[("pmi", "random"), "win_rate"] == pytest.approx(1 / 3)  # a loses, b wins, c loses
    assert w.loc[("logp_x", "operand"), "win_rate"] == 1.0 and w.loc[("logp_x", "operand"), "lo"] == 1.0
    assert w.loc[("pmi", "operand"), "mean_difference"] == pytest.approx(2 / 3)


def test_auc_and_pmi_ranking():
    assert reasoning.auc([3, 2, 1, 0], [1, 1, 0, 0]) == 1.0
    assert reasoning.auc([0, 1, 2, 3], [1, 1, 0, 0]) == 0.0
    assert reasoning.auc([1, 1, 1, 1], [1, 0, 1, 0]) == 0.5  # ties count one half
    assert math.isnan(reasoning.auc([1, 2], [1, 1]))
    frame = pd.DataFrame({"correct": [1, 1, 0, 0, 0], "pmi": [5.0, 4.0, 1.0, 0.0, -1.0],
                          "logp_x": [-9.0, 0.0, -1.0, -2.0, -10.0]})
    r = reasoning.pmi_ranking(frame, n_boot=200).set_index("measure")
    assert r.loc["pmi", "auc"] == 1.0 and r.loc["pmi", "lo"] <= 1.0 and r.loc["logp_x", "auc"] == pytest.approx(2 / 3)
    assert (r.loc["pmi", "mean_correct"], r.loc["pmi", "n_wrong"]) == (4.5, 3)


@pytest.mark.slow
def test_measure_difficulty_and_answer_pmi_on_the_tiny_model(one_thread, capsys):
    preset = get_preset("smoke-reasoning")
    summary, records = reasoning.measure_difficulty(preset, ["one_digit_add", "word"], n=3, progress=False)
    assert list(summary["level"]) == ["one_digit_add", "word"] and (summary["n"] == 3).all()
    assert len(records) == 6 and set(records["parsed_how"]) <= set(reasoning.PARSE_KINDS)
    with pytest.raises(MipoError, match="unknown arithmetic level"):
        reasoning.measure_difficulty(preset, ["calculus"])

    task = get_task(preset.task)
    examples = task.examples("test", preset.n_test_prompts)
    recs = _records("prompting", 0, [f"It is {i}." for i in range(len(examples))],
                    [float(i % 2) for i in range(len(examples))]).assign(example_id=[e.id for e in examples])
    first = reasoning.answer_pmi(preset, recs, "prompting", progress=False)
    assert np.allclose(first["pmi"], first["logp_x"] - first["logp_x_prime"]) and len(first) == len(examples)
    assert np.isfinite(first["pmi"]).all() and (first["n_tokens"] > 0).all()
    capsys.readouterr()
    again = reasoning.answer_pmi(preset, recs, "prompting", progress=False)
    cache.say_reused()
    assert "reusing answer PMI" in capsys.readouterr().out
    pd.testing.assert_frame_equal(first, again)


def test_answer_logprobs_score_only_the_number_after_the_prefix(one_thread):
    from mipo_lib.generate import chat_prompt_ids
    from mipo_lib.models import load_for_preset
    from mipo_lib.scoring import completion_logprobs

    model, tokenizer = load_for_preset(get_preset("smoke-reasoning"))
    task = get_task("arithmetic_word")
    ex = task.examples("validation", 2)
    prompts, prefixes, numbers = [task.prompt(ex[0]), task.prompt(ex[1])], ["Sam has 3.\nAnswer:"] * 2, [17, 4]
    got = reasoning.answer_logprobs(model, tokenizer, prompts, prefixes, numbers, batch_size=2)
    for i in range(2):  # log p(prefix + " N" | x) - log p(prefix | x): the number's own log-probability
        chat = chat_prompt_ids(tokenizer, prompts[i])
        full = tokenizer.encode(f"{prefixes[i]} {numbers[i]}", add_special_tokens=False)
        head = tokenizer.encode(prefixes[i], add_special_tokens=False)
        both = completion_logprobs(model, [chat, chat], [full, head], tokenizer.pad_token_id)
        assert got[i] == pytest.approx(both[0] - both[1], abs=1e-4) and got[i] < 0


@pytest.mark.slow
def test_base_reply_pmi_on_the_tiny_model_is_cached(one_thread, capsys):
    preset = get_preset("smoke-reasoning")
    examples = get_task(preset.task).examples("test", preset.n_test_prompts)
    recs = _records("prompting", 0, [f"It is {i}.\nAnswer: {i}" for i in range(len(examples))],
                    [0.0] * len(examples)).assign(example_id=[e.id for e in examples], task=preset.task)
    first = reasoning.base_reply_pmi(preset, recs, "prompting", progress=False)
    kept = [e for e in examples if reasoning.answer_variants(e, np.random.default_rng(0)) is not None]
    assert len(first) == 3 * len(kept) and np.isfinite(first["pmi"]).all()
    assert np.allclose(first["pmi"], first["logp_x"] - first["logp_x_prime"])
    capsys.readouterr()
    again = reasoning.base_reply_pmi(preset, recs, "prompting", progress=False)
    cache.say_reused()
    assert "reusing within-problem answer PMI" in capsys.readouterr().out
    pd.testing.assert_frame_equal(first, again)


@pytest.mark.slow
def test_the_cap_is_chosen_on_every_seeds_validation_replies_of_the_adapters_the_test_run_reads(one_thread, capsys):
    from mipo_lib.experiments import pipeline, tune

    preset = get_preset("smoke-reasoning")
    cap, table = reasoning.choose_cap_on_validation(preset, seeds=(0, 1), share=0.0, upper=12, progress=False)
    n = len(tune.validation_examples(preset))
    assert cap == 1 and set(table["method"]) == {"prompting", "SFT", "MIPO"} and (table["seeds"] == "0 1").all()
    assert (table["n"] == 2 * n).all() and table.loc[table["chosen"], "cap"].tolist() == [1] * 3
    assert table.groupby("method")["finished"].apply(lambda f: f.is_monotonic_increasing).all()
    # the adapters are the pipeline's own (the test run reuses them), and a second call generates nothing
    assert set(pipeline.stored_adapters(preset, ["SFT", "MIPO"], [0, 1])) == {(m, s) for m in ("SFT", "MIPO") for s in (0, 1)}
    capsys.readouterr()
    again = reasoning.choose_cap_on_validation(preset, seeds=(0, 1), share=0.0, upper=12, progress=False)[1]
    pd.testing.assert_frame_equal(table, again)
    cap, strict = reasoning.choose_cap_on_validation(preset, seeds=(0, 1), share=1.0, upper=12, progress=False)
    assert (strict["required"] == 1.0).all() and (cap == 12 or not reasoning.shortfall(strict, cap, 1.0))


def test_committed_reasoning_choices_were_tuned_under_the_preset_at_the_caps_upper_bound():
    """figures/choices_cpu-reasoning.csv was tuned under cpu-reasoning as written, in fp32, its replies generated at
    the cap's upper bound (`make reasoning-choices SET="dtype=float32"`): a change to the preset that the tuning read,
    without tuning anew, fails here."""
    import json

    from mipo_lib.config import choices_path
    from mipo_lib.experiments import tune

    table = pd.read_csv(choices_path("cpu-reasoning"))
    swept = get_preset("cpu-reasoning", tuned=False, dtype="float32", eval_max_new_tokens=reasoning.CAP_UPPER_BOUND)
    assert set(table["field"]) == {"epochs", "learning_rate", "sft_epochs", "sft_learning_rate"}
    for row in table.itertuples():
        assert json.loads(row.tuned_under) == tune.tuned_under(swept, row.method, set(table["field"]))
