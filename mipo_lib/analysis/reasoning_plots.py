"""Figures of notebook 07 (reasoning), drawn from the tables `experiments.reasoning` computes.

Per-seed dots, 95% CIs (bootstrap over problems or answers, Student-t over seeds), captions from `plots.caption`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from mipo_lib import methods as registry
from mipo_lib.analysis import plots, stats
from mipo_lib.tasks.arithmetic import INFORMATIVE_RANGE


def plot_difficulty(table: pd.DataFrame, chosen: str, meta: dict[str, Any]) -> Any:
    """Validation accuracy of the base model per level (bootstrap CI over problems), the informative range shaded
    and the chosen level outlined."""
    fig, axes = plots.subplots(1, 1, (9.0, 4.2))
    ax = axes[0, 0]
    low, high = INFORMATIVE_RANGE
    ax.axhspan(100 * low, 100 * high, color="#55a868", alpha=0.12, lw=0, label="informative range")
    for i, r in enumerate(table.itertuples()):
        picked = r.level == chosen
        ax.bar(i, 100 * r.accuracy, width=0.65, color=plots.colour(registry.names()[0]), alpha=0.85,
               edgecolor="black" if picked else "none", lw=2.0 if picked else 0)
        ax.errorbar(i, 100 * r.accuracy, yerr=[[100 * (r.accuracy - r.lo)], [100 * (r.hi - r.accuracy)]], fmt="none",
                    ecolor="black", capsize=5, lw=1.4)
        ax.annotate(f"{100 * r.accuracy:.0f}%" + ("\nchosen" if picked else ""), (i, 100 * r.hi), xytext=(0, 5),
                    textcoords="offset points", ha="center", va="bottom", fontsize=9)  # clear of the CI's cap
    ax.set_xticks(range(len(table)), [lv.replace("_", " ") for lv in table["level"]], rotation=15)
    ax.set_ylabel("base accuracy on validation (%)")
    ax.set_ylim(0, 115)
    ax.set_title("How hard is each level for the base model?")
    ax.legend(loc="upper right", fontsize=8)
    n = int(table["n"].min()) if len(table) else None
    cap = plots.caption(str(meta.get("preset", "?")), str(meta.get("model", "?")), "arithmetic levels (validation)",
                        None, n, bars="95% bootstrap CI over problems",
                        examples_word="validation problems per level (at least)",
                        dots="Bars: greedy accuracy", bars_word="black bars",
                        extra=f"Chosen: the hardest level in [{low:.0%}, {high:.0%}]; test problems were not used.")
    fig.tight_layout()
    fig.mipo_caption = cap
    return fig


def plot_pairs_and_pmi(pair_table: pd.DataFrame, pmi: pd.DataFrame, ranking: pd.DataFrame, meta: dict[str, Any]) -> Any:
    """Left: what the pairs say about correctness, per seed (dots) with a Student-t CI over seeds. Right: base-model
    PMI of the base model's held-out answers, correct vs wrong, with the AUC of PMI and of likelihood."""
    fig, axes = plots.subplots(1, 2, (11.0, 4.2))
    ax_p, ax_h = axes[0]
    cols = [("positive_correct", "y+ correct"), ("negative_correct", "y- correct for x"),
            ("agree", "y+ right, y- wrong"), ("disagree", "y+ wrong, y- right"), ("both_wrong", "both wrong")]
    for i, (col, label) in enumerate(cols):
        v = 100 * pair_table[col].to_numpy(float)
        mean, lo, hi, _ = stats.seed_interval(v)
        ax_p.bar(i, mean, width=0.65, color=plots.colour("MIPO"), alpha=0.8)
        ax_p.errorbar(i, mean, yerr=[[mean - lo], [hi - mean]], fmt="none", ecolor="black", capsize=5, lw=1.4)
        ax_p.scatter(i + plots.jitter(v.size), v, s=22, color="white", edgecolor="black", lw=0.9, zorder=4)
    ax_p.set_xticks(range(len(cols)), [c[1] for c in cols], rotation=20, fontsize=9)
    ax_p.set_ylabel("share of training pairs (%)")
    ax_p.set_ylim(0, 105)
    ax_p.set_title("Correctness inside the MIPO pairs (never shown to MIPO)")
    vals = pmi["pmi"].to_numpy(float)
    bins = np.linspace(vals.min(), vals.max(), 26) if vals.size and vals.min() < vals.max() else 10
    for correct, label, col in ((1.0, "correct", "#55a868"), (0.0, "wrong", "#c44e52")):
        v = pmi.loc[(pmi["correct"] > 0.5) == bool(correct), "pmi"].to_numpy(float)
        if v.size:
            ax_h.hist(v, bins=bins, density=True, alpha=0.35, color=col,
                      label=f"{label} (n={v.size}, mean {v.mean():.1f})")
            ax_h.axvline(v.mean(), color=col, ls="--", lw=1.2)
    ax_h.axvline(0.0, color="black", lw=0.8)
    text = "\n".join(f"AUC {r.measure}: {r.auc:.2f} [{r.lo:.2f}, {r.hi:.2f}]" for r in ranking.itertuples())
    ax_h.text(0.02, 0.97, text, transform=ax_h.transAxes, va="top", fontsize=9,
              bbox={"boxstyle": "round", "fc": "white", "ec": "gray"})
    ax_h.set_xlabel("base-model PMI log p(y|x) - log p(y|x') (nats)")
    ax_h.set_ylabel("density")
    # Above the axes, under the title: inside, the legend hid the tallest bars.
    legend = ax_h.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
    fig.canvas.draw()
    legend_pt = (legend.get_window_extent().y1 - ax_h.get_window_extent().y1) * 72 / fig.dpi
    ax_h.set_title("Does PMI rank correct answers higher?", pad=legend_pt + 4)
    cap = plots.caption(
        str(meta.get("preset", "?")), str(meta.get("model", "?")), str(meta.get("task", "?")), meta.get("n_seeds"),
        meta.get("n_pairs"), bars="95% Student-t CI over seeds (left), bootstrap over answers for the AUCs (right)",
        examples_word="training pairs per seed", dots="Dots (left): individual seeds",
        extra=f"Right: the base model's greedy answers to the {meta.get('n_examples', '?')} held-out problems; x' = "
              "another held-out problem (derangement).")
    fig.tight_layout()
    fig.mipo_caption = cap
    return fig


def plot_formats(formats: pd.DataFrame, meta: dict[str, Any]) -> Any:
    """Per method: accuracy, share of replies with a final answer, accuracy among them and the share cut by the cap;
    bars = mean over seeds with a Student-t CI over seeds, dots = seeds (untrained methods are deterministic)."""
    problems, parseable = "% of held-out problems", "% of replies with a final answer"
    panels = [("accuracy", "accuracy", problems), ("parseable", "an 'Answer: N' line given (format)", problems),
              ("accuracy_parseable", "accuracy among them (correctness)", parseable),
              ("unfinished", "replies cut by the token cap", problems)]
    methods = stats.ordered_methods(formats["method"])
    # 2 x 2, not 1 x 4: four panels in a row shrink to unreadable fonts at a notebook's width
    fig, axes = plots.subplots(2, 2, (9.5, 7.2))
    for ax, (col, title, unit) in zip(axes.flat, panels):
        for i, m in enumerate(methods):
            v = 100 * formats.loc[formats["method"] == m, col].dropna().to_numpy(float)
            if not v.size:
                continue
            mean, lo, hi, _ = stats.seed_interval(v)
            ax.bar(i, mean, width=0.65, color=plots.colour(m), alpha=0.85)
            ax.errorbar(i, mean, yerr=[[mean - lo], [hi - mean]], fmt="none", ecolor="black", capsize=5, lw=1.4)
            ax.scatter(i + plots.jitter(v.size), v, s=22, color="white", edgecolor="black", lw=0.9, zorder=4)
        ax.set_xticks(range(len(methods)), methods, rotation=15, fontsize=9)
        ax.set_ylim(0, 105)
        ax.set_title(title, fontsize=11)
        ax.set_ylabel(unit)
    cap = plots.caption(str(meta.get("preset", "?")), str(meta.get("model", "?")), str(meta.get("task", "?")),
                        meta.get("n_seeds"), meta.get("n_examples"), bars="95% Student-t CI over seeds",
                        extra="accuracy = share with a final answer x accuracy among them: a gain in the top right "
                              "panel is format, in the bottom left panel correctness.")
    fig.tight_layout()
    fig.mipo_caption = cap
    return fig


def plot_cap(shares: pd.DataFrame, cap: int, share: float, meta: dict[str, Any]) -> Any:
    """Share of each method's validation replies that finish within each token cap (`reasoning.finished_shares`),
    the required share as a line and the chosen cap marked."""
    fig, axes = plots.subplots(1, 1, (8.0, 4.0))
    ax = axes[0, 0]
    for method in stats.ordered_methods(shares["method"]):
        part = shares[shares["method"] == method].sort_values("cap")
        ax.plot(part["cap"], 100 * part["finished"], marker="o", ms=3, color=plots.colour(method), label=method)
    ax.axhline(100 * share, color="black", ls="--", lw=1.0, label=f"{share:.0%} must finish")
    ax.axvline(cap, color="gray", ls=":", lw=1.2)
    left = cap > 0.75 * float(shares["cap"].max()) if len(shares) else False  # near the right edge: label inside
    ax.annotate(f"chosen cap: {cap}", (cap, 5), xytext=(-4 if left else 4, 0), textcoords="offset points", fontsize=9,
                ha="right" if left else "left")
    ax.set_xlabel("token cap (new tokens)")
    ax.set_ylabel("replies that finish (%)")
    ax.set_ylim(0, 105)
    ax.set_title("Which token cap lets every method's replies finish?")
    ax.legend(fontsize=8, loc="center right")
    n = int(shares["n"].min()) if len(shares) else None
    if n is not None and "seeds" in shares:  # replies pooled over the seeds' adapters: n problems each
        n //= len(str(shares["seeds"].iloc[0]).split())
    cap_text = plots.caption(str(meta.get("preset", "?")), str(meta.get("model", "?")), str(meta.get("task", "?")),
                             meta.get("n_seeds"), n, bars="none (the shares of these replies, not estimates)",
                             examples_word="validation problems", dots="Lines: one per method",
                             bars_word="error bars",
                             extra="Replies generated greedily at the upper bound, MIPO and SFT at the settings "
                                   "chosen on validation, every seed's adapters pooled; a reply finishes when the "
                                   "model ends it within the cap.")
    fig.tight_layout()
    fig.mipo_caption = cap_text
    return fig


def plot_pmi_wins(wins: pd.DataFrame, meta: dict[str, Any]) -> Any:
    """Within-problem comparisons (`reasoning.pmi_wins`): how often the right final number beats an operand and a
    random number, by PMI and by likelihood, with bootstrap 95% CIs over problems; 50% is chance."""
    fig, axes = plots.subplots(1, 1, (7.5, 4.0))
    ax = axes[0, 0]
    labels = {"pmi": "PMI log p(N|x,r) - mean log p(N|x',r)", "logp_x": "likelihood log p(N|x,r)"}
    colours = {"pmi": plots.colour("MIPO"), "logp_x": plots.colour(registry.names()[0])}
    versus = list(dict.fromkeys(wins["versus"]))
    width = 0.38
    for j, measure in enumerate(m for m in labels if m in set(wins["measure"])):
        part = wins[wins["measure"] == measure].set_index("versus").loc[versus]
        x = np.arange(len(versus)) + (j - 0.5) * width
        ax.bar(x, 100 * part["win_rate"], width=width, color=colours[measure], alpha=0.85, label=labels[measure])
        ax.errorbar(x, 100 * part["win_rate"], yerr=[100 * (part["win_rate"] - part["lo"]),
                                                     100 * (part["hi"] - part["win_rate"])],
                    fmt="none", ecolor="black", capsize=5, lw=1.4)
    ax.axhline(50, color="black", ls="--", lw=1.0)
    ax.set_xticks(range(len(versus)), [f"right answer vs {v}" for v in versus])
    ax.set_ylabel("problems where the right answer scores higher (%)")
    ax.set_ylim(0, 105)
    # above the axes, under the title: inside, the legend hid the bars
    legend = ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
    fig.canvas.draw()
    legend_pt = (legend.get_window_extent().y1 - ax.get_window_extent().y1) * 72 / fig.dpi
    ax.set_title("Within a problem: does the right final number score higher?", pad=legend_pt + 4)
    cap = plots.caption(str(meta.get("preset", "?")), str(meta.get("model", "?")), str(meta.get("task", "?")), None,
                        int(wins["n"].min()) if len(wins) else None, bars="95% bootstrap CI over problems (paired)",
                        examples_word="held-out problems", dots="Bars: share of problems",
                        extra="The base model's greedy reply to each problem, its final number replaced; scored "
                              "under the base model. Dashed line: chance.")
    fig.tight_layout()
    fig.mipo_caption = cap
    return fig
