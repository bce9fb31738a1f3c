"""The GPU measurement script (benchmarks/gpu/) cannot silently rot as the library changes: its `--tiny` CPU check runs
every part through the library's current functions, and its report renders every run stored in results_gpu.json.

No number is asserted: the tiny shapes measure nothing, they exercise the calls.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GPU = ROOT / "benchmarks" / "gpu"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"gpu_{name}", GPU / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_tiny_check_runs_every_part_without_an_error(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               MIPO_RUNS_DIR=str(tmp_path / "runs"))
    proc = subprocess.run([sys.executable, str(GPU / "measure.py"), "--tiny", "--workdir", str(tmp_path / "work")],
                          env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "gpu_results.json").read_text())
    planned = results["meta"]["parts_selected"]
    assert results["errors"] == {}, {k: v[-1500:] for k, v in results["errors"].items()}
    assert results["skipped"] == {}
    assert set(results["parts"]) == set(planned)
    for name in ("env", "t4_load_generate", "t4_dpo_reuse", "t4_fp16_load_generate", "t4_fp16_dpo_reuse", "paper_gc",
                 "gen_speedup", "paper", "t4_dpo_trl_default", "t4_long_prompts", "t4_build_pairs"):
        assert name in results["parts"], f"part {name} did not run"
    parts = results["parts"]
    # each part says which dtype it asked for and ran in: the automatic one first, then float16 (float32 on a CPU)
    assert parts["t4_load_generate"]["dtype"]["requested"] == "auto"
    assert parts["t4_fp16_load_generate"]["dtype"]["requested"] == "float16"
    assert parts["paper_gc"]["preset"]["gradient_checkpointing"] is True
    assert parts["t4_dpo_reuse"]["optimizer_steps"] == results["meta"]["sizes"]["t4_steps"]
    assert abs(parts["t4_dpo_reuse"]["initial_sanity"]["loss"] - 0.6931) < 0.01
    assert (out / "gpu_results.md").read_text().startswith("# MIPO GPU measurements (TINY")


def test_only_priority_selects_t4_in_both_dtypes_then_paper_with_checkpointing(measure):
    assert measure.selected_parts("priority") == [
        "env", "t4_build", "t4_load_generate", "t4_dpo_reuse", "t4_fp16_load_generate", "t4_fp16_dpo_reuse", "paper_gc"]
    assert measure.selected_parts("t4,paper_gc") == measure.selected_parts("priority")
    # a part brings what it needs
    assert measure.selected_parts("t4_dpo_trl_default") == ["env", "t4_build", "t4_load_generate", "t4_dpo_trl_default"]
    with pytest.raises(SystemExit, match="unknown part 'nope'"):
        measure.selected_parts("nope")


def test_every_stored_gpu_run_renders_with_todays_report():
    report = _load("report")
    runs = report.load_runs()
    assert runs, "benchmarks/results_gpu.json holds no run"
    for label, results in runs.items():
        text = report.markdown(results)
        assert text.startswith("# MIPO GPU measurements (real shapes"), label
        assert "## Errors" in text or not results["errors"], label
    full = report.markdown(next(r for r in runs.values() if "t4_load_generate" in r["parts"]))
    assert "fits with margin on a 16 GB T4" in full and "| t4 4-bit load | float16 |" in full


def test_add_run_keeps_every_label_and_refuses_tiny_runs(tmp_path):
    report = _load("report")
    path = tmp_path / "runs.json"
    run = {"meta": {"tiny": False}, "parts": {}, "errors": {}, "skipped": {}}
    report.add_run(run, "first", path)
    report.add_run(run, "second", path)
    assert list(report.load_runs(path)) == ["second", "first"]
    with pytest.raises(SystemExit, match="already has a run labelled 'first'"):
        report.add_run(run, "first", path)
    with pytest.raises(SystemExit, match="tiny"):
        report.add_run({**run, "meta": {"tiny": True}}, "third", path)


@pytest.fixture
def measure(monkeypatch):
    """measure.py imported in this process: it imports report.py as a sibling (it runs as a script from its folder)
    and sets Hugging Face defaults for its own process, which are undone here."""
    monkeypatch.syspath_prepend(str(GPU))
    before = dict(os.environ)
    try:
        yield _load("measure")
    finally:
        os.environ.clear()
        os.environ.update(before)
