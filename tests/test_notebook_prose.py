"""The notebooks' prose states costs, settings and counts through spans rendered from their sources.

`readme.render_spans` renders the numbered notebooks' markdown cells like the README and docs/ (the whole re-render
check, with an empty diff, is `test_readme.py::test_every_generated_text_re_renders_...`). Here: the setting and
schedule spans render from the resolved preset and `dpo.LR_SCHEDULE`; rendering a notebook touches only its spans and
keeps its JSON as committed; and each contradiction the prose once had (issue 27, item 5) is now a span where it sat,
so deleting the span fails a test:
  a. notebook 03's header: MIPO's and SFT's epochs and its measured time (once "2 epochs", "about 16 min");
  b. notebook 01, section 8: CAD's evaluation strength is chosen on validation (once "a = 1/beta");
  c. our DPO schedule is `dpo.LR_SCHEDULE` (once "cosine" for our runs, in docs/gpu-and-datasets.md);
  d. any statement of which notebooks have exercises matches the notebooks with `stub` cells (once "01-04");
  e. notebook 00's header: its measured time (once "a few minutes" for about 10 min).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from mipo_lib import config, dpo, hardware
from mipo_lib.config import repo_root
from mipo_lib.errors import MipoError
from mipo_lib.workbook import readme


def notebook(number: str) -> dict:
    path = next(p for p in readme.numbered_notebooks() if p.name.startswith(f"{number}_"))
    return json.loads(path.read_text())


def markdown(nb: dict) -> list[str]:
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown"]


def header(number: str) -> str:
    """A notebook's first markdown cell: its title, what it teaches, and the presets' cost table."""
    return markdown(notebook(number))[0]


def cell_with(number: str, text: str) -> str:
    found = [m for m in markdown(notebook(number)) if text in m]
    assert len(found) == 1, f"notebook {number}: {len(found)} markdown cells hold {text!r}"
    return found[0]


def span(kind: str, key: str, content: str) -> str:
    return f"<!-- {kind}:{key} -->{content}<!-- /{kind} -->"


# ------------------------------------------------------------------------------------------ settings and schedule
def test_setting_spans_render_the_preset_with_its_validation_choices():
    choices = pd.read_csv(repo_root() / "figures" / "choices_cpu.csv", dtype={"value": str}).set_index("field")["value"]
    assert readme.setting_text("cpu/epochs") == choices["epochs"] == "2"
    assert readme.setting_text("cpu/cad_alpha") == choices["cad_alpha"] == "1"  # 1, not 1.0
    assert readme.setting_text("cpu/learning_rate") == "0.0008"
    assert readme.setting_text("smoke/epochs") == str(config.get_preset("smoke").epochs)
    assert readme.render_spans(span("setting", "cpu/sft_epochs", "2")) == span("setting", "cpu/sft_epochs", "4")
    with pytest.raises(MipoError, match="has no field 'epoch'"):
        readme.setting_text("cpu/epoch")
    with pytest.raises(MipoError, match="<preset>/<field>"):
        readme.setting_text("epochs")


def test_a_setting_span_prints_nothing_on_a_cpu_with_native_bf16(monkeypatch, capsys):
    """`get_preset("cpu")` notes there that the choices were tuned in fp32; the note must not reach the output."""
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(config, "_SAID", set())
    config.get_preset("cpu")
    assert "tuned under dtype=float32" in capsys.readouterr().out  # the note this guards against
    monkeypatch.setattr(config, "_SAID", set())
    assert readme.render_spans(span("setting", "cpu/epochs", "x")) == span("setting", "cpu/epochs", "2")
    assert readme.deviations_block("cpu")
    assert capsys.readouterr().out == ""


def test_the_schedule_span_follows_dpo_lr_schedule(monkeypatch):
    preset = readme.reference_preset("cpu")
    assert readme.schedule_text(preset).startswith("constant after a warm-up of 3% of one epoch's steps")
    assert f"`{dpo.LR_SCHEDULE}`" in readme.schedule_text(preset)
    monkeypatch.setattr(readme, "LR_SCHEDULE", "cosine")
    assert readme.schedule_text(preset).startswith("cosine decay") and "`cosine`" in readme.schedule_text(preset)
    monkeypatch.setattr(readme, "LR_SCHEDULE", "polynomial")
    with pytest.raises(MipoError, match="SCHEDULE_WORDS"):
        readme.schedule_text(preset)


# ------------------------------------------------------------------------------------------ rendering a notebook
def test_rendering_a_notebook_touches_only_its_markdown_spans():
    stale = span("setting", "cpu/epochs", "8")
    prose = ["MIPO trains ", stale, " epochs\n", "and more.\n"]
    nb = {"cells": [{"cell_type": "markdown", "metadata": {}, "source": prose},
                    {"cell_type": "code", "metadata": {}, "outputs": [], "source": [stale]},
                    {"cell_type": "markdown", "metadata": {}, "source": ["no span"]}],
          "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    out = readme.render_notebook(nb)
    assert out["cells"][0]["source"] == [f"MIPO trains {span('setting', 'cpu/epochs', '2')} epochs\n", "and more.\n"]
    assert out["cells"][1:] == nb["cells"][1:]  # code cells are not rendered
    assert nb["cells"][0]["source"][1].endswith("8<!-- /setting -->")  # the input is not changed in place


def test_update_notebooks_keeps_the_committed_json_format(tmp_path):
    (tmp_path / "notebooks").mkdir()
    source = readme.numbered_notebooks()[3]
    committed = source.read_text()
    target = tmp_path / "notebooks" / source.name
    target.write_text(committed)
    assert readme.update_notebooks(tmp_path) == []
    target.write_text(committed.replace(span("setting", "cpu/epochs", "2"), span("setting", "cpu/epochs", "8"), 1))
    assert readme.update_notebooks(tmp_path) == [target]
    assert target.read_text() == committed


# ------------------------------------------------------------------------------------- the five contradictions
def test_a_notebook_03_states_its_epochs_and_time_from_their_sources():
    text = header("03")
    preset = readme.reference_preset("cpu")
    assert f"MIPO {span('setting', 'cpu/epochs', str(preset.epochs))} epochs" in text
    assert f"SFT {span('setting', 'cpu/sft_epochs', str(preset.sft_epochs))}" in text
    timings = pd.read_csv(readme.timings_path())
    minutes = readme.timing_text(timings, "cpu/03_dpo_training minutes")
    assert span("timing", "cpu/03_dpo_training minutes", minutes) in text
    assert "2 epochs" not in text and "16 min" not in text


def test_b_notebook_01_says_cads_evaluation_strength_is_chosen_on_validation():
    text = cell_with("01", "**Context-aware decoding**")
    assert "chosen on the validation split" in text
    assert span("setting", "cpu/cad_alpha", readme.setting_text("cpu/cad_alpha")) in text
    assert "evaluation runs CAD with $a = 1/\\beta$" not in text


def _prose() -> dict[str, str]:
    """Every page's text and every numbered notebook's markdown, by name."""
    texts = {str(p.relative_to(repo_root())): p.read_text() for p in readme.pages()}
    texts.update({p.name: "\n".join(markdown(json.loads(p.read_text()))) for p in readme.numbered_notebooks()})
    return texts


def test_c_our_dpo_schedule_is_rendered_and_cosine_is_only_the_official_one():
    assert f"`{dpo.LR_SCHEDULE}`" in readme.deviations_block("cpu")
    assert "<!-- schedule:cpu -->" in (repo_root() / "docs" / "gpu-and-datasets.md").read_text()
    for name, text in _prose().items():
        for line in text.splitlines():
            if "cosine" in line.lower():
                assert re.search(r"official|OpenRLHF|<!-- schedule:", line), f"{name}: cosine for our runs? {line!r}"


#: A statement of which notebooks have exercises: "exercises (01-04)", "exercises in notebooks 01-07".
EXERCISE_RANGE = re.compile(r"exercises?[^.|\n]{0,30}?\(?(\d\d)\s*[-–]\s*(\d\d)\)?", re.I)


def exercise_ranges(text: str) -> list[tuple[int, int]]:
    return [(int(a), int(b)) for a, b in EXERCISE_RANGE.findall(text)]


def notebooks_with_exercises() -> list[int]:
    return [int(p.name[:2]) for p in readme.numbered_notebooks()
            if any("stub" in c.get("metadata", {}).get("tags", []) for c in json.loads(p.read_text())["cells"])]


def test_d_every_statement_of_the_exercise_range_matches_the_stub_cells():
    numbers = notebooks_with_exercises()
    assert numbers == list(range(numbers[0], numbers[-1] + 1)) and len(numbers) >= 7
    wrong = {name: found for name, text in _prose().items()
             if (found := [r for r in exercise_ranges(text) if r != (numbers[0], numbers[-1])])}
    assert not wrong, f"exercise ranges that are not notebooks {numbers[0]:02d}-{numbers[-1]:02d}: {wrong}"


def test_d_the_range_scan_can_fail():
    assert exercise_ranges("graded exercises (01-04) in the notebooks") == [(1, 4)]
    assert exercise_ranges("exercises in notebooks 01–07.") == [(1, 7)]
    assert exercise_ranges("4 graded exercises (look for **Exercise**)") == []


def test_e_notebook_00_states_its_measured_time():
    text = header("00")
    minutes = readme.timing_text(pd.read_csv(readme.timings_path()), "cpu/00_quickstart minutes")
    assert span("timing", "cpu/00_quickstart minutes", minutes) + " on 2 cores from scratch" in text
    assert "a few minutes" not in text


def test_every_notebook_header_with_a_cpu_time_renders_it():
    """No header types a measured CPU time: each measured notebook's `cpu` row holds its timing span."""
    for path in readme.numbered_notebooks():
        number = path.name[:2]
        preset = "cpu-reasoning" if number == "07" else "cpu"
        if number != "01":  # notebook 01 computes on tables: "seconds" on any preset
            assert f"<!-- timing:{preset}/{path.stem} " in header(number), path.name


def test_a_study_time_counts_a_spans_text_not_its_markers(tmp_path, monkeypatch):
    timings = pd.read_csv(readme.timings_path())
    (tmp_path / "notebooks").mkdir()
    monkeypatch.setattr(readme, "repo_root", lambda: tmp_path)
    prose = f"MIPO trains {span('setting', 'cpu/epochs', '8')} epochs"
    cell = {"cell_type": "markdown", "metadata": {}, "source": [prose]}
    (tmp_path / "notebooks" / "03_dpo_training.ipynb").write_text(json.dumps({"cells": [cell]}))
    assert readme.study_time(timings, "cpu/03_dpo_training").words == 4
