"""What every task provides: examples with train/test splits, prompts with and without context, a judge in code.

A task is the only place that knows its domain. The rest of the pipeline sees `Example`s and calls four methods:
`examples` (a deterministic split), `prompt` (chat messages, with or without the conditioning context),
`score` (the judge: 1.0 satisfied / correct, 0.0 not) and `group` (the breakdown shown in figures, e.g. the
preference type).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # generate imports torch: tasks stay cheap to import, since presets check task names
    from mipo_lib.generate import Messages


@dataclass(frozen=True)
class Example:
    """One prompt of a task. `context` is what conditional MIPO contrasts (a user's stated preference), if any."""

    id: str
    request: str
    context: str | None = None
    answer: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


class Task(Protocol):
    """The interface `pairs`, `evaluate` and the notebooks rely on."""

    name: str
    #: True when the task has a context to drop or swap (personalization); False for plain prompt-response MI.
    conditional: bool

    def examples(self, split: str, n: int | None = None, seed: int = 0) -> list[Example]:
        """`split` is 'train', 'test' or (where the task has one) 'validation'; `n` caps the count (a deterministic
        subset for a given seed)."""
        ...

    def prompt(self, example: Example, with_context: bool = True, context: str | None = None) -> Messages:
        """Chat messages for the example; `context` replaces the example's own (random-context negatives)."""
        ...

    #: False for tasks judged by an LLM (PRISM): `judge_or_nan` then returns NaN instead of calling `score`.
    program_judge: bool

    def score(self, example: Example, response: str) -> float:
        """The judge: 1.0 when the response satisfies the example (preference met, answer correct), else 0.0."""
        ...

    def group(self, example: Example) -> str:
        """Label for per-group breakdowns (preference type, dataset name ...)."""
        ...


def judge_or_nan(task: Task, example: Example, response: str, truncated: bool = False) -> float:
    """The task's program judge, or NaN for tasks that need an LLM judge (their scores come later).

    `truncated` (the reply hit the token cap) goes to judges that take it (personalization fails a cut-off reply on
    the preferences more text could break); a task whose `score` has no such parameter judges the text as it is.
    """
    if not getattr(task, "program_judge", True):
        return float("nan")
    if "truncated" in inspect.signature(task.score).parameters:
        return float(task.score(example, response, truncated=truncated))  # type: ignore[call-arg]
    return float(task.score(example, response))
