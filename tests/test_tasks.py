"""Tasks: the checkers and scorers are the judges of every reported number, so each is tested on both sides."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # a hub id must fail fast here, not retry for ~45 s

import json
import time
from collections import Counter
from pathlib import Path

import pytest

from mipo_lib.errors import MipoError
from mipo_lib.tasks import get_task, task_names
from mipo_lib.tasks.arithmetic import ArithmeticTask
from mipo_lib.tasks.datasets import official_arc_choice, official_math_answer, prism_split
from mipo_lib.tasks.numbers import final_answer, last_number, numbers_in
from mipo_lib.tasks.personalization import (
    PREFERENCES,
    REQUESTS,
    COMPLETE_ONLY,
    LENGTH_INSTRUCTION,
    SEEN_TYPES,
    TEST_REQUEST_IDS,
    TRAIN_REQUEST_IDS,
    VALIDATION_REQUEST_IDS,
    PersonalizationTask,
    UnseenTypesTask,
    balanced_shape,
    check,
    sentences,
)

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "data" / "fixtures"
REAL_GSM8K = Path(__file__).resolve().parents[2] / "shared/data/gsm8k/test.jsonl"


# --------------------------------------------------------------------------------------------- preference checkers
CASES = {
    "lowercase": (["all good here.", "tea: 2 cups"], ["All good.", "", "123 !", "ok then I"]),
    "short": (["Boil water, add tea.", " ".join(["w"] * 24)], [" ".join(["w"] * 25), "", "   "]),
    "cheers": (["Enjoy your tea. Cheers!", "Cheers!  \n", "Cheers!"], ["Cheers", "cheers!", "Cheers! Bye.", ""]),
    "hey_there": (["Hey there, boil water.", "  Hey there!"], ["hey there, hi.", "Well, Hey there.", "Hey, there", ""]),
    "bullets": (["- one\n- two", "Steps:\n  - boil\n  - pour\n"], ["- only one", "-one\n-two", "* a\n* b", ""]),
    "banana": (["I like Bananas.", "A BANANA a day.", "banana-bread"], ["bananarama", "no fruit here", ""]),
    "no_commas": (["No commas at all.", "Plain"], ["One, two.", "", "  \n"]),
    "two_sentences": (
        ["Boil water. Add tea.", "Really?! Yes.", "It costs 3.5 dollars. Pay now.", 'He said "go." Then left.'],
        # the last one is a cut-off reply (a sentence and a fragment): the second sentence must be finished
        ["One sentence only.", "One. Two. Three.", "", "...", "- a\n- b\n- c",
         "Brew the tea for three minutes. Then add milk and sugar to taste, and enjoy it with a"],
    ),
    "all_caps": (["BOIL WATER NOW!", "TEA: 2 CUPS"], ["Boil water.", "", "123"]),
    "digit": (["Use 2 bags.", "Wait 5min"], ["Use two bags.", ""]),
}


def test_preferences_are_the_ten_documented_ones():
    assert list(PREFERENCES) == [
        "lowercase", "short", "cheers", "hey_there", "bullets",
        "banana", "no_commas", "two_sentences", "all_caps", "digit",
    ]
    assert set(CASES) == set(PREFERENCES)
    assert len({sentence for sentence, _ in PREFERENCES.values()}) == 10


@pytest.mark.parametrize("key", list(CASES))
def test_checker_accepts_positives_and_rejects_negatives(key):
    positives, negatives = CASES[key]
    for text in positives:
        assert check(key, text), f"{key} should accept {text!r}"
    for text in negatives:
        assert not check(key, text), f"{key} should reject {text!r}"


def test_sentence_splitting_rule():
    assert sentences("Boil water. Add tea!") == ["Boil water.", "Add tea!"]
    assert sentences("Pi is 3.14 roughly. Yes") == ["Pi is 3.14 roughly.", "Yes"]  # decimal point is not an end
    assert sentences("Wait... what?! Ok.") == ["Wait...", "what?!", "Ok."]
    assert sentences("Line one\nLine two") == ["Line one", "Line two"]  # a line break ends a sentence
    assert sentences('She said "hi." Then left.') == ['She said "hi."', "Then left."]
    assert sentences("") == [] and sentences(" ... !! ") == []


def test_unknown_preference_is_a_mipo_error():
    with pytest.raises(MipoError, match="valid: lowercase"):
        check("emoji", "hi")


# ---------------------------------------------------------------------------------------- personalization splits
def test_requests_split_30_10_20_disjoint_and_unique():
    assert len(REQUESTS) == 60 and len(set(REQUESTS)) == 60
    assert len(TRAIN_REQUEST_IDS) == 30 and len(VALIDATION_REQUEST_IDS) == 10 and len(TEST_REQUEST_IDS) == 20
    assert set(TRAIN_REQUEST_IDS) | set(VALIDATION_REQUEST_IDS) | set(TEST_REQUEST_IDS) == {f"r{i:02d}" for i in range(60)}
    task = PersonalizationTask()
    train, val, test = ({e.request for e in task.examples(s)} for s in ("train", "validation", "test"))
    assert (len(train), len(val), len(test)) == (30, 10, 20)
    assert not train & test and not train & val and not val & test


def test_validation_subset_is_fixed_and_balanced():
    task = PersonalizationTask()
    ids = [[e.id for e in task.examples("validation", n=50, seed=s)] for s in (0, 3)]
    assert ids[0] == ids[1] and len(ids[0]) == 50
    assert set(Counter(e.meta["preference"] for e in task.examples("validation", n=50)).values()) == {5}


def test_full_splits_cross_every_request_with_every_preference():
    task = PersonalizationTask()
    train, test = task.examples("train"), task.examples("test")
    assert len(train) == 300 and len(test) == 200
    assert len({e.id for e in train + test + task.examples("validation")}) == 600
    ex = next(e for e in train if e.id == "r00-banana")
    assert ex.request == "How do I make tea?" and ex.context == PREFERENCES["banana"][0]
    assert ex.meta["preference"] == "banana" and task.group(ex) == "banana"


@pytest.mark.parametrize("n, shape", [(120, (12, 10)), (16, (2, 8)), (20, (2, 10)), (7, (1, 7)), (300, (30, 10))])
def test_train_subsets_are_balanced_and_deterministic(n, shape):
    task = PersonalizationTask()
    assert balanced_shape(n, 30) == shape
    a, b = task.examples("train", n=n, seed=3), task.examples("train", n=n, seed=3)
    assert [e.id for e in a] == [e.id for e in b]
    assert len(a) == n and len({e.id for e in a}) == n
    counts = Counter(e.meta["preference"] for e in a)
    assert len(counts) == shape[1] and set(counts.values()) == {shape[0]}
    assert len({e.request for e in a}) == shape[0]


def test_train_subset_depends_on_seed_and_is_nested_in_n():
    task = PersonalizationTask()
    s0, s1 = task.examples("train", n=120, seed=0), task.examples("train", n=120, seed=1)
    assert {e.request for e in s0} != {e.request for e in s1}
    small = {e.id for e in task.examples("train", n=60, seed=0)}
    assert small <= {e.id for e in s0}


def test_test_subset_ignores_the_seed():
    task = PersonalizationTask()
    for n in (20, 200):
        ids = [[e.id for e in task.examples("test", n=n, seed=s)] for s in (0, 1, 7)]
        assert ids[0] == ids[1] == ids[2]
    assert len(task.examples("test", n=200)) == 200


def test_subset_errors():
    task = PersonalizationTask()
    with pytest.raises(MipoError, match="n <= 300"):
        task.examples("train", n=310)
    with pytest.raises(MipoError, match="train, validation, test"):
        task.examples("dev")


def test_prompt_with_without_and_swapped_context():
    task = PersonalizationTask()
    ex = next(e for e in task.examples("test") if e.meta["preference"] == "cheers")
    other = PREFERENCES["banana"][0]
    request = f"{ex.request} {LENGTH_INSTRUCTION}"
    assert LENGTH_INSTRUCTION == "Respond with short 2-3 sentences."  # the official PRISM template's instruction
    assert task.prompt(ex) == [{"role": "user", "content": f"{PREFERENCES['cheers'][0]}\n\n{request}"}]
    assert task.prompt(ex, with_context=False) == [{"role": "user", "content": request}]
    assert task.prompt(ex, context=other) == [{"role": "user", "content": f"{other}\n\n{request}"}]
    with pytest.raises(MipoError):
        task.prompt(ex, with_context=False, context=other)
    # the judge keeps the example's own preference, whatever context a prompt used
    assert task.score(ex, "Sure. Cheers!") == 1.0 and task.score(ex, "I like bananas.") == 0.0


# A reply cut off at the token cap, and the same text as a finished reply: judges a cut-off could fake must fail it.
CUT_OFF = {
    "lowercase": "boil water and pour it over the leaves",  # a capital may come next
    "short": "Boil water.",  # more words may come next
    "no_commas": "Boil water and pour it",  # a comma may come next
    "two_sentences": "Boil water. Pour it.",  # a third sentence may come next
    "all_caps": "BOIL WATER AND",
    "cheers": "Enjoy. Cheers!",
}


@pytest.mark.parametrize("key", sorted(CUT_OFF))
def test_cut_off_replies_fail_the_preferences_more_text_could_break(key):
    reply = CUT_OFF[key]
    assert key in COMPLETE_ONLY
    assert check(key, reply) and not check(key, reply, truncated=True)
    ex = next(e for e in PersonalizationTask().examples("test") if e.meta["preference"] == key)
    assert PersonalizationTask().score(ex, reply) == 1.0 and PersonalizationTask().score(ex, reply, truncated=True) == 0.0


@pytest.mark.parametrize("key, reply", [("banana", "I love bananas and"), ("digit", "Use 2 bags and"),
                                        ("hey_there", "Hey there, boil"), ("bullets", "- boil\n- pour\n- wait for")])
def test_cut_off_replies_keep_verdicts_more_text_cannot_break(key, reply):
    assert key not in COMPLETE_ONLY and check(key, reply, truncated=True)


def test_registered_preferences_are_complete_only_unless_said_otherwise():
    from mipo_lib.tasks import register_preference, unregister_preference

    register_preference("tea_word", "Mention tea.", lambda r: "tea" in r)
    register_preference("coffee_word", "Mention coffee.", lambda r: "coffee" in r, complete_only=False)
    try:
        assert "tea_word" in COMPLETE_ONLY and "coffee_word" not in COMPLETE_ONLY
        assert not check("tea_word", "tea and", truncated=True) and check("coffee_word", "coffee and", truncated=True)
    finally:
        unregister_preference("tea_word")
        unregister_preference("coffee_word")
    assert "tea_word" not in COMPLETE_ONLY


def test_unseen_types_task_trains_and_tests_on_disjoint_preferences():
    task = get_task("personalization_unseen_types")
    assert isinstance(task, UnseenTypesTask)
    train, val, test = (task.examples(s, n) for s, n in (("train", 60), ("validation", 50), ("test", 100)))
    seen = {e.meta["preference"] for e in train}
    assert seen == set(SEEN_TYPES) == {e.meta["preference"] for e in val}
    unseen = {e.meta["preference"] for e in test}
    assert len(unseen) == 5 and not seen & unseen
    assert {e.request for e in test} == {e.request for e in PersonalizationTask().examples("test")}
    assert len(train) == 60 and len(test) == 100


# ---------------------------------------------------------------------------------------------------- arithmetic
def test_number_parsing():
    assert numbers_in("It is 1,200 or 3, 4 and -5 but 12 - 7 = 5.") == [1200, 3, 4, -5, 12, 7, 5]
    assert last_number("So the answer is 85.") == 85 and last_number("85.0") == 85 and last_number("none") is None
    assert final_answer("2 + 2 = 4\n#### 4\nbye 9") == 4
    assert final_answer("#### \nthe answer is 7") == 7  # an empty #### falls back to the last number


def test_arithmetic_splits_disjoint_deterministic_and_balanced():
    task = ArithmeticTask()
    test = task.examples("test")
    train = task.examples("train")
    assert len(test) == 1000 and not {e.id for e in test} & {e.id for e in train}
    assert [e.id for e in task.examples("test", n=50, seed=0)] == [e.id for e in task.examples("test", n=50, seed=9)]
    t0, t1 = task.examples("train", n=50, seed=0), task.examples("train", n=50, seed=1)
    assert [e.id for e in t0] == [e.id for e in task.examples("train", n=50, seed=0)]
    assert [e.id for e in t0] != [e.id for e in t1]
    assert Counter(task.group(e) for e in t0) == {"addition": 25, "subtraction": 25}
    assert all(int(e.answer) >= 0 for e in train)
    with pytest.raises(MipoError):
        task.examples("train", n=0)


def test_arithmetic_answers_and_scoring():
    task = ArithmeticTask()
    for e in task.examples("test", n=20):
        a, op, b = e.request.removeprefix("What is ").removesuffix("?").split()
        assert int(e.answer) == (int(a) + int(b) if op == "+" else int(a) - int(b))
        assert task.prompt(e) == task.prompt(e, with_context=False) == [{"role": "user", "content": e.request}]
    ex = next(e for e in task.examples("test") if e.meta["operation"] == "addition")
    right = int(ex.answer)
    assert task.score(ex, f"{ex.request[8:-1]} = {right}.") == 1.0
    assert task.score(ex, f"The answer is {right:,}") == 1.0
    assert task.score(ex, f"{right} is wrong, it is {right + 1}") == 0.0
    assert task.score(ex, "I don't know") == 0.0
    with pytest.raises(MipoError):
        task.prompt(ex, context="anything")


# -------------------------------------------------------------------------------------------------------- loaders
def test_gsm8k_fixture():
    task = get_task("gsm8k", train_path=FIXTURES / "gsm8k_sample.jsonl", test_path=FIXTURES / "gsm8k_sample.jsonl")
    examples = task.examples("test")
    assert len(examples) == 6 and examples[0].answer == "18" and examples[-1].answer == "1200"
    assert not task.conditional and task.group(examples[0]) == "gsm8k"
    (message,) = task.prompt(examples[0])
    content = message["content"]
    assert message["role"] == "user" and content.startswith("You are a helpful math assistant. Solve the following")
    assert content.count("\n#### ") == 8 and "Example 8:\nQuestion: Olivia has $23." in content
    assert content.endswith("\n\nNew question: " + examples[0].request.strip())
    ex = examples[0]
    assert task.score(ex, "She sells 9 eggs for $2 each.\n#### 18") == 1.0
    assert task.score(ex, "#### 18.00") == 1.0
    assert task.score(ex, "She makes $18 a day.") == 1.0  # no ####: the last number
    assert task.score(ex, "#### 18 ... wait, 9 eggs") == 1.0  # the number right after #### wins
    assert task.score(ex, "She makes 9 * 2 = 18, no: #### 16") == 0.0
    assert task.score(ex, "#### 18\n\nExample 9:\nQuestion: ...\n#### 7") == 1.0  # the FIRST #### (gsm.py line 220)
    assert task.score(examples[-1], "In total #### 1,200 loaves.") == 1.0
    seeded = [e.id for e in task.examples("train", n=3, seed=0)]
    assert seeded == [e.id for e in task.examples("train", n=3, seed=0)] and len(seeded) == 3


def test_official_math_answer():
    assert official_math_answer("#### 5\n#### 6") == 5.0
    assert official_math_answer("x #### -10 degrees") == -10.0  # the official regex would read 10
    assert official_math_answer("#### 2,125") == 2125.0  # ... and 2
    assert official_math_answer("#### none\nso 4 apples") == 4.0  # nothing after ####: the last number
    assert official_math_answer("no numbers") is None
    with pytest.raises(MipoError, match="n_shots=0 must be between 1 and 8"):
        get_task("gsm8k", n_shots=0)
    one_shot = get_task("gsm8k", test_path=FIXTURES / "gsm8k_sample.jsonl", n_shots=1)
    content = one_shot.prompt(one_shot.examples("test")[0])[0]["content"]
    assert "Example 1:" in content and "Example 2:" not in content


def test_gsm8k_real_test_file_sample_of_200():
    if not REAL_GSM8K.exists():
        pytest.skip(f"real GSM8K not at {REAL_GSM8K}")
    import pandas as pd

    task = get_task("gsm8k", test_path=REAL_GSM8K)
    records = task.records("test")
    assert len(records) == 1319
    every = task.examples("test")  # every row's gold answer is recovered from its '#### <number>' line
    for e, r in zip(every, records):
        tail = r["answer"].split("####")[1].strip()
        assert float(e.answer) == float(tail.replace(",", "")), (e.id, tail)
    sample = task.examples("test", n=200, seed=0)
    official = pd.DataFrame(records).sample(n=200, random_state=42, replace=False)  # gsm.py line 177
    assert [e.id for e in sample] == [f"gsm8k-test-{i:04d}" for i in official.index]
    assert [e.request for e in sample] == official["question"].tolist()
    assert [e.id for e in sample] == [e.id for e in task.examples("test", n=200, seed=5)]  # random_state 42 always
    assert float(sample[0].answer) == final_answer(official["answer"].iloc[0])


def test_svamp_fixture():
    task = get_task("svamp", train_path=FIXTURES / "svamp_sample.json", test_path=FIXTURES / "svamp_sample.json",
                    gsm8k_train_path=FIXTURES / "gsm8k_sample.jsonl")
    examples = task.examples("test")
    assert [e.answer for e in examples] == ["23", "19", "42", "7", "3.75"]  # all test rows, in file order
    first = examples[0]
    assert first.request == (
        "Maya has 14 stickers. Her brother gives her 9 more stickers. How many stickers does Maya have now?"
    )
    content = task.prompt(first)[0]["content"]
    assert content.startswith("You are a helpful math assistant.") and content.endswith("New question: " + first.request)
    assert task.group(first) == "Addition" and task.group(examples[3]) == "Common-Division"
    assert task.score(first, "14 + 9 = 23\n#### 23") == 1.0 and task.score(first, "#### 24") == 0.0
    assert task.score(examples[4], "2.5 + 1.25 = 3.75 kilometers.") == 1.0
    train = task.examples("train")  # SVAMP's training rows plus GSM8K training rows (700 officially; all 6 here)
    assert len(train) == 5 + 6 and sum(task.group(e) == "gsm8k" for e in train) == 6
    assert [e.id for e in task.examples("train", n=4, seed=1)] == [e.id for e in task.examples("train", n=4, seed=1)]


def test_arc_fixture_and_official_letter_extraction():
    task = get_task("arc_easy", test_path=FIXTURES / "arc_sample.jsonl")
    examples = task.examples("test")
    assert len(examples) == 5 and task.name == "arc_easy"
    content = task.prompt(examples[0])[0]["content"]
    assert content == (
        "You are a helpful assistant. The following is a multiple choice question with answer choices. Your response "
        'should show clear and concise reasoning, and you should end with "The answer is: <X>", where X is the correct '
        "letter choice.\n\nWhich part of a plant takes in water from the soil?\n\nA: leaves\nB: roots\nC: flowers\n"
        'D: seeds\n\nYour response should end with "The answer is: <X>", where X is the correct letter choice.'
    )
    numeric = examples[2]  # labelled 1-4 in the file: lettered by position, the key mapped to its letter
    assert numeric.meta["labels"] == ["A", "B", "C", "D"] and numeric.answer == "B"
    assert examples[3].meta["labels"] == ["A", "B", "C", "D", "E"]
    assert task.score(examples[0], "Roots absorb water. The answer is: B") == 1.0
    assert task.score(examples[0], "B") == 0.0  # no "the answer is": no answer, as in the official code
    labels = ["A", "B", "C", "D"]
    assert official_arc_choice("THE ANSWER IS (C).", labels) == "C"
    assert official_arc_choice("The answer is: a tricky one, so D", labels) == "D"  # capitals only: "a" is no choice
    assert official_arc_choice("The answer is B. Or the answer is C.", labels) == "B"  # the first marker
    assert official_arc_choice("The answer is E", labels) is None and official_arc_choice("The answer is E", labels + ["E"]) == "E"
    assert official_arc_choice("I think C.", labels) is None
    challenge = get_task("arc_challenge", test_path=FIXTURES / "arc_sample.jsonl")
    assert challenge.name == "arc_challenge" and challenge.group(challenge.examples("test")[0]) == "arc_challenge"


def test_prism_fixture_prompts_references_and_judge_error():
    task = get_task("prism", path=FIXTURES / "prism_sample.jsonl")
    assert task.conditional
    train, test = task.examples("train"), task.examples("test")
    assert [e.meta["user_id"] for e in test] == ["user1", "user9"]  # the first test rows, in file order
    assert [e.id for e in task.examples("test", n=1)] == ["c-fixture-2"]
    assert not {e.meta["user_id"] for e in train} & {e.meta["user_id"] for e in test}
    assert len(train) + len(test) == 6 and prism_split("user1") == "test" and prism_split("user0") == "train"
    ex = test[0]
    assert task.prompt(ex) == [{"role": "user", "content": (
        "Give me short 2-3 sentence answers to the following prompt: How can I get better at chess? "
        "Please respect the following requirements made by the user: Answer like a patient teacher and avoid jargon. "
        "Respond with short 2-3 sentences."
    )}]
    assert task.prompt(ex, with_context=False)[0]["content"] == (
        "Give me short 2-3 sentence answers to the following prompt: How can I get better at chess? "
        "Respond with short 2-3 sentences."
    )
    assert task.prompt(ex, context="Be brief.")[0]["content"].endswith(
        "made by the user: Be brief. Respond with short 2-3 sentences.")
    assert ex.meta["preferences"] == ["Answer like a patient teacher and avoid jargon."]
    assert ex.meta["reference"].startswith("Play regularly")
    two = test[1]  # `instructions` (the official field) wins over system_string: one preference per string
    assert two.meta["preferences"] == ["Be honest and direct, even if the answer is uncomfortable.", "Keep it to two sentences."]
    assert two.context == " ".join(two.meta["preferences"])
    assert task.group(ex) == "unguided"
    with pytest.raises(MipoError, match="mipo_lib.evaluate"):
        task.score(ex, "anything")


def test_prism_record_without_preferences_is_refused(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"conversation_id": "c", "user_id": "user1", "opening_prompt": "Hi", "system_string": " "}) + "\n")
    with pytest.raises(MipoError, match="states no preference; give it `instructions`"):
        get_task("prism", path=path).examples("test")


def test_local_file_errors(tmp_path):
    with pytest.raises(MipoError, match="not found"):
        get_task("gsm8k", test_path=tmp_path / "missing.jsonl").examples("test")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q"}\n')
    with pytest.raises(MipoError, match=r"lack field\(s\) \['answer'\]"):
        get_task("gsm8k", test_path=bad).examples("test")


@pytest.mark.parametrize("name,text", [("empty.jsonl", ""), ("blank.jsonl", "\n\n"), ("empty.json", "[]")])
def test_empty_data_file_is_refused(tmp_path, name, text):
    """An empty file used to load as 0 examples and fail much later (0 pairs); it must fail where it is read."""
    path = tmp_path / name
    path.write_text(text)
    for task in (get_task("gsm8k", test_path=path), get_task("svamp", test_path=path), get_task("prism", path=path)):
        with pytest.raises(MipoError, match="has no records; pass a file with at least one example") as err:
            task.examples("test")
        assert "\n" not in str(err.value)


def test_prism_split_without_users_is_refused(tmp_path):
    """A PRISM file whose users all hash to train leaves the test split empty: say so, not "0 examples"."""
    train_user = next(u for u in (f"user{i}" for i in range(50)) if prism_split(u) == "train")
    path = tmp_path / "prism.jsonl"
    record = {"conversation_id": "c1", "user_id": train_user, "opening_prompt": "hi", "system_string": "be brief"}
    path.write_text(json.dumps(record) + "\n")
    assert len(get_task("prism", path=path).examples("train")) == 1
    with pytest.raises(MipoError, match="no user among 1 records falls in the test split"):
        get_task("prism", path=path).examples("test")


@pytest.mark.parametrize("name", ["gsm8k", "svamp", "arc_easy", "arc_challenge", "prism"])
def test_hub_id_offline_fails_fast_with_the_fix(name):
    task = get_task(name)  # building a task reads nothing
    start = time.perf_counter()
    with pytest.raises(MipoError, match="pass a local file path") as err:
        task.examples("test", n=5)
    assert time.perf_counter() - start < 5
    assert "\n" not in str(err.value)


def test_offline_env_set_after_import_is_still_honoured(monkeypatch):
    """trl and datasets read HF_HUB_OFFLINE at import; a later setting must not cost ~25 s of network retries."""
    import datasets
    from huggingface_hub import constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    start = time.perf_counter()
    with pytest.raises(MipoError, match="HF_HUB_OFFLINE is set"):
        get_task("gsm8k").examples("test")
    assert time.perf_counter() - start < 5
    assert datasets.config.HF_HUB_OFFLINE is False and constants.HF_HUB_OFFLINE is False  # restored after the call


# ------------------------------------------------------------------------------------------------------- registry
def test_registry():
    builtin = ("personalization", "personalization_unseen_types", "personalization_constraints", "arithmetic", "gsm8k",
               "svamp", "arc_easy", "arc_challenge", "prism")
    assert task_names()[: len(builtin)] == builtin
    for name in builtin:
        assert get_task(name).name == name
    assert get_task("personalization").conditional and not get_task("arithmetic").conditional
    with pytest.raises(MipoError) as err:
        get_task("mmlu")
    assert all(name in str(err.value) for name in builtin)
    with pytest.raises(MipoError, match="bad options"):
        get_task("arithmetic", test_path="x.jsonl")
