"""Each figure function runs on synthetic frames and `savefig` writes png + pdf (Agg backend, temp folder)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from mipo_lib import plots, stats  # noqa: E402

GROUPS = ["short", "banana", "digit", "bullets"]


def make_records(rates: dict[str, float], n_examples: int, deterministic: tuple[str, ...] = ()) -> pd.DataFrame:
    """Synthetic paired records (a copy of test_stats' generator, so each test file stands alone)."""
    rng = np.random.default_rng(0)
    rows = []
    for method, rate in rates.items():
        for s in ((0,) if method in deterministic else (0, 1, 2)):
            for e in range(n_examples):
                n_words = int(rng.integers(5, 40))
                rows.append({"task": "personalization", "method": method, "seed": s, "example_id": f"ex{e:04d}",
                             "group": GROUPS[e % len(GROUPS)], "score": float(rng.random() < rate),
                             "response": " ".join(f"w{rng.integers(0, 50)}" for _ in range(n_words)),
                             "n_words": n_words})
    return pd.DataFrame(rows)

META = {"preset": "smoke", "model": "tiny-random", "task": "personalization", "n_seeds": 3, "n_examples": 40}


@pytest.fixture(autouse=True)
def _figdir(tmp_path, monkeypatch):
    monkeypatch.setenv("MIPO_FIGURES_DIR", str(tmp_path))
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def records() -> pd.DataFrame:
    return make_records({"base (no context)": 0.03, "prompting": 0.25, "SFT": 0.25, "MIPO": 0.45, "CAD": 0.3},
                        n_examples=40, deterministic=("base (no context)", "prompting", "CAD"))


def _save(fig, name, tmp_path):
    png = plots.savefig(fig, name, "smoke", caption=fig.mipo_caption)
    assert png == tmp_path / f"{name}.png"
    assert png.stat().st_size > 1000 and (tmp_path / f"{name}.pdf").stat().st_size > 1000
    return png


def test_caption_format():
    c = plots.caption("cpu", "SmolLM2-135M-Instruct", "personalization", 3, 200)
    assert "3 seeds" in c and "200 held-out examples" in c and "95% bootstrap CI" in c and "cpu" in c


def test_plot_method_rates(records, tmp_path):
    fig = plots.plot_method_rates(records, META, n_boot=300)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert any("MIPO - prompting (paired)" in t for t in texts)
    assert "3 seeds" in fig.mipo_caption
    _save(fig, "method_rates", tmp_path)


def test_plot_method_rates_without_baseline(records, tmp_path):
    fig = plots.plot_method_rates(records[records.method.isin(["SFT", "MIPO"])], META, n_boot=200)
    _save(fig, "method_rates_nobase", tmp_path)


def test_plot_per_group(records, tmp_path):
    _save(plots.plot_per_group(records, META, n_boot=200), "per_group", tmp_path)


def _train_log() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for seed in (0, 1, 2):
        for step in range(1, 16):
            rows.append({"method": "MIPO", "seed": seed, "step": step, "epoch": step / 15,
                         "loss": 0.693 * np.exp(-step / 10) + rng.normal(0, 0.02),
                         "rewards/margins": step / 10 + rng.normal(0, 0.05),
                         "rewards/accuracies": min(1.0, 0.5 + step / 20), "rewards/chosen": step / 20,
                         "rewards/rejected": -step / 20})
            rows.append({"method": "SFT", "seed": seed, "step": step, "epoch": step / 15,
                         "loss": 2.0 - step / 20 + rng.normal(0, 0.05)})
    return pd.DataFrame(rows)


def test_plot_training_curves(tmp_path):
    fig = plots.plot_training_curves(_train_log(), META)
    assert len(fig.axes) == 4
    _save(fig, "training", tmp_path)


def test_plot_training_curves_without_sft(tmp_path):
    log = _train_log()
    _save(plots.plot_training_curves(log[log.method == "MIPO"], META), "training_nosft", tmp_path)


def test_plot_pmi_shift(tmp_path):
    rng = np.random.default_rng(0)
    rows = [{"seed": s, "example_id": e, "group": "g", "model": "base", "pmi": rng.normal(2, 3)}
            for s in (0,) for e in range(40)]
    rows += [{"seed": s, "example_id": e, "group": "g", "model": "MIPO", "pmi": rng.normal(5, 3)}
             for s in (0, 1, 2) for e in range(40)]
    fig = plots.plot_pmi_shift(pd.DataFrame(rows), META, n_boot=300)
    assert any("MIPO - base" in t.get_text() for t in fig.axes[1].texts)
    _save(fig, "pmi", tmp_path)


def test_plot_reported_vs_reproduced(records, tmp_path):
    d = stats.paired_difference(records, "MIPO", "prompting", n_boot=300)
    fig = plots.plot_reported_vs_reproduced(stats.load_reported_gains(), d, META)
    labels = [t.get_text() for ax in fig.axes for t in ax.get_legend().get_texts()]
    assert any(t.startswith("reported (abstract-level)") for t in labels)
    texts = [t.get_text() for t in fig.texts] + [t.get_text() for ax in fig.axes for t in ax.texts]
    assert any("paper:" in t and "ours:" in t for t in texts)  # the setting-difference box
    ticks = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert ticks[0].startswith("ours: MIPO vs prompting") and any("v1 abstract" in t for t in ticks)
    _save(fig, "reported_vs_reproduced", tmp_path)


def test_plot_diversity(records, tmp_path):
    div = stats.diversity_table(records, sample=20)
    _save(plots.plot_diversity(div, META, n_boot=200), "diversity", tmp_path)
