"""One-off record, run once (2026-12-06): the reference runs' wall times as a table, `figures/timings_cpu.csv`.

Why it exists: the README quoted each notebook's CPU time and peak memory in several places (cost paragraph, notebook
table, memory table, reasoning section), typed by hand from the runs' `runs/<preset>/notebooks/timings.csv`, which is
not committed. Those numbers now live in one committed table and the README renders every place that quotes them from
it (`mipo_lib.workbook.readme`'s timing spans); after a reference run the runner records new times there
(`readme.update_timings_table`). This script wrote the table once from the numbers the project had recorded:

- `make reproduce` from scratch on a fresh clone of 9fb5179 (fp32, 2 cores, 2026-11-28): 44 min 0 s in all; per
  notebook 00: 623 s, 01: 11 s, 02: 16 s, 03: 1,473 s, 04: 361 s, 05: 157 s (README of commit 4f98798); peak memory
  per notebook from the README's memory table, which gave it in GB with one decimal, so `peak_rss_mb` is that figure
  x 1024 (+-50 MB);
- `make ablations` after it (commit caaf900): 6 h 7 min of busy time summed over 5 resumed runs, recorded in parts
  (K=2 69 min, K=4 116, the K=1 2x-epochs control 47, negatives 57, beta 49 and its KL 11, the MIPO vs CAD timing and
  figures 18), peak 4.4 GB; 30 s from the cache;
- `make reasoning` on a fresh clone (fp32, 2 cores, commit a315408's run): 1,405 s, peak 3.4 GB; 21 s from the cache.
  Its later rerun on the current code (commit f0b293c, stopped and resumed) took about 11 min: approximate, recorded as
  such and quoted nowhere.
Nothing imports this script; it refuses to overwrite the table.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from mipo_lib.workbook.readme import CACHED_RUN, REFERENCE_RUN, TIMING_COLUMNS

TABLE = Path("figures/timings_cpu.csv")
REPRODUCE = "make reproduce from scratch on a fresh clone of 9fb5179 (fp32, 2 cores): its timings.csv (README, 4f98798)"
ABLATIONS = "make ablations after make reproduce: busy time summed over 5 resumed runs (commit caaf900)"
REASONING = "make reasoning SET=dtype=float32 on a fresh clone (fp32, 2 cores): its timings.csv (commit a315408)"
GB = 1024  # MiB per GB as the runner's peak_rss_mb counts them


def rows() -> list[dict]:
    def row(notebook: str, wall_s: float, peak_gb: float | None, source: str, part: str = "", preset: str = "cpu",
            run: str = REFERENCE_RUN) -> dict:
        return {"notebook": notebook, "part": part, "preset": preset, "seeds": "0 1 2", "run": run, "wall_s": wall_s,
                "peak_rss_mb": round(peak_gb * GB) if peak_gb is not None else None, "source": source,
                "date": "2026-11-28"}

    minutes = 60
    return [
        row("00-05", 44 * minutes, 3.7, REPRODUCE),
        row("00_quickstart", 623, 3.3, REPRODUCE),
        row("01_mutual_information", 11, 0.8, REPRODUCE),
        row("02_preference_pairs", 16, 1.5, REPRODUCE),
        row("03_dpo_training", 1473, 3.7, REPRODUCE),
        row("04_evaluation", 361, 3.6, REPRODUCE),
        row("05_results", 157, 2.4, REPRODUCE),
        row("06_ablations", 367 * minutes, 4.4, ABLATIONS),
        *(row("06_ablations", m * minutes, None, ABLATIONS, part=part) for part, m in (
            ("K=2", 69), ("K=4", 116), ("K=1, 2x epochs", 47), ("negatives", 57), ("beta", 49), ("KL", 11),
            ("twin and figures", 18))),
        row("06_ablations", 30, None, "make ablations again with every stage cached (commit caaf900)", run=CACHED_RUN),
        row("07_reasoning", 1405, 3.4, REASONING, preset="cpu-reasoning"),
        row("07_reasoning", 21, None, "make reasoning again with every stage cached (commit a315408)",
            preset="cpu-reasoning", run=CACHED_RUN),
        row("07_reasoning", 11 * minutes, None, "rerun on the current code, stopped and resumed (commit f0b293c): "
            "about 11 min, approximate", preset="cpu-reasoning", run="rerun"),
    ]


if __name__ == "__main__":
    assert not TABLE.exists(), f"{TABLE} exists: this script ran once"
    table = pd.DataFrame(rows()).reindex(columns=list(TIMING_COLUMNS)).astype({"peak_rss_mb": "Int64"})
    table.to_csv(TABLE, index=False)
