"""Prompts must not change with the calendar, and a changed prompt must be caught before training.

Llama 3.x chat templates render today's date into every prompt. Pairs scored on one day and trained on the next would
pair reference log-probs with different tokens (same count, other ids). These tests fake the date.
"""

from __future__ import annotations

import datetime as dt

import pytest

from mipo_lib.dpo import check_reference_tokens
from mipo_lib.errors import MipoError
from mipo_lib.generate import TEMPLATE_DATE, pin_chat_template_date
from mipo_lib.models import CHATML_TEMPLATE, build_tiny_tokenizer
from mipo_lib.pairs import duplicate_negatives
from mipo_lib.scoring import pair_tokens, token_digest

DATED_TEMPLATE = (
    '{%- if not date_string is defined %}{%- set date_string = strftime_now("%d %b %Y") %}{%- endif %}'
    "{{ '<|im_start|>system\nToday Date: ' + date_string + '<|im_end|>\n' }}" + CHATML_TEMPLATE
)
PROMPT = [{"role": "user", "content": "How do I make tea?"}]


def _on_day(monkeypatch: pytest.MonkeyPatch, day: dt.datetime) -> None:
    import transformers.utils.chat_template_utils as ctu

    class FakeDatetime(dt.datetime):
        @classmethod
        def now(cls, tz=None):  # noqa: ANN001, ANN206
            return day

    monkeypatch.setattr(ctu, "datetime", FakeDatetime)


def _tokenizer(pinned: bool):
    tok = build_tiny_tokenizer()
    tok.chat_template = DATED_TEMPLATE
    return pin_chat_template_date(tok) if pinned else tok


class _FakeTrainer:
    """What `check_reference_tokens` reads of a TRL trainer: its tokenized train dataset."""

    def __init__(self, rows):
        self.train_dataset = rows


def _scored_pair(tok, response: str, rejected: str, max_length: int = 512) -> dict:
    p, c = pair_tokens(tok, PROMPT, response, max_length)
    _, r = pair_tokens(tok, PROMPT, rejected, max_length)
    return {"pair_id": "x-n0", "chosen_tokens": len(c), "rejected_tokens": len(r),
            "chosen_token_digest": token_digest(p, c), "rejected_token_digest": token_digest(p, r)}


def _trl_row(tok, response: str, rejected: str, max_length: int = 512) -> dict:
    p, c = pair_tokens(tok, PROMPT, response, max_length)
    _, r = pair_tokens(tok, PROMPT, rejected, max_length)
    return {"prompt_ids": p, "chosen_ids": c, "rejected_ids": r}


def test_unpinned_template_changes_tokens_from_one_day_to_the_next(monkeypatch):
    tok = _tokenizer(pinned=False)
    _on_day(monkeypatch, dt.datetime(2026, 11, 27, 23, 59))
    day1 = pair_tokens(tok, PROMPT, "Boil water.")
    _on_day(monkeypatch, dt.datetime(2026, 11, 28, 0, 1))
    day2 = pair_tokens(tok, PROMPT, "Boil water.")
    assert len(day1[0]) == len(day2[0]) and day1[0] != day2[0]  # same count, other ids: counts alone miss it


def test_pinned_template_gives_the_same_tokens_on_any_day(monkeypatch):
    tok = _tokenizer(pinned=True)
    assert "strftime_now" not in tok.chat_template
    assert TEMPLATE_DATE.strftime("%d %b %Y") in tok.decode(pair_tokens(tok, PROMPT, "Boil water.")[0])
    seen = []
    for day in (dt.datetime(2026, 11, 27), dt.datetime(2027, 3, 1)):
        _on_day(monkeypatch, day)
        seen.append(pair_tokens(tok, PROMPT, "Boil water."))
    assert seen[0] == seen[1]


@pytest.mark.parametrize("pinned", [False, True])
def test_pairs_scored_one_day_and_trained_the_next(monkeypatch, pinned):
    tok = _tokenizer(pinned)
    _on_day(monkeypatch, dt.datetime(2026, 11, 27, 23, 59))
    pair = _scored_pair(tok, "Boil water.", "Tea is nice.")
    _on_day(monkeypatch, dt.datetime(2026, 11, 28, 0, 1))
    trainer = _FakeTrainer([_trl_row(tok, "Boil water.", "Tea is nice.")])
    if pinned:
        check_reference_tokens(trainer, [pair], max_length=512)
    else:
        with pytest.raises(MipoError, match="differ from the tokens scoring used"):
            check_reference_tokens(trainer, [pair], max_length=512)


def test_reference_check_compares_ids_not_counts():
    tok = _tokenizer(pinned=True)
    pair = _scored_pair(tok, "Boil water.", "Tea is nice.")
    row = _trl_row(tok, "Boil water.", "Tea is nice.")
    check_reference_tokens(_FakeTrainer([row]), [pair], max_length=512)
    swapped = dict(row, chosen_ids=row["chosen_ids"][:-2] + row["chosen_ids"][-1:] + row["chosen_ids"][-2:-1])
    with pytest.raises(MipoError, match="chosen tokens"):
        check_reference_tokens(_FakeTrainer([swapped]), [pair], max_length=512)
    with pytest.raises(MipoError, match="regenerate pairs"):
        check_reference_tokens(_FakeTrainer([row]), [{k: v for k, v in pair.items() if k != "chosen_token_digest"}], 512)


def test_a_template_date_that_cannot_be_pinned_fails_at_load():
    tok = build_tiny_tokenizer()
    tok.chat_template = "{%- set fmt = '%Y' %}{{ strftime_now(fmt) }}" + CHATML_TEMPLATE
    with pytest.raises(MipoError, match="cannot be pinned"):
        pin_chat_template_date(tok)


def test_duplicate_negatives_counts_repeats_within_a_prompt_only():
    rows = [
        {"example_id": "a", "rejected": "Tea is nice."},
        {"example_id": "a", "rejected": "Tea is  nice. "},  # the same text up to whitespace
        {"example_id": "a", "rejected": "Coffee."},
        {"example_id": "b", "rejected": "Tea is nice."},  # another prompt: not a duplicate
    ]
    assert duplicate_negatives(rows) == 1
    assert duplicate_negatives(rows[2:]) == 0
