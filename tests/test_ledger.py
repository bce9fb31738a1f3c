"""The ledger of test evaluations: `docs/ledger.md` shows exactly `data/ledger.csv`, every commit that changed a
results table has its row (from git history; skipped where there is none, e.g. a shallow clone), and `record` keeps
it current."""

from __future__ import annotations

import csv
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from mipo_lib.analysis import stats
from mipo_lib.config import repo_root
from mipo_lib.errors import MipoError
from mipo_lib.experiments import ledger

ROOT = repo_root()
#: The tables whose every change is an evaluation of a test split (confirm_cpu.csv from `make confirm` on,
#: regime_results_cpu.csv from `make regime` on).
TABLES = ("results_cpu.csv", "heldout_types_cpu.csv", "results_reasoning_cpu.csv", "ablations_cpu.csv",
          "confirm_cpu.csv", "negative_constraints_results_cpu.csv", "regime_results_cpu.csv")


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True).stdout


def history_available(root: Path) -> str:
    """Why the history cannot be checked here ("" when it can): no git, no repository, or a shallow clone."""
    if shutil.which("git") is None:
        return "git is not installed"
    try:
        shallow = git(root, "rev-parse", "--is-shallow-repository").strip()
    except subprocess.CalledProcessError:
        return "not a git repository"
    return "a shallow clone has no history" if shallow == "true" else ""


def pending_rows(root: Path, commit: str, table: str) -> int:
    """How many `PENDING` rows of `table` the ledger holds at `commit` (0 where it has no ledger)."""
    try:
        text = git(root, "show", f"{commit}:data/ledger.csv")
    except subprocess.CalledProcessError:
        return 0
    return sum(1 for r in csv.DictReader(text.splitlines()) if r["table"] == table and r["commit"] == ledger.PENDING)


def unrecorded(root: Path, table: str, rows: list[dict[str, str]]) -> list[str]:
    """The commits that changed `figures/<table>` and have no ledger row: none names them, and they did not add a
    `PENDING` row for the table (the row a run records before its table is committed)."""
    named = [r["commit"] for r in rows if r["table"] == table and r["commit"] not in (ledger.PENDING, ledger.OUTSIDE)]
    missing = []
    for commit in git(root, "log", "--format=%H", "--", f"figures/{table}").split():
        if any(commit.startswith(c) for c in named):
            continue
        parent = git(root, "rev-list", "--parents", "-n", "1", commit).split()[1:2]
        before = pending_rows(root, parent[0], table) if parent else 0
        if pending_rows(root, commit, table) <= before:
            missing.append(commit[:7])
    return missing


# ---------------------------------------------------------------------------------------------- the committed ledger
def test_the_document_shows_the_csv():
    assert ledger.rendered_block(ledger.doc_path().read_text()) == ledger.render_table(ledger.read())


def test_a_changed_csv_no_longer_matches_the_document(tmp_path):
    source = tmp_path / "ledger.csv"
    source.write_text(ledger.csv_path().read_text().replace("+13.3 [+4.7, +22.0]", "+13.3 [+9.9, +22.0]"))
    assert ledger.rendered_block(ledger.doc_path().read_text()) != ledger.render_table(ledger.read(source))


def test_the_reviewers_check_and_the_protocol_changes_are_in_it():
    rows = ledger.read()
    outside = [r for r in rows if r["commit"] == ledger.OUTSIDE]
    assert len(outside) == 1
    assert "+24.3 [+16.1, +32.3]" in outside[0]["result"] and "300 prompts" in outside[0]["result"]
    by_commit = {r["commit"]: r for r in rows}
    assert "+13.3 [+4.7, +22.0]" in by_commit["15c83a1"]["result"]
    assert by_commit["15c83a1"]["re_evaluation"].startswith("yes")
    assert "70.0%" in by_commit["1f716c6"]["result"] and "41.0%" in by_commit["1f716c6"]["result"]


@pytest.mark.parametrize("table", TABLES)
def test_every_commit_that_changed_a_results_table_has_its_row(table):
    why = history_available(ROOT)
    if why:
        pytest.skip(why)
    missing = unrecorded(ROOT, table, ledger.read())
    assert missing == [], (f"commits {missing} changed figures/{table} without a row in data/ledger.csv: add one with "
                           f"ledger.record({table!r}, commit, protocol, result)")


# --------------------------------------------------------------------------------------- the history check itself
@pytest.fixture
def repo(tmp_path):
    """A scratch repository with a ledger (the committed one's header) and a results table."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    (tmp_path / "data").mkdir()
    (tmp_path / "figures").mkdir()
    (tmp_path / "data" / "ledger.csv").write_text(",".join(ledger.COLUMNS) + "\n")
    git(tmp_path, "init", "-q")
    git(tmp_path, "config", "user.email", "t@example.org")
    git(tmp_path, "config", "user.name", "t")
    return tmp_path


def commit_all(root: Path, message: str) -> str:
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", message)
    return git(root, "rev-parse", "HEAD").strip()


def test_the_history_check_finds_a_table_committed_without_its_row(repo):
    (repo / "figures" / "results_cpu.csv").write_text("kind\nper_seed\n")
    first = commit_all(repo, "a table, no row")
    assert unrecorded(repo, "results_cpu.csv", ledger.read(repo / "data" / "ledger.csv")) == [first[:7]]
    rows = [{"commit": first[:7], "table": "results_cpu.csv"}]
    assert unrecorded(repo, "results_cpu.csv", rows) == []  # named by its short hash


def test_a_pending_row_counts_for_the_commit_that_adds_it_with_the_table(repo):
    (repo / "figures" / "results_cpu.csv").write_text("kind\nper_seed\n")
    ledger.record("results_cpu.csv", ledger.PENDING, "p", "r", source=repo / "data" / "ledger.csv",
                  doc=_doc(repo))
    commit_all(repo, "a table with its pending row")
    assert unrecorded(repo, "results_cpu.csv", ledger.read(repo / "data" / "ledger.csv")) == []
    (repo / "figures" / "results_cpu.csv").write_text("kind\npaired_difference\n")
    second = commit_all(repo, "the table again, no new row: the old pending row does not cover it")
    assert unrecorded(repo, "results_cpu.csv", ledger.read(repo / "data" / "ledger.csv")) == [second[:7]]


# ------------------------------------------------------------------------------------------------------- record
def _doc(root: Path) -> Path:
    doc = root / "ledger.md"
    doc.write_text(f"# Ledger\n\n{ledger.BEGIN}\n{ledger.END}\n")
    return doc


def test_record_appends_a_row_and_renders_it(tmp_path):
    source, doc = tmp_path / "ledger.csv", _doc(tmp_path)
    source.write_text(",".join(ledger.COLUMNS) + "\n")
    first = ledger.record("results_cpu.csv", ledger.PENDING, "3 seeds | cap 192", "+1.0 [0.0, 2.0]", date="2027-01-01",
                          source=source, doc=doc)
    again = ledger.record("results_cpu.csv", "abc1234", "3 seeds | cap 192", "+2.0", date="2027-01-02",
                          source=source, doc=doc)
    other = ledger.record("results_cpu.csv", "def5678", "5 seeds", "+3.0", date="2027-01-03", source=source, doc=doc)
    assert first["re_evaluation"].startswith("no")
    assert again["re_evaluation"] == "yes: same protocol as pending (2027-01-01)"
    assert other["re_evaluation"] == "yes: protocol changed since abc1234 (2027-01-02)"
    assert [r["commit"] for r in ledger.read(source)] == [ledger.PENDING, "abc1234", "def5678"]
    block = ledger.rendered_block(doc.read_text())
    assert block == ledger.render_table(ledger.read(source))
    assert "3 seeds \\| cap 192" in block  # a | inside a cell does not split it
    assert doc.read_text().startswith("# Ledger\n")  # the prose around the markers is kept


def test_record_refuses_an_empty_field(tmp_path):
    source = tmp_path / "ledger.csv"
    source.write_text(",".join(ledger.COLUMNS) + "\n")
    with pytest.raises(MipoError, match="protocol is empty"):
        ledger.record("results_cpu.csv", ledger.PENDING, " ", "+1.0", source=source, doc=_doc(tmp_path))


def test_a_document_without_markers_is_refused(tmp_path):
    doc = tmp_path / "ledger.md"
    doc.write_text("# Ledger\n")
    with pytest.raises(MipoError, match="markers"):
        ledger.update_doc(doc=doc)


def test_headline_reads_the_committed_results():
    table = pd.read_csv(ROOT / "figures" / "results_cpu.csv")
    line = ledger.headline(ROOT / "figures" / "results_cpu.csv")
    design = stats.prompt_level_design(table)
    r = table[(table["kind"] == "paired_difference") & (table["task"] == "personalization") & (table["method"] == "MIPO")
              & (table["baseline"] == "prompting") & (table["ci_design"] == design)].iloc[0]
    assert (f"MIPO {100 * r['rate']:.1f}% vs prompting {100 * r['baseline_rate']:.1f}%: {100 * r['diff']:+.1f} "
            f"[{100 * r['diff_lo']:+.1f}, {100 * r['diff_hi']:+.1f}]") in line
    assert line.endswith(f"[95% CIs: {design}; sensitivity: seed-aware cluster(group)]")


def test_ablation_headline_reads_the_committed_variants_once_each():
    table = pd.read_csv(ROOT / "figures" / "ablations_cpu.csv")
    line = ledger.ablation_headline(ROOT / "figures" / "ablations_cpu.csv")
    references = table[table["vs_reference"].isna()]
    assert line.startswith(f"reference ({', '.join(references['variant'])}) {100 * references['rate'].iloc[0]:.1f}%")
    for _, r in table[table["vs_reference"].notna()].iterrows():
        assert (f"{r['variant']} {100 * r['rate']:.1f}% (vs reference {100 * r['vs_reference']:+.1f} "
                f"[{100 * r['vs_reference_lo']:+.1f}, {100 * r['vs_reference_hi']:+.1f}])") in line
    assert line.endswith(f"({table['n_seeds'].iloc[0]} seeds x {table['n_examples'].iloc[0]} prompts)")
    with pytest.raises(MipoError, match="not an ablations table"):
        ledger.ablation_headline(ROOT / "figures" / "results_cpu.csv")
