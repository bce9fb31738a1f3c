"""Per-stage peak memory of the process that runs the stage: a stage is charged for what it holds, not for what
earlier stages left, and the rows reach the runner's CSV."""

from __future__ import annotations

import csv

import numpy as np

from mipo_lib import memory


def test_a_stage_peak_counts_its_own_allocation_and_not_an_earlier_stage(tmp_path, monkeypatch):
    monkeypatch.setenv(memory.LOG_ENV, str(tmp_path / "memory.csv"))
    monkeypatch.setenv(memory.NOTEBOOK_ENV, "03_dpo_training")
    with memory.stage("big"):
        block = np.ones(400 * 2**20 // 8)  # 400 MB, touched
        del block
    with memory.stage("small"):
        small = np.ones(20 * 2**20 // 8)
        del small
    big, small = memory.recorded()[-2:]
    assert big.stage == "big" and small.stage == "small"
    assert big.peak_rss_mb - small.peak_rss_mb > 300  # the second stage is not charged the first one's 400 MB
    rows = list(csv.DictReader((tmp_path / "memory.csv").open()))
    assert [(r["notebook"], r["stage"]) for r in rows] == [("03_dpo_training", "big"), ("03_dpo_training", "small")]


def test_without_a_resettable_peak_a_sampling_thread_measures(monkeypatch):
    monkeypatch.setattr(memory, "_reset_high_water", lambda: False)  # as on macOS
    with memory.stage("sampled"):
        block = np.ones(300 * 2**20 // 8)
        import time

        time.sleep(0.1)
        del block
    assert memory.recorded()[-1].peak_rss_mb > memory.rss_mb() + 200
