"""The ledger of test evaluations: every evaluation of a test split that produced a reported number, one row each.

Why: a test split stays a test only while nobody chooses anything after looking at it. Over the project's history
the `cpu` preset's test prompts were evaluated under several protocols; the ledger keeps that history next to the
results, so a reader can see how often, and under which protocols, a committed number's prompts were looked at.

`data/ledger.csv` is the source: the past reconstructed from git history (each commit that changed a results table),
later rows appended by `record`. `docs/ledger.md` shows it as a table rendered between two markers (`update_doc`), and
tests check that the two agree and that every commit that changed a results table has its row.

A run records its row before anyone commits its table, so it cannot know that commit's hash: it writes `PENDING`,
which stands for "the commit that added this row", the one that commits the table with it.
"""

from __future__ import annotations

import csv
import datetime
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from mipo_lib import files
from mipo_lib.analysis import render
from mipo_lib.config import Preset, repo_root, resolved_dtype
from mipo_lib.errors import MipoError

COLUMNS: tuple[str, ...] = ("date", "commit", "table", "protocol", "result", "re_evaluation")
#: The commit of a row recorded before its table was committed: the commit that adds the row (and the table).
PENDING = "pending"
#: The commit of an evaluation made outside the project (no commit holds its table).
OUTSIDE = "outside the repository"
BEGIN = "<!-- ledger: rendered from data/ledger.csv by mipo_lib.experiments.ledger.update_doc; edit the CSV -->"
END = "<!-- ledger: end -->"
_HEADERS = ("date", "commit", "table", "protocol", "headline result (as committed)", "re-evaluation?")


def csv_path() -> Path:
    """`data/ledger.csv`, the ledger's source."""
    return repo_root() / "data" / "ledger.csv"


def doc_path() -> Path:
    """`docs/ledger.md`, where the ledger is shown."""
    return repo_root() / "docs" / "ledger.md"


def read(path: Path | None = None) -> list[dict[str, str]]:
    """The ledger's rows, oldest first."""
    path = path or csv_path()
    with Path(path).open(newline="") as fh:
        reader = csv.DictReader(fh)
        if tuple(reader.fieldnames or ()) != COLUMNS:
            raise MipoError(f"{path} has columns {reader.fieldnames}; a ledger has {', '.join(COLUMNS)}")
        return list(reader)


def _cell(text: str) -> str:
    """A CSV value as a markdown table cell: a `|` would end the cell, a line break the row."""
    return " ".join(text.split()).replace("|", "\\|")


def render_table(rows: Iterable[Mapping[str, str]]) -> str:
    """The ledger as a markdown table (one line per row, in the CSV's order)."""
    lines = ["| " + " | ".join(_HEADERS) + " |", "|" + "---|" * len(_HEADERS)]
    lines += ["| " + " | ".join(_cell(row[c]) for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def rendered_block(text: str) -> str:
    """What a document holds between the ledger's markers (without them)."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise MipoError(f"the ledger's markers are missing; put {BEGIN!r} and {END!r} around its table")
    return text[start + len(BEGIN):end].strip("\n")


def update_doc(source: Path | None = None, doc: Path | None = None) -> bool:
    """Render the CSV between the document's markers; True when that changed the document."""
    doc = doc or doc_path()
    text = doc.read_text()
    old = rendered_block(text)
    new = render_table(read(source))
    if old == new:
        return False
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    files.write_text(doc, f"{text[:start]}\n{new}\n{text[end:]}")
    return True


def _re_evaluation(previous: Sequence[Mapping[str, str]], protocol: str) -> str:
    """Whether a new row re-evaluates its table's test prompts, and under which protocol, from the table's last row."""
    if not previous:
        return "no: first evaluation recorded for this table"
    last = previous[-1]
    if last["protocol"] == protocol:
        return f"yes: same protocol as {last['commit']} ({last['date']})"
    return f"yes: protocol changed since {last['commit']} ({last['date']})"


def record(
    table: str, commit: str, protocol: str, result: str, *, date: str | None = None,
    source: Path | None = None, doc: Path | None = None,
) -> dict[str, str]:
    """Append one evaluation to the ledger and re-render `docs/ledger.md`; returns the row.

    `table` is the results table's file name (`results_cpu.csv`), `commit` the commit holding it (`PENDING` when the
    table is not committed yet), `protocol` and `result` one line each (`protocol_of`, `headline`). Whether it is a
    re-evaluation is read from the table's earlier rows: any earlier row means these test prompts were seen before.
    """
    for name, value in (("table", table), ("commit", commit), ("protocol", protocol), ("result", result)):
        if not value.strip():
            raise MipoError(f"ledger.record: {name} is empty; say what was evaluated, where and how")
    source = source or csv_path()
    previous = [r for r in read(source) if r["table"] == table]
    row = {"date": date or datetime.date.today().isoformat(), "commit": commit, "table": table,
           "protocol": protocol, "result": result, "re_evaluation": _re_evaluation(previous, protocol)}
    with Path(source).open("a", newline="") as fh:
        csv.writer(fh, lineterminator="\n").writerow([row[c] for c in COLUMNS])
    update_doc(source, doc)
    return row


def _count(n: str, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == "1" else "s")


def _seed_list(seeds: Sequence[int]) -> str:
    return " ".join(str(s) for s in seeds)


def _cad(preset: Preset) -> str:
    return f"{preset.cad_alpha:g}" if preset.cad_alpha is not None else f"1/beta = {1 / preset.beta:g}"


def protocol_of(preset: Preset, seeds: Sequence[int]) -> str:
    """One line with the settings a results table's numbers depend on: task, prompts, seeds, training and decoding."""
    ngrams = f"no repeated {preset.eval_no_repeat_ngram}-grams" if preset.eval_no_repeat_ngram else "no n-gram rule"
    return (f"{preset.name} preset ({preset.task}, {preset.n_test_prompts} test prompts, dtype "
            f"{resolved_dtype(preset)}), seeds {_seed_list(seeds)}; MIPO {preset.epochs} epochs at learning rate "
            f"{preset.learning_rate:g}, SFT {preset.sft_epochs} epochs at {preset.sft_learning_rate:g}, CAD a = "
            f"{_cad(preset)}; token caps {preset.max_new_tokens} (sampling) / {preset.eval_max_new_tokens} "
            f"(evaluation), {ngrams}")


def headline(table_path: Path) -> str:
    """One line from a results table (`stats.RESULTS_COLUMNS`): each comparison of the table's first interval design
    with its rates, 95% CI and Holm p, then the designs used."""
    with Path(table_path).open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("kind") == "paired_difference"]
    if not rows:
        raise MipoError(f"{table_path} has no paired_difference rows; pass a results table (stats.write_results)")
    designs = list(dict.fromkeys(r["ci_design"] for r in rows))
    tasks = {r["task"] for r in rows}
    parts = []
    for r in (r for r in rows if r["ci_design"] == designs[0]):
        where = f"{r['task']}: " if len(tasks) > 1 else ""
        parts.append(f"{where}{r['method']} {render.pct(float(r['rate']))} vs {r['baseline']} "
                     f"{render.pct(float(r['baseline_rate']))}: "
                     f"{render.interval(float(r['diff']), float(r['diff_lo']), float(r['diff_hi']))}, "
                     f"Holm p {float(r['p_holm']):.2g} ({_count(r['n_seeds'], 'seed')} x {r['n']} prompts)")
    sensitivity = f"; sensitivity: {', '.join(designs[1:])}" if designs[1:] else ""
    return "; ".join(parts) + f" [95% CIs: {designs[0]}{sensitivity}]"


def ablation_headline(table_path: Path) -> str:
    """One line from notebook 06's variants table (`ablations_<preset>.csv`): each variant's rate and, for every
    variant but the references, its difference from the reference with the 95% CI."""
    with Path(table_path).open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "vs_reference" not in rows[0]:
        raise MipoError(f"{table_path} is not an ablations table (notebook 06's ablations_<preset>.csv)")
    references = [r for r in rows if not r["vs_reference"]]  # one run under each ablation's name for it
    parts = [f"reference ({', '.join(r['variant'] for r in references)}) {render.pct(float(references[0]['rate']))}"]
    parts += [f"{r['variant']} {render.pct(float(r['rate']))} (vs reference "
              f"{render.interval(float(r['vs_reference']), float(r['vs_reference_lo']), float(r['vs_reference_hi']))})"
              for r in rows if r["vs_reference"]]
    return "; ".join(parts) + f" ({_count(rows[0]['n_seeds'], 'seed')} x {rows[0]['n_examples']} prompts)"
