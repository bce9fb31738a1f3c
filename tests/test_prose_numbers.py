"""Numbers in prose come from the data: no markdown cell of a notebook types a measured number.

The workbook's rule: every number a reader sees in prose is computed in a cell (an f-string rendered with
`IPython.display.Markdown` from that notebook's results, so it is an *output*, never typed) or is a constant. Typed
pilot numbers drift: notebook 02 once said "22.5% for positives vs 2.5%" beside a figure showing about 20% vs 17%.

The scan looks at every markdown cell's source (code-cell outputs are the computed form and are not scanned) for
  * percentages: `22.5%`, `40 %`, `-3%`;
  * decimals: `0.52`, `+9.3`, `1.29 s`, `1.95x`, `.5`.
Integers (`3 seeds`, `100 prompts`, `log 2`) are design sizes and formula constants, and are not scanned. LaTeX math
is scanned like the rest: the decimal constants of formulas are in the allow-list below, and hyperparameter settings
(`$\\beta = 0.1$`, `temperature 0.1`) are constants of the run, not results. Link targets, bare URLs, HTML comments
and version numbers (`2.13.0`, `torch 2.13`) are skipped. Paper-reported numbers are not constants: read them from
`data/reported_gains.csv` in a code cell (`stats.load_reported_gains`).
"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))

# Temporary: these notebooks' owner is rewriting their prose; remove the entry once a notebook passes.
BEING_REWORKED: set[str] = set()

# ----------------------------------------------------------------------------------------------- allow-list
# Constants a reader may see typed, each with why it is not a measurement. Keep this short: a typed result that
# happens to equal one of these (a measured 0.05) slips through, so only values that are almost always constants.
ALLOWED = {
    "0.6931": "log 2: the DPO loss at initialisation and the InfoNCE ceiling of one negative",
    "0.693": "log 2, three decimals",
    "0.05": "the significance level of every verdict (Holm-adjusted p < 0.05)",
    "1.96": "the normal quantile of a 95% interval (notebook 05's normal approximation)",
}
# Constants that are allowed only next to the words that make them constants (regex searched in the same sentence).
ALLOWED_IN_CONTEXT = {
    "95%": (r"\bCIs?\b|confidence|bootstrap|interval", "the level of every confidence interval"),
    "2.5%": (r"percentile", "the lower percentile of a 95% percentile-bootstrap interval"),
    "97.5%": (r"percentile", "the upper percentile of a 95% percentile-bootstrap interval"),
    "0.5": (r"\bchance\b", "chance level of an AUC or a pairwise accuracy"),
}
# A hyperparameter set by the workbook (beta, sampling temperature, top-p), and a list of such values after it:
# "$\beta = 0.1$", "$\beta$ = 0.05, 0.3", "beta = 0.05, 0.1, 0.3", "temperature 0.1 and top-p 0.9".
_NUM = r"[+\-−]?\d*\.?\d+"
HYPERPARAMETER = re.compile(
    rf"(?:\\beta|β|\bbeta\b|\btemperature\b|\btop-p\b|\btop_p\b)\$?\s*(?:=|of|is)?\s*\$?\s*"
    rf"({_NUM}(?:\s*(?:,|and|or|to)\s*{_NUM})*)")
VERSION = re.compile(r"\b\d+\.\d+\.\d+\b|(?i:\b(?:python|torch|transformers|trl|peft|bitsandbytes|accelerate|datasets|"
                     r"pandas|matplotlib|numpy|version|v)\s*\d+\.\d+\b)")
# A number: an optional sign, digits with an optional decimal part, an optional percent sign.
NUMBER = re.compile(r"(?<![\w.])([+\-−±]?)(\d*\.\d+|\d+)(?![\d.]*\d)(\s?\\?%)?")  # LaTeX writes 63\%


def _strip(markdown: str) -> str:
    """Remove what a reader does not see as typed prose: generated spans (`<!-- kind:key -->...<!-- /kind -->`, rendered
    from committed tables by `python -m mipo_lib readme`), link targets, bare URLs, HTML comments and tags."""
    text = re.sub(r"<!-- ([a-z-]+):[^>]*-->.*?<!-- /\1 -->", " ", markdown, flags=re.S)
    text = re.sub(r"<!--.*?-->", " ", text, flags=re.S)
    text = re.sub(r"\]\([^)]*\)", "]", text)                   # [label](target): keep the label
    text = re.sub(r"https?://\S+", " ", text)
    return re.sub(r"<[^>]+>", " ", text)


def _sentence(text: str, start: int, end: int) -> str:
    left = max(text.rfind(". ", 0, start), text.rfind("\n\n", 0, start), text.rfind("|", 0, start), -1)
    stops = [i for i in (text.find(". ", end), text.find("\n\n", end), text.find("|", end)) if i != -1]
    return text[left + 1: min(stops) if stops else len(text)]


def typed_numbers(markdown: str) -> list[str]:
    """The percentages and decimals a markdown source types, minus the allowed constants."""
    text = _strip(markdown)
    skip = [m.span() for m in VERSION.finditer(text)] + [m.span(1) for m in HYPERPARAMETER.finditer(text)]
    found = []
    for m in NUMBER.finditer(text):
        sign, digits, percent = m.group(1), m.group(2), m.group(3)
        if not percent and "." not in digits:
            continue                                           # an integer: a size or a formula constant
        start = m.start(2)
        if any(a <= start < b for a, b in skip):
            continue
        if not sign and start >= 2 and text[start - 1] in "-−" and text[start - 2].isalnum():
            continue                                           # inside an identifier: Qwen2.5-1.5B-Instruct
        token = digits + ("%" if percent else "")
        if token in ALLOWED:
            continue
        if token in ALLOWED_IN_CONTEXT and re.search(ALLOWED_IN_CONTEXT[token][0], _sentence(text, m.start(), m.end())):
            continue
        found.append(m.group(0).strip())
    return found


def offending_cells(nb) -> list[tuple[int, str]]:
    """(cell index, token) for every typed number in the notebook's markdown cells."""
    return [(i, tok) for i, cell in enumerate(nb.cells) if cell.cell_type == "markdown"
            for tok in typed_numbers(cell.source)]


def _params():
    for path in NOTEBOOKS:
        marks = ([pytest.mark.xfail(strict=False, reason="owner: notebooks 00/04/05 being reworked")]
                 if path.name[:2] in BEING_REWORKED else [])
        yield pytest.param(path, id=path.stem, marks=marks)


def test_all_notebooks_are_scanned():
    assert len(NOTEBOOKS) == 8, [p.name for p in NOTEBOOKS]


@pytest.mark.parametrize("path", list(_params()))
def test_markdown_cells_type_no_measured_numbers(path):
    nb = nbformat.read(path, as_version=4)
    bad = offending_cells(nb)
    assert not bad, f"{path.name}: typed numbers in markdown (compute them in a cell and render with Markdown):\n" + \
        "\n".join(f"  cell {i}: {tok!r}" for i, tok in bad)


# ------------------------------------------------------------------------------------------ the scanner itself
def _fake(*cells):
    nb = nbformat.v4.new_notebook()
    for cell in cells:
        nb.cells.append(cell)
    return nb


def test_a_typed_result_is_flagged():
    nb = _fake(nbformat.v4.new_markdown_cell("# Results"),
               nbformat.v4.new_markdown_cell("MIPO reached 39.3% on the test set."))
    assert offending_cells(nb) == [(1, "39.3%")]


def test_an_allowed_constant_passes_and_computed_outputs_are_not_scanned():
    code = nbformat.v4.new_code_cell("display(Markdown(f'MIPO reached {rate:.1%}'))")
    code.outputs = [nbformat.v4.new_output("display_data", data={"text/markdown": "MIPO reached 39.3%"})]
    nb = _fake(nbformat.v4.new_markdown_cell("At initialisation the loss is $\\log 2 = 0.6931$, with $\\beta=0.1$."),
               code)
    assert offending_cells(nb) == []


@pytest.mark.parametrize("text,tokens", [
    ("the pilot measured 22.5% for positives vs 2.5% for negatives", ["22.5%", "2.5%"]),
    ("+9.3 nats for positives, -9.5 for negatives, 100% of pairs", ["+9.3", "-9.5", "100%"]),
    ("the margin reaches about 0.7 and one step takes 1.29 s", ["0.7", "1.29"]),
    ("win-or-tie 40 % but CAD took 1.95x the time", ["40 %", "1.95"]),
    ("a formula is no hiding place: $I_0(X;Y) = 0.37$ nats", ["0.37"]),
    ("95% of pairs agree", ["95%"]),                                  # 95% is allowed only as a CI level
    ("in LaTeX, $1 - 1/e \\approx 63\\%$", ["63\\%"]),
    ("an AUC of 0.5 here", ["0.5"]),                                  # 0.5 only as chance
])
def test_scanner_flags(text, tokens):
    assert typed_numbers(text) == tokens


@pytest.mark.parametrize("text", [
    "3 seeds x 100 held-out prompts, LoRA r=8, 2 epochs",
    "Qwen2.5-1.5B-Instruct in 4-bit",
    "tested with torch 2.13.0 and Python 3.11",
    "a 95% crossed bootstrap CI; Holm-adjusted p < 0.05",
    "$\\beta$ = 0.05, 0.3 and temperature 0.1, top-p 0.9",
    "read the 2.5% and 97.5% percentiles",
    "AUC 0.5: no better than chance",
    "[the paper](https://arxiv.org/abs/2411.01234) <!-- 12.5% -->",
    "$\\hat p \\pm 1.96\\sqrt{\\hat p(1-\\hat p)/n}$ and $e^{-1}$, $10^{-6}$",
])
def test_scanner_passes(text):
    assert typed_numbers(text) == []
