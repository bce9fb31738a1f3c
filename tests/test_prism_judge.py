"""The official PRISM judge protocol: exact wording, the first-integer parser, one call per stated preference, the
mean over preferences, skipped replies, and win-or-tie vs strict win (ties)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest

from mipo_lib import evaluate
from mipo_lib.analysis import stats
from mipo_lib.config import get_preset
from mipo_lib.evaluate import judge_messages, mean_judge_score, parse_judge_score
from mipo_lib.tasks.base import Example


@pytest.fixture(scope="module")
def preset():
    return get_preset("smoke")


EX = Example("c1", "How can I get better at chess?", context="Be patient. Avoid jargon.",
             meta={"preferences": ["Be patient.", "Avoid jargon."], "reference": "Play often."})


@pytest.mark.parametrize("text,score", [
    ("4", 4), ("Score: 4", 4), ("4/5", 4), ("I would give it a 3.", 3), ("4.5", 4), ("1 to 5: I say 4", 1),
    ("Score: 3\nReason: ok", 3), ("no idea", None), ("", None), ("Score: 10", None), ("0", None), ("7", None),
])
def test_parse_judge_score_takes_the_first_integer(text, score):
    assert parse_judge_score(text) == score


def test_mean_over_preferences_skips_replies_without_a_score():
    assert mean_judge_score([4, 5]) == 4.5
    assert mean_judge_score([None, 2, 4]) == 3.0
    assert mean_judge_score([None, None]) is None and mean_judge_score([]) is None


def test_judge_messages_are_the_official_ones():
    system, user = judge_messages(EX, "Play daily.", "Be patient.")
    assert system["role"] == "system" and system["content"].startswith(
        "You are a helpful assistant, that evaluates another assistant's response based on how well the response is "
        "personalized to this user based on their stated preference. Give a score between 1 and 5, 1 if the response "
        "is general, and 5 if the response sufficiently addresses the user's preference.")
    assert system["content"].endswith("Only respond with a number between 1 and 5 and do not provide an explanation.")
    assert user == {"role": "user", "content": "User: How can I get better at chess?\n\nAssistant: Play daily.\n\n"
                                               "User's preference: Be patient."}


def test_one_sampled_call_per_preference_and_the_mean(monkeypatch, preset):
    seen = []
    replies = iter(["5", "3", "no number", "Score: 2", "none"])

    def fake_generate(model, tok, ids, **kw):
        seen.append(kw)
        for row in range(len(ids)):
            yield type("B", (), {"rows": [row]})(), [next(replies)]

    monkeypatch.setattr(evaluate, "generate_batches", fake_generate)
    monkeypatch.setattr(evaluate, "chat_prompt_ids", lambda tok, messages: messages)
    other = Example("c2", "Hi", context="Be brief.")  # no `preferences`: the context is the one preference
    scores = evaluate.llm_judge_scores(None, None, [EX, other, EX], ["a", "b", "c"], preset, progress=False)
    assert scores == [4.0, None, 2.0]  # (5+3)/2; the only reply had no number; 2 and a skipped reply
    assert seen[0]["temperature"] == 0.1 and seen[0]["top_p"] == 0.9  # the judge samples, as officially


def test_win_or_tie_counts_ties_strict_win_does_not():
    policy, reference = [4.5, 3.0, 2.0, 5.0], [4.0, 3.0, 3.0, np.nan]  # a win, a tie, a loss, a skipped reference
    rates = stats.win_rates(policy, reference)
    assert rates["n"] == 3 and rates["win_or_tie"] == pytest.approx(2 / 3) and rates["strict_win"] == pytest.approx(1 / 3)


def test_judge_with_the_smoke_model(tiny, preset, one_thread):
    model, tok = tiny
    scores = evaluate.llm_judge_scores(model, tok, [EX, EX], ["Play often.", ""], preset, progress=False)
    assert len(scores) == 2 and all(s is None or 1 <= s <= 5 for s in scores)


def test_judge_for_matches_the_official_pairing():
    assert evaluate.judge_for("Qwen/Qwen2.5-1.5B-Instruct") == "Qwen/Qwen2.5-14B-Instruct"
    assert evaluate.judge_for("meta-llama/Llama-3.2-1B-Instruct") == "meta-llama/Meta-Llama-3-8B-Instruct"
