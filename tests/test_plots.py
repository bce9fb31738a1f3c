"""Each figure function runs on synthetic frames and `savefig` writes png + pdf (Agg backend, temp folder)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from mipo_lib.analysis import plots, stats  # noqa: E402

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
    assert "3 seeds" in c and "200 held-out examples" in c and "95% crossed bootstrap CI over prompts and seeds" in c and "cpu" in c


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


def _titles(fig) -> list[str]:
    return [ax.get_title() for ax in fig.axes]


def test_plot_training_curves(tmp_path):
    fig = plots.plot_training_curves(_train_log(), META)
    assert _titles(fig) == ["MIPO (DPO) loss", "MIPO reward margin (chosen - rejected)", "MIPO reward accuracy",
                            "SFT loss"]
    _save(fig, "training", tmp_path)


def test_plot_training_curves_show_seeds_and_mean_without_a_band():
    """With 3 seeds a band over seeds is degenerate: each seed is a thin line, their mean a thick one, no band."""
    log = _train_log()
    ax = plots.plot_training_curves(log, META).axes[0]
    n_seeds = log.loc[log.method == "MIPO", "seed"].nunique()
    widths = sorted(line.get_linewidth() for line in ax.lines if line.get_label() != "log 2 = 0.693 (untrained)")
    assert widths == [0.7] * n_seeds + [2.0] and not ax.collections  # no fill_between
    thick = next(line for line in ax.lines if line.get_linewidth() == 2.0)
    mean = log[log.method == "MIPO"].groupby("step")["loss"].mean()
    assert np.allclose(thick.get_ydata(), mean.to_numpy())
    fig = plots.plot_training_curves(log, META)
    assert "no CI band" in fig.mipo_caption and "thick line: mean over seeds" in fig.mipo_caption


def test_plot_training_curves_without_sft(tmp_path):
    log = _train_log()
    fig = plots.plot_training_curves(log[log.method == "MIPO"], META)
    assert [t.get_text() for t in fig.axes[3].texts] == ["not logged (SFT)"]
    _save(fig, "training_nosft", tmp_path)


def test_plot_training_curves_draw_every_registered_trained_method():
    from mipo_lib import methods

    log = _train_log()
    methods.register_method("MIPO-long", slug="mipo_long", training="dpo", colour="#123456")
    try:
        fig = plots.plot_training_curves(pd.concat([log, log[log.method == "MIPO"].assign(method="MIPO-long")]), META)
    finally:
        methods.unregister_method("MIPO-long")
    assert _titles(fig)[0] == "MIPO / MIPO-long (DPO) loss"
    colours = {matplotlib.colors.to_hex(line.get_color()) for line in fig.axes[0].lines}
    assert {"#123456", plots.PALETTE["MIPO"]} <= colours and "#123456" not in {
        matplotlib.colors.to_hex(line.get_color()) for line in fig.axes[3].lines}


def test_plot_pmi_shift(tmp_path):
    rng = np.random.default_rng(0)
    rows = [{"seed": s, "example_id": e, "group": "g", "model": "base", "pmi": rng.normal(2, 3)}
            for s in (0,) for e in range(40)]
    rows += [{"seed": s, "example_id": e, "group": "g", "model": "MIPO", "pmi": rng.normal(5, 3)}
             for s in (0, 1, 2) for e in range(40)]
    fig = plots.plot_pmi_shift(pd.DataFrame(rows), META, n_boot=300)
    assert any("MIPO - base" in t.get_text() for t in fig.axes[1].texts)
    _save(fig, "pmi", tmp_path)


def test_plot_reported_vs_reproduced_keeps_paper_and_ours_on_separate_axes(records, tmp_path):
    d = stats.paired_difference(records, "MIPO", "prompting", n_boot=300)
    ours = [plots.reproduced_entry(d, "personalization", "tiny model, program judge")]
    fig = plots.plot_reported_vs_reproduced(stats.load_reported_gains(), ours, META)
    (left_p, right_p), (left_r, right_r) = fig.axes[0:2], fig.axes[2:4]
    assert "reported (abstract-level)" in left_p.get_title() and "measured" in right_p.get_title()
    assert left_p.get_shared_x_axes().get_siblings(left_p) == [left_p]  # no common axis with ours
    assert any("v1 abstract" in t.get_text() for t in left_p.get_yticklabels())
    assert right_p.get_yticklabels()[0].get_text().replace("\n", " ").startswith("MIPO vs prompting")
    assert any(f"{100 * d['relative_gain']:+.1f}%" in t.get_text() for t in right_p.texts)
    assert any("not measured" in t.get_text() for t in right_r.texts)  # no reasoning entry given
    assert "compare the sign and rough size" in fig.mipo_caption
    _save(fig, "reported_vs_reproduced", tmp_path)


def _overlaps(fig) -> list[tuple[str, str]]:
    """Pairs of things a reader cannot tell apart: a tick label over another axes, a legend over any axes or tick
    label; and tick labels that the code cut short ("...")."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ticks = [(ax, label) for ax in fig.axes for label in ax.get_yticklabels() + ax.get_xticklabels() if label.get_text()]
    legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend() is not None)]
    found = [(label.get_text(), "cut short") for _, label in ticks if label.get_text().endswith("...")]
    for own, label in ticks:
        box = label.get_window_extent(renderer)
        found += [(label.get_text(), other.get_title()) for other in fig.axes
                  if other is not own and box.overlaps(other.get_window_extent(renderer))]
    for legend in legends:
        box = legend.get_window_extent(renderer)
        found += [("legend", label.get_text()) for _, label in ticks if box.overlaps(label.get_window_extent(renderer))]
        if legend in fig.legends:
            found += [("figure legend", ax.get_title()) for ax in fig.axes if box.overlaps(ax.get_window_extent(renderer))]
    return found


def test_the_committed_reported_vs_reproduced_figure_is_legible():
    """As notebook 05 draws it from the committed tables: no row label cut, none over the other column, no legend
    over a label or an axes (the figure had all three)."""
    from mipo_lib.config import repo_root

    results = pd.read_csv(repo_root() / "figures" / "results_cpu.csv")
    reasoning = pd.read_csv(repo_root() / "figures" / "results_reasoning_cpu.csv")
    ours = [plots.reproduced_entry(stats.difference_from_results(results, "MIPO", "prompting"), "personalization",
                                   "SmolLM2-135M-Instruct, personalization, program judge, 3 seeds x 100"),
            plots.reproduced_entry(stats.difference_from_results(reasoning, "MIPO", "prompting"), "math+MC",
                                   "SmolLM2-135M-Instruct, arithmetic (notebook 07), exact match")]
    fig = plots.plot_reported_vs_reproduced(stats.load_reported_gains(), ours, META)
    assert _overlaps(fig) == []
    plt.close(fig)


def test_the_legibility_check_can_fail():
    fig, (a, b) = plt.subplots(1, 2, figsize=(4, 2))
    a.set_yticks([0], ["cut..."])
    b.set_yticks([0], ["a label far too long to stay beside its own axes"])  # reaches into the left axes
    b.plot([0], [0], label="x")
    b.legend(loc="center left", bbox_to_anchor=(-0.6, 0.5))
    found = _overlaps(fig)
    assert ("cut...", "cut short") in found and any(what == "legend" for what, _ in found)
    assert ("a label far too long to stay beside its own axes", "") in found
    plt.close(fig)


def test_difference_from_results_reads_only_its_own_tasks_seeds():
    """results_cpu.csv holds two tasks with the same method names: per-seed gains must come from the difference's
    own task (they were averaged with the held-out types' seed 0)."""
    from mipo_lib.config import repo_root

    results = pd.read_csv(repo_root() / "figures" / "results_cpu.csv")
    d = stats.difference_from_results(results, "MIPO", "prompting")
    own = results[(results["kind"] == "per_seed") & (results["task"] == "personalization")]
    mipo = own[own["method"] == "MIPO"].set_index("seed")["rate"]
    assert [p["rate_a"] for p in d["per_seed"]] == pytest.approx(list(mipo))


def test_difference_from_results_round_trips_a_written_table(records, tmp_path):
    table = stats.write_results(records, tmp_path / "r.csv", n_boot=300)
    back = stats.difference_from_results(pd.read_csv(tmp_path / "r.csv"), "MIPO", "prompting")
    row = table[(table["kind"] == "paired_difference") & (table["method"] == "MIPO")
                & (table["baseline"] == "prompting") & (table["ci_design"] == "crossed")].iloc[0]
    assert back["mean"] == pytest.approx(row["diff"], abs=1e-5) and back["relative_lo"] == pytest.approx(row["rel_lo"], abs=1e-5)
    assert len(back["per_seed"]) == records["seed"].nunique()


def test_plot_diversity(records, tmp_path):
    div = stats.diversity_table(records, sample=20)
    _save(plots.plot_diversity(div, META), "diversity", tmp_path)


# ----------------------------------------------------------------------------------------------- ablation figures
def _variant_records(records: pd.DataFrame) -> pd.DataFrame:
    """MIPO as the variant "K=2" next to the prompting baseline, as `ablations.run_variants` returns them."""
    both = records[records.method.isin(["MIPO", "prompting"])]
    return both.assign(variant=both.method.map({"MIPO": "K=2", "prompting": "prompting"}))


def test_plot_variants_with_kl(records, tmp_path):
    from mipo_lib.experiments import ablations

    variants = _variant_records(records)
    table = ablations.compare_variants(variants, ["K=2"], reference=None, n_boot=200)
    base = stats.hierarchical_bootstrap(variants, "prompting", n_boot=200, unit="variant")
    kl = pd.DataFrame({"variant": ["K=2"], "mean": [1.0], "lo": [0.5], "hi": [1.5], "per_seed": [[0.9, 1.0, 1.1]]})
    fig = plots.plot_variants(table, {**META, "kl_prompts": 30}, "K", baseline_row=base, reference="K=2", kl=kl)
    assert len(fig.axes) == 3 and _titles(fig)[2] == "How far the policy moved"
    assert fig.mipo_caption.startswith("Preset smoke | tiny-random | task: personalization | 3 seeds x 40")
    assert "on 30 held-out prompts" in fig.mipo_caption
    _save(fig, "variants", tmp_path)
    assert len(plots.plot_variants(table, META, "K").axes) == 2  # without KL: two panels


def test_plot_twin(records, tmp_path):
    cost = pd.DataFrame([{"method": m, "seed": s, "n_prompts": 6, "s_per_prompt": t + 0.01 * s, "mean_words": 9.0}
                         for m, t in (("prompting", 0.1), ("MIPO", 0.1), ("CAD", 0.2)) for s in (0, 1, 2)])
    fig = plots.plot_twin(records, cost, {**META, "cad_alpha": "10", "cost_prompts": 6}, n_boot=200)
    assert any("MIPO - CAD (paired)" in t.get_text() for t in fig.axes[0].texts)
    assert [t.get_text() for t in fig.axes[1].texts][1] == "1.00x"  # MIPO's own ratio
    assert "a = 1/beta = 10" in fig.mipo_caption and "on 6 held-out prompts" in fig.mipo_caption
    _save(fig, "twin", tmp_path)


def test_plot_win_rates(records, tmp_path):
    fig = plots.plot_win_rates(stats.win_tie_table(records, n_boot=200), META)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == list(stats.WIN_TIE_METRICS)
    assert fig.mipo_caption.startswith("Preset smoke | tiny-random") and "needs a GPU preset" in fig.mipo_caption
    _save(fig, "win_rates", tmp_path)


def _validated_log() -> pd.DataFrame:
    """`_train_log` with validation metrics every 5 steps on the MIPO rows (validation loss turning up late)."""
    log = _train_log()
    measured = (log.method == "MIPO") & (log.step % 5 == 0)
    log.loc[measured, "eval_loss"] = 0.6 - 0.02 * log.loc[measured, "step"] + 0.002 * log.loc[measured, "step"] ** 2
    log.loc[measured, "eval_rewards/margins"] = log.loc[measured, "step"] / 20
    return log


def test_plot_validation_curves_draws_training_beside_validation(tmp_path):
    log = _validated_log()
    meta = {**META, "n_validation_pairs": 20, "evals_per_epoch": 2}
    fig = plots.plot_validation_curves(log, meta)
    assert _titles(fig) == ["DPO loss", "reward margin (chosen - rejected)"]
    assert "preset smoke" in fig._suptitle.get_text() and "tiny-random" in fig._suptitle.get_text()
    assert "3 seeds" in fig._suptitle.get_text() and "20 validation pairs" in fig._suptitle.get_text()
    dashed = [line for line in fig.axes[0].lines if line.get_linestyle() == "--"]
    assert len(dashed) == 3 + 1  # one per seed and the mean
    mean = log[log.method == "MIPO"].dropna(subset=["eval_loss"]).groupby("step")["eval_loss"].mean()
    thick = next(line for line in dashed if line.get_linewidth() == 2.0)
    assert np.allclose(thick.get_ydata(), mean.to_numpy())
    assert not any(ax.get_legend() for ax in fig.axes) and len(fig.legends) == 1  # one legend, below the axes
    fig.canvas.draw()
    legend_box = fig.legends[0].get_window_extent()
    assert all(not legend_box.overlaps(ax.get_tightbbox()) for ax in fig.axes)
    _save(fig, "validation", tmp_path)


def test_plot_validation_curves_of_logs_without_validation_say_so():
    fig = plots.plot_validation_curves(_train_log(), {**META, "n_validation_pairs": 20})
    assert "not logged" in fig._suptitle.get_text()
    assert all(line.get_linestyle() != "--" for line in fig.axes[0].lines)
