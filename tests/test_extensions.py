"""The public extension points, used the way a researcher would: register a preference, register a task, override a
preset field from the command line. Each runs the smoke pipeline end to end (pairs -> DPO -> evaluation -> the
per-preference table and figure) and every registration is undone after its test."""

import json
import os
import re
import sys
import time

os.environ["HF_HUB_OFFLINE"] = "1"

import nbformat
import pandas as pd
import pytest

from mipo_lib import config, tasks
from mipo_lib.experiments import pipeline
from mipo_lib.analysis import plots, stats
from mipo_lib.workbook import runner
from mipo_lib.__main__ import main
from mipo_lib.config import get_preset
from mipo_lib.workbook.environment import resolve_preset
from mipo_lib.errors import MipoError
from mipo_lib.tasks import personalization
from mipo_lib.tasks.base import Example

pytestmark = pytest.mark.usefixtures("one_thread")

NEW_KEY = "exclaim"
NEW_SENTENCE = "End your reply with an exclamation mark."


def _exclaims(text: str) -> bool:
    return text.rstrip().endswith("!")


@pytest.fixture
def runs(tmp_path, monkeypatch):
    """A private runs folder: these tests must not reuse (or leave) artefacts of other tests' smoke runs."""
    monkeypatch.setenv("MIPO_RUNS_DIR", str(tmp_path / "runs"))
    return tmp_path / "runs"


@pytest.fixture
def exclaim():
    """An 11th preference, registered for one test and removed afterwards."""
    tasks.register_preference(NEW_KEY, NEW_SENTENCE, _exclaims)
    yield NEW_KEY
    tasks.unregister_preference(NEW_KEY)


def _one_line_error(call, match: str) -> str:
    start = time.perf_counter()
    with pytest.raises(MipoError, match=match) as err:
        call()
    assert time.perf_counter() - start < 5
    assert "\n" not in str(err.value)
    return str(err.value)


# ------------------------------------------------------------------------------------------------- preferences
def test_registered_preference_is_in_every_balanced_subset(exclaim):
    """The old bug: a module-level default capped subsets at 10 preferences, so an 11th silently dropped one."""
    assert list(tasks.PREFERENCES)[-1] == exclaim and len(tasks.PREFERENCES) == 11
    assert personalization.balanced_shape(22, 40) == (2, 11)
    task = tasks.get_task("personalization")
    for split, n in (("train", 22), ("test", 11), ("test", 220)):
        examples = task.examples(split, n, seed=0)
        assert len(examples) == n and {e.meta["preference"] for e in examples} == set(tasks.PREFERENCES)
    ex = next(e for e in task.examples("test", 11) if e.meta["preference"] == exclaim)
    assert ex.id.endswith(f"-{exclaim}") and ex.context == NEW_SENTENCE and task.group(ex) == exclaim
    assert task.score(ex, "Sure thing!") == 1.0 and task.score(ex, "Sure thing.") == 0.0


def test_unregistering_restores_the_ten(exclaim):
    tasks.unregister_preference(exclaim)
    assert len(tasks.PREFERENCES) == 10 and personalization.balanced_shape(22, 40) == (11, 2)
    tasks.register_preference(exclaim, NEW_SENTENCE, _exclaims)  # so the fixture's teardown has something to undo


@pytest.mark.parametrize(
    "key,sentence,checker,match",
    [
        ("Bad Key", NEW_SENTENCE, _exclaims, "lower-case letters"),
        ("banana", NEW_SENTENCE, _exclaims, "already registered"),
        ("fruit", personalization.PREFERENCES["banana"][0], _exclaims, "already the one of 'banana'"),
        ("fruit", "  ", _exclaims, "non-empty text"),
        ("fruit", NEW_SENTENCE, "not callable", "must be a function"),
        ("fruit", NEW_SENTENCE, lambda text: text[0] == "!", "fails on the reply ''"),
        ("fruit", NEW_SENTENCE, lambda text: text.find("!"), "return True or False"),
    ],
)
def test_bad_preferences_fail_at_registration(key, sentence, checker, match):
    _one_line_error(lambda: tasks.register_preference(key, sentence, checker), match)
    assert "fruit" not in tasks.PREFERENCES and len(tasks.PREFERENCES) == 10


@pytest.mark.slow
def test_registered_preference_flows_through_the_smoke_pipeline(exclaim, runs):
    preset = get_preset("smoke", n_train_prompts=22, n_test_prompts=11, seeds=[0])
    pairs = pipeline.pairs_for_seed(preset, 0, progress=False)
    assert len(pairs) == 22 and sum(p["group"] == exclaim for p in pairs) == 2
    assert all(NEW_SENTENCE in p["prompt"][0]["content"] for p in pairs if p["group"] == exclaim)

    trained = pipeline.train_for_seed(preset, "MIPO", 0, progress=False)
    assert all(trained.lora_changed.values())
    saved = {p.name for p in trained.adapter_dir.iterdir()}  # dpo._save_adapter: TRL's layout beside the adapter
    assert {"adapter_model.safetensors", "tokenizer_config.json", "README.md"} <= saved

    records = [pipeline.evaluate_method(preset, m, 0, progress=False) for m in ("prompting", "MIPO")]
    for frame in records:
        mine = frame[frame.group == exclaim]
        assert len(mine) == 1 and set(mine.score) <= {0.0, 1.0}
    both = pd.concat(records, ignore_index=True)
    table = stats.per_group_rates(both, n_boot=200)
    assert set(table[table.group == exclaim].method) == {"prompting", "MIPO"}
    assert len(table) == 2 * 11
    fig = plots.plot_per_group(both, {"preset": preset.name, "model": "tiny", "n_seeds": 1})
    assert exclaim in [t.get_text() for t in fig.axes[0].get_yticklabels()]


# ------------------------------------------------------------------------------------------------------- tasks
class ShoutTask:
    """A task in a dozen lines: write a word in capital letters; the judge checks the reply contains it."""

    name = "shout"
    conditional = False
    program_judge = True
    WORDS = ("apple", "river", "cloud", "stone", "green", "music", "paper", "tiger", "light", "ocean", "bread", "chair")

    def examples(self, split: str, n: int | None = None, seed: int = 0) -> list[Example]:
        words = self.WORDS[:8] if split == "train" else self.WORDS[8:]
        return [Example(id=f"shout-{w}", request=f"Write the word {w} in capital letters.", answer=w.upper(),
                        meta={"initial": "vowel" if w[0] in "aeiou" else "consonant"}) for w in words][:n]

    def prompt(self, example: Example, with_context: bool = True, context: str | None = None) -> list[dict[str, str]]:
        return [{"role": "user", "content": example.request}]

    def score(self, example: Example, response: str) -> float:
        return float(example.answer in response)

    def group(self, example: Example) -> str:
        return example.meta["initial"]


@pytest.fixture
def shout():
    tasks.register_task("shout", ShoutTask)
    yield "shout"
    tasks.unregister_task("shout")


def test_task_registry_checks_names_factories_and_the_protocol(shout):
    assert "shout" in tasks.task_names() and isinstance(tasks.get_task("shout"), ShoutTask)
    _one_line_error(lambda: tasks.register_task("shout", ShoutTask), "already registered")
    _one_line_error(lambda: tasks.register_task("personalization", ShoutTask), "already registered")
    _one_line_error(lambda: tasks.register_task("My Task", ShoutTask), "folder name")
    _one_line_error(lambda: tasks.register_task("mytask", ShoutTask()), "must be a Task class")
    tasks.register_task("half", lambda: object())
    try:
        _one_line_error(lambda: tasks.get_task("half"), r"lacks \['name', 'conditional', 'examples'")
    finally:
        tasks.unregister_task("half")


def test_a_preset_selects_a_registered_task_and_unregistering_undoes_it():
    _one_line_error(lambda: get_preset("smoke", task="shout"), "unknown task; choose one of")
    tasks.register_task("shout", ShoutTask)
    try:
        assert get_preset("smoke", task="shout", negative="random_prompt").task == "shout"
    finally:
        tasks.unregister_task("shout")
    _one_line_error(lambda: get_preset("smoke", task="shout"), "unknown task")
    _one_line_error(lambda: tasks.unregister_task("shout"), "not registered")


def test_plugins_register_in_every_process_that_asks_for_a_preset(tmp_path, monkeypatch):
    """MIPO_PLUGINS modules are imported by get_preset: how notebooks run by the batch runner see user tasks."""
    (tmp_path / "my_plugin.py").write_text(
        "from mipo_lib.tasks import register_preference, register_task\n"
        "from mipo_lib.tasks.arithmetic import ArithmeticTask\n"
        "register_task('plugin_sums', ArithmeticTask)\n"
        "register_preference('plugin_word', 'Mention the word plugin.', lambda text: 'plugin' in text)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(tasks, "_loaded_plugins", set())
    monkeypatch.setenv(tasks.PLUGINS_ENV, "my_plugin")
    try:
        assert get_preset("smoke", task="plugin_sums", negative="random_prompt").task == "plugin_sums"
        assert "plugin_word" in tasks.PREFERENCES
        get_preset("smoke")  # imported once: a second call does not register twice (which would raise)
    finally:
        tasks.unregister_task("plugin_sums")
        tasks.unregister_preference("plugin_word")
        sys.modules.pop("my_plugin", None)
    monkeypatch.setenv(tasks.PLUGINS_ENV, "no_such_plugin")
    _one_line_error(lambda: get_preset("smoke"), "MIPO_PLUGINS names 'no_such_plugin', which cannot be imported")


@pytest.mark.slow
def test_registered_task_runs_the_smoke_pipeline(shout, runs):
    preset = get_preset("smoke", task="shout", negative="random_prompt", n_train_prompts=8, n_test_prompts=4, seeds=[0])
    pairs = pipeline.pairs_for_seed(preset, 0, progress=False)
    assert len(pairs) == 8 and {p["group"] for p in pairs} == {"vowel", "consonant"}
    assert all(p["negative_source"] != p["example_id"] for p in pairs)  # random_prompt: another prompt's response
    records = pipeline.evaluate_method(preset, "MIPO", 0, progress=False)
    assert sorted(records.example_id) == sorted(e.id for e in ShoutTask().examples("test"))
    assert set(records.task) == {"shout"} and set(records.score) <= {0.0, 1.0}
    table = stats.per_group_rates(records, n_boot=200)
    assert set(table.group) == {"vowel", "consonant"}


# -------------------------------------------------------------------------------------------- command line --set
def test_set_parses_values_by_field_type():
    parsed = config.parse_assignments([
        "beta=0.3", "epochs=3", "load_in_4bit=true", "task=arithmetic", "seeds=0, 1", "cad_alpha=none",
        "lora_target_modules=q_proj,v_proj",
    ])
    assert parsed == {"beta": 0.3, "epochs": 3, "load_in_4bit": True, "task": "arithmetic", "seeds": (0, 1),
                      "cad_alpha": None, "lora_target_modules": ("q_proj", "v_proj")}
    preset = get_preset("cpu", **parsed)
    assert (preset.beta, preset.seeds, preset.cad_alpha) == (0.3, (0, 1), None)


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--set", "bta=0.3"], "unknown preset field 'bta' \\(did you mean 'beta'\\?\\)"),
        (["--set", "beta=high"], "beta takes a number, got 'high'; e.g. beta=0.1"),
        (["--set", "epochs=1.5"], "epochs takes an integer"),
        (["--set", "load_in_4bit=maybe"], "load_in_4bit takes true or false"),
        (["--set", "seeds=a,b"], "seeds takes comma-separated integers"),
        (["--set", "beta"], "--set expects field=value"),
        (["--set", "beta=-1"], "beta=-1.0 must be greater than 0"),
    ],
)
def test_bad_set_is_one_line_and_exit_2(argv, match, capsys):
    start = time.perf_counter()
    assert main(["reproduce", "--preset", "cpu", *argv]) == 2
    assert time.perf_counter() - start < 5
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert re.search(match, err), err


def test_set_reaches_papermill_as_overrides(monkeypatch, runs):
    """The runner validates overrides before any kernel starts and hands them to every notebook as JSON values."""
    import papermill

    calls = []
    monkeypatch.setattr(papermill, "execute_notebook", lambda src, dst, parameters, **kw: calls.append(parameters))
    assert main(["reproduce", "--preset", "smoke", "--notebooks", "01", "02", "--no-progress",
                 "--set", "beta=0.3", "--set", "lora_target_modules=q_proj,v_proj", "--set", "name=smoke-b03"]) == 0
    expected = {"beta": 0.3, "lora_target_modules": ["q_proj", "v_proj"], "name": "smoke-b03"}
    assert [c["OVERRIDES"] for c in calls] == [expected, expected]
    assert all(c["PRESET"] == "smoke" for c in calls)
    assert (runs / "smoke-b03" / "notebooks" / "timings.csv").exists()  # the overridden name keeps runs apart


@pytest.mark.parametrize("path", runner.list_notebooks(["all"]), ids=lambda p: p.stem)
def test_every_notebook_takes_overrides_from_papermill(path):
    """Each notebook has an OVERRIDES parameter used by `get_preset(resolve_preset(PRESET), **OVERRIDES)` (or its
    reasoning twin), and papermill's injected
    value (a dict literal) is what the notebook then evaluates."""
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    nb = load_notebook_node(str(path))  # papermill's loader: gives every cell the `tags` list it looks up
    i = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    assert "OVERRIDES = {}" in nb.cells[i].source
    assert re.search(r"(get_preset|reasoning_preset)\((resolve_preset\(PRESET\)|PRESET), \*\*OVERRIDES\)", nb.cells[i + 1].source)
    injected = parameterize_notebook(nb, {"OVERRIDES": {"beta": 0.3, "seeds": [0]}})
    namespace: dict = {}
    for cell in injected.cells[i : i + 2]:  # the parameters cell, then papermill's injected-parameters cell
        exec(cell.source, namespace)
    assert namespace["OVERRIDES"] == {"beta": 0.3, "seeds": [0]}
    assert get_preset(resolve_preset(namespace["PRESET"]), **namespace["OVERRIDES"]).beta == 0.3


@pytest.mark.slow
def test_set_runs_the_quickstart_end_to_end(runs):
    """`reproduce --set` for real: the quickstart's kernel builds its preset from the overrides and runs the smoke
    pipeline (pairs, DPO, evaluation, plot) with them."""
    assert main(["reproduce", "--preset", "smoke", "--seeds", "0", "--notebooks", "00", "--no-progress",
                 "--set", "n_test_prompts=10", "--set", "beta=0.3", "--set", "name=smoke-set"]) == 0
    executed = nbformat.read(runs / "smoke-set" / "notebooks" / "00_quickstart.ipynb", as_version=4)
    text = json.dumps([c.get("outputs", []) for c in executed.cells])
    assert "preset smoke-set:" in text and "10 held-out prompts" in text
    assert (runs / "smoke-set" / "personalization").is_dir()
