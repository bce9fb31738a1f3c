"""Publishing the reference run's outputs into the committed notebooks: code and text stay the committed ones, outputs
come from the executed copy by cell id, without machine paths or progress bars."""

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from mipo_lib.workbook import publish
from mipo_lib.config import repo_root, runs_dir
from mipo_lib.errors import MipoError


def _notebooks():
    committed = new_notebook(cells=[
        new_markdown_cell("# title", id="md"),
        new_code_cell("print(path)", id="a"),
        new_code_cell("new_cell()", id="new"),
        new_code_cell("# NBVAL_CHECK_OUTPUT\nprint(1)", id="chk", outputs=[new_output("stream", name="stdout", text="1\n")]),
    ])
    executed = new_notebook(cells=[
        new_code_cell("PRESET = 'cpu'", id="injected", metadata={"tags": ["injected-parameters"]}),
        new_code_cell("print(path)  # an older source", id="a", execution_count=3, outputs=[
            new_output("stream", name="stdout", text=f"wrote {repo_root()}/figures/x.png and {runs_dir()}/cpu/y.csv\n"),
            new_output("stream", name="stderr", text="positive responses:  50%|#####     | 30/60 [00:10<00:10, 3.0it/s]\r"),
            new_output("execute_result", data={"text/plain": f"'{repo_root()}/notebooks'"}, execution_count=3),
        ]),
        new_code_cell("# NBVAL_CHECK_OUTPUT\nprint(1)", id="chk", outputs=[
            new_output("stream", name="stderr", text="a warning\n"), new_output("stream", name="stdout", text="1\n")]),
    ])
    return committed, executed


def test_outputs_are_merged_by_id_and_sanitized():
    committed, executed = _notebooks()
    merged = publish.merge_outputs(committed, executed)
    cells = {c.id: c for c in merged.cells}
    assert [c.id for c in merged.cells] == ["md", "a", "new", "chk"]  # no injected cell, committed order
    assert cells_outputs(merged, "chk") == ["1\n"]  # nbval's regression truth is kept, not the run's
    assert cells["a"].source == "print(path)" and cells["a"].execution_count == 3
    texts = [o.get("text", "") or o["data"]["text/plain"] for o in cells["a"].outputs]
    assert texts == ["wrote <repo>/figures/x.png and <runs>/cpu/y.csv\n", "'<repo>/notebooks'"]  # no stderr
    assert cells["new"].outputs == []
    assert committed.cells[1].outputs == []  # the input notebook is not modified


def test_object_addresses_are_dropped():
    """A repr's address is new on every run: kept, every rerun would rewrite the line, results unchanged."""
    out = publish.sanitize_outputs([new_output("execute_result", data={"text/plain": "<pandas.io.formats.style.Styler at 0x7f81400bcb50>"})])
    assert out[0]["data"]["text/plain"] == "<pandas.io.formats.style.Styler>"


def cells_outputs(nb, cell_id):
    return [o.get("text") for c in nb.cells if c.id == cell_id for o in c.outputs]


def test_publish_writes_into_the_committed_notebook(tmp_path):
    committed, executed = _notebooks()
    nbformat.write(committed, str(tmp_path / "target.ipynb"))
    nbformat.write(executed, str(tmp_path / "ran.ipynb"))
    publish.publish(tmp_path / "ran.ipynb", tmp_path / "target.ipynb")
    back = nbformat.read(str(tmp_path / "target.ipynb"), as_version=4)
    assert back.cells[1].outputs and str(repo_root()) not in nbformat.writes(back)
    with pytest.raises(MipoError, match="no committed notebook"):
        publish.publish(tmp_path / "ran.ipynb", tmp_path / "missing.ipynb")


def test_only_the_reference_run_publishes():
    from mipo_lib.config import get_preset
    from mipo_lib.workbook.runner import is_reference_run

    assert is_reference_run(get_preset("cpu"), {}) and is_reference_run(get_preset("cpu"), {"dtype": "float32"})
    assert not is_reference_run(get_preset("cpu", beta=0.3), {"beta": 0.3})
    assert not is_reference_run(get_preset("smoke"), {})
    assert is_reference_run(get_preset("cpu-reasoning"), {"dtype": "float32"})  # notebook 07's reference (make reasoning)
    assert not is_reference_run(get_preset("smoke-reasoning"), {})
    assert not is_reference_run(get_preset("cpu"), {}, seeds=[0])  # the one-seed quick path writes under runs/
    assert is_reference_run(get_preset("cpu"), {}, seeds=[0, 1, 2, 3, 4])
    assert not is_reference_run(get_preset("cpu"), {}, seeds=[0, 1, 2])  # a subset of the preset's seeds
    ablations = ["06_ablations"]  # notebook 06's committed run uses seeds 0-2 (make ablations)
    assert is_reference_run(get_preset("cpu"), {"dtype": "float32"}, seeds=[0, 1, 2], notebooks=ablations)
    assert not is_reference_run(get_preset("cpu"), {}, seeds=[0], notebooks=ablations)
    assert not is_reference_run(get_preset("cpu"), {}, seeds=[0, 1, 2], notebooks=["05_results", "06_ablations"])


def test_styled_tables_get_ids_from_their_content():
    """Two renders of one Styler table sanitize to the same html; another table keeps an id of its own."""
    import pandas as pd

    frame = pd.DataFrame({"rate": [0.25, 0.5]})
    first, second = (frame.style.format("{:.1%}").to_html() for _ in range(2))
    other = pd.DataFrame({"rate": [0.75]}).style.format("{:.1%}").to_html()
    assert first != second  # pandas draws a new random id per render
    out = lambda html: "".join(publish.sanitize_outputs([{"output_type": "display_data", "data": {"text/html": html}}])[0]["data"]["text/html"])
    assert out(first) == out(second)
    assert out(first) != out(other)
    ids = set(publish._STYLER_ID.findall(out(first))) | set(publish._STYLER_ID.findall(out(other)))
    assert len(ids) == 2 and "25.0%" in out(first)


def test_only_a_from_scratch_reference_run_records_its_times(tmp_path, monkeypatch):
    """A reference run that reuses its cache measures reading it: it must not replace the committed timings."""
    from mipo_lib.experiments import ledger
    from mipo_lib.workbook import publish as publish_module
    from mipo_lib.workbook import readme, runner

    monkeypatch.setenv("MIPO_RUNS_DIR", str(tmp_path / "runs"))
    recorded = []
    monkeypatch.setattr(runner, "list_notebooks", lambda names: [runner.notebooks_dir() / "05_results.ipynb"])
    monkeypatch.setattr(runner, "run_notebook", lambda path, *a, **k: runner.NotebookRun(path.stem, "cpu", 1.0, 2.0, True))
    monkeypatch.setattr(publish_module, "publish", lambda path: None)
    monkeypatch.setattr(readme, "update_readme", lambda name: False)
    monkeypatch.setattr(readme, "update_timings_table", lambda timings, name: recorded.append(name))
    evaluations = []  # every reference run of the results notebook gets a ledger row, cached or not
    monkeypatch.setattr(ledger, "record", lambda table, commit, protocol, result: evaluations.append(table))
    runner.reproduce("cpu", progress=False)  # nothing under runs/cpu/personalization yet: from scratch
    assert recorded == ["cpu"]
    (tmp_path / "runs" / "cpu" / "personalization").mkdir(parents=True)  # a later run finds its cache
    runner.reproduce("cpu", progress=False)
    assert recorded == ["cpu"]
    runner.reproduce("cpu", redo=True, progress=False)  # redo recomputes everything
    assert recorded == ["cpu", "cpu"]
    runner.reproduce("cpu", overrides={"lora_r": 4}, redo=True, progress=False)  # not the reference
    assert recorded == ["cpu", "cpu"]
    assert evaluations == ["results_cpu.csv"] * 3


def test_the_ablations_reference_run_records_its_ledger_row(tmp_path, monkeypatch):
    """Notebook 06 on seeds 0-2 evaluates its variants on the test prompts: a ledger row for figures/ablations_cpu.csv,
    with each variant's rate; on other seeds it is not the reference and records nothing."""
    from mipo_lib.experiments import ledger
    from mipo_lib.workbook import publish as publish_module
    from mipo_lib.workbook import readme, runner

    monkeypatch.setenv("MIPO_RUNS_DIR", str(tmp_path / "runs"))
    (tmp_path / "runs" / "cpu" / "personalization").mkdir(parents=True)  # a cached run: no timings recorded
    monkeypatch.setattr(runner, "list_notebooks", lambda names: [runner.notebooks_dir() / "06_ablations.ipynb"])
    monkeypatch.setattr(runner, "run_notebook", lambda path, *a, **k: runner.NotebookRun(path.stem, "cpu", 1.0, 2.0, True))
    monkeypatch.setattr(publish_module, "publish", lambda path: None)
    monkeypatch.setattr(readme, "update_readme", lambda name: False)
    rows = []
    monkeypatch.setattr(ledger, "record", lambda table, commit, protocol, result: rows.append((table, protocol, result)))
    runner.reproduce("cpu", seeds=[0], notebooks=["06"], progress=False)  # a quick look: not the reference
    assert rows == []
    runner.reproduce("cpu", seeds=[0, 1, 2], notebooks=["06"], overrides={"dtype": "float32"}, progress=False)
    ((table, protocol, result),) = rows
    assert table == "ablations_cpu.csv" and "seeds 0 1 2" in protocol and "ablation_choices_cpu.csv" in protocol
    assert result == ledger.ablation_headline(repo_root() / "figures" / "ablations_cpu.csv")
