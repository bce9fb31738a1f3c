"""The cache contract: every stage's key changes with every preset field the stage reads and with nothing else, every
preset field is accounted for, writes are atomic, and a run says what it reuses and why it recomputes.

The end-to-end check runs the smoke preset's tiny model (8 pairs, one epoch of 2 steps) three times in one runs
folder: `lora_r` changed (training and what follows rerun, and the log names the field), then unchanged (everything
reused, no model loaded). Then what no key holds: a code judge (cached replies are judged on read, so a preference
checker registered anew reaches them), the LLM judge (its model, 4-bit setting, dtype and prompt are keyed) and the
library versions (recorded, said once when they differ, a changed key only under MIPO_CACHE_VERSIONS=strict)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

from mipo_lib import cache, dpo, evaluate, files, methods, pairs
from mipo_lib.errors import MipoError
from mipo_lib.experiments import pipeline, tune
from mipo_lib.config import Preset, get_preset
from mipo_lib.tasks import register_preference, register_task, unregister_task
from mipo_lib.tasks import personalization
from mipo_lib.tasks.base import Example

F = cache.STAGE_FIELDS
MIPO_TRAINING = methods.get_method("MIPO").trainer
ALL_FIELDS = tuple(f.name for f in dataclasses.fields(Preset))
SPECIAL_VALUES = {
    "name": "smoke_other", "description": "another description", "model_id": "bundled:SmolLM2-135M-Instruct",
    "dtype": "bfloat16", "task": "arithmetic", "negative": "random_prompt", "lora_target_modules": ("q_proj",),
    "cad_alpha": 2.0, "seeds": (7,), "report_to": "tensorboard", "extra": {"note": "x"},
}


@pytest.fixture(scope="module")
def preset() -> Preset:
    return get_preset("smoke", n_train_prompts=8, n_test_prompts=4, seeds=(0,), epochs=1, batch_size=4)


def changed(preset: Preset, name: str) -> Preset:
    """`preset` with field `name` set to another valid value."""
    old = getattr(preset, name)
    if name in SPECIAL_VALUES:
        value = SPECIAL_VALUES[name]
    elif isinstance(old, bool):
        value = not old
    elif isinstance(old, int):
        value = old + 1
    elif isinstance(old, float):
        value = old + 0.05 if old < 0.5 else old / 2
    else:
        raise AssertionError(f"add a changed value for preset field {name!r} to SPECIAL_VALUES")
    assert value != old, name
    return preset.with_overrides(**{name: value})


def _responses() -> pd.DataFrame:
    return pd.DataFrame({"example_id": ["a", "b"], "response": ["one", None]})


JUDGED_EXAMPLES = [Example("c1", "How do I start running?", context="Be brief.",
                           meta={"preferences": ["Be brief."], "reference": "Slowly."})]


def _judged_records() -> pd.DataFrame:
    return pd.DataFrame({"method": ["MIPO"], "seed": [0], "example_id": ["c1"], "response": ["Run."]})


# (what, key of the stage, every field it reads: its own and its upstream stages', the path named by the key)
STAGES: list[tuple[str, Callable[[Preset], cache.Key], tuple[str, ...], Callable[[Preset], Path] | None]] = [
    ("generation", lambda p: pairs.generation_key(p, 0), F["generation"], lambda p: pairs.pairs_dir(p, 0)),
    ("pairs", lambda p: pairs.pairs_key(p, 0), F["generation"] + F["pairs"], None),
    ("MIPO adapter", lambda p: pipeline.training_key(p, "MIPO", 0), F["generation"] + F["pairs"] + F["dpo"],
     lambda p: pipeline.adapter_dir(p, "MIPO", 0)),
    ("SFT adapter", lambda p: pipeline.training_key(p, "SFT", 0), F["generation"] + F["pairs"] + F["sft"],
     lambda p: pipeline.adapter_dir(p, "SFT", 0)),
    ("adapter trained directly", lambda p: dpo.adapter_key(MIPO_TRAINING, p, 0, [{"chosen": "a"}]),
     F["generation"] + F["pairs"] + F["dpo"], None),
    ("prompting evaluation", lambda p: pipeline.evaluation_key(p, "prompting", 0), F["evaluation"],
     lambda p: pipeline._eval_path(p, "prompting", 0)),
    ("base evaluation", lambda p: pipeline.evaluation_key(p, "base (no context)", 0), F["evaluation"], None),
    ("CAD evaluation", lambda p: pipeline.evaluation_key(p, "CAD", 0), F["evaluation-cad"],
     lambda p: pipeline._eval_path(p, "CAD", 0)),
    ("MIPO evaluation", lambda p: pipeline.evaluation_key(p, "MIPO", 0),
     F["evaluation"] + F["generation"] + F["pairs"] + F["dpo"], lambda p: pipeline._eval_path(p, "MIPO", 0)),
    ("PMI", lambda p: pipeline.pmi_key(p, _responses(), "PMI"), F["pmi"], None),
    ("validation evaluation", lambda p: tune._eval_key(p, "prompting", 0, 5, None), F["evaluation"], None),
    ("LLM judge", lambda p: evaluate.judge_key(p, _judged_records(), JUDGED_EXAMPLES, "judge/x"), F["llm-judge"], None),
]


# --------------------------------------------------------------------------------------------------------- keys
def test_every_preset_field_is_read_by_a_stage_or_declared_irrelevant():
    read = {name for fields in F.values() for name in fields}
    assert not read - set(ALL_FIELDS), "a stage declares a field the preset does not have"
    assert not read & set(cache.NOT_AFFECTING), "a field cannot both matter and not matter"
    forgotten = set(ALL_FIELDS) - read - set(cache.NOT_AFFECTING)
    assert not forgotten, f"add {sorted(forgotten)} to a stage in cache.STAGE_FIELDS, or to cache.NOT_AFFECTING"
    stale = (read | set(cache.NOT_AFFECTING)) - set(ALL_FIELDS)
    assert not stale, f"{sorted(stale)} are not Preset fields any more: remove them from the cache declarations"


@pytest.mark.parametrize("what,key_of,reads,path_of", STAGES, ids=[s[0] for s in STAGES])
def test_key_changes_with_every_field_the_stage_reads_and_no_other(preset, what, key_of, reads, path_of):
    base = key_of(preset)
    assert base == key_of(preset) and len(base.digest) == 12
    for name in ALL_FIELDS:
        other = changed(preset, name)
        if name in reads:
            assert key_of(other).digest != base.digest, f"{what}: changing {name} must recompute"
            assert name in cache.changes(base.values, key_of(other).values), name
            if path_of is not None:
                assert path_of(other) != path_of(preset), f"{what}: {name} must lead to another folder or file"
        else:
            assert key_of(other) == base, f"{what} does not read {name}: changing it must reuse the result"


def test_keys_of_seeds_methods_and_responses_differ(preset):
    assert pairs.pairs_key(preset, 0) != pairs.pairs_key(preset, 1)
    assert pipeline.training_key(preset, "MIPO", 0).digest != pipeline.training_key(preset, "MIPO", 1).digest
    assert pipeline.evaluation_key(preset, "prompting", 0) == pipeline.evaluation_key(preset, "prompting", 3)
    assert pipeline.evaluation_key(preset, "MIPO", 0) != pipeline.evaluation_key(preset, "MIPO", 3)
    assert pipeline.evaluation_key(preset, "prompting", 0) != pipeline.evaluation_key(preset, "base (no context)", 0)
    other = _responses().assign(response=["one", "two"])
    assert pipeline.pmi_key(preset, other, "PMI") != pipeline.pmi_key(preset, _responses(), "PMI")
    direct = [dpo.adapter_key(MIPO_TRAINING, preset, 0, [{"chosen": c}]) for c in ("a", "b")]
    assert direct[0] != direct[1]  # a run trained directly is keyed by its pairs' content too


# ------------------------------------------------------------------------------------------------ reuse, prepare
def _key(**values) -> cache.Key:
    return cache.Key("stage", "thing (seed 0)", {"lora_r": 8, **values})


def test_reuse_needs_the_same_key_and_a_finished_result(tmp_path, caplog):
    result = tmp_path / "thing.jsonl"
    assert not cache.reuse(result, _key())
    cache.store(result, _key())
    assert not cache.reuse(result, _key())  # key stored, result missing (an interrupted run)
    result.write_text("x")
    assert not cache.reuse(result, _key(lora_r=4))
    with caplog.at_level(logging.INFO, logger="mipo_lib.cache"):
        assert cache.reuse(result, _key())
        cache.say_reused()
    assert caplog.messages == [f"reusing thing (seed 0) from {result}"]


def _reused_results(tmp_path: Path, stage_labels: list[str]) -> None:
    """Store and reuse one result per label (a notebook cell looping over seeds and methods)."""
    for i, label in enumerate(stage_labels):
        result = tmp_path / f"r{i}.jsonl"
        result.write_text("x")
        key = cache.Key("stage", label, {"i": i})
        cache.store(result, key)
        assert cache.reuse(result, key)


def test_reuse_says_one_summary_line_per_stage_when_the_cell_ends(tmp_path, caplog, monkeypatch):
    monkeypatch.delenv(cache.VERBOSE_ENV, raising=False)
    labels = [f"pairs (seed {s})" for s in (0, 1, 2)] + [f"MIPO evaluation (seed {s})" for s in (0, 1)] + ["prompting evaluation"]
    with caplog.at_level(logging.INFO, logger="mipo_lib.cache"):
        _reused_results(tmp_path, labels)
        assert caplog.messages == []  # nothing said per result
        cache.say_reused()
        cache.say_reused()  # said once: the tally starts again
    assert caplog.messages == [
        "reusing pairs: 3 results (seeds 0, 1, 2)", "reusing MIPO evaluation: 2 results (seeds 0, 1)",
        f"reusing prompting evaluation from {tmp_path / 'r5.jsonl'}",
    ]


def test_verbose_says_every_reused_result(tmp_path, caplog, monkeypatch):
    monkeypatch.setenv(cache.VERBOSE_ENV, "1")
    with caplog.at_level(logging.INFO, logger="mipo_lib.cache"):
        _reused_results(tmp_path, ["pairs (seed 0)", "pairs (seed 1)"])
        cache.say_reused()
    assert caplog.messages == [f"reusing pairs (seed {s}) from {tmp_path / f'r{s}.jsonl'}" for s in (0, 1)]


def test_a_notebook_cell_ends_with_the_summary(tmp_path):
    """Run in a real IPython shell: the post_run_cell hook says the summary as the cell that reused ends."""
    pytest.importorskip("IPython")
    code = (
        "from pathlib import Path\nfrom mipo_lib import cache\n"
        f"root = Path({str(tmp_path)!r})\n"
        "for s in range(3):\n"
        "    r = root / f'p{s}.jsonl'; r.write_text('x'); k = cache.Key('pairs', f'pairs (seed {s})', {'s': s})\n"
        "    cache.store(r, k); cache.reuse(r, k)\n"
        "print('cell ran')\n"
    )
    script = tmp_path / "cell.ipy"
    script.write_text(code)
    env = {k: v for k, v in os.environ.items() if k != cache.VERBOSE_ENV}
    out = subprocess.run([sys.executable, "-m", "IPython", "--quick", "--no-banner", "-c", f"%run -i {script}"],
                         capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[1], timeout=120)
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    assert lines[-2:] == ["cell ran", "cache: reusing pairs: 3 results (seeds 0, 1, 2)"], out.stdout + out.stderr


def test_prepare_names_the_changed_fields_and_drops_the_stale_key(tmp_path, caplog):
    result = tmp_path / "thing.jsonl"
    result.write_text("x")
    with caplog.at_level(logging.INFO, logger="mipo_lib.cache"):
        assert cache.prepare(result, _key())  # a result without a key: settings unknown
        cache.store(result, _key())
        assert not cache.prepare(result, _key())  # same settings: nothing to say
        assert cache.prepare(result, _key(lora_r=4))
    assert "no cache key" in caplog.messages[0]
    assert caplog.messages[1] == f"thing (seed 0) in {result} was made with other settings (lora_r 8 -> 4): recomputing"
    assert len(caplog.messages) == 2 and not cache.key_file(result).exists()


def test_prepare_names_the_nearest_stored_sibling(tmp_path, caplog):
    for name, r, beta in (("a", 8, 0.1), ("b", 16, 0.3)):
        (tmp_path / name).write_text("x")
        cache.store(tmp_path / name, _key(lora_r=r, beta=beta))
    cache.store(tmp_path / "other", cache.Key("stage", "another thing", {"lora_r": 4}))
    with caplog.at_level(logging.INFO, logger="mipo_lib.cache"):
        assert not cache.prepare(tmp_path / "c", _key(lora_r=4, beta=0.1))
    assert caplog.messages == [f"computing thing (seed 0): the nearest stored one, {tmp_path / 'a'}, differs in lora_r 8 -> 4"]


def test_a_torn_key_is_no_key(tmp_path):
    result = tmp_path / "thing.jsonl"
    result.write_text("x")
    cache.key_file(result).write_text('{"values": {"lora')
    assert not cache.reuse(result, _key())


# ------------------------------------------------------------------------------------------------- atomic writes
def test_atomic_file_is_all_or_nothing(tmp_path):
    target = tmp_path / "sub" / "table.jsonl"
    files.write_text(target, "old")
    with pytest.raises(RuntimeError):
        with files.atomic(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old" and sorted(p.name for p in target.parent.iterdir()) == ["table.jsonl"]
    files.write_text(target, "new")
    assert target.read_text() == "new" and len(list(target.parent.iterdir())) == 1


def test_atomic_directory_is_all_or_nothing_and_first_wins(tmp_path):
    target = tmp_path / "checkpoint"
    with pytest.raises(RuntimeError):
        with files.atomic(target, directory=True) as tmp:
            (tmp / "model.safetensors").write_text("half")
            raise RuntimeError("killed mid-conversion")
    assert list(tmp_path.iterdir()) == []
    with files.atomic(target, directory=True) as tmp:
        (tmp / "model.safetensors").write_text("first")
    with files.atomic(target, directory=True) as tmp:  # another process converted it meanwhile
        (tmp / "model.safetensors").write_text("second")
    assert (target / "model.safetensors").read_text() == "first" and list(tmp_path.iterdir()) == [target]


# ---------------------------------------------------------------------------------------------------- end to end
def _run_stages(preset: Preset) -> tuple[dpo.TrainResult, pd.DataFrame]:
    """What notebooks 02-05 run for one seed: pairs, the MIPO adapter, two evaluations and the PMI of both."""
    pipeline.pairs_for_seed(preset, 0, progress=False)
    trained = pipeline.train_for_seed(preset, "MIPO", 0, progress=False)
    records = pd.concat([pipeline.evaluate_method(preset, m, 0, progress=False) for m in ("prompting", "MIPO")])
    pipeline.pmi_before_after(preset, records, progress=False)
    return trained, records


@pytest.mark.usefixtures("one_thread")
def test_changed_lora_r_retrains_and_says_why_then_everything_is_reused(preset, tmp_path, monkeypatch, caplog, capsys):
    monkeypatch.setenv("MIPO_RUNS_DIR", str(tmp_path / "runs"))
    first, _ = _run_stages(preset)
    assert not first.reused
    smaller = preset.with_overrides(lora_r=4)

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mipo_lib.cache"):
        second, records = _run_stages(smaller)
        cache.say_reused()
    text = caplog.text
    assert not second.reused and second.adapter_dir != first.adapter_dir
    assert "reusing pairs (seed 0)" in text and "reusing prompting evaluation" in text
    assert "computing DPO adapter (seed 0): the nearest stored one" in text and "lora_r 8 -> 4" in text
    assert "computing MIPO evaluation (seed 0)" in text
    assert json.loads((second.adapter_dir / "adapter_config.json").read_text())["r"] == 4
    assert (first.adapter_dir / dpo.DONE_MARKER).exists()  # the lora_r=8 run stays, for a switch back

    def no_model(*args, **kwargs):
        raise AssertionError("everything is cached: no model may be loaded")

    monkeypatch.setattr(pipeline, "load_for_preset", no_model)
    caplog.clear()
    capsys.readouterr()
    with caplog.at_level(logging.INFO, logger="mipo_lib.cache"):
        third, again = _run_stages(smaller)
        cache.say_reused()  # one result per stage: the summary names each, as a notebook cell shows it
    assert third.reused and third.adapter_dir == second.adapter_dir
    pd.testing.assert_frame_equal(again.reset_index(drop=True), records.reset_index(drop=True), check_dtype=False)
    reused = [m.split(" from ")[0] for m in caplog.messages]
    assert reused == [
        "reusing pairs (seed 0)", "reusing DPO adapter (seed 0)", "reusing prompting evaluation",
        "reusing MIPO evaluation (seed 0)", "reusing PMI of the prompting responses",
        "reusing PMI of the MIPO responses (seed 0)",
    ]
    assert "cache: reusing DPO adapter (seed 0) from <runs>/smoke/" in capsys.readouterr().out  # a notebook shows it


def test_the_dtype_auto_resolves_to_is_part_of_the_key(monkeypatch):
    """Two CPUs, one with AVX512-BF16: the same "auto" preset must not share cached results between them."""
    from mipo_lib import cache, hardware
    from mipo_lib.config import get_preset

    preset = get_preset("cpu")
    keys = {}
    for native in (False, True):
        monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda native=native: native)
        monkeypatch.setattr(hardware.torch.cuda, "is_available", lambda: False)
        keys[native] = cache.stage_key("generation", preset, "pairs")
    assert keys[False].values["resolved_dtype"] == "float32" and keys[True].values["resolved_dtype"] == "bfloat16"
    assert keys[False].digest != keys[True].digest


# ---------------------------------------------------------------------------------------------- judged on read
@pytest.fixture
def preferences_restored():
    """The preference registry as it is, restored after the test (which registers a preference anew)."""
    saved, complete_only = dict(personalization.PREFERENCES), set(personalization.COMPLETE_ONLY)
    yield
    personalization.PREFERENCES.clear()
    personalization.PREFERENCES.update(saved)
    personalization.COMPLETE_ONLY.clear()
    personalization.COMPLETE_ONLY.update(complete_only)


@pytest.mark.usefixtures("one_thread", "preferences_restored")
def test_a_preference_checker_registered_anew_judges_the_cached_replies(preset, tmp_path, monkeypatch):
    """The judge is in no key: cached evaluations and pairs store replies, and the scores read back follow the
    checker registered now (same sentence, so the same prompts and keys), without a model."""
    monkeypatch.setenv("MIPO_RUNS_DIR", str(tmp_path / "runs"))
    before = pipeline.evaluate_method(preset, "prompting", 0, progress=False)
    pairs_before = pd.DataFrame(pipeline.pairs_for_seed(preset, 0, progress=False))
    bullets, on_bullets = before["group"] == "bullets", pairs_before["group"] == "bullets"
    assert bullets.any() and (before.loc[bullets, "score"] == 0).all()  # the tiny random model writes no bullet list
    assert on_bullets.any() and (pairs_before.loc[on_bullets, "chosen_score"] == 0).all()
    stored = evaluate._read_records(pipeline._eval_path(preset, "prompting", 0))
    assert "score" not in stored and "response" in stored and "truncated" in stored  # replies, no verdict

    def no_model(*args, **kwargs):
        raise AssertionError("the replies are cached: no model may be loaded")

    monkeypatch.setattr(pipeline, "load_for_preset", no_model)
    key = pipeline.evaluation_key(preset, "prompting", 0)
    register_preference("bullets", personalization.PREFERENCES["bullets"][0], lambda reply: True, replace=True,
                        complete_only=False)
    assert pipeline.evaluation_key(preset, "prompting", 0) == key
    after = pipeline.evaluate_method(preset, "prompting", 0, progress=False)
    assert (after.loc[bullets, "score"] == 1).all()
    pd.testing.assert_frame_equal(after[~bullets], before[~bullets])  # the other preferences' verdicts are unchanged
    pairs_after = pd.DataFrame(pipeline.pairs_for_seed(preset, 0, progress=False))
    assert (pairs_after.loc[on_bullets, ["chosen_score", "rejected_score"]] == 1).all().all()
    pd.testing.assert_frame_equal(pairs_after[~on_bullets], pairs_before[~on_bullets])


def test_records_of_examples_the_task_lacks_are_refused(task):
    frame = pd.DataFrame({"example_id": ["r99-nothing"], "response": ["hi"], "truncated": [False]})
    with pytest.raises(MipoError, match="redo=True"):
        evaluate.judged(frame, task, task.examples("test", 10))


# ------------------------------------------------------------------------------------------------- the LLM judge
@pytest.fixture
def llm_judged_task(monkeypatch):
    """A registered task without a code judge (as PRISM), its one test example having a reference reply."""

    class Judged:
        name, conditional, program_judge = "llm_judged", True, False

        def examples(self, split, n=None, seed=0):
            return list(JUDGED_EXAMPLES)

        def prompt(self, example, with_context=True, context=None):
            return [{"role": "user", "content": example.request}]

        def score(self, example, response):
            raise AssertionError("judged by an LLM")

        def group(self, example):
            return "all"

    register_task("llm_judged", Judged)
    yield
    unregister_task("llm_judged")


@pytest.mark.usefixtures("llm_judged_task")
def test_another_judge_model_4bit_setting_dtype_or_prompt_is_another_judged_table(tmp_path, monkeypatch, capsys):
    """The judged table is reused for the same judge and replies, and judged again for another judge model, its
    4-bit setting, its dtype or its prompt: each decides the scores."""
    monkeypatch.setenv("MIPO_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setattr(pipeline, "evaluate_all", lambda preset, seeds, progress=True: _judged_records())
    loaded = []
    monkeypatch.setattr(pipeline, "load_model_and_tokenizer", lambda judge, **kw: loaded.append((judge, kw)) or (None, None))
    monkeypatch.setattr(evaluate, "llm_judge_scores", lambda model, tok, examples, responses, preset, progress: [4.0] * len(responses))

    def judged(**settings):
        frame = pipeline.judge_run("smoke", task="llm_judged", progress=False, **settings)
        assert frame["score"].tolist() == [4.0, 4.0]  # MIPO's reply and the reference
        return len(loaded)

    assert judged(judge_id="judge/a") == 1
    assert judged(judge_id="judge/a") == 1  # reused
    assert judged(judge_id="judge/b") == 2
    assert judged(judge_id="judge/a", judge_4bit=True) == 3
    assert loaded[-1] == ("judge/a", {"dtype": "float32", "load_in_4bit": True})
    assert judged(judge_id="judge/a", dtype="bfloat16") == 4
    monkeypatch.setattr(evaluate, "JUDGE_SYSTEM", "Rate the reply from 1 to 5.")
    assert judged(judge_id="judge/a") == 5
    assert len(list((tmp_path / "runs" / "smoke" / "llm_judged" / "judged").glob("judged-*.jsonl"))) == 5


# ------------------------------------------------------------------------------------------------------- versions
VERSIONS = {"mipo_lib": "0.1.0", "torch": "2.13.0", "transformers": "5.24.0", "trl": "1.16.0", "peft": "0.21.2"}


@pytest.fixture
def versions(monkeypatch):
    """Set the library versions this process reports (`versions(transformers="5.25.0")`), from a fresh process's
    state: nothing said yet, MIPO_CACHE_VERSIONS unset."""
    monkeypatch.setattr(cache, "_versions_said", set())
    monkeypatch.delenv(cache.VERSIONS_ENV, raising=False)

    def set_versions(**changed):
        monkeypatch.setattr(cache, "library_versions", lambda: {**VERSIONS, **changed})

    set_versions()
    return set_versions


def test_versions_are_recorded_not_keyed_and_a_difference_is_said_once(tmp_path, versions, caplog):
    results = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    for result in results:
        result.write_text("x")
        cache.store(result, _key())
    record = json.loads(cache.key_file(results[0]).read_text())
    assert record["versions"] == VERSIONS and record["values"] == dict(_key().values)
    versions(transformers="5.25.0")
    with caplog.at_level(logging.INFO, logger="mipo_lib.cache"):
        assert all(cache.reuse(r, _key()) for r in results + results)
        cache.say_reused()
    line = "results made with transformers 5.24.0 (now 5.25.0) are reused; set MIPO_CACHE_VERSIONS=strict to recompute them"
    assert caplog.messages[0] == line and caplog.messages.count(line) == 1  # once per process, not once per file
    assert caplog.messages[1:] == ["reusing thing: 2 results (seeds 0)"]  # each result counted once


def test_strict_versions_recompute_results_of_other_versions(tmp_path, versions, monkeypatch, caplog):
    result = tmp_path / "a.jsonl"
    result.write_text("x")
    cache.store(result, _key())
    monkeypatch.setenv(cache.VERSIONS_ENV, "strict")
    assert cache.reuse(result, _key())  # the same versions: reused
    cache.say_reused()
    versions(peft="0.22.0")
    assert not cache.reuse(result, _key())
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mipo_lib.cache"):
        assert cache.prepare(result, _key())
    assert caplog.messages == [f"thing (seed 0) in {result} was made with peft 0.21.2 (now 0.22.0): recomputing"]
    assert not cache.key_file(result).exists()
    old = {k: v for k, v in json.loads(_key().record()).items() if k != "versions"}  # made before versions were recorded
    cache.key_file(result).write_text(json.dumps(old))
    assert not cache.reuse(result, _key())
    monkeypatch.setenv(cache.VERSIONS_ENV, "no")
    with pytest.raises(MipoError, match="set it to strict"):
        cache.reuse(result, _key())


@pytest.mark.usefixtures("one_thread")
def test_an_evaluation_of_other_versions_is_reused_unless_strict(preset, tmp_path, monkeypatch, versions, caplog):
    monkeypatch.setenv("MIPO_RUNS_DIR", str(tmp_path / "runs"))
    first = pipeline.evaluate_method(preset, "prompting", 0, progress=False)
    versions(torch="2.14.0")
    loads = []
    real = pipeline.load_for_preset
    monkeypatch.setattr(pipeline, "load_for_preset", lambda p: loads.append(p) or real(p))
    with caplog.at_level(logging.INFO, logger="mipo_lib.cache"):
        pd.testing.assert_frame_equal(pipeline.evaluate_method(preset, "prompting", 0, progress=False), first)
    assert not loads and "results made with torch 2.13.0 (now 2.14.0) are reused" in caplog.text
    monkeypatch.setenv(cache.VERSIONS_ENV, "strict")
    pd.testing.assert_frame_equal(pipeline.evaluate_method(preset, "prompting", 0, progress=False), first)
    assert len(loads) == 1  # recomputed (the same replies: greedy decoding of the same model)
    record = json.loads(cache.key_file(pipeline._eval_path(preset, "prompting", 0)).read_text())
    assert record["versions"]["torch"] == "2.14.0"
