"""Task registry: a preset names its task (`Preset.task`), `get_task` builds it.

`personalization` and `arithmetic` are generated in code and work offline; the others read the paper's datasets from
the Hugging Face hub, or from local files passed as options (e.g. `get_task("gsm8k", test_path="test.jsonl")`).
"""

from __future__ import annotations

from typing import Any, Callable

from mipo_lib.errors import MipoError
from mipo_lib.tasks.arithmetic import ArithmeticTask
from mipo_lib.tasks.base import Example, Task
from mipo_lib.tasks.datasets import ARCTask, GSM8KTask, PRISMTask, SVAMPTask
from mipo_lib.tasks.personalization import PREFERENCES, PersonalizationTask, check

_FACTORIES: dict[str, Callable[..., Task]] = {
    "personalization": PersonalizationTask,
    "arithmetic": ArithmeticTask,
    "gsm8k": GSM8KTask,
    "svamp": SVAMPTask,
    "arc_easy": lambda **kw: ARCTask("ARC-Easy", **kw),
    "arc_challenge": lambda **kw: ARCTask("ARC-Challenge", **kw),
    "prism": PRISMTask,
}
TASKS: tuple[str, ...] = tuple(_FACTORIES)


def get_task(name: str, **options: Any) -> Task:
    """The task called `name`; `options` go to its constructor.

    Dataset tasks take `train_path`/`test_path` (local files instead of the hub), PRISM a single `path`.
    """
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise MipoError(f"unknown task {name!r}; choose one of: {', '.join(TASKS)}") from None
    try:
        return factory(**options)
    except TypeError as err:
        raise MipoError(f"bad options {sorted(options)} for task {name!r}: {err}") from None


__all__ = ["TASKS", "get_task", "Task", "Example", "PREFERENCES", "check"]
