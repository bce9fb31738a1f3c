"""Reading numbers out of free text: the shared core of every numeric judge (arithmetic, GSM8K, SVAMP).

A model's answer is prose ("So she makes $1,200 in total."), so the judges need one careful rule for what counts as
a number: thousands separators are dropped only when they sit in proper groups of three ("1,200" is 1200, but
"3, 4" is two numbers), a trailing sentence period is not a decimal point, and a minus sign counts only when it
touches the digits ("-5" is negative, "12 - 7" is two positive numbers).
"""

from __future__ import annotations

import math
import re

_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_FINAL_MARK = "####"


def numbers_in(text: str) -> list[float]:
    """All numbers in `text`, in order of appearance."""
    return [float(m.group().replace(",", "")) for m in _NUMBER.finditer(text)]


def last_number(text: str) -> float | None:
    """The last number in `text`, or None when there is none."""
    found = numbers_in(text)
    return found[-1] if found else None


def final_answer(text: str) -> float | None:
    """The answer a GSM8K-style solution commits to: the first number after the last `####`, else the last number.

    GSM8K's reference solutions (and prompts that ask for the format) end with `#### <number>`; models that ignore
    the format are still graded on their last number, the usual lenient fallback.
    """
    if _FINAL_MARK in text:
        after = numbers_in(text.rsplit(_FINAL_MARK, 1)[1])
        if after:
            return after[0]
    return last_number(text)


def same_number(predicted: float | None, gold: float) -> bool:
    """Exact numeric match, up to float rounding (so "18.0" matches 18)."""
    return predicted is not None and math.isclose(predicted, gold, rel_tol=0.0, abs_tol=1e-6)


def format_number(value: float) -> str:
    """Canonical text of a gold answer: integers without a decimal point ("27", not "27.0")."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))
