"""The README's results block is generated from the committed results table: they cannot disagree."""

from __future__ import annotations

import pandas as pd
import pytest

from mipo_lib.workbook import readme
from mipo_lib.analysis import stats
from mipo_lib.config import repo_root
from mipo_lib.errors import MipoError
from test_stats import make_records


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


def test_block_quotes_the_notebooks_conclusions_when_written(tmp_path, monkeypatch):
    """Notebook 07 writes its summary sentences next to its results table; the block quotes them verbatim, and
    without the file it has none (an older run)."""
    rec = make_records({"prompting": 0.25, "MIPO": 0.45}, n_examples=40, deterministic=("prompting",))
    table = stats.results_table(rec, n_boot=200)
    path = tmp_path / "reasoning_smoke_conclusions.md"
    monkeypatch.setattr(readme, "conclusions_path", lambda preset: path)
    assert "What the same run shows" not in readme.results_block(table, "smoke")
    path.write_text("- Accuracy: base 24.0%, MIPO 21.2%.\n\n- PMI and correctness: AUC 0.48.\n")
    block = readme.results_block(table, "smoke")
    assert "- Accuracy: base 24.0%, MIPO 21.2%.\n- PMI and correctness: AUC 0.48.\n" + readme.END.format(preset="smoke") in block
    assert f"`figures/{path.name}`" in block


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


def test_a_table_from_before_the_crossed_design_is_labelled_nested_without_verdicts():
    rec = make_records({"prompting": 0.25, "MIPO": 0.45}, n_examples=40, deterministic=("prompting",))
    old = stats.results_table(rec, n_boot=200).drop(columns=["ci_design", "family", "p_value", "p_holm", "detectable"])
    old = old.drop_duplicates(subset=["kind", "method", "baseline", "seed"])
    block = readme.results_block(old, "smoke")
    assert "nested design" in block and "Holm" not in block.split("\n", 2)[2]


def test_a_table_without_truncation_records_is_labelled_as_the_earlier_protocol():
    rec = make_records({"prompting": 0.25, "MIPO": 0.45}, n_examples=40, deterministic=("prompting",))
    table = stats.results_table(rec, n_boot=200)
    assert "Earlier protocol" in readme.results_block(table.drop(columns=["truncated"]), "smoke")
    assert "Earlier protocol" not in readme.results_block(table, "smoke")


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


def _ablation_files(tmp_path, header):
    rows = [  # ablation, variant, rate, lo, hi, vs prompting (+lo, hi), vs reference (+lo, hi), KL (+lo, hi)
        ("K", "K=1", .47, .41, .53, .24, .13, .36, None, None, None, None, None, None, "0.46 0.48 0.47"),
        ("K", "K=2", .52, .46, .58, .29, .18, .40, .05, -.01, .11, None, None, None, "0.5 0.53 0.53"),
        ("K", "K=1, 2x epochs", .50, .44, .56, .27, .16, .38, .03, -.03, .09, None, None, None, "0.49 0.5 0.51"),
        ("beta", "beta=0.1", .47, .41, .53, .24, .13, .36, None, None, None, 1.6, 1.2, 2.0, "0.46 0.48 0.47"),
    ]
    cols = ["ablation", "variant", "rate", "lo", "hi", "vs_prompting", "vs_prompting_lo", "vs_prompting_hi",
            "vs_reference", "vs_reference_lo", "vs_reference_hi", "kl_nats", "kl_lo", "kl_hi", "per_seed_rate"]
    csv, txt = tmp_path / "ablations_smoke.csv", tmp_path / "ablations_smoke_conclusions.txt"
    pd.DataFrame(rows, columns=cols).to_csv(csv, index=False)
    txt.write_text(f"{header}\n\n[K negatives]\n  - K=2 - prompting: +29.0 points [95% CI +18.0, +40.0]; detectable.\n"
                   "  - K=2 - K=1: +5.0 points [95% CI -1.0, +11.0]; no detectable effect.\n"
                   "  - K=2 - K=1, 2x epochs: +2.0 points [95% CI -4.0, +8.0]; no detectable effect.\n\n[beta]\n"
                   "  - KL(policy || base) at beta=0.1: +1.60 nats [95% CI +1.20, +2.00]; detectable.\n\n[diversity]\n"
                   "  - distinct-2: MIPO - prompting: -0.030 [95% CI -0.050, -0.010]; a detectable decrease.\n"
                   "  - distinct-2: MIPO K=2 - prompting: +0.001 [95% CI -0.01, +0.01]; no detectable effect.\n")
    return csv, txt


def test_ablations_block_shows_the_table_and_only_the_sentences_it_does_not(tmp_path, monkeypatch):
    csv, txt = _ablation_files(tmp_path, "preset smoke, seeds [0, 1, 2]; 95% CIs: paired crossed bootstrap over prompts and seeds")
    monkeypatch.setattr(readme, "committed_paths", lambda preset="cpu": (csv, txt))
    block = readme.ablations_block("smoke")
    assert block.startswith(readme.ABLATIONS_BEGIN.format(preset="smoke"))
    assert block.endswith(readme.ABLATIONS_END.format(preset="smoke"))
    assert "| K | K=1 (reference) | 47.0 [41.0, 53.0] | 46 / 48 / 47 | +24.0 [+13.0, +36.0] | — | — |" in block
    assert "| K | K=1, 2x epochs | 50.0 [44.0, 56.0] | 49 / 50 / 51 | +27.0 [+16.0, +38.0] | +3.0 [-3.0, +9.0] | — |" in block
    assert "| beta | beta=0.1 (reference) | 47.0 [41.0, 53.0] | 46 / 48 / 47 | +24.0 [+13.0, +36.0] | — | 1.60 [1.20, 2.00] |" in block
    assert "- K=2 - K=1, 2x epochs: +2.0 points" in block  # the compute-matched comparison is not a table cell
    assert "K=2 - prompting" not in block and "K=2 - K=1:" not in block and "KL(policy" not in block  # in the table
    assert "distinct-2: MIPO - prompting" in block and "MIPO K=2 - prompting" not in block
    assert "Earlier protocol" not in block and "cut at the cap" not in block  # these rows have no truncation record
    pd.read_csv(csv).assign(truncated=[0.0, 0.03, 0.19, 0.01]).to_csv(csv, index=False)
    assert "| +3.0 [-3.0, +9.0] | — | 19 |" in readme.ablations_block("smoke")
    pd.read_csv(csv).assign(truncated=[0.0, 0.03, None, 0.01]).to_csv(csv, index=False)
    block = readme.ablations_block("smoke")
    assert "| +3.0 [-3.0, +9.0] | — | — |" in block and "nan" not in block  # a variant without the record
    txt.write_text(txt.read_text().replace("paired crossed bootstrap over prompts and seeds", "paired hierarchical bootstrap"))
    assert "**Earlier protocol.**" in readme.ablations_block("smoke")


def test_update_readme_rewrites_the_ablations_block_where_the_files_exist(tmp_path, monkeypatch):
    csv, txt = _ablation_files(tmp_path, "preset cpu; 95% CIs: paired crossed bootstrap")
    monkeypatch.setattr(readme, "committed_paths", lambda preset="cpu": (csv, txt))
    path = tmp_path / "README.md"
    begin, end = readme.ABLATIONS_BEGIN.format(preset="cpu"), readme.ABLATIONS_END.format(preset="cpu")
    text = (repo_root() / "README.md").read_text()
    path.write_text(text.split(begin)[0] + f"{begin}\nstale\n{end}" + text.split(end)[1])
    assert readme.update_readme("cpu", path) is True
    assert readme.ablations_block("cpu") in path.read_text() and "stale" not in path.read_text()
    csv.unlink()
    with pytest.raises(MipoError, match="make ablations"):
        readme.ablations_block("cpu")
