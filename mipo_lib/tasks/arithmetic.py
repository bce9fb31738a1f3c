"""Synthetic arithmetic at graded difficulty: plain prompt-response MIPO on problems whose answers code can check.

The unconditional version of MIPO (negative = the response to another prompt) is meant for math and multiple
choice. GSM8K needs a hub download and a bigger model; these synthetic problems need neither, so a CPU preset can
run the same pipeline and the notebooks can show the effect on exact-match accuracy.

MIPO can only amplify what the base model already gets right, so difficulty is a knob: a 135M model scores about 2%
on two-digit problems asked plainly, far too low to have anything to amplify. `LEVELS` go from one-digit addition to
word problems, each registered as a task of its own (`arithmetic_<level>`, see `level_tasks`); the plain `arithmetic`
task is the original two-digit level, kept as it was. Notebook 07 measures the base model on every level's
validation split and picks one in its informative range.

Splits: a fixed shuffle of each group's problems (an operation or a word-problem template), independent of any seed,
puts the first problems in 'test', the next in 'validation' and the rest in 'train', so the three never overlap and
the held-out problems are the same for every training seed.
"""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Callable, Iterable

from mipo_lib.errors import MipoError
from mipo_lib.tasks.base import Example
from mipo_lib.tasks.numbers import last_number, numbers_in, same_number

if TYPE_CHECKING:  # generate imports torch: tasks stay cheap to import, since presets check task names
    from mipo_lib.generate import Messages

SPLITS: tuple[str, ...] = ("train", "validation", "test")
TEST_PER_GROUP = 500  # at most; small groups (one-digit problems) hold out TEST_SHARE of their problems instead
VALIDATION_PER_GROUP = 100
TEST_SHARE, VALIDATION_SHARE = 0.4, 0.2
_SPLIT_SEED = 1234  # fixes the partition; never the caller's seed
#: Appended to every graded level's question: an explicit final answer, and grading reads only that line
#: (`final_answer`). The levels' earlier instruction, "Reply with one short sentence.", was graded on a reply's last
#: number, which for a reply cut by the token cap is often an operand ("so Leo now has 7 + 5 ="): the grade measured
#: where the cap fell, not the arithmetic. Followed by that sentence, the 135M model mostly drops the answer line (7 of
#: 30 word problems had one, on validation); alone, 20 of 30 (measured 2026-12-07, greedy, 96 new tokens).
ANSWER_FORMAT = "End your reply with 'Answer: <number>'."
INSTRUCTION = ANSWER_FORMAT
DEFAULT_LEVEL = "two_digit"  # the plain `arithmetic` task


@dataclass(frozen=True)
class Problem:
    """One problem of a level: `group` is its breakdown in figures (the operation or template)."""

    id: str
    group: str
    request: str
    answer: int


@dataclass(frozen=True)
class Level:
    """A difficulty level: how to enumerate all its problems, and the instruction that follows each question."""

    name: str
    description: str
    problems: Callable[[], dict[str, list[Problem]]]  # group -> every problem of the group, in a canonical order
    instruction: str | None = INSTRUCTION

    @property
    def answer_format(self) -> bool:
        """Whether the prompt asks for `ANSWER_FORMAT`, so that grading reads only the final-answer line."""
        return self.instruction is not None and ANSWER_FORMAT in self.instruction


# ------------------------------------------------------------------------------------------------ problem spaces
_SYMBOLS = {"addition": "+", "subtraction": "-", "multiplication": "×"}
_ASCII = {"addition": "+", "subtraction": "-", "multiplication": "x"}  # for ids (file-safe, one byte per sign)


def _binary(group: str, pairs: Iterable[tuple[int, int]]) -> list[Problem]:
    """`What is a <op> b?` problems for the (a, b) pairs, ids like `add-47+38` (the original task's ids)."""
    ops = {"addition": lambda a, b: a + b, "subtraction": lambda a, b: a - b, "multiplication": lambda a, b: a * b}
    return [
        Problem(f"{group[:3]}-{a}{_ASCII[group]}{b}", group, f"What is {a} {_SYMBOLS[group]} {b}?", ops[group](a, b))
        for a, b in pairs
    ]


def _carries(a: int, b: int, group: str) -> bool:
    """Whether the column method needs a carry (addition) or a borrow (subtraction) in the ones column."""
    return (a % 10 + b % 10 >= 10) if group == "addition" else (a % 10 < b % 10)


def _two_digit(carry: bool | None) -> dict[str, list[Problem]]:
    """a + b and a - b (a >= b) with a, b in 10..99; `carry` keeps only problems with (True) / without (False) one."""
    out = {}
    for group in ("addition", "subtraction"):
        pairs = itertools.product(range(10, 100), repeat=2)
        if group == "subtraction":
            pairs = ((a, b) for a, b in pairs if a >= b)
        if carry is not None:
            tens_ok = (lambda a, b: a // 10 + b // 10 <= 9) if group == "addition" else (lambda a, b: True)
            pairs = ((a, b) for a, b in pairs if _carries(a, b, group) == carry and (carry or tens_ok(a, b)))
        out[group] = _binary(group, pairs)
    return out


def _one_digit(groups: tuple[str, ...]) -> dict[str, list[Problem]]:
    """Single-digit operands 0..9 (subtraction keeps a >= b: answers are never negative)."""
    digits = range(10)
    return {g: _binary(g, ((a, b) for a in digits for b in digits if g != "subtraction" or a >= b)) for g in groups}


def _two_step() -> dict[str, list[Problem]]:
    """`a + b - c` and `a × b + c` with operands 1..9: two operations to chain, answers never negative."""
    ops = range(1, 10)
    add_sub = [Problem(f"as-{a}+{b}-{c}", "add_then_subtract", f"What is {a} + {b} - {c}?", a + b - c)
               for a, b, c in itertools.product(ops, repeat=3) if a + b >= c]
    mul_add = [Problem(f"ma-{a}x{b}+{c}", "multiply_then_add", f"What is {a} × {b} + {c}?", a * b + c)
               for a, b, c in itertools.product(ops, repeat=3)]
    return {"add_then_subtract": add_sub, "multiply_then_add": mul_add}


_PEOPLE = (("Sam", "He"), ("Mia", "She"), ("Leo", "He"), ("Ava", "She"), ("Ben", "He"), ("Zoe", "She"))
_ITEMS = ("apples", "stickers", "marbles", "books", "pencils", "cookies")


def _word() -> dict[str, list[Problem]]:
    """One-step add / take-away stories with numbers 2..20; the name and object vary with the numbers, so the
    phrasing changes from problem to problem while the problem set stays fixed."""
    out: dict[str, list[Problem]] = {"word_addition": [], "word_subtraction": []}
    for a, b in itertools.product(range(2, 21), repeat=2):
        name, pronoun = _PEOPLE[(3 * a + b) % len(_PEOPLE)]
        items = _ITEMS[(a + 5 * b) % len(_ITEMS)]
        out["word_addition"].append(Problem(
            f"wa-{a}+{b}", "word_addition",
            f"{name} has {a} {items}. {pronoun} gets {b} more {items}. How many {items} does {name} have now?", a + b))
        if a > b:
            out["word_subtraction"].append(Problem(
                f"ws-{a}-{b}", "word_subtraction",
                f"{name} has {a} {items}. {pronoun} gives {b} {items} to a friend. How many {items} does {name} have "
                f"left?", a - b))
    return out


LEVELS: dict[str, Level] = {
    level.name: level
    for level in (
        Level("one_digit_add", "one-digit addition (3 + 4)", partial(_one_digit, ("addition",))),
        Level("one_digit_mixed", "one-digit +, - and × (7 - 2, 6 × 4)",
              partial(_one_digit, ("addition", "subtraction", "multiplication"))),
        Level("two_digit_no_carry", "two-digit + and - without a carry or borrow (23 + 45)",
              partial(_two_digit, False)),
        Level("two_digit_carry", "two-digit + and - with a carry or borrow (47 + 38)", partial(_two_digit, True)),
        Level("two_step", "two operations, one-digit operands (7 + 5 - 3, 6 × 4 + 2)", _two_step),
        Level("word", "one-step word problems, numbers 2-20 (Sam has 7 apples, gets 5 more)", _word),
        Level(DEFAULT_LEVEL, "two-digit + and -, asked plainly (the original arithmetic task, graded leniently)",
              partial(_two_digit, None), instruction=None),
    )
}
#: The graded levels in their designed order, easiest first (measured accuracy need not follow it exactly).
GRADED_LEVELS: tuple[str, ...] = tuple(name for name in LEVELS if name != DEFAULT_LEVEL)
#: Base accuracy (on validation) at which there is both something to amplify and room to improve.
INFORMATIVE_RANGE: tuple[float, float] = (0.2, 0.7)


def task_name(level: str) -> str:
    """The registry name of a level's task: `arithmetic` for the original level, else `arithmetic_<level>`."""
    return "arithmetic" if level == DEFAULT_LEVEL else f"arithmetic_{level}"


def level_tasks() -> dict[str, Callable[[], "ArithmeticTask"]]:
    """Registry entries (name -> factory) of the graded levels; `mipo_lib.tasks` registers them."""
    return {task_name(level): partial(ArithmeticTask, level) for level in GRADED_LEVELS}


# ------------------------------------------------------------------------------------------------ answer parsing
@dataclass(frozen=True)
class ParsedAnswer:
    """The number a reply commits to and how it was found: 'answer_line' (`Answer: 7`, the format the graded levels
    ask for, `final_answer`), or in the lenient reading (`parse_answer`) 'final_mark' (`#### 7`), 'answer_phrase'
    ("The answer is 7"), 'last_number' (the last number of the reply); 'none': no final answer found."""

    value: float | None
    how: str


#: "answer is", "Answer:", "the answer would be", ... directly followed by a number ($, a space or '=' between).
_ANSWER_PHRASE = re.compile(r"\banswer\b(?:\s+(?:is|was|would be|will be))?\s*[:=]?\s*\$?\s*(?=-?\d)", re.IGNORECASE)


def parse_answer(text: str) -> ParsedAnswer:
    """The final answer of a free-text reply, in order of how explicitly the reply commits to it.

    1. `#### N` (GSM8K's format): the first number after the last mark;
    2. an answer phrase ("The answer is N", "Answer: N"): the number right after the last such phrase, so
       "The answer is 14 (7 × 2)." gives 14 and "The answer is 8. I hope 2 more help" gives 8;
    3. otherwise the last number of the reply ("3 + 4 = 7", "It is 7.", "7"): trailing chatter without numbers
       does not matter.
    Commas in proper thousands groups are dropped ("1,200"), a minus sign that touches the digits (or a Unicode
    minus) makes a negative number, and a sentence-final period is not a decimal point.
    """
    text = text.replace("\u2212", "-")
    if "####" in text:
        after = numbers_in(text.rsplit("####", 1)[1])
        if after:
            return ParsedAnswer(after[0], "final_mark")
    phrases = list(_ANSWER_PHRASE.finditer(text))
    if phrases:  # the phrase ends right before a number, so the rest starts with it
        return ParsedAnswer(numbers_in(text[phrases[-1].end():])[0], "answer_phrase")
    last = last_number(text)
    return ParsedAnswer(last, "none" if last is None else "last_number")


#: `Answer:` (any case, optionally in bold) followed by a number ($ and spaces between): the line `ANSWER_FORMAT` asks for.
_ANSWER_LINE = re.compile(r"\banswer\s*:\s*(?:\*\*)?\s*\$?\s*(?=-?\d)", re.IGNORECASE)


def final_answer(text: str) -> ParsedAnswer:
    """The final answer in the format the graded levels ask for: the number right after the last `Answer:`.

    Strict on purpose: a reply without that line has no final answer (how 'none') and is graded wrong, so a reply the
    token cap cut before its answer line, or one that ignores the instruction, is never graded on a number it
    happened to mention. "Answer: 17 stickers." gives 17; "The answer is 17." gives none (no `Answer:` line).
    """
    text = text.replace("\u2212", "-")
    marks = list(_ANSWER_LINE.finditer(text))
    if not marks:
        return ParsedAnswer(None, "none")
    return ParsedAnswer(numbers_in(text[marks[-1].end():])[0], "answer_line")


def extract_answer(text: str) -> float | None:
    """The number a reply answers with (`parse_answer`), None when it holds no number."""
    return parse_answer(text).value


# ---------------------------------------------------------------------------------------------------------- task
class ArithmeticTask:
    """`What is 47 + 38?` -> 85 (or a word problem), scored by the reply's final answer (`parse`): the graded levels
    read only the `Answer: N` line their prompt asks for (`final_answer`), the plain `arithmetic` task the lenient
    `parse_answer`."""

    conditional = False

    def __init__(self, level: str = DEFAULT_LEVEL) -> None:
        if level not in LEVELS:
            raise MipoError(f"unknown arithmetic level {level!r}; choose one of: {', '.join(LEVELS)}")
        self.level = LEVELS[level]
        self.name = task_name(level)
        self._splits: dict[str, dict[str, list[Problem]]] | None = None

    def _split_problems(self) -> dict[str, dict[str, list[Problem]]]:
        """split -> group -> problems: each group shuffled once (fixed seed), then cut test | validation | train."""
        if self._splits is None:
            self._splits = {s: {} for s in SPLITS}
            for group, problems in self.level.problems().items():
                problems = list(problems)
                random.Random(f"{_SPLIT_SEED}-{group}").shuffle(problems)
                n_test = min(TEST_PER_GROUP, round(TEST_SHARE * len(problems)))
                n_val = min(VALIDATION_PER_GROUP, round(VALIDATION_SHARE * len(problems)))
                self._splits["test"][group] = problems[:n_test]
                self._splits["validation"][group] = problems[n_test : n_test + n_val]
                self._splits["train"][group] = problems[n_test + n_val :]
        return self._splits

    def examples(self, split: str, n: int | None = None, seed: int = 0) -> list[Example]:
        """Problems of a split, groups interleaved (n=10 with two groups gives 5 of each).

        'train' with `n` draws a seeded subset (nested in n for a given seed); 'validation' and 'test' ignore `seed`
        and return their first n problems. `n=None` returns the whole split.
        """
        if split not in SPLITS:
            raise MipoError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        per_group: list[list[Problem]] = []
        for group, problems in self._split_problems()[split].items():
            problems = list(problems)
            if split == "train":
                random.Random(f"{seed}-{group}").shuffle(problems)
            per_group.append(problems)
        total = sum(len(p) for p in per_group)
        if n is not None and not 1 <= n <= total:
            raise MipoError(f"n={n} is out of range for the {split} split of {self.name}; use 1..{total}")
        interleaved = [p for row in itertools.zip_longest(*per_group) for p in row if p is not None]
        return [
            Example(id=p.id, request=p.request, answer=str(p.answer),
                    meta={"operation": p.group, "level": self.level.name})
            for p in interleaved[:n]
        ]

    def prompt(self, example: Example, with_context: bool = True, context: str | None = None) -> Messages:
        """The question (and the level's instruction) as one user message; the task has no context, so
        `with_context` changes nothing and swapping one in is refused."""
        if context is not None:
            raise MipoError(f"{self.name} has no context to swap; use negative='random_prompt'")
        content = example.request if self.level.instruction is None else f"{example.request} {self.level.instruction}"
        return [{"role": "user", "content": content}]

    def parse(self, response: str) -> ParsedAnswer:
        """The reply's final answer as this task grades it: `final_answer` when the prompt asks for the answer
        format, else `parse_answer`."""
        return final_answer(response) if self.level.answer_format else parse_answer(response)

    def score(self, example: Example, response: str) -> float:
        """1.0 when the reply's final answer (`parse`) equals the answer; a reply without one is wrong."""
        return float(same_number(self.parse(response).value, float(example.answer)))

    def group(self, example: Example) -> str:
        return example.meta["operation"]
