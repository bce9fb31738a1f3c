"""The benchmark script's smoke mode runs end to end (so the script cannot rot) and writes the headline lines in the
`name: value` form tools read. No timing is asserted: timings are noisy on shared machines."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_benchmark_smoke_writes_headline_ratios(tmp_path):
    out = tmp_path / "results.md"
    env = dict(os.environ, OMP_NUM_THREADS="1", MIPO_RUNS_DIR=str(tmp_path / "runs"))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--smoke", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    for name in ("generation_vs_naive", "generation_vs_scoring", "dpo_precomputed_vs_default"):
        match = re.search(rf"^{name}: ([0-9.]+)$", text, flags=re.MULTILINE)
        assert match and float(match.group(1)) > 0, f"{name} missing from the results file"
    assert re.search(r"^\| dpo_step_compact_vs_all \| [0-9.]+ \|$", text, flags=re.MULTILINE), "DPO step measurement missing"
    assert re.search(r"^\| eval_no_context_same_replies \| 1\.000 \|$", text, flags=re.MULTILINE), "distinct prompts changed replies"
