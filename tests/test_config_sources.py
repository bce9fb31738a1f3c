"""One configuration, documented once: every preset field carries its help (and the command line lists them all), and
a run says where each of its values came from (the preset, a task's official settings, the validation choices,
`--set`), and when the validation choices it applies were tuned under other settings."""

import dataclasses
import json
import re

import pandas as pd
import pytest

from mipo_lib import config
from mipo_lib.__main__ import main
from mipo_lib.config import Preset, get_preset, resolve_preset
from mipo_lib.experiments import tune
from mipo_lib.workbook import runner

#: How `--help` names each annotation's type.
TYPE_WORDS = {"str": "text", "int": "an integer", "float": "a number", "bool": "true or false",
              "float | None": "a number or none", "tuple[str, ...]": "comma-separated text",
              "tuple[int, ...]": "comma-separated integers"}


def _words(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize("command", ["reproduce", "tune", "heldout", "chat"])
def test_help_lists_every_field_with_its_help_type_and_default(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for f in dataclasses.fields(Preset):
        (header,) = [line for line in out.splitlines() if line.startswith(f"  {f.name} (")]
        assert TYPE_WORDS[f.type] in header, header
        if f.default is not dataclasses.MISSING:
            assert f"default {config.cli_text(f.default)})" in header, header
        assert _words(f.metadata["help"]) in _words(out), f.name


def test_every_field_has_a_help_text_a_user_can_act_on():
    for f in dataclasses.fields(Preset):
        text = f.metadata.get("help", "")
        assert len(text.split()) >= 10, f"{f.name}: help too short to act on: {text!r}"
        assert _words(text).lower().rstrip(".") not in (f.name, f.name.replace("_", " ")), f.name


@pytest.fixture
def smoke_choices(tmp_path, monkeypatch):
    """A choices table for the smoke preset (epochs 8, CAD's strength 2), tuned under the smoke preset as written;
    `config.repo_root` points at tmp_path, so it is figures/choices_smoke.csv there."""
    monkeypatch.setattr(config, "repo_root", lambda: tmp_path)
    monkeypatch.setattr(config, "_SAID", set())
    choices = pd.DataFrame([
        {"field": "epochs", "value": "8", "method": "MIPO", "validation_rate": 0.5, "grid": "1 8", "seeds": "0",
         "n_validation": 4, "rule": tune.RULE},
        {"field": "cad_alpha", "value": "2", "method": "CAD", "validation_rate": 0.4, "grid": "1 2", "seeds": "0",
         "n_validation": 4, "rule": tune.RULE},
    ])
    path = config.choices_path("smoke")
    tune.write_choices(choices, get_preset("smoke", tuned=False), path)
    return path


def test_the_runner_prints_each_value_that_differs_with_its_source(smoke_choices, monkeypatch, capsys):
    monkeypatch.setattr(runner, "list_notebooks", lambda names: [])  # no notebook runs: only what is said first
    runner.reproduce("smoke", overrides={"lora_r": 4, "beta": 0.1}, progress=False)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[mipo] smoke: ")]
    assert [line.removeprefix("[mipo] smoke: ") for line in lines] == [
        "lora_r = 4 (--set)", "epochs = 8 (figures/choices_smoke.csv)", "cad_alpha = 2.0 (figures/choices_smoke.csv)"]
    # beta=0.1 is the preset's own value: set, but nothing to say


def test_set_beats_the_choices(smoke_choices, capsys):
    resolved = resolve_preset("smoke", {"epochs": 3})
    assert resolved.preset.epochs == 3 and resolved.sources["epochs"] == "--set"
    assert resolved.preset.cad_alpha == 2.0 and resolved.sources["cad_alpha"] == "figures/choices_smoke.csv"
    assert resolved.sources["beta"] == "preset smoke"
    assert get_preset("smoke").epochs == 8 and get_preset("smoke", epochs=3).epochs == 3
    # the command line says it before anything runs (here: before failing on a notebook that does not exist)
    assert main(["reproduce", "--preset", "smoke", "--set", "epochs=3", "--notebooks", "none-such"]) == 2
    out = capsys.readouterr().out
    assert "[mipo] smoke: epochs = 3 (--set)" in out and "epochs = 8" not in out


def test_set_beats_the_tasks_official_settings():
    resolved = resolve_preset("t4", {"task": "gsm8k", "max_new_tokens": 100})
    assert resolved.preset.temperature == 0.1 and resolved.sources["temperature"] == "task gsm8k's official settings"
    assert resolved.preset.max_new_tokens == 100 and resolved.sources["max_new_tokens"] == "--set"
    assert "temperature = 0.1 (task gsm8k's official settings)" in resolved.changes()


def test_choices_tuned_under_other_settings_are_applied_and_said_once(smoke_choices, capsys):
    """The MIPO row was tuned under lora_r=8, which CAD's decoding never read: --set lora_r=4 names epochs, not
    cad_alpha; a choice the caller sets itself is not named; the line comes once per process."""
    assert get_preset("smoke", lora_r=4).epochs == 8  # still applied
    assert capsys.readouterr().out == (
        "figures/choices_smoke.csv was tuned under lora_r=8; this run has lora_r=4: its epochs=8 is applied but was "
        "not chosen for these settings (make tune PRESET=smoke SET=\"lora_r=4\" chooses anew, or --set them)\n")
    get_preset("smoke", lora_r=4)
    assert capsys.readouterr().out == ""
    get_preset("smoke", lora_r=4, epochs=2)
    get_preset("smoke")
    assert capsys.readouterr().out == ""  # the only affected choice is the caller's; then nothing differs


def test_cpu_with_lora_r_4_says_which_committed_choices_no_longer_match(cpu_native_bf16, monkeypatch, capsys):
    """The committed cpu choices were tuned in fp32: where "auto" means bf16 (a CPU with native bf16) the dtype is
    named too, and a run as committed says nothing where "auto" means fp32."""
    monkeypatch.setattr(config, "_SAID", set())
    get_preset("cpu")
    assert ("tuned under dtype=float32; this run has dtype=bfloat16" in capsys.readouterr().out) == cpu_native_bf16
    get_preset("cpu", lora_r=4)
    (line,) = capsys.readouterr().out.splitlines()
    was, now = re.match(r"figures/choices_cpu.csv was tuned under (.*); this run has (.*?): its", line).groups()
    assert (was, now) == (("dtype=float32, lora_r=8", "dtype=bfloat16, lora_r=4") if cpu_native_bf16
                          else ("lora_r=8", "lora_r=4"))
    assert "its epochs=2, learning_rate=0.0008, sft_epochs=4, sft_learning_rate=0.0008" in line
    assert ("cad_alpha=1.0" in line) == cpu_native_bf16  # CAD's strength never read lora_r
    assert "are applied but were not chosen for these settings (make tune PRESET=cpu SET=" in line


def test_cpu_reasoning_is_quiet_about_its_cap_chosen_after_tuning(monkeypatch, capsys):
    """cpu-reasoning tunes at the cap's upper bound (`reasoning.CAP_UPPER_BOUND` new tokens) and then picks its
    evaluation cap (at most the bound, figures/reasoning_cap_cpu.csv) from validation replies: a difference there is
    the design, not stale choices, so a run says nothing about it; a field changed by the user is still named."""
    import pandas as pd

    from mipo_lib.experiments.reasoning import CAP_UPPER_BOUND

    monkeypatch.setattr(config, "_SAID", set())
    choices = config.read_choices(config.choices_path("cpu-reasoning"))
    assert {c.tuned_under["eval_max_new_tokens"] for c in choices} == {CAP_UPPER_BOUND}
    caps = pd.read_csv(config.repo_root() / "figures" / "reasoning_cap_cpu.csv")
    assert get_preset("cpu-reasoning", dtype="float32").eval_max_new_tokens == int(caps.loc[caps["chosen"], "cap"].iloc[0])
    get_preset("cpu-reasoning", dtype="float32", eval_max_new_tokens=106)  # a smaller cap, as the rule may choose
    assert "eval_max_new_tokens" not in capsys.readouterr().out
    get_preset("cpu-reasoning", dtype="float32", lora_r=4)
    out = capsys.readouterr().out
    assert "lora_r=8" in out and "eval_max_new_tokens" not in out


def test_the_committed_choices_record_the_reference_settings():
    """Both committed choices tables were tuned under the cpu preset as written, in fp32 (`make tune SEEDS=0
    SET="dtype=float32"`, `make heldout SET="dtype=float32"`): a change to the cpu preset that a tuning read, without
    tuning anew, fails here."""
    from mipo_lib.experiments import heldout

    reference = get_preset("cpu", dtype="float32")
    held = reference.with_overrides(task=heldout.TASK)
    for path, preset in [(config.choices_path("cpu"), reference), (heldout.choices_path("cpu"), held)]:
        table = pd.read_csv(path)
        for row in table.itertuples():
            assert json.loads(row.tuned_under) == tune.tuned_under(preset, row.method, set(table["field"])), path.name
        assert all(config.tuning_differences(preset, c.tuned_under) == {} for c in config.read_choices(path))
