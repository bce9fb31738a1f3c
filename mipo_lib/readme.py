"""The README's results section, generated from the committed results table so prose can never drift from data.

`figures/results_<preset>.csv` (written by notebook 05 through `stats.write_results`) is the one source of the
reference numbers. The README holds a block between two markers; `results_block` renders it from the table (method
rates, per-seed values, paired differences with their crossed-bootstrap CIs, Holm-adjusted verdicts and the
cluster-bootstrap sensitivity), `update_readme` rewrites the block in place (the runner calls it after a reference
run), and a test fails when the committed README and the committed table disagree.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from mipo_lib.config import repo_root
from mipo_lib.errors import MipoError
from mipo_lib.methods import Method, get_method

BEGIN = "<!-- results:{preset}:begin (generated from figures/results_{preset}.csv by `python -m mipo_lib readme`; do not edit) -->"
END = "<!-- results:{preset}:end -->"


def _entry(method: str) -> Method | None:
    try:
        return get_method(method)
    except MipoError:
        return None


def _describe(method: str) -> str:
    """What a method is, read off its registry entry (so a new method needs no README edit)."""
    m = _entry(method)
    if m is None:
        return method
    how = {"dpo": "DPO on the MIPO pairs", "sft": "SFT on the pairs' positives", None: "no training"}.get(m.training, str(m.training))
    context = "context in the prompt" if m.with_context else "no context in the prompt"
    decoding = "context-aware decoding" if m.decoding == "cad" else "greedy"
    return f"{how}; {context}; {decoding}"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _pts(x: float) -> str:
    return f"{100 * x:+.1f}"


def _method_rows(per_seed: pd.DataFrame) -> list[str]:
    rows = ["| method | what it is | success rate | per seed | words per reply |", "|---|---|---|---|---|"]
    for method, sub in per_seed.groupby("method", sort=False):
        rates = sub.sort_values("seed")["rate"].tolist()
        seeds = "same in every seed" if len(set(rates)) == 1 else " / ".join(f"{100 * r:.0f}" for r in rates) + "%"
        entry = _entry(method)
        name = f"**{method}**" if entry is not None and entry.training == "dpo" else method
        rows.append(f"| {name} | {_describe(method)} | {_pct(sub['rate'].mean())} | {seeds} | {sub['mean_words'].mean():.1f} |")
    return rows


def _difference_lines(diffs: pd.DataFrame) -> list[str]:
    crossed = diffs[diffs["ci_design"] == "crossed"]
    cluster = diffs[diffs["ci_design"] != "crossed"].set_index(["method", "baseline"])
    lines = []
    for _, r in crossed.iterrows():
        verdict = "detectable" if bool(r["detectable"]) else "no detectable difference"
        line = (f"- **{r['method']} − {r['baseline']}: {_pts(r['diff'])} points, 95% CI [{_pts(r['diff_lo'])}, "
                f"{_pts(r['diff_hi'])}]** ({_pct(r['rate'])} vs {_pct(r['baseline_rate'])}; relative "
                f"{_pts(r['rel_gain'])}% [{_pts(r['rel_lo'])}%, {_pts(r['rel_hi'])}%]); Holm-adjusted p = "
                f"{r['p_holm']:.3g} in the family *{r['family']}*: {verdict}")
        key = (r["method"], r["baseline"])
        if key in cluster.index:
            c = cluster.loc[key]
            line += (f". Sensitivity, {c['ci_design']} bootstrap: [{_pts(c['diff_lo'])}, {_pts(c['diff_hi'])}], "
                     f"{'detectable' if bool(c['detectable']) else 'not detectable'}")
        lines.append(line + ".")
    return lines


def results_block(table: pd.DataFrame, preset: str = "cpu") -> str:
    """The README block (markers included) for a results table as `stats.write_results` writes it."""
    per_seed = table[table["kind"] == "per_seed"]
    diffs = table[table["kind"] == "paired_difference"]
    if per_seed.empty:
        raise MipoError(f"figures/results_{preset}.csv has no per-seed rows; rerun notebook 05 (make reproduce)")
    n_seeds = per_seed["seed"].nunique()
    n_examples = int(per_seed["n"].iloc[0])
    n_values = set(per_seed["n"].astype(int))
    if len(n_values) != 1 or any(math.isnan(v) for v in per_seed["rate"]):
        raise MipoError(f"figures/results_{preset}.csv mixes example counts {sorted(n_values)}; rerun notebook 05")
    header = (f"Preset `{preset}`, {n_seeds} seeds x {n_examples} held-out prompts; 95% CIs: paired bootstrap over "
              "prompts and seeds, crossed (every seed sees the same prompts); verdicts: Holm-adjusted p < 0.05 within "
              "the family named.")
    body = [BEGIN.format(preset=preset), header, "", *_method_rows(per_seed), "", *_difference_lines(diffs),
            END.format(preset=preset)]
    return "\n".join(body)


def results_path(preset: str = "cpu") -> Path:
    return repo_root() / "figures" / f"results_{preset}.csv"


def update_readme(preset: str = "cpu", readme: Path | None = None) -> bool:
    """Rewrite the README's results block for `preset` from its committed table; True if the README changed."""
    readme = readme or repo_root() / "README.md"
    text = readme.read_text()
    begin, end = BEGIN.format(preset=preset), END.format(preset=preset)
    if begin not in text or end not in text:
        raise MipoError(f"README.md has no results block for preset {preset!r}; add the lines {begin!r} and {end!r}")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    new = head + results_block(pd.read_csv(results_path(preset)), preset) + tail
    if new != text:
        readme.write_text(new)
    return new != text
