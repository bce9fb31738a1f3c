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
    titles = [ax.title for ax in fig.axes if ax.get_title()]
    for legend in legends:
        box = legend.get_window_extent(renderer)
        found += [("legend", label.get_text()) for _, label in ticks if box.overlaps(label.get_window_extent(renderer))]
        found += [("legend", t.get_text()) for t in titles if box.overlaps(t.get_window_extent(renderer))]
        if legend in fig.legends:
            found += [("figure legend", ax.get_title()) for ax in fig.axes if box.overlaps(ax.get_window_extent(renderer))]
        found += [("legend over data", what) for ax in fig.axes for what, hit in _data_marks(ax) if hit(box)]
    for ax in fig.axes:  # a value label written on its own error bar (the caps) cannot be read
        for text in ax.texts:
            box = text.get_window_extent(renderer)
            found += [(text.get_text(), what) for what, hit in _data_marks(ax, errorbars_only=True) if hit(box)]
    return found


def _data_marks(ax, errorbars_only: bool = False):
    """(name, box -> bool) for each plotted data mark of `ax` in display coordinates: error bars and caps, bars,
    histogram outlines, lines (their segments and markers) and scatter points. Shaded spans across the whole axes
    (a baseline's band) are background, not marks."""
    from matplotlib.collections import LineCollection, PathCollection
    from matplotlib.container import BarContainer, ErrorbarContainer
    from matplotlib.transforms import Bbox

    def crosses(path, transform, filled=False):
        return lambda box: transform.transform_path(path).intersects_bbox(box, filled=filled)

    def inside(points):
        points = np.asarray(points, dtype=float).reshape(-1, 2)
        return lambda box: bool(np.any((points[:, 0] >= box.x0) & (points[:, 0] <= box.x1)
                                       & (points[:, 1] >= box.y0) & (points[:, 1] <= box.y1)))

    def line_hit(line):
        xy = line.get_transform().transform(line.get_xydata())
        markers = line.get_marker() not in (None, "None", "none", "")
        drawn = line.get_linestyle() not in ("None", "none", "", " ") and len(xy) > 1
        return lambda box: (markers and inside(xy)(box)) or (drawn and crosses(line.get_path(), line.get_transform())(box))

    def cap_hit(line):
        """A cap is a short horizontal (or vertical) stroke; a label must keep 3 points clear of it."""
        px = ax.figure.dpi / 72
        half_w, half_h = line.get_markersize() * px / 2, line.get_markeredgewidth() * px / 2 + 3 * px
        if line.get_marker() == "|":
            half_w, half_h = half_h, half_w
        xy = line.get_transform().transform(line.get_xydata())
        return lambda box: any(box.overlaps(Bbox([[x - half_w, y - half_h], [x + half_w, y + half_h]])) for x, y in xy)

    marks = []
    error_lines = {id(a) for c in ax.containers if isinstance(c, ErrorbarContainer) for group in c[1:] for a in group}
    for c in ax.collections:
        if isinstance(c, LineCollection) and (id(c) in error_lines or not errorbars_only):
            marks += [("error bar", crosses(path, c.get_transform())) for path in c.get_paths()]
        elif isinstance(c, PathCollection) and not errorbars_only:
            marks.append(("point", inside(c.get_offset_transform().transform(c.get_offsets()))))
    for line in ax.lines:
        if id(line) in error_lines:
            marks.append(("error bar cap", cap_hit(line)))
        elif not errorbars_only:
            marks.append((f"line {line.get_label()}", lambda box, hit=line_hit(line): hit(box)))
    if errorbars_only:
        return marks
    bars = {id(p) for c in ax.containers if isinstance(c, BarContainer) for p in c}
    width = ax.get_window_extent().width
    for patch in ax.patches:
        extent = patch.get_window_extent()
        if id(patch) in bars:
            marks.append(("bar", lambda box, e=extent: e.height > 0.5 and box.overlaps(e)))
        elif extent.width < width - 1:  # a histogram's outline, not a span across the axes
            marks.append(("patch", crosses(patch.get_path(), patch.get_transform(), filled=True)))
    return marks


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
                & (table["baseline"] == "prompting") & (table["ci_design"] == stats.DEFAULT_DESIGN)].iloc[0]
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
    meta = {**META, "n_validation_pairs": 20}
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
    assert "(evaluated 3 times an epoch)" in fig.mipo_caption  # every 5 of an epoch's 15 steps, read from the log


def test_validation_schedule_in_the_caption_is_read_from_the_logs():
    """The caption says how often the plotted runs evaluated, not how often today's code would (a committed
    reference run may predate a change of schedule)."""
    log = _train_log()
    log["epoch"] = log["step"] / 5  # 3 epochs of 5 steps
    log.loc[(log.method == "MIPO") & (log.step % 5 == 0), "eval_loss"] = 0.5
    fig = plots.plot_validation_curves(log, {**META, "n_validation_pairs": 20})
    assert "(evaluated once an epoch)" in fig.mipo_caption
    log.loc[(log.method == "MIPO") & (log.seed == 0) & (log.step == 3), "eval_loss"] = 0.5  # runs disagree
    fig = plots.plot_validation_curves(log, {**META, "n_validation_pairs": 20})
    assert "(evaluated a few times an epoch)" in fig.mipo_caption


def test_plot_validation_curves_of_logs_without_validation_say_so():
    fig = plots.plot_validation_curves(_train_log(), {**META, "n_validation_pairs": 20})
    assert "not logged" in fig._suptitle.get_text()
    assert all(line.get_linestyle() != "--" for line in fig.axes[0].lines)


# ------------------------------------------------------------------------- every workbook figure, legible at a glance
def _pmi_frame() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = [{"seed": 0, "example_id": e, "group": "g", "model": "base", "pmi": rng.normal(2, 3)} for e in range(40)]
    rows += [{"seed": s, "example_id": e, "group": "g", "model": "MIPO", "pmi": rng.normal(5, 3)}
             for s in (0, 1, 2) for e in range(40)]
    return pd.DataFrame(rows)


def _corner_records() -> pd.DataFrame:
    """Rates at the axes' edges, where a legend inside the axes would sit: MIPO at 100% on the last preference (the
    bottom right of the per-preference plot, as on "short" in the committed figure), every method at 0% on another."""
    records = make_records({"base (no context)": 0.1, "prompting": 0.3, "SFT": 0.4, "MIPO": 0.6, "CAD": 0.5},
                           n_examples=40, deterministic=("base (no context)", "prompting", "CAD"))
    last = records["group"] == sorted(GROUPS)[-1]
    records.loc[last & (records["method"] == "MIPO"), "score"] = 1.0
    records.loc[records["group"] == sorted(GROUPS)[0], "score"] = 0.0
    return records


def _variants_figure(records, kl: bool):
    from mipo_lib.experiments import ablations

    variants = _variant_records(records)
    table = ablations.compare_variants(variants, ["K=2"], reference=None, n_boot=200)
    base = stats.hierarchical_bootstrap(variants, "prompting", n_boot=200, unit="variant")
    kl_table = pd.DataFrame({"variant": ["K=2"], "mean": [1.0], "lo": [0.5], "hi": [1.5], "per_seed": [[0.9, 1.0, 1.1]]})
    return plots.plot_variants(table, META, "K", baseline_row=base, reference="K=2", kl=kl_table if kl else None)


def _twin_figure(records):
    cost = pd.DataFrame([{"method": m, "seed": s, "n_prompts": 6, "s_per_prompt": t + 0.01 * s, "mean_words": 9.0}
                         for m, t in (("prompting", 0.1), ("MIPO", 0.1), ("CAD", 0.2)) for s in (0, 1, 2)])
    return plots.plot_twin(records, cost, META, n_boot=200)


def _difficulty_figure(_records):
    from mipo_lib.analysis import reasoning_plots
    from mipo_lib.config import repo_root
    from mipo_lib.experiments import reasoning

    table = pd.read_csv(repo_root() / "figures" / "reasoning_difficulty_cpu.csv")  # what notebook 07 draws
    return reasoning_plots.plot_difficulty(table, reasoning.choose_level(table), META)


def _pairs_figure(_records):
    from mipo_lib.analysis import reasoning_plots

    rng = np.random.default_rng(1)
    pair_table = pd.DataFrame({"seed": [0, 1, 2], "positive_correct": [0.2, 0.25, 0.18],
                               "negative_correct": [0.05, 0.02, 0.06], "agree": [0.2, 0.22, 0.18],
                               "disagree": [0.04, 0.02, 0.05], "both_wrong": [0.76, 0.8, 0.72]})
    pmi = pd.DataFrame({"pmi": rng.normal(38, 9, 200), "correct": (rng.random(200) < 0.25).astype(float)})
    ranking = pd.DataFrame({"measure": ["pmi", "logp_x"], "auc": [0.49, 0.64], "lo": [0.39, 0.54], "hi": [0.59, 0.73]})
    return reasoning_plots.plot_pairs_and_pmi(pair_table, pmi, ranking, {**META, "n_pairs": 60})


def _formats_figure(_records):
    from mipo_lib.analysis import reasoning_plots

    formats = pd.DataFrame([{"method": m, "seed": s, "accuracy": a + 0.02 * s, "parseable": 1.0,
                             "accuracy_parseable": a + 0.02 * s, "unfinished": u}
                            for m, a, u in (("prompting", 0.22, 0.07), ("SFT", 0.18, 0.04), ("MIPO", 0.22, 0.58))
                            for s in (0, 1, 2)])
    return reasoning_plots.plot_formats(formats, META)


def _cap_figure(_records):
    from mipo_lib.analysis import reasoning_plots
    from mipo_lib.experiments import reasoning

    lengths = pd.DataFrame({"method": ["prompting"] * 4 + ["SFT"] * 4 + ["MIPO"] * 4,
                            "n_tokens": [10, 20, 30, 40, 12, 22, 33, 60, 15, 25, 35, float("inf")]})
    shares = reasoning.finished_shares(lengths, range(8, 129, 8))
    return reasoning_plots.plot_cap(shares, 64, 0.95, META)


def _pmi_wins_figure(_records):
    from mipo_lib.analysis import reasoning_plots

    wins = pd.DataFrame([{"measure": m, "versus": v, "n": 200, "win_rate": w, "lo": w - 0.07, "hi": w + 0.07}
                         for m, v, w in (("pmi", "operand", 0.55), ("pmi", "random", 0.7), ("logp_x", "operand", 0.6),
                                         ("logp_x", "random", 0.8))])
    return reasoning_plots.plot_pmi_wins(wins, META)


WORKBOOK_FIGURES = {
    "method rates (00, 05, 07)": lambda r: plots.plot_method_rates(r, META, n_boot=200),
    "per preference (05)": lambda r: plots.plot_per_group(r, META, n_boot=200),
    "training curves (03, 05, 07)": lambda r: plots.plot_training_curves(_train_log(), META),
    "validation curves (03)": lambda r: plots.plot_validation_curves(_validated_log(), {**META, "n_validation_pairs": 20}),
    "diversity (04, 06)": lambda r: plots.plot_diversity(stats.diversity_table(r, sample=20), META),
    "pmi shift (05)": lambda r: plots.plot_pmi_shift(_pmi_frame(), META, n_boot=200),
    "variants with KL (06 beta)": lambda r: _variants_figure(r, kl=True),
    "variants (06 K, negative kind)": lambda r: _variants_figure(r, kl=False),
    "MIPO vs CAD (06)": _twin_figure,
    "win rates (06)": lambda r: plots.plot_win_rates(stats.win_tie_table(r, n_boot=200), META),
    "difficulty (07, committed table)": _difficulty_figure,
    "pairs and PMI (07)": _pairs_figure,
    "formats (07)": _formats_figure,
    "token cap (07)": _cap_figure,
    "PMI within a problem (07)": _pmi_wins_figure,
}


@pytest.mark.parametrize("name", list(WORKBOOK_FIGURES))
def test_every_workbook_figure_is_legible(name):
    """No legend over data, a title or a tick label; no value label on its error bar's cap; no label cut short or
    over another axes. On rates at the axes' edges, where a legend inside the axes would cover a point."""
    fig = WORKBOOK_FIGURES[name](_corner_records())
    assert _overlaps(fig) == []
    plt.close(fig)


def test_the_legend_over_data_check_can_fail():
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.bar([0, 1], [1.0, 0.2], label="bars")
    ax.errorbar([1], [0.9], yerr=[[0.1], [0.05]], fmt="o", capsize=4, label="point")
    ax.text(0, 1.0, "on its cap", ha="center", va="bottom")
    ax.errorbar([0], [0.95], yerr=[[0.05], [0.05]], fmt="none", capsize=4)
    ax.legend(loc="upper right")
    found = _overlaps(fig)
    assert ("legend over data", "error bar") in found and ("legend over data", "error bar cap") in found
    assert ("on its cap", "error bar cap") in found
    plt.close(fig)
