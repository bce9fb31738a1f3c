"""`make heldout`'s committed records: written with their cache keys, read back only while the current settings give
the same keys for every method and seed, recomputed (and said why) otherwise."""

import pandas as pd
import pytest

from mipo_lib import config, evaluate, hardware
from mipo_lib.experiments import heldout, pipeline, tune
from mipo_lib.__main__ import main
from mipo_lib.config import get_preset
from mipo_lib.tasks import get_task


@pytest.fixture
def fake_pipeline(monkeypatch, tmp_path):
    """evaluate_all replaced by a cheap table with awkward replies (newlines, quotes, emoji, "NA"); the table lands in
    tmp_path instead of figures/."""
    calls = []

    def evaluate_all(preset, seeds, methods=None, progress=True):
        calls.append((preset.task, tuple(seeds), tuple(methods), preset.epochs))
        task = get_task(preset.task)
        examples = task.examples("test", preset.n_test_prompts)[:3]  # read back, the replies are judged against them
        replies = ['Hi "there"\nline two 🍌', "NA", ""]
        return pd.concat([evaluate.records(task, examples, replies, m, s, [True, False, False])
                          for s in seeds for m in methods], ignore_index=True)

    def choose_epochs(preset, seeds, progress=True):
        summary = pd.DataFrame({"method": "MIPO", "setting": "epochs", "value": [1.0, 2.0], "rate": [0.1, 0.3]})
        choices = pd.DataFrame([{"field": "epochs", "value": "2", "method": "MIPO", "validation_rate": 0.3,
                                 "grid": "1 2", "seeds": "0", "n_validation": 3, "rule": tune.RULE}])
        return summary, choices

    monkeypatch.setattr(pipeline, "evaluate_all", evaluate_all)
    monkeypatch.setattr(heldout, "choose_epochs", choose_epochs)
    monkeypatch.setattr(heldout, "records_path", lambda name: tmp_path / f"heldout_types_{name}.csv")
    monkeypatch.setattr(heldout, "choices_path", lambda name: tmp_path / f"heldout_choices_{name}.csv")
    monkeypatch.setattr(heldout, "tuning_path", lambda name: tmp_path / f"heldout_tuning_{name}.csv")
    return calls


def test_run_writes_the_first_three_seeds_tuned_on_the_first_and_reads_back_unchanged(fake_pipeline, monkeypatch):
    tuned, choose = [], heldout.choose_epochs
    monkeypatch.setattr(heldout, "choose_epochs",
                        lambda preset, seeds, progress=True: tuned.append(tuple(seeds)) or choose(preset, seeds, progress))
    written = heldout.run("smoke", progress=False)
    # the epochs are chosen on the first seed's validation sweep (as make tune), then every seed trains with them
    assert tuned == [(0,)] and fake_pipeline == [(heldout.TASK, (0, 1, 2), heldout.METHODS, 2)]
    preset = get_preset("smoke")
    frame, why = heldout.committed(preset, [0, 1, 2])
    assert why == ""
    pd.testing.assert_frame_equal(frame, written, check_dtype=False)
    again, source = heldout.records(preset, [0, 1, 2])
    assert source.startswith("read from") and len(fake_pipeline) == 1  # nothing recomputed


def said_before_computing(monkeypatch, capsys) -> list[str]:
    """What had been printed each time `heldout.compute` started."""
    said, compute = [], heldout.compute

    def spy(*args, **kwargs):
        said.append(capsys.readouterr().out)
        return compute(*args, **kwargs)

    monkeypatch.setattr(heldout, "compute", spy)
    return said


@pytest.mark.parametrize("change, reason", [
    ({"beta": 0.3}, "made with beta=0.1; this run has beta=0.3"),
    # make tune's rate; the epochs are its own
    ({"learning_rate": 1e-3}, "made with learning_rate=0.0002; this run has learning_rate=0.001"),
    ({"n_test_prompts": 7}, "made with other settings"),  # the test's size: not a setting the choice was made under
])
def test_other_settings_recompute_and_say_which_first(fake_pipeline, change, reason, monkeypatch, capsys):
    heldout.run("smoke", progress=False)
    preset = get_preset("smoke", **change)
    frame, why = heldout.committed(preset, [0])
    assert frame is None and reason in why
    said = said_before_computing(monkeypatch, capsys)
    _, source = heldout.records(preset, [0])
    assert source.startswith("computed now") and reason in source
    assert len(fake_pipeline) == 2
    assert reason in said[0] and "recomputing the held-out-types results for seeds [0]" in said[0]


def test_a_dtype_that_resolves_otherwise_is_named_before_recomputing(fake_pipeline, monkeypatch, capsys):
    """Records made where dtype "auto" meant fp32, read where it means bf16 (a CPU with native bf16): the line names
    the resolved dtypes, before anything is computed."""
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: False)
    heldout.run("smoke", overrides={"dtype": "auto"}, progress=False)
    preset = get_preset("smoke", dtype="auto")
    assert heldout.committed(preset, [0])[1] == ""
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: True)
    capsys.readouterr()
    said = said_before_computing(monkeypatch, capsys)
    heldout.records(preset, [0])
    assert said[0].startswith("heldout_types_smoke.csv was made with dtype=float32; this run has dtype=bfloat16: "
                              "recomputing the held-out-types results for seeds [0]: per seed, MIPO's pairs")


def test_missing_seed_or_file_recomputes(fake_pipeline):
    preset = get_preset("smoke")
    assert "no heldout_types_smoke.csv" in heldout.committed(preset, [0])[1]
    heldout.run("smoke", progress=False)
    frame, why = heldout.committed(preset, [0, 3])
    assert frame is None and "no prompting records for seed 3" in why


def test_the_choice_is_written_and_sets_the_keys(fake_pipeline):
    heldout.run("smoke", progress=False)
    assert heldout.load_choices("smoke") == {"epochs": 2}
    (row,) = config.read_choices(heldout.choices_path("smoke"))  # with the settings the sweep ran under
    assert row.tuned_under["task"] == heldout.TASK and row.tuned_under["learning_rate"] == 2e-4
    assert "epochs" not in row.tuned_under and row.tuned_under["dtype"] == "float32"
    assert heldout.tuning_path("smoke").exists()
    preset = get_preset("smoke")
    assert preset.epochs != 2  # the main run's epochs are not the held-out run's
    keys = heldout.expected_keys(preset, [0])
    assert keys[("MIPO", 0)] == pipeline.evaluation_key(preset.with_overrides(task=heldout.TASK, epochs=2), "MIPO", 0).digest
    heldout.choices_path("smoke").unlink()
    frame, why = heldout.committed(preset, [0])
    assert frame is None and "no heldout_choices_smoke.csv" in why


def test_choose_epochs_sweeps_the_held_out_task_with_the_tune_rule(monkeypatch):
    """One sweep per seed on the held-out task's own validation split; the best mean rate wins, ties go to fewer
    epochs; only the epochs row is kept (the learning rate stays make tune's)."""
    swept = []

    def sweep_epochs(preset, method, seed, grid, progress=True):
        swept.append((preset.task, method, seed, tuple(grid)))
        rate = {1: 0.2, 2: 0.5, 4: 0.5, 8: 0.1}
        return pd.DataFrame([{"method": "MIPO", "setting": "epochs", "value": float(e), "learning_rate": 2e-4,
                              "seed": seed, "score": float(i < 10 * rate[e]), "truncated": False, "n_words": 5}
                             for e in grid for i in range(10)])

    monkeypatch.setattr(tune, "sweep_epochs", sweep_epochs)
    summary, choices = heldout.choose_epochs(get_preset("smoke"), [0, 1], progress=False)
    assert swept == [(heldout.TASK, "MIPO", s, tune.EPOCH_GRID) for s in (0, 1)]
    assert list(choices["field"]) == ["epochs"] and list(choices["value"]) == ["2"]
    assert set(summary["value"]) == set(map(float, tune.EPOCH_GRID))


def test_keys_follow_the_evaluation_keys():
    preset = get_preset("smoke")
    keys = heldout.expected_keys(preset, [0, 1])
    assert keys[("MIPO", 0)] != keys[("MIPO", 1)]  # trained per seed
    assert keys[("prompting", 0)] == keys[("prompting", 1)]  # deterministic: one evaluation
    assert keys[("MIPO", 0)] == pipeline.evaluation_key(preset.with_overrides(task=heldout.TASK), "MIPO", 0).digest


def test_cli_writes_the_table(fake_pipeline, capsys):
    assert main(["heldout", "--preset", "smoke", "--seeds", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "MIPO" in out
    assert fake_pipeline == [(heldout.TASK, (1,), heldout.METHODS, 2)]


def test_committed_cpu_records_match_the_reference_settings_and_results():
    """The committed table is the reference run's (`make heldout SET="dtype=float32"`): a change to anything in its
    keys without rerunning it fails here, and the results file's held-out rows are computed from it."""
    from mipo_lib.config import repo_root

    path = repo_root() / "figures" / "heldout_types_cpu.csv"
    run = get_preset("cpu", dtype="float32")
    seeds = list(run.seeds)[: heldout.DEFAULT_SEEDS]
    frame, why = heldout.committed(run, seeds, path=path)
    assert frame is not None, why
    results = pd.read_csv(repo_root() / "figures" / "results_cpu.csv")
    rows = results[(results["kind"] == "per_seed") & (results["task"] == heldout.TASK)]
    rows = rows.assign(seed=rows["seed"].astype(int)).set_index(["method", "seed"])
    for (method, seed), part in frame.groupby(["method", "seed"]):
        assert rows.loc[(method, int(seed)), "rate"] == pytest.approx(part["score"].mean())
        assert rows.loc[(method, int(seed)), "truncated"] == pytest.approx(part["truncated"].mean())
