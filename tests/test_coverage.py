"""Coverage of the paired bootstrap CI on simulated *crossed* data: every seed is scored on the same prompts.

The evaluation of the workbook is crossed (seeds x held-out prompts), so a prompt that is hard, or on which the
trained method helps a lot, is so in every seed. This test simulates exactly that and checks that the default
(crossed) bootstrap of `stats.paired_difference` covers the true difference about 95% of the time, while the nested
bootstrap (prompts redrawn within each seed) is too narrow on the same data: it treats the seeds' shared prompt
effects as independent noise and divides their variance by the number of seeds.

Model (probit, one latent normal per outcome, so the population rates have a closed form):
- method B ("prompting", deterministic, stored with one seed): y = [mu_b + u_j + e_j > 0];
- method A ("MIPO", 3 training seeds): y = [mu_a + u_j + t_j + v_s + e_sj > 0];
with prompt effects u_j ~ N(0, 1.5^2) shared by both methods and all seeds, a per-prompt treatment effect
t_j ~ N(0, 1) shared by all seeds, a modest seed effect v_s ~ N(0, 0.2^2) and unit noise e. The true difference
over the prompt (and seed) population is Phi(mu_a / sqrt(1 + 1.5^2 + 1 + 0.2^2)) - Phi(mu_b / sqrt(1 + 1.5^2)).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from mipo_lib.analysis import stats

N_DATASETS, N_SEEDS, N_PROMPTS, N_BOOT = 400, 3, 100, 1_000
SD_PROMPT, SD_TREATMENT, SD_SEED, MU_A, MU_B = 1.5, 1.0, 0.2, 0.3, 0.0


def _phi(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


TRUTH = _phi(MU_A / math.sqrt(1 + SD_PROMPT**2 + SD_TREATMENT**2 + SD_SEED**2)) - _phi(MU_B / math.sqrt(1 + SD_PROMPT**2))


@pytest.fixture(scope="module")
def crossed_datasets() -> pd.DataFrame:
    """All simulated data sets in one long records frame (a `dataset` column), drawn in one vectorised pass."""
    rng = np.random.default_rng(20240612)
    d, s, n = N_DATASETS, N_SEEDS, N_PROMPTS
    u = rng.normal(0.0, SD_PROMPT, (d, 1, n))
    t = rng.normal(0.0, SD_TREATMENT, (d, 1, n))
    v = rng.normal(0.0, SD_SEED, (d, s, 1))
    a = (MU_A + u + t + v + rng.normal(size=(d, s, n)) > 0).astype(float)  # (datasets, seeds, prompts)
    b = (MU_B + u + rng.normal(size=(d, 1, n)) > 0).astype(float)  # deterministic: one seed
    ds_a, seed_a, ex_a = np.indices(a.shape).reshape(3, -1)
    ds_b, _, ex_b = np.indices(b.shape).reshape(3, -1)
    return pd.concat([
        pd.DataFrame({"dataset": ds_a, "task": "sim", "method": "MIPO", "seed": seed_a, "example_id": ex_a,
                      "score": a.ravel()}),
        pd.DataFrame({"dataset": ds_b, "task": "sim", "method": "prompting", "seed": 0, "example_id": ex_b,
                      "score": b.ravel()}),
    ], ignore_index=True)


def _coverage(records: pd.DataFrame, design: str) -> float:
    hits = [
        (d := stats.paired_difference(sub, "MIPO", "prompting", n_boot=N_BOOT, seed=int(i), design=design))["lo"]
        <= TRUTH <= d["hi"]
        for i, sub in records.groupby("dataset", sort=True)
    ]
    return float(np.mean(hits))


def test_crossed_bootstrap_covers_the_true_difference(crossed_datasets):
    # 400 data sets: the binomial standard error of a 95% coverage is sqrt(0.95 * 0.05 / 400) = 1.1 points, so
    # [0.92, 0.98] is about +-2.7 standard errors around 0.95 (the seeds are fixed: the test is deterministic;
    # measured 0.94-0.96 over other simulation seeds).
    assert 0.92 <= _coverage(crossed_datasets, "crossed") <= 0.98


def test_nested_bootstrap_under_covers_crossed_data(crossed_datasets):
    # Same data: redrawing prompts within each seed makes the interval about 30% too narrow (measured 0.82-0.85).
    assert _coverage(crossed_datasets, "nested") < 0.90
