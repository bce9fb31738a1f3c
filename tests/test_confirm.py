"""The confirmatory test (`make confirm`): its requests are new and reachable by no tuning or training code, its
prompts are the personalization task's own, it finds the plan's reference run in git history, and it evaluates once:
a second run is refused, saying why. End to end on the smoke preset in a temporary runs folder, never on `cpu`."""

from __future__ import annotations

import ast
import csv
import json
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from mipo_lib.analysis import stats
from mipo_lib.config import get_preset, repo_root
from mipo_lib.errors import MipoError
from mipo_lib.experiments import confirm, ledger, pipeline
from mipo_lib.tasks import get_task
from mipo_lib.tasks.personalization import LENGTH_INSTRUCTION, PREFERENCES, REQUESTS, SPLITS
from test_layers import MODULES, imports  # tests/ is on sys.path (pytest prepends it)

ROOT = repo_root()
NEW = confirm.read_requests(ROOT / confirm.REQUESTS)
_STOP = set("how do i can what is a the to for my an of in on should with when if me some good way make get your it "
            "at from".split())


def _content_words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z]+", text.lower()) if w not in _STOP}


# ---------------------------------------------------------------------------- nobody can tune or train on them
def test_at_least_30_new_requests_none_of_the_tasks():
    texts = [t for _, t in NEW]
    assert len(texts) >= 30 and len(set(texts)) == len(texts)
    ours = {" ".join(r.lower().split()) for r in REQUESTS}
    assert [t for t in texts if " ".join(t.lower().split()) in ours] == []


def test_no_new_request_is_a_paraphrase_of_the_tasks():
    """Half or more of a request's content words shared with one of the task's would make it a rewording."""
    close = [(t, r) for _, t in NEW for r in REQUESTS
             if len(_content_words(t) & _content_words(r)) / len(_content_words(t) | _content_words(r)) >= 0.5]
    assert close == []


@pytest.mark.parametrize("task_name", ["personalization", "personalization_unseen_types"])
def test_no_split_of_the_task_holds_them(task_name):
    task, texts = get_task(task_name), {t for _, t in NEW}
    for split in SPLITS:
        seen = {e.request for e in task.examples(split)} | {m["content"] for e in task.examples(split)
                                                            for m in task.prompt(e)}
        assert [t for t in texts if t in seen or any(t in s for s in seen)] == [], split


def _names_confirm_data(path: Path) -> bool:
    """Whether a file's text names the plan's folder (`data/confirm`, or "confirm" as a path part in code)."""
    text = path.read_text()
    if "data/confirm" in text or "confirm/requests" in text:
        return True
    if path.suffix == ".py":
        return any(isinstance(n, ast.Constant) and n.value == "confirm" for n in ast.walk(ast.parse(text)))
    return False


def test_only_the_confirm_module_names_the_requests_folder():
    code = [p for d in ("mipo_lib", "notebooks", "tools", "benchmarks") for p in sorted((ROOT / d).rglob("*"))
            if p.suffix in (".py", ".ipynb") and p.is_file()]
    naming = [str(p.relative_to(ROOT)) for p in code if _names_confirm_data(p)]
    assert naming == ["mipo_lib/experiments/confirm.py"]


def test_the_check_would_catch_a_module_that_reads_them(tmp_path):
    sneaky = tmp_path / "tune_more.py"
    sneaky.write_text('from pathlib import Path\nrows = (Path("data") / "confirm" / "requests.csv").read_text()\n')
    assert _names_confirm_data(sneaky)


def test_no_module_imports_the_confirm_module():
    importers = sorted(name for name, path in MODULES.items() if "experiments.confirm" in imports(path) - {name})
    assert importers == []


# ------------------------------------------------------------------------------------- the task's prompts and judge
def test_examples_are_the_new_requests_with_the_trained_preferences_in_the_tasks_template():
    task = get_task("personalization")
    exs = confirm.examples(task, NEW)
    assert len(exs) == len(NEW) * len(task.preference_keys("train")) >= 300
    first = exs[0]
    assert first.id == f"{NEW[0][0]}-lowercase"
    content = task.prompt(first)[0]["content"]
    assert content == f"{PREFERENCES['lowercase'][0]}\n\n{NEW[0][1]} {LENGTH_INSTRUCTION}"
    assert task.score(first, "all lowercase here.") == 1.0 and task.score(first, "Not lowercase.") == 0.0


def test_a_requests_file_with_a_repeated_id_is_refused(tmp_path):
    bad = tmp_path / "requests.csv"
    bad.write_text("id,request\nc00,How?\nc00,Why?\n")
    with pytest.raises(MipoError, match="unique id"):
        confirm.read_requests(bad)


# ---------------------------------------------------------------------------------------------------- verdicts
def _table(lo: float, hi: float, design: str = "crossed") -> pd.DataFrame:
    rows = [{"kind": "per_seed", "method": "MIPO", "baseline": "", "ci_design": "", "diff_lo": None, "diff_hi": None}]
    for d in (design, "cluster(group)"):
        rows += [{"kind": "paired_difference", "method": "MIPO", "baseline": "prompting", "ci_design": d,
                  "diff_lo": lo, "diff_hi": hi},
                 {"kind": "paired_difference", "method": "MIPO", "baseline": "SFT", "ci_design": d,
                  "diff_lo": lo, "diff_hi": hi}]
    return pd.DataFrame(rows)


@pytest.mark.parametrize("lo, hi, h1, h2", [
    (0.01, 0.2, "confirmed", "supported"),
    (-0.01, 0.2, "not confirmed", "not supported"),
    (-0.2, -0.01, "not confirmed (upper bound below 0)", "not supported (upper bound below 0)"),
])
def test_verdicts_follow_the_plans_rule(lo, hi, h1, h2):
    out = confirm.verdicts(_table(lo, hi), "crossed")
    assert out["verdict"].tolist() == ["", h1, h2, "sensitivity", "sensitivity"]
    assert out["hypothesis"].tolist() == ["", "H1", "H2", "H1", "H2"]


def test_a_design_the_results_table_lacks_is_refused():
    with pytest.raises(MipoError, match="seed-aware"):
        confirm.verdicts(_table(0.1, 0.2), "seed-aware")


# ------------------------------------------------------------------------------------ the reference run, from git
def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True).stdout


def results_csv(seeds: list[int]) -> str:
    rows = [{"kind": "per_seed", "task": "personalization", "method": m, "baseline": "", "seed": s, "ci_design": ""}
            for m in ("prompting", "MIPO") for s in seeds]
    rows.append({"kind": "paired_difference", "task": "personalization", "method": "MIPO", "baseline": "prompting",
                 "seed": "", "ci_design": "crossed"})
    return pd.DataFrame(rows).to_csv(index=False)


@pytest.fixture
def history(tmp_path):
    """A repository whose history has a 5-seed table on a side branch (not after the plan), the plan, a 3-seed table,
    then a 5-seed one: only the last is the plan's reference."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    root = tmp_path / "repo"
    for d in ("docs", "data/confirm", "figures"):
        (root / d).mkdir(parents=True)

    def commit(message: str) -> str:
        git(root, "add", "-A")
        git(root, "commit", "-q", "-m", message)
        return git(root, "rev-parse", "HEAD").strip()

    git(root, "init", "-q", "-b", "main")
    git(root, "config", "user.email", "t@example.org")
    git(root, "config", "user.name", "t")
    (root / "figures" / "choices_cpu.csv").write_text("field,value\nepochs,8\n")
    commit("start")
    git(root, "checkout", "-q", "-b", "side")
    (root / "figures" / "results_cpu.csv").write_text(results_csv([0, 1, 2, 3, 4]))
    commit("a 5-seed run on a branch that does not descend from the plan")
    git(root, "checkout", "-q", "main")
    shutil.copy(ROOT / confirm.PLAN, root / confirm.PLAN)
    shutil.copy(ROOT / confirm.REQUESTS, root / confirm.REQUESTS)
    commit("the plan")
    git(root, "merge", "-q", "-X", "theirs", "side", "-m", "merge side")
    (root / "figures" / "results_cpu.csv").write_text(results_csv([0, 1, 2]))
    commit("3 seeds")
    (root / "figures" / "results_cpu.csv").write_text(results_csv([0, 1, 2, 3, 4, 5]))
    return root, commit("6 seeds")


def test_the_reference_is_the_first_run_of_five_seeds_or_more_after_the_plan(history):
    root, six = history
    found = confirm.find_reference("cpu", "personalization", root)
    assert found == confirm.Reference(six[:12], (0, 1, 2, 3, 4, 5), "crossed")


def test_settings_changed_since_the_reference_run_are_refused(history):
    root, six = history
    (root / "figures" / "choices_cpu.csv").write_text("field,value\nepochs,2\n")
    with pytest.raises(MipoError, match=f"choices_cpu.csv differ from the reference run's commit {six[:12]}"):
        confirm.find_reference("cpu", "personalization", root)


def test_without_a_committed_plan_nothing_is_evaluated(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    git(tmp_path, "init", "-q")
    git(tmp_path, "-c", "user.email=t@example.org", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", "start")
    with pytest.raises(MipoError, match="not committed"):
        confirm.find_reference("cpu", "personalization", tmp_path)


# ------------------------------------------------------------------------------------------ once, end to end (smoke)
@pytest.fixture
def paths(tmp_path):
    """The plan and its first 3 requests (30 prompts: enough for the plumbing, fast with the smoke model) in a
    temporary folder, with the lock, outputs and ledger beside them."""
    for name in (confirm.PLAN, confirm.REQUESTS):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / confirm.PLAN, tmp_path / confirm.PLAN)
    (tmp_path / confirm.REQUESTS).write_text("\n".join((ROOT / confirm.REQUESTS).read_text().splitlines()[:4]) + "\n")
    (tmp_path / "ledger.csv").write_text(",".join(ledger.COLUMNS) + "\n")
    (tmp_path / "ledger.md").write_text(f"{ledger.BEGIN}\n{ledger.END}\n")
    return confirm.Paths(tmp_path / confirm.PLAN, tmp_path / confirm.REQUESTS, tmp_path / confirm.LOCK,
                         tmp_path / "figures" / "confirm_smoke.csv", tmp_path / "figures" / "confirm_records_smoke.csv",
                         tmp_path / "ledger.csv", tmp_path / "ledger.md")


REFERENCE = confirm.Reference("0123456789ab", (0, 1), stats.DEFAULT_DESIGN)


def test_missing_adapters_stop_the_run_before_the_lock(paths, tmp_path, monkeypatch):
    monkeypatch.setenv("MIPO_RUNS_DIR", str(tmp_path / "runs"))
    with pytest.raises(MipoError, match="no finished SFT adapter for seed 0"):
        confirm.run("smoke", reference=REFERENCE, paths=paths, progress=False)
    assert not paths.lock.exists()


@pytest.mark.usefixtures("one_thread")
def test_it_evaluates_once_and_refuses_a_second_run_saying_why(paths, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MIPO_RUNS_DIR", str(tmp_path / "runs"))
    preset = get_preset("smoke")
    for seed in REFERENCE.seeds:
        for method in ("MIPO", "SFT"):
            pipeline.train_for_seed(preset, method, seed, progress=False)

    table = confirm.run("smoke", reference=REFERENCE, paths=paths, progress=False)

    n = 3 * len(PREFERENCES)
    records = pd.read_csv(paths.records, keep_default_na=False)
    assert records.groupby(["method", "seed"]).size().to_dict() == {(m, s): n for m in confirm.METHODS for s in (0, 1)}
    assert set(records["example_id"].str[:3]) == {rid for rid, _ in NEW[:3]}
    written = pd.read_csv(paths.results)
    written[["hypothesis", "verdict"]] = written[["hypothesis", "verdict"]].fillna("")
    h1 = written[(written["hypothesis"] == "H1") & (written["ci_design"] == stats.DEFAULT_DESIGN)].iloc[0]
    assert h1["method"] == "MIPO" and h1["baseline"] == "prompting" and h1["n"] == n
    assert h1["verdict"] == ("confirmed" if h1["diff_lo"] > 0 else
                             "not confirmed (upper bound below 0)" if h1["diff_hi"] < 0 else "not confirmed")
    assert set(written["plan_digest"]) == {confirm.plan_digest(paths)}
    assert set(written["adapters_commit"]) == {REFERENCE.commit}
    assert len(table) == len(written)
    lock = json.loads(paths.lock.read_text())
    assert lock["finished_at"] and lock["seeds"] == [0, 1] and lock["plan_digest"] == confirm.plan_digest(paths)
    (row,) = ledger.read(paths.ledger_csv)
    assert row["table"] == "confirm_smoke.csv" and row["commit"] == ledger.PENDING and row["result"].startswith("H1 ")

    with pytest.raises(MipoError, match="refused, a confirmatory test runs once.*finished") as refused:
        confirm.run("smoke", reference=REFERENCE, paths=paths, progress=False)
    assert str(paths.lock) in str(refused.value) and REFERENCE.commit in str(refused.value)
    assert confirm.status(paths).startswith(f"used: {paths.lock} records a run of this plan")

    paths.lock.unlink()  # a lost lock: the results still carry the plan's digest
    with pytest.raises(MipoError, match="already holds this plan's results"):
        confirm.run("smoke", reference=REFERENCE, paths=paths, progress=False)


def test_an_interrupted_run_is_not_retried_quietly(paths):
    paths.lock.parent.mkdir(parents=True, exist_ok=True)
    paths.lock.write_text(json.dumps({"plan_digest": confirm.plan_digest(paths), "adapters_commit": "abc",
                                      "seeds": [0], "started_at": "2027-01-01T00:00:00+00:00", "finished_at": None,
                                      "results": "figures/confirm_smoke.csv"}))
    with pytest.raises(MipoError, match="started, never finished"):
        confirm.run("smoke", reference=REFERENCE, paths=paths, progress=False)


def test_status_on_the_command_line(paths, monkeypatch, capsys):
    monkeypatch.setattr(confirm.Paths, "for_preset", classmethod(lambda cls, name: paths))
    assert confirm.main(["--status"]) == 0
    assert capsys.readouterr().out.startswith("unused: no plan.lock")
    paths.lock.parent.mkdir(parents=True, exist_ok=True)
    paths.lock.write_text(json.dumps({"plan_digest": "0" * 16, "adapters_commit": "abc", "seeds": [0],
                                      "started_at": "t", "finished_at": "u", "results": "r"}))
    assert confirm.main(["--preset", "smoke", "--no-progress"]) == 2
    assert "refused" in capsys.readouterr().err
    assert "a plan since changed" in confirm.status(paths)


def test_make_confirm_calls_the_module_on_the_cpu_preset():
    recipe = (ROOT / "Makefile").read_text().split("\nconfirm:", 1)[1].split("\n\n", 1)[0]
    assert "-m mipo_lib.experiments.confirm --preset cpu" in recipe


def test_the_plan_and_its_requests_were_committed_together_before_the_code_that_reads_them():
    if shutil.which("git") is None or git(ROOT, "rev-parse", "--is-shallow-repository").strip() == "true":
        pytest.skip("needs the repository's history")
    plan = git(ROOT, "log", "--diff-filter=A", "--format=%H", "--", confirm.PLAN).split()[-1]
    requests = git(ROOT, "log", "--diff-filter=A", "--format=%H", "--", confirm.REQUESTS).split()[-1]
    code = git(ROOT, "log", "--diff-filter=A", "--format=%H", "--", "mipo_lib/experiments/confirm.py").split()
    assert plan == requests
    if code:  # once committed, the module came after the plan
        assert git(ROOT, "merge-base", "--is-ancestor", plan, code[-1]) == ""
        assert plan != code[-1]
    rows = list(csv.DictReader((ROOT / confirm.REQUESTS).read_text().splitlines()))
    assert [r["id"] for r in rows] == [rid for rid, _ in NEW]
