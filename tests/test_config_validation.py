"""Values are checked where they enter: a bad preset value (built in, overridden, typed on the command line or built by
hand) or an empty data file fails at once, in one line that names the field and a value that works, instead of
minutes later inside TRL or as "0 examples"."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import dataclasses
import math
import time

import numpy as np
import pytest
import torch

from mipo_lib import config, hardware, models, pairs
from mipo_lib.config import DTYPES, NEGATIVES, PRESETS, Preset, get_preset
from mipo_lib.errors import MipoError
from mipo_lib.tasks import get_task

BAD_VALUES = [
    ({"beta": -1.0}, "beta=-1.0 must be greater than 0; e.g. beta=0.1"),
    ({"beta": 0}, "beta=0.0 must be greater than 0"),
    ({"beta": math.nan}, "beta=nan must be greater than 0"),
    ({"learning_rate": 0.0}, "learning_rate=0.0 must be greater than 0"),
    ({"sft_learning_rate": -2e-4}, "sft_learning_rate=-0.0002 must be greater than 0"),
    ({"n_train_prompts": 0}, "n_train_prompts=0 must be greater than 0"),
    ({"n_test_prompts": -5}, "n_test_prompts=-5 must be greater than 0"),
    ({"epochs": 0}, "epochs=0 must be greater than 0; e.g. epochs=2"),
    ({"batch_size": 0}, "batch_size=0 must be greater than 0"),
    ({"gen_batch_size": 0}, "gen_batch_size=0"),
    ({"eval_batch_size": 0}, "eval_batch_size=0"),
    ({"max_new_tokens": 0}, "max_new_tokens=0"),
    ({"k_negatives": 0}, "k_negatives=0"),
    ({"lora_r": 0}, "lora_r=0"),
    ({"top_p": 0.0}, r"top_p=0.0 must be in \(0, 1\]"),
    ({"top_p": 1.5}, r"top_p=1.5 must be in \(0, 1\]"),
    ({"temperature": -0.1}, "temperature=-0.1 must be >= 0"),
    ({"lora_dropout": 1.0}, r"lora_dropout=1.0 must be in \[0, 1\)"),
    ({"warmup_ratio": 2.0}, r"warmup_ratio=2.0 must be in \[0, 1\)"),
    ({"cad_alpha": -1.0}, "cad_alpha=-1.0 must be >= 0, or none"),
    ({"eval_batch_new_tokens": -1}, r"eval_batch_new_tokens=-1 must be >= 0 \(0 is off\)"),
    ({"dtype": "fp16"}, "dtype='fp16' must be one of auto, float32, float16, bfloat16"),
    ({"negative": "nope"}, "unknown negative; choose one of context_drop, random_context, random_prompt"),
    ({"task": "mmlu"}, "task='mmlu' is an unknown task; choose one of personalization, personalization_unseen_types, personalization_constraints, arithmetic"),
    ({"lora_target_modules": ()}, "lora_target_modules=\\(\\) must name at least one module"),
    ({"lora_target_modules": ("q_proj", "")}, "must name at least one module"),
    ({"seeds": ()}, r"seeds=\(\) must hold at least one seed; e.g. seeds=0,1,2"),
    ({"seeds": (0, 0)}, "must be distinct integers >= 0"),
    ({"seeds": (-1,)}, "must be distinct integers >= 0"),
    ({"name": ""}, "name='' must be a non-empty folder name"),
    ({"name": "a/b"}, "must be a non-empty folder name"),
    ({"report_to": " "}, "report_to=' ' must be 'none'"),
    # wrong types, from Python or as text
    ({"beta": "high"}, "preset field beta takes a number, got 'high'; e.g. beta=0.1"),
    ({"epochs": 1.5}, "preset field epochs takes an integer, got 1.5; e.g. epochs=2"),
    ({"epochs": True}, "preset field epochs takes an integer, got True"),
    ({"load_in_4bit": "maybe"}, "load_in_4bit takes true or false"),
    ({"load_in_4bit": 1}, "load_in_4bit takes true or false, got 1"),
    ({"seeds": 3}, "seeds takes comma-separated integers, got 3"),
    ({"cad_alpha": "strong"}, "cad_alpha takes a number or none"),
    ({"bta": 0.3}, "unknown preset field 'bta' \\(did you mean 'beta'\\?\\); valid fields: name, description"),
]


@pytest.mark.parametrize("overrides,match", BAD_VALUES, ids=lambda v: str(v)[:40])
def test_bad_value_fails_at_once_in_one_line(overrides, match):
    start = time.perf_counter()
    with pytest.raises(MipoError, match=match) as err:
        get_preset("cpu", **overrides)
    assert time.perf_counter() - start < 5
    assert "\n" not in str(err.value)


def test_a_preset_built_by_hand_is_validated_too():
    with pytest.raises(MipoError, match="beta=-1.0 must be greater than 0"):
        Preset(name="mine", description="by hand", model_id="tiny-random", beta=-1.0)
    with pytest.raises(MipoError, match="beta=-1.0"):
        dataclasses.replace(PRESETS["cpu"], beta=-1.0)


def test_builtin_presets_are_valid_and_typed():
    hints = {f.name: f.type for f in dataclasses.fields(Preset)}
    for preset in PRESETS.values():
        preset.validate()
        assert isinstance(preset.seeds, tuple) and all(type(s) is int for s in preset.seeds)
        assert all(type(getattr(preset, n)) is float for n, t in hints.items() if t == "float")
        assert all(type(getattr(preset, n)) is int for n, t in hints.items() if t == "int")


def test_values_are_coerced_to_the_field_types():
    p = get_preset("cpu", beta=1, seeds=np.arange(2), lora_target_modules=["q_proj", "v_proj"], epochs=np.int64(3))
    assert p.beta == 1.0 and type(p.beta) is float
    assert p.seeds == (0, 1) and all(type(s) is int for s in p.seeds)
    assert p.lora_target_modules == ("q_proj", "v_proj") and p.epochs == 3 and type(p.epochs) is int
    text = get_preset("cpu", beta="0.3", load_in_4bit="yes", cad_alpha="none", seeds="4, 5", lora_target_modules="q_proj,")
    assert (text.beta, text.load_in_4bit, text.cad_alpha, text.seeds, text.lora_target_modules) == (
        0.3, True, None, (4, 5), ("q_proj",))


def test_name_can_be_overridden():
    """`get_preset`'s own argument is positional-only, so the preset's `name` field is overridable like any other."""
    assert get_preset("smoke", name="smoke-b03", beta=0.3).name == "smoke-b03"


def test_cli_text_round_trips_every_default():
    """Every default, written as `--set field=<text>`, parses back to itself: the error messages' examples work."""
    for f in dataclasses.fields(Preset):
        if f.default is not dataclasses.MISSING:
            assert config.conform(f.name, config.cli_text(f.default)) == f.default, f.name


def test_checked_lists_agree_with_the_modules_that_use_them():
    """config validates against its own lists; the modules that act on the values must accept exactly those."""
    assert set(pairs.NEGATIVES) == set(NEGATIVES)
    for dtype in DTYPES:
        assert isinstance(hardware.select_dtype(torch.device("cpu"), dtype), torch.dtype)


@pytest.mark.parametrize("name,text", [("empty.jsonl", ""), ("empty.json", "[]")])
def test_empty_data_file_fails_where_it_is_read(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    start = time.perf_counter()
    with pytest.raises(MipoError, match="has no records; pass a file with at least one example") as err:
        get_task("gsm8k", test_path=path).examples("test", n=5)
    assert time.perf_counter() - start < 5
    assert "\n" not in str(err.value) and str(path) in str(err.value)
