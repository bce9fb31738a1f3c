"""Every generated text of the workbook is rendered from committed tables: the README's, the docs pages' and the
notebooks' blocks and spans, the conclusions files of notebooks 06 and 07 and notebook 06's section 8 re-render from
`figures/` with an empty diff; each block sits on the page `readme.BLOCKS` names; the README stays a page (<= 150 lines,
<= 1,500 words) whose docs links all resolve and which links every docs page."""

from __future__ import annotations

import difflib
import json
import re
import shutil
from pathlib import Path

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


def copy_pages(root: Path) -> list[Path]:
    """The committed README, docs/ pages and numbered notebooks, copied under `root` (which `update_readme` then
    rewrites)."""
    shutil.copy(repo_root() / "README.md", root / "README.md")
    shutil.copytree(repo_root() / "docs", root / "docs")
    (root / "notebooks").mkdir()
    for notebook in readme.numbered_notebooks():
        shutil.copy(notebook, root / "notebooks" / notebook.name)
    return [p.relative_to(root) for p in [*readme.pages(root), *readme.numbered_notebooks(root)]]


def page_text(block: readme.Block) -> str:
    return (repo_root() / block.page).read_text()


def test_every_generated_text_re_renders_from_the_committed_tables_with_an_empty_diff(tmp_path):
    """README, docs and notebook-markdown blocks and spans (`update_readme` on a copy changes no page and no
    notebook), both conclusions files, and the section-8 findings notebook 06 shows, each rendered again from
    `figures/`."""
    figures = repo_root() / "figures"
    pages = copy_pages(tmp_path)
    assert len(pages) > 9 and all(str(p).startswith(("docs/", "notebooks/")) for p in pages[1:])
    for preset in sorted({b.preset for b in readme.BLOCKS}):
        readme.update_readme(preset, tmp_path)
    for page in pages:
        _same((repo_root() / page).read_text(), (tmp_path / page).read_text(), str(page))
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
    follow_up = table.index[(table["section"] == "K negatives") & table["variant_column"].isna()][0]  # a text line
    table.loc[follow_up, "detectable"] = not table.loc[follow_up, "detectable"]
    table.to_csv(path, index=False)
    text = (repo_root() / "figures" / "ablations_cpu_conclusions.txt").read_text()
    with pytest.raises(AssertionError, match="differs"):
        _same(text, ablation_findings.conclusions_text(ablation_findings.load_run("cpu")), "conclusions")


@pytest.mark.parametrize("block", readme.BLOCKS, ids=lambda b: f"{b.kind}:{b.preset}")
def test_each_block_is_on_its_page_and_matches_the_committed_tables(block):
    assert readme.render_block(block) in page_text(block), (
        f"{block.page}'s {block.kind}:{block.preset} block is stale: run `python -m mipo_lib readme` and commit it")


def test_every_page_holds_exactly_the_blocks_the_table_gives_it():
    """No block is left behind on its old page (a stale copy in the README) or placed on a page `BLOCKS` does not name."""
    for path in readme.pages():
        text, page = path.read_text(), str(path.relative_to(repo_root()))
        found = sorted(line.split(":")[0].removeprefix("<!-- ") + ":" + line.split(":")[1]
                       for line in text.splitlines() if line.startswith("<!-- ") and ":begin" in line)
        assert found == sorted(f"{b.kind}:{b.preset}" for b in readme.BLOCKS if b.page == page), page


def test_reference_tables_all_have_their_blocks():
    assert set(readme.REFERENCE_TABLES) == {b.preset for b in readme.BLOCKS if b.kind == "results"}


def test_block_states_rates_differences_and_verdicts_from_the_table():
    rec = make_records({"prompting": 0.25, "SFT": 0.3, "MIPO": 0.45}, n_examples=60, deterministic=("prompting",))
    table = stats.results_table(rec, n_boot=300)
    block = readme.results_block(table, "smoke")
    mipo = table[(table["kind"] == "paired_difference") & (table["method"] == "MIPO")
                 & (table["baseline"] == "prompting") & (table["ci_design"] == stats.DEFAULT_DESIGN)].iloc[0]
    assert f"{100 * mipo['diff']:+.1f} points, 95% CI [{100 * mipo['diff_lo']:+.1f}, {100 * mipo['diff_hi']:+.1f}]" in block
    assert "same in every seed" in block  # prompting is deterministic
    assert readme.DESIGN_WORDS[stats.DEFAULT_DESIGN] in block  # the table's design, said as such
    type_level = table.loc[(table["kind"] == "paired_difference") & (table["ci_design"] != stats.DEFAULT_DESIGN),
                           "ci_design"].iloc[0]
    assert f"Type-level, {type_level}: [" in block  # beside the prompt-level interval
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


def test_update_writes_each_block_into_the_page_the_table_names(tmp_path, monkeypatch):
    rec = make_records({"prompting": 0.25, "MIPO": 0.45}, n_examples=40, deterministic=("prompting",))
    csv = tmp_path / "results_smoke.csv"
    stats.write_results(rec, csv, n_boot=200)
    monkeypatch.setattr(readme, "results_path", lambda preset="cpu": csv)
    dev = f"{readme.DEVIATIONS_BEGIN.format(preset='smoke')}\nDEV-BLOCK\n{readme.DEVIATIONS_END.format(preset='smoke')}"
    monkeypatch.setattr(readme, "deviations_block", lambda preset="cpu": dev)
    monkeypatch.setitem(readme.BLOCK_RENDERERS, "deviations", readme.deviations_block)
    monkeypatch.setattr(readme, "BLOCKS", (readme.Block("results", "smoke", "docs/results.md"),
                                           readme.Block("deviations", "smoke", "README.md")))
    (tmp_path / "docs").mkdir()
    results, front = tmp_path / "docs" / "results.md", tmp_path / "README.md"
    results.write_text(f"intro\n{readme._begin('smoke')}\nold numbers\n{readme.END.format(preset='smoke')}\noutro\n")
    front.write_text(f"top\n{readme.DEVIATIONS_BEGIN.format(preset='smoke')}\nold\n"
                     f"{readme.DEVIATIONS_END.format(preset='smoke')}\nend\n")
    assert readme.update_readme("smoke", tmp_path) is True
    text = results.read_text()
    assert text.startswith("intro\n") and text.endswith(readme.END.format(preset="smoke") + "\noutro\n")
    assert "old numbers" not in text and "| **MIPO** |" in text
    assert front.read_text() == f"top\n{dev}\nend\n"
    assert readme.update_readme("smoke", tmp_path) is False  # idempotent
    results.write_text("no markers\n")
    with pytest.raises(MipoError, match="docs/results.md has no generated block"):
        readme.update_readme("smoke", tmp_path)
    results.unlink()
    with pytest.raises(MipoError, match="docs/results.md is missing"):
        readme.update_readme("smoke", tmp_path)
    with pytest.raises(MipoError, match="no generated block belongs to preset 'nope'"):
        readme.update_readme("nope", tmp_path)


def test_committed_deviations_table_matches_the_preset():
    """Change a `cpu` preset value and this fails until the deviations table (docs/protocol.md) is regenerated."""
    block = next(b for b in readme.BLOCKS if b.kind == "deviations")
    assert readme.deviations_block("cpu") in page_text(block)


def test_deviations_read_our_settings_off_the_preset(monkeypatch):
    from mipo_lib import config

    changed = config.get_preset("cpu", learning_rate=1e-4, epochs=4, dtype="float32")
    monkeypatch.setattr(readme, "reference_preset", lambda name: changed)
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


def test_committed_ablations_page_matches_the_committed_ablations():
    block = next(b for b in readme.BLOCKS if b.kind == "ablations")
    assert readme.ablations_block("cpu") in page_text(block), "ablations block is stale: run `python -m mipo_lib readme`"


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
    variants, comparisons = pd.read_csv(paths["variants"]), pd.read_csv(paths["comparisons"])
    k1 = variants[variants["variant"] == "K=1"].iloc[0]
    assert (f"| K | K=1 (reference) | {100 * k1['rate']:.1f} [{100 * k1['lo']:.1f}, {100 * k1['hi']:.1f}] | "
            + " / ".join(f"{100 * float(r):.0f}" for r in k1["per_seed_rate"].split())) in block
    lines = comparisons[(comparisons["section"] == "K negatives") & comparisons["variant_column"].isna()]
    assert len(lines) and all(f"- {c}: " in block for c in lines["comparison"])  # follow-ups are not table cells
    assert "K=2 - prompting" not in block and "- K=2 - K=1:" not in block and "KL(policy" not in block  # cells
    assert "distinct-2: MIPO - prompting" in block and "MIPO K=2 - prompting" not in block
    variants.loc[variants["variant"] == "K=4", "truncated"] = None
    variants.to_csv(paths["variants"], index=False)
    block = readme.ablations_block("cpu")
    k4 = variants[variants["variant"] == "K=4"].iloc[0]
    assert (f"| {100 * k4['vs_reference']:+.1f} [{100 * k4['vs_reference_lo']:+.1f}, {100 * k4['vs_reference_hi']:+.1f}]"
            " | — | — |") in block and "nan" not in block  # a variant without the record


def test_update_readme_rewrites_the_ablations_block_from_its_tables(tmp_path, monkeypatch):
    paths = _committed_tables_in(tmp_path, monkeypatch)
    copy_pages(tmp_path)
    path = tmp_path / next(b for b in readme.BLOCKS if b.kind == "ablations").page
    begin, end = readme.ABLATIONS_BEGIN.format(preset="cpu"), readme.ABLATIONS_END.format(preset="cpu")
    text = path.read_text()
    path.write_text(text.split(begin)[0] + f"{begin}\nstale\n{end}" + text.split(end)[1])
    assert readme.update_readme("cpu", tmp_path) is True
    assert readme.ablations_block("cpu") in path.read_text() and "stale" not in path.read_text()
    paths["comparisons"].unlink()
    with pytest.raises(MipoError, match="make ablations"):
        readme.ablations_block("cpu")


# ------------------------------------------------------------------------------------------------------ timings
TIMINGS = pd.DataFrame([
    {"notebook": "00-05", "part": None, "preset": "cpu", "run": "reference", "wall_s": 2640, "peak_rss_mb": 3789,
     "seeds": "0 1 2"},
    {"notebook": "00_quickstart", "part": None, "preset": "cpu", "run": "reference", "wall_s": 623, "peak_rss_mb": 3379},
    {"notebook": "03_dpo_training", "part": None, "preset": "cpu", "run": "reference", "wall_s": 1473, "peak_rss_mb": 3789},
    {"notebook": "06_ablations", "part": "K=2", "preset": "cpu", "run": "reference", "wall_s": 4140, "peak_rss_mb": None},
    {"notebook": "06_ablations", "part": "K=4", "preset": "cpu", "run": "reference", "wall_s": 6960, "peak_rss_mb": None},
    {"notebook": "06_ablations", "part": None, "preset": "cpu", "run": "from the cache", "wall_s": 30, "peak_rss_mb": None},
])


@pytest.mark.parametrize("key, text", [
    ("cpu/00_quickstart wall", "10.4 min"), ("cpu/03_dpo_training wall", "25 min"), ("cpu/00_quickstart seconds", "623 s"),
    ("cpu/03_dpo_training seconds", "1,473 s"), ("cpu/00-05 min-s", "44 min 0 s"), ("cpu/00_quickstart peak", "3.3 GB"),
    ("cpu/00-05 budget", "16 min under the 60-minute budget"), ("cpu/00-05 goal", "goal 45: met"),
    ("cpu/00-05 seeds", "3 seeds"),
    ("cpu/06_ablations/K=2+K=4 minutes", "3 h 5 min"), ("cpu/06_ablations/K=2 minutes", "1 h 9 min"),
    ("cpu/06_ablations@cache wall", "30 s"),
])
def test_timing_spans_render_from_the_table(key, text):
    assert readme.timing_text(TIMINGS, key) == text


def test_wall_and_peak_take_a_notebooks_highest_stage_else_its_whole_run(tmp_path, monkeypatch):
    pd.DataFrame([
        {"notebook": "00_quickstart", "stage": "pairs (seed 0)", "peak_rss_mb": 2079.0},
        {"notebook": "00_quickstart", "stage": "train MIPO (seed 0)", "peak_rss_mb": 3597.1},
    ]).to_csv(tmp_path / "memory_cpu.csv", index=False)
    monkeypatch.setattr(readme, "memory_path", lambda preset: tmp_path / f"memory_{preset}.csv")
    assert readme.timing_text(TIMINGS, "cpu/00_quickstart wall+peak") == "10.4 min, 3.5 GB"  # the stage, not 3.3 GB
    assert readme.timing_text(TIMINGS, "cpu/03_dpo_training wall+peak") == "25 min, 3.7 GB"  # no stage: the whole run


def test_timing_spans_are_rewritten_in_place_and_a_missing_row_names_the_fix():
    span = "<!-- timing:cpu/00_quickstart wall -->"
    assert readme.render_spans(f"took **{span}9 min<!-- /timing -->** here", TIMINGS) == (
        f"took **{span}10.4 min<!-- /timing -->** here")
    with pytest.raises(MipoError, match="no row for every part"):
        readme.render_spans("<!-- timing:cpu/06_ablations/K=8 minutes -->x<!-- /timing -->", TIMINGS)
    with pytest.raises(MipoError, match="unknown format"):
        readme.render_spans("<!-- timing:cpu/00_quickstart hours -->x<!-- /timing -->", TIMINGS)
    with pytest.raises(MipoError, match="not closed"):
        readme.render_spans("<!-- timing:cpu/00_quickstart wall -->x", TIMINGS)


def test_update_timings_table_records_a_reference_run(tmp_path):
    table = tmp_path / "timings_cpu.csv"
    TIMINGS.assign(seeds="0 1 2", source="old", date="2026-11-28").to_csv(table, index=False)
    runs = tmp_path / "timings.csv"
    rows = [("00_quickstart", 600.5, 3000.0, True), ("00_quickstart", 590.0, 3100.0, False)]
    rows += [(f"0{i}_nb", 10.0, 100.0, True) for i in range(1, 6)] + [("06_ablations", 50.0, 900.0, True)]
    pd.DataFrame(rows, columns=["notebook", "wall_s", "peak_rss_mb", "ok"]).assign(
        preset="cpu", finished_at="2026-12-24T10:00:00").to_csv(runs, index=False)
    out = readme.update_timings_table(runs, "cpu", table).set_index(["notebook", "run"])
    def whole(notebook: str) -> pd.Series:  # a notebook's whole-run reference row (the index repeats parts' keys)
        return out[out["part"].isna()].loc[[(notebook, "reference")]].iloc[0]

    quick = whole("00_quickstart")
    assert (quick["wall_s"], quick["peak_rss_mb"], quick["date"]) == (600.5, 3000.0, "2026-12-24")  # the ok run
    assert "runs/cpu/notebooks/timings.csv" in quick["source"]
    assert whole("00-05")["wall_s"] == pytest.approx(650.5)  # all six ran: their sum
    assert whole("03_dpo_training")["wall_s"] == 1473  # not run: kept
    assert sorted(out.loc["06_ablations", "wall_s"]) == [30, 4140, 6960]  # recorded as a breakdown: left as recorded
    assert whole("01_nb")["wall_s"] == 10.0  # a new notebook gets its row
    assert out.equals(pd.read_csv(table).set_index(["notebook", "run"]))


# ----------------------------------------------------------------------------------------------------- headline
def test_headline_states_each_difference_with_its_ci_verdict_and_population():
    table = pd.read_csv(readme.results_path("cpu"))
    block = readme.headline_block(table, "cpu")
    assert block.startswith(readme.markers("headline", "cpu")[0]) and block.endswith(readme.markers("headline", "cpu")[1])
    # the committed table may predate the seed-aware designs: the block reads the design the table holds
    design = stats.prompt_level_design(table)
    diffs = table[(table["kind"] == "paired_difference") & (table["task"] == "personalization")]
    prompt_level = diffs[diffs["ci_design"] == design]
    type_level = diffs[diffs["ci_design"] != design].set_index(["method", "baseline"])
    assert len(prompt_level) >= 2 and len(type_level) == len(prompt_level)
    for _, r in prompt_level.iterrows():
        c = type_level.loc[(r["method"], r["baseline"])]
        assert (f"| {r['method']} − {r['baseline']} | {100 * r['rate']:.1f}% vs {100 * r['baseline_rate']:.1f}% | "
                f"**{100 * r['diff']:+.1f} [{100 * r['diff_lo']:+.1f}, {100 * r['diff_hi']:+.1f}]** |") in block
        assert f"| [{100 * c['diff_lo']:+.1f}, {100 * c['diff_hi']:+.1f}], " in block  # the type-level one beside it
    assert readme.DESIGN_WORDS[design] in block
    # the population in words, counted off the task's test split and the table's seeds
    n_seeds = int(prompt_level["n_seeds"].iloc[0])
    assert "on these 10 preference types x 10 test requests (100 held-out prompts" in block
    assert f"{n_seeds} seeds" in block and n_seeds >= 5  # the reference run issue 29 asked for
    assert "held-out types" not in block and "unseen_types" not in block  # the main task only


def test_headline_follows_a_flipped_verdict_and_names_a_missing_column():
    table = pd.read_csv(readme.results_path("cpu"))
    row = (table["kind"] == "paired_difference") & (table["baseline"] == "SFT") \
        & (table["ci_design"] == stats.prompt_level_design(table)) \
        & (table["task"] == "personalization")
    flipped = table.assign(detectable=table["detectable"].where(~row, not bool(table.loc[row, "detectable"].iloc[0])))
    assert readme.headline_block(flipped, "cpu") != readme.headline_block(table, "cpu")
    with pytest.raises(MipoError, match="lacks column.*p_holm"):
        readme.headline_block(table.drop(columns=["p_holm"]), "cpu")


# -------------------------------------------------------------------------------------------------- study times
def _notebook(cells: list[tuple[str, str, list[str]]]) -> str:
    return json.dumps({"cells": [{"cell_type": kind, "source": [source], "metadata": {"tags": tags}}
                                 for kind, source, tags in cells]})


def test_study_time_leaves_out_the_optional_appendix(tmp_path, monkeypatch):
    """A lecture covers the core path: the cells from a `## Appendix` heading on are not counted."""
    (tmp_path / "notebooks").mkdir()
    monkeypatch.setattr(readme, "repo_root", lambda: tmp_path)
    path = tmp_path / "notebooks" / "00_quickstart.ipynb"
    core = [("markdown", "three core words", []), ("code", "x = 1", [])]
    path.write_text(_notebook(core + [("markdown", "## Appendix (optional) " + "word " * 500, []), ("code", "y", [])]))
    study = readme.study_time(TIMINGS, "cpu/00_quickstart")
    assert (study.words, study.code_cells) == (3, 1)


def test_study_time_is_prose_plus_code_cells_plus_measured_compute(tmp_path, monkeypatch):
    (tmp_path / "notebooks").mkdir()
    monkeypatch.setattr(readme, "repo_root", lambda: tmp_path)
    path = tmp_path / "notebooks" / "00_quickstart.ipynb"
    prose = " ".join(["word"] * 300)
    path.write_text(_notebook([("markdown", prose, []), ("code", "x = 1", []), ("code", "y = 2", ["stub"]),
                               ("markdown", "two words", [])]))
    study = readme.study_time(TIMINGS, "cpu/00_quickstart")
    assert (study.words, study.code_cells, study.compute_s) == (302, 2, 623.0)
    expected = 302 / readme.READING_WORDS_PER_MINUTE + 2 * readme.MINUTES_PER_CODE_CELL + 623 / 60
    assert study.minutes == pytest.approx(expected)
    span = "<!-- study:cpu/00_quickstart -->"
    before = readme.render_spans(f"{span}x<!-- /study -->", TIMINGS)
    assert before == f"{span}{readme.render.whole_minutes(60 * expected)}<!-- /study -->"
    path.write_text(_notebook([("markdown", prose * 4, []), ("code", "x = 1", [])]))  # more prose: a longer time
    assert readme.render_spans(f"{span}x<!-- /study -->", TIMINGS) != before
    with pytest.raises(MipoError, match="no notebooks/09_missing.ipynb"):
        readme.study_time(TIMINGS, "cpu/09_missing")


def test_a_class_plan_says_whether_it_fits_a_lab(monkeypatch):
    minutes = {"cpu/00_quickstart": 50.0, "cpu/03_dpo_training": 30.0, "cpu/04_evaluation": 55.0}
    monkeypatch.setattr(readme, "study_time", lambda timings, selector: readme.StudyTime(0, int(minutes[selector]), 0.0))
    assert readme.lab_text(TIMINGS, "cpu/00_quickstart + cpu/03_dpo_training") == (
        "1 h 20 min: fits a 90-minute lab, 10 min to spare")
    assert readme.lab_text(TIMINGS, "cpu/00_quickstart + cpu/04_evaluation") == "1 h 45 min: 15 min over a 90-minute lab"


# ------------------------------------------------------------------------------------------ badges and addresses
def test_badge_and_clone_spans_come_from_the_one_repository_address(monkeypatch):
    from mipo_lib.workbook import environment

    text = "<!-- colab:03_dpo_training -->old<!-- /colab --> and <!-- repo:clone -->old<!-- /repo -->"
    monkeypatch.setattr(environment, "REPO", "course/fork")
    out = readme.render_spans(text, TIMINGS)
    assert environment.colab_badge("03_dpo_training.ipynb", "course/fork") in out
    assert "git clone https://github.com/course/fork && cd fork" in out and "mipo-workbook" not in out
    with pytest.raises(MipoError, match="one repo span"):
        readme.render_spans("<!-- repo:url -->x<!-- /repo -->", TIMINGS)


# ---------------------------------------------------------------------------------------------- README as a page
README_MAX_LINES, README_MAX_WORDS = 150, 1500


def readme_size(text: str) -> tuple[int, int]:
    """(lines, words) of a page as committed: every whitespace-separated token counts, markers and addresses too."""
    return len(text.splitlines()), len(text.split())


def docs_links(text: str) -> set[str]:
    """The docs/ pages a page links to: `](docs/name.md)` or `](docs/name.md#anchor)`."""
    links = set()
    for chunk in text.split("](docs/")[1:]:
        target = chunk.split(")", 1)[0].split("#", 1)[0]
        links.add(f"docs/{target}")
    return links


def test_readme_is_a_page_not_a_manual():
    lines, words = readme_size((repo_root() / "README.md").read_text())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail to a docs/ page"
    assert words <= README_MAX_WORDS, f"README.md has {words} words; move detail to a docs/ page"


def test_the_size_check_can_fail():
    assert readme_size("one two\nthree\n") == (2, 3)
    assert readme_size("word " * 1501)[1] > README_MAX_WORDS


def test_every_docs_link_of_the_readme_exists_and_every_docs_page_is_linked():
    linked = docs_links((repo_root() / "README.md").read_text())
    missing = sorted(link for link in linked if not (repo_root() / link).is_file())
    assert not missing, f"README.md links to docs pages that do not exist: {missing}"
    pages = {str(p.relative_to(repo_root())) for p in (repo_root() / "docs").glob("*.md")}
    assert not pages - linked, f"docs pages the README does not link (orphans): {sorted(pages - linked)}"
    assert docs_links("[a](docs/x.md) [b](docs/y.md#part) [c](figures/z.png)") == {"docs/x.md", "docs/y.md"}


def test_relative_links_of_the_docs_pages_resolve():
    """A page moved into docs/ keeps no link that pointed from the repository root (`figures/...` is `../figures/...`)."""
    broken = []
    for path in readme.pages():
        for chunk in path.read_text().split("](")[1:]:
            target = chunk.split(")", 1)[0].split("#", 1)[0]
            if target and "://" not in target and not (path.parent / target).exists():
                broken.append(f"{path.relative_to(repo_root())}: {target}")
    assert not broken, broken


def test_the_memory_block_names_every_stage_over_the_target(tmp_path, monkeypatch):
    """A stage over the laptop target must be named in the block, whatever the table says."""
    table = pd.read_csv(readme.memory_path("cpu"))
    fitted = table.assign(peak_rss_mb=1000.0)
    path = tmp_path / "memory_cpu.csv"
    fitted.to_csv(path, index=False)
    monkeypatch.setattr(readme, "memory_path", lambda preset: path)
    assert "Every stage fits in 3 GB." in readme.memory_block("cpu")
    fitted.loc[1, "peak_rss_mb"] = 4000.0
    fitted.to_csv(path, index=False)
    text = readme.memory_block("cpu")
    assert f"{fitted.loc[1, 'stage']} in {fitted.loc[1, 'notebook']} (3.9 GB)" in text and "fits" not in text


def test_the_confirm_span_renders_the_committed_verdict_or_says_it_has_not_run(tmp_path, monkeypatch):
    table = pd.read_csv(readme.repo_root() / "figures" / "confirm_cpu.csv")
    h1 = table[(table["hypothesis"] == "H1") & (table["ci_design"] == stats.prompt_level_design(table))].iloc[0]
    text = readme.confirm_text("cpu")
    assert text.startswith(f"H1 {h1['verdict']}: MIPO − prompting {100 * h1['diff']:+.1f} points")
    assert f"on {int(h1['n'])} new prompts" in text
    monkeypatch.setattr(readme, "repo_root", lambda: tmp_path)
    assert readme.confirm_text("cpu") == "not run yet (`make confirm`)"


def test_a_range_row_has_the_seeds_of_its_notebooks_rows():
    """`make reproduce`'s total row (00-05) and the per-notebook reference rows of the same run must name the same
    seeds: the README's "with N seeds" next to the total reads the range row (a typed row once said 3 for a 5-seed run)."""
    table = pd.read_csv(repo_root() / "figures" / "timings_cpu.csv", dtype=str, keep_default_na=False)
    ref = table[table["run"] == "reference"]
    for _, row in ref[ref["notebook"].str.fullmatch(r"\d\d-\d\d")].iterrows():
        lo, hi = (int(x) for x in row["notebook"].split("-"))
        def in_range(name: str) -> bool:
            return bool(re.fullmatch(r"\d\d_.*", name)) and lo <= int(name[:2]) <= hi

        inside = ref[ref["notebook"].map(in_range) & (ref["preset"] == row["preset"]) & (ref["date"] == row["date"])]
        assert len(inside), f"no per-notebook rows of the {row['notebook']} run ({row['date']})"
        assert set(inside["seeds"]) == {row["seeds"]}, (
            f"figures/timings_cpu.csv: the {row['notebook']} row says seeds {row['seeds']!r}, its notebooks' rows "
            f"{sorted(set(inside['seeds']))}; make them agree")


def test_constraints_span_renders_the_committed_comparison_or_says_it_is_missing(tmp_path, monkeypatch):
    """The README's backfire line comes from `make constraints`' table: its MIPO - prompting row, prompt-level design."""
    from mipo_lib.experiments import constraints

    table = pd.read_csv(repo_root() / "figures" / "negative_constraints_results_cpu.csv")
    row = table[(table["kind"] == "paired_difference") & (table["method"] == "MIPO") & (table["baseline"] == "prompting")].iloc[0]
    text = readme.constraints_text("cpu")
    assert f"{100 * row['diff']:+.1f} points [{100 * row['diff_lo']:+.1f}, {100 * row['diff_hi']:+.1f}]" in text
    flipped = table.assign(diff=-table["diff"], detectable=False)
    flipped.to_csv(tmp_path / "t.csv", index=False)
    monkeypatch.setattr(constraints, "results_path", lambda name: tmp_path / "t.csv")
    assert "not detectable" in readme.constraints_text("cpu") and f"{-100 * row['diff']:+.1f} points" in readme.constraints_text("cpu")
    monkeypatch.setattr(constraints, "results_path", lambda name: tmp_path / "missing.csv")
    assert readme.constraints_text("cpu").startswith("not run yet")


def test_the_reasoning_summary_says_when_the_cap_is_the_bound_because_a_method_falls_short():
    tables = reasoning_findings.load_tables("cpu")
    findings = tables["findings"]
    base = findings[findings["quantity"] != "finished at the cap on validation"]
    rows = [{"section": "setup", "quantity": "finished at the cap on validation", "subject": m, "value": v}
            for m, v in (("prompting", 0.96), ("SFT", 0.99), ("MIPO", 0.93))]
    short = pd.concat([base, pd.DataFrame(rows)], ignore_index=True)
    text = "\n".join(reasoning_findings.lines(tables["results"], tables["difficulty"], short))
    assert "the bound: no cap up to it lets 95% of every method's validation replies finish; MIPO 93% at the bound" in text
    met = pd.concat([base, pd.DataFrame(rows).assign(value=0.97)], ignore_index=True)
    text = "\n".join(reasoning_findings.lines(tables["results"], tables["difficulty"], met))
    assert "the smallest at which at least 95% of every method's validation replies finish" in text
    assert "the bound" not in text


def test_the_reasoning_caveat_compares_the_held_out_cut_with_validation():
    """A method cut past the budget on the test problems is named with its finished share at the same cap on
    validation; only where validation met the rule does the caveat say the held-out problems drew longer replies."""
    tables = reasoning_findings.load_tables("cpu")
    results = tables["results"].copy()
    results.loc[(results["kind"] == "per_seed") & (results["method"] == "MIPO"), "truncated"] = 0.2
    findings = tables["findings"][tables["findings"]["quantity"] != "finished at the cap on validation"]

    def caveat(mipo_share: float) -> str:
        rows = [{"section": "setup", "quantity": "finished at the cap on validation", "subject": m, "value": v}
                for m, v in (("prompting", 0.99), ("SFT", 0.99), ("MIPO", mipo_share))]
        text = reasoning_findings.lines(results, tables["difficulty"], pd.concat([findings, pd.DataFrame(rows)]))
        (line,) = [x for x in text if x.startswith("- Caveat:")]
        return line

    assert "held-out replies of MIPO;" in caveat(0.96)
    assert "(finished at the same cap on validation: MIPO 96%; the held-out problems drew more" in caveat(0.96)
    assert "(finished at the same cap on validation: MIPO 93%)." in caveat(0.93)
    assert not any(x.startswith("- Caveat:") for x in reasoning_findings.lines(
        results.assign(truncated=0.0), tables["difficulty"], tables["findings"]))
    per_seed = results[results["kind"] == "per_seed"]
    assert "(a cut reply has no final answer and is graded wrong)" in readme._truncation_line(per_seed)[1]
    assert "preference" in readme._truncation_line(per_seed.assign(task="personalization"))[1]


def test_the_reasoning_caveat_bounds_what_the_cut_replies_could_hide():
    """Over the budget, the caveat states the trained method's accuracy and its difference from the base if every cut
    reply had been right, computed from the per-seed rows (the base's cut replies kept wrong)."""
    tables = reasoning_findings.load_tables("cpu")
    results = tables["results"].copy()
    per_seed = results["kind"] == "per_seed"
    results.loc[per_seed & (results["method"] == "MIPO"), ["rate", "truncated"]] = [0.10, 0.25]
    results.loc[per_seed & (results["method"] != "MIPO"), "truncated"] = 0.0
    base_rate = results[per_seed & (results["method"] == "prompting")]["rate"].mean()
    (line,) = [x for x in reasoning_findings.lines(results, tables["difficulty"], tables["findings"])
               if x.startswith("- Caveat:")]
    assert f"MIPO would score at most 35.0% and MIPO − base would be at most {100 * (0.35 - base_rate):+.1f} points" in line
    only_base = results.assign(truncated=0.0)
    only_base.loc[per_seed & (only_base["method"] == "prompting"), "truncated"] = 0.2
    (line,) = [x for x in reasoning_findings.lines(only_base, tables["difficulty"], tables["findings"])
               if x.startswith("- Caveat:")]
    assert "would score at most" not in line
