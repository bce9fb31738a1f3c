"""Two-digit addition and subtraction: plain prompt-response MIPO on a task whose answers code can check.

The unconditional version of MIPO (negative = the response to another prompt) is meant for math and multiple
choice. GSM8K needs a hub download and a bigger model; these synthetic problems need neither, so the CPU preset can
run the same pipeline with `task="arithmetic"` and the notebooks can show the (small) effect on exact-match accuracy.

Problems are `a + b` and `a - b` (a >= b, so answers are never negative) with a, b in 10..99. A fixed shuffle of each
operation's problems, independent of any seed, puts the first `TEST_PER_OPERATION` in the test split and the rest in
the train split, so the splits are disjoint and the held-out problems are the same for every training seed.
"""

from __future__ import annotations

import itertools
import random
from typing import TYPE_CHECKING

from mipo_lib.errors import MipoError
from mipo_lib.tasks.base import Example
from mipo_lib.tasks.numbers import last_number, same_number

if TYPE_CHECKING:  # generate imports torch: tasks stay cheap to import, since presets check task names
    from mipo_lib.generate import Messages

OPERATIONS: dict[str, str] = {"addition": "+", "subtraction": "-"}
TEST_PER_OPERATION = 500
_SPLIT_SEED = 1234  # fixes the train/test partition; never the caller's seed


def _problems(operation: str) -> list[tuple[int, int]]:
    pairs = itertools.product(range(10, 100), repeat=2)
    if operation == "subtraction":
        pairs = ((a, b) for a, b in pairs if a >= b)
    problems = list(pairs)
    random.Random(f"{_SPLIT_SEED}-{operation}").shuffle(problems)
    return problems


def _split(operation: str, split: str) -> list[tuple[int, int]]:
    problems = _problems(operation)
    return problems[:TEST_PER_OPERATION] if split == "test" else problems[TEST_PER_OPERATION:]


class ArithmeticTask:
    """`What is 47 + 38?` -> 85, scored by the last number in the reply."""

    name = "arithmetic"
    conditional = False

    def examples(self, split: str, n: int | None = None, seed: int = 0) -> list[Example]:
        """Problems of a split, operations interleaved (n=10 gives 5 additions and 5 subtractions).

        'train' with `n` draws a seeded subset (nested in n for a given seed); 'test' ignores `seed` and returns
        the first n held-out problems. `n=None` returns the whole split.
        """
        if split not in ("train", "test"):
            raise MipoError(f"unknown split {split!r}; use 'train' or 'test'")
        per_op: list[list[tuple[int, int]]] = []
        for op in OPERATIONS:
            problems = _split(op, split)
            if split == "train":
                random.Random(f"{seed}-{op}").shuffle(problems)
            per_op.append(problems)
        total = sum(len(p) for p in per_op)
        if n is not None and not 1 <= n <= total:
            raise MipoError(f"n={n} is out of range for the {split} split of arithmetic; use 1..{total}")
        interleaved = [
            (op, ab)
            for row in itertools.zip_longest(*per_op)
            for op, ab in zip(OPERATIONS, row)
            if ab is not None
        ]
        return [self._example(op, a, b) for op, (a, b) in interleaved[:n]]

    @staticmethod
    def _example(operation: str, a: int, b: int) -> Example:
        symbol = OPERATIONS[operation]
        answer = a + b if operation == "addition" else a - b
        return Example(
            id=f"{operation[:3]}-{a}{symbol}{b}",
            request=f"What is {a} {symbol} {b}?",
            answer=str(answer),
            meta={"operation": operation},
        )

    def prompt(self, example: Example, with_context: bool = True, context: str | None = None) -> Messages:
        """The question as one user message; the task has no context, so `with_context` changes nothing."""
        if context is not None:
            raise MipoError("arithmetic has no context to swap; use negative='random_prompt'")
        return [{"role": "user", "content": example.request}]

    def score(self, example: Example, response: str) -> float:
        """1.0 when the last number in the reply equals the answer ("85", "= 85.", "85.0" all count)."""
        return float(same_number(last_number(response), float(example.answer)))

    def group(self, example: Example) -> str:
        return example.meta["operation"]
