"""Every generated text of the workbook is rendered from committed tables: the README's blocks and timing spans, the
conclusions files of notebooks 06 and 07 and notebook 06's section 8 re-render from `figures/` with an empty diff."""

from __future__ import annotations

import difflib
import json

import pandas as pd
import pytest

from mipo_lib.analysis import ablation_findings, reasoning_findings
from mipo_lib.workbook import readme
from mipo_lib.analysis import stats
from mipo_lib.config import repo_root
from mipo_lib.errors import MipoError
from test_stats import make_records as _make_records


def make_records(*args, **kwargs) -> pd.DataFrame:
    """`test_stats.make_records` with the truncation record every evaluation writes (here: no reply cut)."""
    return _make_records(*args, **kwargs).assign(truncated=False)


def _same(committed: str, rendered: str, what: str) -> None:
    diff = "".join(difflib.unified_diff(committed.splitlines(True), rendered.splitlines(True), "committed", "rendered"))
    assert not diff, f"{what} differs from its rendering from the committed tables:\n{diff}"


def test_every_generated_text_re_renders_from_the_committed_tables_with_an_empty_diff(tmp_path):
    """README blocks and timing spans (`update_readme` on a copy changes nothing), both conclusions files, and the
    section-8 findings notebook 06 shows, each rendered again from `figures/`."""
    figures = repo_root() / "figures"
    copy = tmp_path / "README.md"
    copy.write_text((repo_root() / "README.md").read_text())
    for preset in readme.REFERENCE_TABLES:
        readme.update_readme(preset, copy)
    _same((repo_root() / "README.md").read_text(), copy.read_text(), "README.md")
    run = ablation_findings.load_run("cpu")
    _same((figures / "ablations_cpu_conclusions.txt").read_text(), ablation_findings.conclusions_text(run),
          "figures/ablations_cpu_conclusions.txt")
    tables = reasoning_findings.load_tables("cpu")
    _same((figures / "reasoning_cpu_conclusions.md").read_text(),
          reasoning_findings.conclusions_text(tables["results"], tables["difficulty"], tables["findings"]),
          "figures/reasoning_cpu_conclusions.md")
    cells = json.loads((repo_root() / "notebooks" / "06_ablations.ipynb").read_text())["cells"]
    shown = next(c for c in cells if "committed_findings" in "".join(c["source"]))["outputs"][0]["data"]["text/markdown"]
    _same("".join(shown), "\n".join(f"- {b}" for b in ablation_findings.findings(run)), "notebook 06 section 8")


def test_the_whole_check_fails_on_a_changed_table(tmp_path, monkeypatch):
    """A committed table that disagrees with the committed text is caught (here: one verdict cell flipped)."""
    path = _committed_tables_in(tmp_path, monkeypatch)["comparisons"]
    table = pd.read_csv(path)
    table.loc[table["comparison"] == "K=2 - K=1, 2x epochs", "detectable"] = True
    table.to_csv(path, index=False)
    text = (repo_root() / "figures" / "ablations_cpu_conclusions.txt").read_text()
    with pytest.raises(AssertionError, match="differs"):
        _same(text, ablation_findings.conclusions_text(ablation_findings.load_run("cpu")), "conclusions")


@pytest.mark.parametrize("preset", sorted(readme.REFERENCE_TABLES))
def test_committed_readme_matches_the_committed_results_table(preset):
    text = (repo_root() / "README.md").read_text()
    block = readme.results_block(pd.read_csv(readme.results_path(preset)), preset)
    assert block in text, "README results block is stale: run `python -m mipo_lib readme` and commit README.md"


def test_block_states_rates_differences_and_verdicts_from_the_table():
    rec = make_records({"prompting": 0.25, "SFT": 0.3, "MIPO": 0.45}, n_examples=60, deterministic=("prompting",))
    table = stats.results_table(rec, n_boot=300)
    block = readme.results_block(table, "smoke")
    mipo = table[(table["kind"] == "paired_difference") & (table["method"] == "MIPO")
                 & (table["baseline"] == "prompting") & (table["ci_design"] == "crossed")].iloc[0]
    assert f"{100 * mipo['diff']:+.1f} points, 95% CI [{100 * mipo['diff_lo']:+.1f}, {100 * mipo['diff_hi']:+.1f}]" in block
    assert "same in every seed" in block  # prompting is deterministic
    assert "| **MIPO** | DPO on the MIPO pairs; context in the prompt; greedy |" in block
    assert block.startswith(readme._begin("smoke")) and block.endswith(readme.END.format(preset="smoke"))


def test_block_renders_the_notebooks_summary_from_its_tables(monkeypatch):
    """Notebook 07's summary follows its results in the block, rendered from its tables (not read from its .md)."""
    table = pd.read_csv(readme.results_path("cpu-reasoning"))
    assert "What the same run shows" not in readme.results_block(table, "smoke")
    monkeypatch.setattr(readme, "SUMMARIES", {"smoke": "cpu"})
    block = readme.results_block(table, "smoke")
    tables = reasoning_findings.load_tables("cpu")
    lines = reasoning_findings.lines(table, tables["difficulty"], tables["findings"])
    assert block.endswith("\n".join(lines) + "\n" + readme.END.format(preset="smoke"))
    assert "`figures/reasoning_cpu_findings.csv`" in block


def test_update_rewrites_only_the_block(tmp_path, monkeypatch):
    rec = make_records({"prompting": 0.25, "MIPO": 0.45}, n_examples=40, deterministic=("prompting",))
    csv = tmp_path / "results_smoke.csv"
    stats.write_results(rec, csv, n_boot=200)
    monkeypatch.setattr(readme, "results_path", lambda preset="cpu": csv)
    path = tmp_path / "README.md"
    dev = f"{readme.DEVIATIONS_BEGIN.format(preset='smoke')}\nDEV-BLOCK\n{readme.DEVIATIONS_END.format(preset='smoke')}"
    monkeypatch.setattr(readme, "deviations_block", lambda preset="cpu": dev)
    path.write_text(f"intro\n{readme._begin('smoke')}\nold numbers\n{readme.END.format(preset='smoke')}\n"
                    f"{readme.DEVIATIONS_BEGIN.format(preset='smoke')}\nold\n{readme.DEVIATIONS_END.format(preset='smoke')}\noutro\n")
    assert readme.update_readme("smoke", path) is True
    text = path.read_text()
    assert text.startswith("intro\n") and text.endswith(dev + "\noutro\n") and "old numbers" not in text
    assert readme.update_readme("smoke", path) is False  # idempotent
    path.write_text("no markers\n")
    with pytest.raises(MipoError, match="no generated block"):
        readme.update_readme("smoke", path)


def test_committed_deviations_table_matches_the_preset():
    """Change a `cpu` preset value and this fails until the README's deviations table is regenerated."""
    assert readme.deviations_block("cpu") in (repo_root() / "README.md").read_text()


def test_deviations_read_our_settings_off_the_preset(monkeypatch):
    from mipo_lib import config

    changed = config.get_preset("cpu", learning_rate=1e-4, epochs=4)
    monkeypatch.setattr(readme, "get_preset", lambda name: changed)
    block = readme.deviations_block("cpu")
    assert "learning rate 0.0001" in block and "4 epochs" in block


@pytest.mark.parametrize("column", ["ci_design", "p_holm", "detectable", "truncated"])
def test_a_table_without_verdicts_or_truncation_records_names_the_fix(column):
    """No compatibility branch renders an older table: it fails, naming the notebook to rerun."""
    rec = make_records({"prompting": 0.25, "MIPO": 0.45}, n_examples=40, deterministic=("prompting",))
    table = stats.results_table(rec, n_boot=200)
    with pytest.raises(MipoError, match=f"lacks column.*{column}.*rerun"):
        readme.results_block(table.drop(columns=[column]), "smoke")


def test_block_names_the_methods_over_the_truncation_budget():
    rec = make_records({"prompting": 0.25, "MIPO": 0.45}, n_examples=40, deterministic=("prompting",))
    table = stats.results_table(rec, n_boot=200)
    per_seed = table["kind"] == "per_seed"
    within = table.assign(truncated=table["truncated"].where(~per_seed, 0.02))
    assert "stay within the 5.0% budget" in readme.results_block(within, "smoke")
    over = within.copy()
    over.loc[per_seed & (over["method"] == "prompting"), "truncated"] = 0.1
    block = readme.results_block(over, "smoke")
    assert "Over the 5.0% budget for replies cut at the token cap: prompting 10.0%" in block and "MIPO 2" not in block


def test_choices_line_flags_an_epoch_choice_at_the_grid_edge(tmp_path, monkeypatch):
    from mipo_lib import config

    rows = "field,value,method,validation_rate,grid,seeds,n_validation,rule\n"
    path = tmp_path / "choices_smoke.csv"
    monkeypatch.setattr(config, "choices_path", lambda preset: path)
    path.write_text(rows + "epochs,8,MIPO,0.48,1 2 4 8,0,50,r\nsft_epochs,4,SFT,0.3,1 2 4 8,0,50,r\ncad_alpha,10,CAD,0.4,0.5 1 10,0,50,r\n")
    line = " ".join(readme._choices_lines("smoke"))
    assert "At the grid's edge: MIPO's `epochs` is the largest value tried" in line and "SFT's" not in line.split("edge")[1]
    path.write_text(rows + "epochs,4,MIPO,0.48,1 2 4 8,0,50,r\n")
    assert "grid's edge" not in " ".join(readme._choices_lines("smoke"))
    # a learning rate at the top of its grid is flagged too; a one-value grid has no edge to speak of
    path.write_text(rows + "sft_epochs,4,SFT,0.34,1 2 4 8,0,50,r\nsft_learning_rate,0.0008,SFT,0.34,0.0002 0.0008,0,50,r\n"
                    "learning_rate,0.0002,MIPO,0.48,0.0002,0,50,r\n")
    line = " ".join(readme._choices_lines("smoke"))
    assert "At the grid's edge: SFT's `sft_learning_rate` is the largest value tried" in line
    assert "MIPO's" not in line.split("edge")[1]


def test_held_out_types_title_names_the_target_that_made_its_records():
    main = make_records({"prompting": 0.25, "MIPO": 0.45}, n_examples=40, deterministic=("prompting",))
    held = make_records({"prompting": 0.3, "MIPO": 0.35}, n_examples=40, seeds=(0,), seed=1).assign(task="personalization_unseen_types")
    block = readme.results_block(stats.results_table(pd.concat([main, held], ignore_index=True), n_boot=200), "smoke")
    assert ("task `personalization_unseen_types`, 1 seed x 40 held-out prompts; records from `make heldout` "
            "(`figures/heldout_types_smoke.csv`); same CIs and family.") in block


def test_held_out_types_block_says_which_epochs_its_own_validation_chose(tmp_path, monkeypatch):
    main = make_records({"prompting": 0.25, "MIPO": 0.45}, n_examples=40, deterministic=("prompting",))
    held = make_records({"prompting": 0.3, "MIPO": 0.35}, n_examples=40, seeds=(0,), seed=1).assign(task="personalization_unseen_types")
    table = stats.results_table(pd.concat([main, held], ignore_index=True), n_boot=200)
    monkeypatch.setattr(readme, "repo_root", lambda: tmp_path)
    assert "own validation split" not in readme.results_block(table, "smoke")  # no committed choice: nothing said
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "heldout_choices_smoke.csv").write_text(
        "field,value,method,validation_rate,grid,seeds,n_validation,rule\nepochs,4,MIPO,0.58,1 2 4 8,0,50,r\n")
    block = readme.results_block(table, "smoke")
    held_part = block.split("**Held-out preference types")[1]
    assert ("Chosen on this task's own validation split (`make heldout`, seeds 0, 50 validation prompts; "
            "figures/heldout_choices_smoke.csv): MIPO `epochs` = 4 (validation rate 58.0%, grid 1 2 4 8).") in held_part


def test_committed_readme_matches_the_committed_ablations():
    text = (repo_root() / "README.md").read_text()
    assert readme.ablations_block("cpu") in text, "README ablations block is stale: run `python -m mipo_lib readme`"


def _committed_tables_in(tmp_path, monkeypatch):
    """Notebook 06's committed tables, copied into `tmp_path/figures`, which the readme then reads."""
    (tmp_path / "figures").mkdir()
    for name in ablation_findings.TABLES.values():
        source = repo_root() / "figures" / name.format(preset="cpu")
        (tmp_path / "figures" / name.format(preset="cpu")).write_text(source.read_text())
    monkeypatch.setattr(ablation_findings, "repo_root", lambda: tmp_path)
    return ablation_findings.table_paths("cpu")


def test_ablations_block_shows_the_table_and_only_the_lines_it_does_not(tmp_path, monkeypatch):
    paths = _committed_tables_in(tmp_path, monkeypatch)
    block = readme.ablations_block("cpu")
    assert block.startswith(readme.ABLATIONS_BEGIN.format(preset="cpu"))
    assert block.endswith(readme.ABLATIONS_END.format(preset="cpu"))
    assert "| K | K=1 (reference) | 47.3 [37.0, 57.7] | 47 / 53 / 42 | +24.3 [+12.7, +36.0] | — | — | 0 |" in block
    assert "- K=2 - K=1, 2x epochs: -7.7 points" in block  # the compute-matched comparison is not a table cell
    assert "K=2 - prompting" not in block and "- K=2 - K=1:" not in block and "KL(policy" not in block  # cells
    assert "distinct-2: MIPO - prompting" in block and "MIPO K=2 - prompting" not in block
    variants = pd.read_csv(paths["variants"])
    variants.loc[variants["variant"] == "K=4", "truncated"] = None
    variants.to_csv(paths["variants"], index=False)
    block = readme.ablations_block("cpu")
    assert "| -5.0 [-15.0, +6.0] | — | — |" in block and "nan" not in block  # a variant without the record


def test_update_readme_rewrites_the_ablations_block_where_the_tables_exist(tmp_path, monkeypatch):
    paths = _committed_tables_in(tmp_path, monkeypatch)
    path = tmp_path / "README.md"
    begin, end = readme.ABLATIONS_BEGIN.format(preset="cpu"), readme.ABLATIONS_END.format(preset="cpu")
    text = (repo_root() / "README.md").read_text()
    path.write_text(text.split(begin)[0] + f"{begin}\nstale\n{end}" + text.split(end)[1])
    assert readme.update_readme("cpu", path) is True
    assert readme.ablations_block("cpu") in path.read_text() and "stale" not in path.read_text()
    paths["comparisons"].unlink()
    with pytest.raises(MipoError, match="make ablations"):
        readme.ablations_block("cpu")


# ------------------------------------------------------------------------------------------------------ timings
TIMINGS = pd.DataFrame([
    {"notebook": "00-05", "part": None, "preset": "cpu", "run": "reference", "wall_s": 2640, "peak_rss_mb": 3789},
    {"notebook": "00_quickstart", "part": None, "preset": "cpu", "run": "reference", "wall_s": 623, "peak_rss_mb": 3379},
    {"notebook": "03_dpo_training", "part": None, "preset": "cpu", "run": "reference", "wall_s": 1473, "peak_rss_mb": 3789},
    {"notebook": "06_ablations", "part": "K=2", "preset": "cpu", "run": "reference", "wall_s": 4140, "peak_rss_mb": None},
    {"notebook": "06_ablations", "part": "K=4", "preset": "cpu", "run": "reference", "wall_s": 6960, "peak_rss_mb": None},
    {"notebook": "06_ablations", "part": None, "preset": "cpu", "run": "from the cache", "wall_s": 30, "peak_rss_mb": None},
])


@pytest.mark.parametrize("key, text", [
    ("cpu/00_quickstart wall", "10.4 min"), ("cpu/03_dpo_training wall", "25 min"), ("cpu/00_quickstart seconds", "623 s"),
    ("cpu/03_dpo_training seconds", "1,473 s"), ("cpu/00-05 min-s", "44 min 0 s"), ("cpu/00_quickstart peak", "3.3 GB"),
    ("cpu/00-05 budget", "1 min under the 45-minute budget"), ("cpu/00-05 goal", "goal 30: missed"),
    ("cpu/06_ablations/K=2+K=4 minutes", "3 h 5 min"), ("cpu/06_ablations/K=2 minutes", "1 h 9 min"),
    ("cpu/06_ablations@cache wall", "30 s"),
])
def test_timing_spans_render_from_the_table(key, text):
    assert readme.timing_text(TIMINGS, key) == text


def test_timing_spans_are_rewritten_in_place_and_a_missing_row_names_the_fix():
    span = "<!-- timing:cpu/00_quickstart wall -->"
    assert readme.render_timings(f"took **{span}9 min<!-- /timing -->** here", TIMINGS) == (
        f"took **{span}10.4 min<!-- /timing -->** here")
    with pytest.raises(MipoError, match="no row for every part"):
        readme.render_timings("<!-- timing:cpu/06_ablations/K=8 minutes -->x<!-- /timing -->", TIMINGS)
    with pytest.raises(MipoError, match="unknown format"):
        readme.render_timings("<!-- timing:cpu/00_quickstart hours -->x<!-- /timing -->", TIMINGS)
    with pytest.raises(MipoError, match="not closed"):
        readme.render_timings("<!-- timing:cpu/00_quickstart wall -->x", TIMINGS)


def test_update_timings_table_records_a_reference_run(tmp_path):
    table = tmp_path / "timings_cpu.csv"
    TIMINGS.assign(seeds="0 1 2", source="old", date="2026-11-28").to_csv(table, index=False)
    runs = tmp_path / "timings.csv"
    rows = [("00_quickstart", 600.5, 3000.0, True), ("00_quickstart", 590.0, 3100.0, False)]
    rows += [(f"0{i}_nb", 10.0, 100.0, True) for i in range(1, 6)] + [("06_ablations", 50.0, 900.0, True)]
    pd.DataFrame(rows, columns=["notebook", "wall_s", "peak_rss_mb", "ok"]).assign(
        preset="cpu", finished_at="2026-12-24T10:00:00").to_csv(runs, index=False)
    out = readme.update_timings_table(runs, "cpu", table).set_index(["notebook", "run"])
    quick = out.loc[("00_quickstart", "reference")]
    assert (quick["wall_s"], quick["peak_rss_mb"], quick["date"]) == (600.5, 3000.0, "2026-12-24")  # the ok run
    assert "runs/cpu/notebooks/timings.csv" in quick["source"]
    assert out.loc[("00-05", "reference"), "wall_s"] == pytest.approx(650.5)  # all six ran: their sum
    assert out.loc[("03_dpo_training", "reference"), "wall_s"] == 1473  # not run: kept
    assert sorted(out.loc["06_ablations", "wall_s"]) == [30, 4140, 6960]  # recorded as a breakdown: left as recorded
    assert out.loc[("01_nb", "reference"), "wall_s"] == 10.0  # a new notebook gets its row
    assert out.equals(pd.read_csv(table).set_index(["notebook", "run"]))
