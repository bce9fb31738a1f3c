"""Task registry: a preset names its task (`Preset.task`), `get_task` builds it from the registry.

`personalization` and `arithmetic` (with its graded levels `arithmetic_<level>`) are generated in code and work
offline; the others read the paper's datasets from the Hugging Face hub, or from local files passed as options (e.g.
`get_task("gsm8k", test_path="test.jsonl")`).

A researcher adds a task without editing this package: write a small class that follows the `Task` protocol
(`tasks/base.py`), `register_task("mytask", MyTask)`, then `get_preset("cpu", task="mytask")`. Code that runs in
other processes (the notebooks that `python -m mipo_lib reproduce` starts) registers its tasks and preferences from
modules named in the `MIPO_PLUGINS` environment variable (comma-separated, importable from the working directory or
PYTHONPATH): `get_preset` imports them once, so every kernel sees the same registry as the command line.
"""

from __future__ import annotations

import importlib
import os
import re
from typing import Any, Callable

from mipo_lib.errors import MipoError
from mipo_lib.tasks.arithmetic import ArithmeticTask, level_tasks
from mipo_lib.tasks.base import Example, Task
from mipo_lib.tasks.datasets import ARCTask, GSM8KTask, PRISMTask, SVAMPTask
from mipo_lib.tasks.personalization import (
    PREFERENCES,
    NegativeConstraintsTask,
    PersonalizationTask,
    UnseenTypesTask,
    check,
    register_preference,
    unregister_preference,
)

TaskFactory = Callable[..., Task]

#: name -> factory (a Task class or any callable returning a Task); options of `get_task` go to the factory.
_REGISTRY: dict[str, TaskFactory] = {
    "personalization": PersonalizationTask,
    "personalization_unseen_types": UnseenTypesTask,  # trains on 5 preference types, tests on the other 5
    "personalization_constraints": NegativeConstraintsTask,  # test only: "do not ..." constraints (make constraints)
    "arithmetic": ArithmeticTask,
    "gsm8k": GSM8KTask,
    "svamp": SVAMPTask,
    "arc_easy": lambda **kw: ARCTask("ARC-Easy", **kw),
    "arc_challenge": lambda **kw: ARCTask("ARC-Challenge", **kw),
    "prism": PRISMTask,
    **level_tasks(),  # arithmetic_one_digit_add ... arithmetic_word: graded difficulty (tasks/arithmetic.py)
}
#: What the pipeline calls on a task (`program_judge` is optional: tasks without it are judged in code).
PROTOCOL: tuple[str, ...] = ("name", "conditional", "examples", "prompt", "score", "group")
#: Task names become folder names under runs/<preset>/: keep them to lower-case letters, digits and underscores.
_NAME = re.compile(r"[a-z][a-z0-9_]*")
PLUGINS_ENV = "MIPO_PLUGINS"
_loaded_plugins: set[str] = set()


def task_names() -> tuple[str, ...]:
    """Registered task names, built-in ones first, in registration order."""
    return tuple(_REGISTRY)


def register_task(name: str, factory: TaskFactory, *, replace: bool = False) -> None:
    """Make `get_task(name)` (and so `Preset.task = name`) build tasks with `factory`.

    Registering a name twice is refused unless `replace=True`, so a plugin cannot silently shadow a built-in task.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise MipoError(f"task name {name!r} is not usable as a folder name; use lower-case letters, digits and _")
    if not callable(factory):
        raise MipoError(f"register_task({name!r}, ...): the factory must be a Task class or a function returning a Task")
    if name in _REGISTRY and not replace:
        raise MipoError(f"task {name!r} is already registered; pick another name or pass replace=True")
    _REGISTRY[name] = factory


def unregister_task(name: str) -> None:
    """Remove a registered task (tests undo their registrations with it)."""
    if _REGISTRY.pop(name, None) is None:
        raise MipoError(f"task {name!r} is not registered; registered: {', '.join(_REGISTRY)}")


def load_plugins() -> None:
    """Import the modules named in MIPO_PLUGINS (once each): they call `register_task` / `register_preference`."""
    for module in filter(None, (m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(","))):
        if module in _loaded_plugins:
            continue
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise MipoError(
                f"{PLUGINS_ENV} names {module!r}, which cannot be imported ({err}); put it on PYTHONPATH or fix the name"
            ) from None
        _loaded_plugins.add(module)


def get_task(name: str, **options: Any) -> Task:
    """The task called `name`, built by its registered factory with `options`.

    Dataset tasks take `train_path`/`test_path` (local files instead of the hub), PRISM a single `path`. The object
    built is checked against the Task protocol here, so a registered task that lacks a method fails at once, not
    after minutes of generation.
    """
    if name not in _REGISTRY:
        load_plugins()
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise MipoError(f"unknown task {name!r}; choose one of: {', '.join(_REGISTRY)} (or register_task it)") from None
    try:
        task = factory(**options)
    except TypeError as err:
        raise MipoError(f"bad options {sorted(options)} for task {name!r}: {err}") from None
    missing = [attr for attr in PROTOCOL if not hasattr(task, attr)]
    if missing:
        raise MipoError(f"task {name!r} lacks {missing}; follow the Task protocol in mipo_lib/tasks/base.py")
    return task


def task_settings(name: str) -> dict[str, Any]:
    """The preset fields the official code used for task `name` (its `official_settings`; none for tasks without).

    `config.get_preset` applies them for presets with `task_defaults` (t4, paper). Building a task reads no data."""
    return dict(getattr(get_task(name), "official_settings", {}))


__all__ = [
    "PREFERENCES",
    "PROTOCOL",
    "Example",
    "Task",
    "TaskFactory",
    "check",
    "get_task",
    "load_plugins",
    "register_preference",
    "register_task",
    "task_names",
    "task_settings",
    "unregister_preference",
    "unregister_task",
]
