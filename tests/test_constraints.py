"""Test-only negative constraints ("do not mention coffee"): their checkers, their task, and `make constraints`
(issue 29: held-out types done properly, and where MIPO's PMI reward backfires)."""

from __future__ import annotations

import pandas as pd
import pytest

from mipo_lib import evaluate
from mipo_lib.analysis import stats
from mipo_lib.config import get_preset
from mipo_lib.errors import MipoError
from mipo_lib.experiments import constraints, ledger, pipeline
from mipo_lib.tasks import get_task
from mipo_lib.tasks.personalization import (
    NEGATIVE_CONSTRAINTS,
    PREFERENCES,
    NegativeConstraintsTask,
    PersonalizationTask,
    check_constraint,
    echoes_constraint,
)


# ------------------------------------------------------------------------------------------------------- checkers
@pytest.mark.parametrize("key, kept, broken", [
    ("no_coffee", ["Tea is a fine warm drink.", "Try cocoa instead."],
     ["A coffee helps.", "COFFEE first.", "Visit a coffeehouse.", "Two coffees, please."]),
    ("no_hello", ["Hi! Here is a tip.", "Say hello to your neighbor.", "Othello is a good read."],
     ["Hello! Here is a tip.", "hello there", '"Hello," she said.', "  **Hello** friend", "Hellooo!"]),
    ("no_you", ["Your plants need light.", "Water the plants yourself.", "Bayou trips are fun."],
     ["You can do it.", "Thank you.", "If you're tired, rest.", "YOU should rest."]),
    ("no_exclamation", ["Rest well.", "Is it late? Sleep."], ["Rest well!", "Wow! Sleep.", "Sleep!!"]),
])
def test_each_constraint_is_kept_or_broken_as_documented(key, kept, broken):
    for reply in kept:
        assert check_constraint(key, reply), (key, reply)
    for reply in broken:
        assert not check_constraint(key, reply), (key, reply)


def test_an_empty_reply_keeps_no_constraint():
    for key in NEGATIVE_CONSTRAINTS:
        assert not check_constraint(key, "") and not check_constraint(key, "  \n"), key


def test_a_cut_reply_fails_the_constraints_more_text_could_break():
    clean = "Rest well and drink tea"
    assert {k for k in NEGATIVE_CONSTRAINTS if not check_constraint(k, clean, truncated=True)} == {
        "no_coffee", "no_you", "no_exclamation"}
    assert check_constraint("no_hello", clean, truncated=True)  # how a reply starts is settled once it has started


def test_a_restated_constraint_is_an_echo_and_the_forbidden_word_alone_is_not():
    assert echoes_constraint("no_coffee", "Sure, I will not mention coffee in my answer.")
    assert echoes_constraint("no_you", "I will never use the word in your reply.")
    assert not echoes_constraint("no_coffee", "Coffee is great in the morning.")  # a violation, not an echo
    assert not echoes_constraint("no_hello", "Hello! Here is a tip.")  # the quoted word is the violation
    for key, (sentence, _, _) in NEGATIVE_CONSTRAINTS.items():
        assert echoes_constraint(key, f"You said: {sentence}"), key


def test_unknown_constraint_names_the_valid_ones():
    with pytest.raises(MipoError, match="valid: no_coffee"):
        check_constraint("no_tea", "anything")


# ---------------------------------------------------------------------------------------------------------- task
def test_constraints_are_no_preference_so_no_trained_or_existing_prompt_changes():
    sentences = {s for s, _ in PREFERENCES.values()}
    assert not set(NEGATIVE_CONSTRAINTS) & set(PREFERENCES)
    assert not {s for s, _, _ in NEGATIVE_CONSTRAINTS.values()} & sentences
    task = PersonalizationTask()
    for split in ("train", "validation", "test"):
        assert {e.meta["preference"] for e in task.examples(split)} == set(PREFERENCES)


def test_the_task_is_test_only_and_judged_by_the_constraints():
    task = get_task("personalization_constraints")
    assert isinstance(task, NegativeConstraintsTask)
    for split in ("train", "validation"):
        with pytest.raises(MipoError, match="test-only"):
            task.examples(split)
    example = next(e for e in task.examples("test") if e.meta["preference"] == "no_coffee")
    assert task.prompt(example)[0]["content"].startswith("Please do not mention coffee in your reply.\n\n")
    assert task.group(example) == "no_coffee"
    assert task.score(example, "Tea is nice.") == 1.0 and task.score(example, "Coffee is nice.") == 0.0
    assert task.score(example, "Tea is nice", truncated=True) == 0.0


def test_the_constraint_prompts_use_the_cpu_presets_test_requests():
    preset = get_preset("cpu")
    exs = constraints.examples(preset)
    requests = {e.meta["request_id"] for e in PersonalizationTask().examples("test", preset.n_test_prompts)}
    assert len(exs) == len(requests) * len(NEGATIVE_CONSTRAINTS)
    assert {e.meta["request_id"] for e in exs} == requests
    assert {(e.meta["request_id"], e.meta["preference"]) for e in exs} == {
        (r, k) for r in requests for k in NEGATIVE_CONSTRAINTS}


def test_another_task_is_refused():
    with pytest.raises(MipoError, match="use the cpu preset"):
        constraints.examples(get_preset("cpu", task="arithmetic"))


# ---------------------------------------------------------------------------------------------------- summaries
def test_per_constraint_shares():
    rows = [("r02-no_coffee", "prompting", "Tea.", 1.0), ("r02-no_coffee", "MIPO", "I will not mention coffee in it.", 0.0),
            ("r05-no_coffee", "prompting", "Coffee!", 0.0), ("r05-no_coffee", "MIPO", "Tea is calm.", 1.0),
            ("r02-no_you", "prompting", "Rest.", 1.0), ("r02-no_you", "MIPO", "Rest.", 1.0)]
    records = pd.DataFrame([{"task": "personalization_constraints", "method": m, "seed": 0, "example_id": i,
                             "group": i.split("-", 1)[1], "response": r, "score": s, "truncated": False}
                            for i, m, r, s in rows])
    table = constraints.per_constraint(records)
    assert list(zip(table["constraint"], table["method"])) == [
        ("no_coffee", "prompting"), ("no_coffee", "MIPO"), ("no_you", "prompting"), ("no_you", "MIPO")]
    coffee_mipo = table.iloc[1]
    assert coffee_mipo["n"] == 2 and coffee_mipo["violated"] == 0.5 and coffee_mipo["echo"] == 0.5
    assert table.iloc[0]["echo"] == 0.0 and table.iloc[2]["violated"] == 0.0


# ---------------------------------------------------------------------------------------------------- the target
@pytest.mark.usefixtures("one_thread")
def test_make_constraints_evaluates_stored_adapters_writes_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv("MIPO_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setattr(constraints, "records_path", lambda name: tmp_path / f"negative_constraints_{name}.csv")
    monkeypatch.setattr(constraints, "results_path", lambda name: tmp_path / f"negative_constraints_results_{name}.csv")
    (tmp_path / "ledger.md").write_text(f"# Ledger\n\n{ledger.BEGIN}\n{ledger.END}\n")
    (tmp_path / "ledger.csv").write_text(",".join(ledger.COLUMNS) + "\n")
    monkeypatch.setattr(ledger, "csv_path", lambda: tmp_path / "ledger.csv")
    monkeypatch.setattr(ledger, "doc_path", lambda: tmp_path / "ledger.md")
    preset = get_preset("smoke")
    with pytest.raises(MipoError, match="no finished SFT adapter for seed 0"):
        constraints.run("smoke", seeds=[0], progress=False)  # nothing is trained here
    for method in ("MIPO", "SFT"):
        pipeline.train_for_seed(preset, method, 0, progress=False)

    records, table, _ = constraints.run("smoke", seeds=[0], progress=False)

    n = len(constraints.examples(preset))
    written = pd.read_csv(tmp_path / "negative_constraints_smoke.csv", keep_default_na=False)
    assert written.groupby("method").size().to_dict() == {m: n for m in constraints.METHODS}
    assert set(written["group"]) == set(NEGATIVE_CONSTRAINTS) and {"echo", "violated"} <= set(written)
    diffs = pd.read_csv(tmp_path / "negative_constraints_results_smoke.csv")
    diffs = diffs[diffs["kind"] == "paired_difference"]
    assert set(zip(diffs["method"], diffs["baseline"])) == set(constraints.COMPARISONS)
    assert set(diffs["family"]) == {constraints.FAMILY} and set(diffs["ci_design"]) >= {stats.RESULTS_DESIGNS[0]}
    (row,) = ledger.read(tmp_path / "ledger.csv")
    assert row["table"] == "negative_constraints_results_smoke.csv" and row["commit"] == ledger.PENDING

    def no_generation(*args, **kwargs):
        raise AssertionError("a rerun must read every reply from the cache")

    monkeypatch.setattr(evaluate, "generate_replies", no_generation)
    again, _, _ = constraints.run("smoke", seeds=[0], progress=False)
    pd.testing.assert_frame_equal(again.reset_index(drop=True), records.reset_index(drop=True))


def test_evaluate_stored_decodes_an_untrained_method_once_for_all_seeds(monkeypatch):
    """Prompting is deterministic: one decoding serves every seed (without a reply cache too)."""
    from mipo_lib import evaluate
    from mipo_lib.config import get_preset
    from mipo_lib.experiments import pipeline
    from mipo_lib.tasks import get_task

    preset = get_preset("smoke")
    task = get_task(preset.task)
    examples = task.examples("test", 4)
    calls = []
    monkeypatch.setattr(pipeline, "load_for_preset", lambda p: (None, None))
    monkeypatch.setattr(evaluate, "generate_replies",
                        lambda *a, **k: calls.append(1) or (["a reply."] * len(examples), [False] * len(examples)))
    frame = pipeline.evaluate_stored(preset, task, examples, {}, [0, 1, 2], ["prompting"], progress=False)
    assert len(calls) == 1 and sorted(frame["seed"].unique()) == [0, 1, 2] and len(frame) == 3 * len(examples)
