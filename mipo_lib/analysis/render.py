"""Sentences and table cells rendered from result-table rows: the one template layer of the workbook's prose.

Every sentence the workbook publishes about a result (the conclusions files of notebooks 06 and 07, notebook 06's
section 8, the README's generated blocks) is a template filled from a table row; no sentence is ever read back to
find a number. A comparison row (`stats.COMPARISON_COLUMNS`) carries its numbers (`estimate`, `lo`, `hi`, `scale`,
`unit`, `digits`), its test (`design`, `p_value`, `p_holm`, `family`, `family_size`) and its verdict
(`detectable`, `deterministic`), so the wording that depends on a verdict is chosen by those columns and the sign of
the estimate, and the statistics stay in `stats`. Rows may be dicts or pandas rows; missing values are NaN.

>>> row = {"comparison": "MIPO - SFT", "estimate": 0.05, "lo": 0.01, "hi": 0.09, "unit": "points", "scale": 100,
...        "digits": 1, "up": "gain", "down": "loss", "design": "crossed", "p_value": 0.02, "p_holm": 0.06,
...        "family": "main", "family_size": 3, "n_seeds": 3, "n_examples": 100, "deterministic": False,
...        "detectable": False}
>>> difference(row)
'MIPO - SFT: +5.0 points [95% CI +1.0, +9.0]; Holm-adjusted p = 0.06 over the 3 comparisons of "main": no detectable effect at this size (its unadjusted CI excludes 0) (3 seeds x 100 examples).'
>>> claim(row)
'+5.0 points [+1.0, +9.0], no detectable effect'
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

#: The design of a CI computed over per-seed values with Student's t (`stats.seed_interval`).
SEEDS_DESIGN = "t over seeds"


def _number(row: Mapping[str, Any], key: str) -> float:
    """A row's value as a float (NaN when absent or empty)."""
    value = row.get(key)
    try:
        return float(value) if value is not None else math.nan
    except (TypeError, ValueError):
        return math.nan


def _finite(*values: float) -> bool:
    return all(math.isfinite(v) for v in values)


def _flag(row: Mapping[str, Any], key: str) -> bool:
    """A boolean column as written by pandas (True/False, or their text after a CSV round trip)."""
    value = row.get(key)
    return str(value).strip().lower() == "true" if isinstance(value, str) else bool(value) and value == value


def p_text(p: float) -> str:
    """Relation and p-value as written in a verdict: "= 0.012" (two significant digits), or "< 0.001"."""
    return "< 0.001" if p < 0.001 else f"= {p:.2g}"


def _digits(row: Mapping[str, Any]) -> int:
    """The row's decimals, raised for tiny values so that "+0.0" never hides a difference."""
    digits, scale = int(_number(row, "digits")), _number(row, "scale")
    biggest = max(abs(scale * _number(row, k)) for k in ("estimate", "lo", "hi"))
    while 0 < biggest < 10 ** (1 - digits) and digits < 6:
        digits += 1
    return digits


def _value_and_ci(row: Mapping[str, Any], ci_label: str) -> str:
    """`+5.0 points [95% CI +1.0, +9.0]` (or `[+1.0, +9.0]` when `ci_label` is empty)."""
    digits, scale = _digits(row), _number(row, "scale")
    mean, lo, hi = (f"{scale * _number(row, k):+.{digits}f}" for k in ("estimate", "lo", "hi"))
    unit = f" {row['unit']}" if isinstance(row.get("unit"), str) and row["unit"] else ""
    return f"{mean}{unit} [{ci_label}{lo}, {hi}]"


def _size(row: Mapping[str, Any]) -> str:
    """` (3 seeds x 100 examples)`, from the row's counts (either may be missing)."""
    parts = []
    seeds, examples = _number(row, "n_seeds"), _number(row, "n_examples")
    if math.isfinite(seeds):
        parts.append(f"{int(seeds)} seed{'' if int(seeds) == 1 else 's'}")
    if math.isfinite(examples):
        parts.append(f"{int(examples)} examples")
    return f" ({' x '.join(parts)})" if parts else ""


def _one_seed(row: Mapping[str, Any]) -> bool:
    """A CI over seeds computed from one seed: there is no CI, so there is no verdict."""
    return row.get("design") == SEEDS_DESIGN and _number(row, "n_seeds") < 2


def direction(row: Mapping[str, Any]) -> str:
    """What the row calls a difference of its sign: its `up` word for a positive estimate, else its `down` word."""
    return str(row["up"] if _number(row, "estimate") > 0 else row["down"])


def difference(row: Mapping[str, Any]) -> str:
    """One sentence for a comparison row: the estimate with its 95% CI, the test, the verdict and the sample size.

    The verdict is the row's `detectable` column (Holm-adjusted p < 0.05 within its family, see
    `stats.comparison_row`), its word the row's `up` or `down` by the sign of the estimate; otherwise "no detectable
    effect at this size" (not "no effect": a small effect may hide in a wide CI). A CI over one seed, or over
    deterministic methods (identical in every seed), gives no verdict.
    """
    name = row["comparison"]
    if not _finite(*(_number(row, k) for k in ("estimate", "lo", "hi"))):
        return f"{name}: not computable (no finite values)."
    head, size = f"{name}: {_value_and_ci(row, '95% CI ')}", _size(row)
    if _one_seed(row):
        return f"{head}; one seed only, so no CI over seeds: no conclusion{size}."
    if _flag(row, "deterministic"):
        return (f"{head}; both sides are identical in every seed (deterministic methods), so the CI over seeds is "
                f"degenerate: one measured difference, no verdict{size}.")
    detectable = _flag(row, "detectable")
    p_holm, p = _number(row, "p_holm"), _number(row, "p_value")
    if math.isfinite(p_holm) or math.isfinite(p):
        if math.isfinite(p_holm) and _number(row, "family_size") > 1:
            test = (f"Holm-adjusted p {p_text(p_holm)} over the {int(_number(row, 'family_size'))} comparisons of "
                    f"\"{row['family']}\"")
        else:
            test = f"p {p_text(p_holm if math.isfinite(p_holm) else p)} (one comparison, nothing to adjust)"
        if detectable:
            return f"{head}; {test}: a detectable {direction(row)}{size}."
        lo, hi = _number(row, "lo"), _number(row, "hi")
        note = " (its unadjusted CI excludes 0)" if lo > 0 or hi < 0 else ""
        return f"{head}; {test}: no detectable effect at this size{note}{size}."
    if detectable:
        return f"{head}; the CI excludes 0: a detectable {direction(row)}{size}."
    return f"{head}; the CI includes 0: no detectable effect at this size{size}."


def verdict(row: Mapping[str, Any]) -> str:
    """The short verdict of a comparison row: "a detectable gain", "no detectable effect" or "no verdict (...)"."""
    if _one_seed(row) or _flag(row, "deterministic"):
        return "no verdict (one seed, or deterministic on both sides)"
    return f"a detectable {direction(row)}" if _flag(row, "detectable") else "no detectable effect"


def claim(row: Mapping[str, Any]) -> str:
    """A comparison as a clause: `+5.0 points [+1.0, +9.0], a detectable gain`."""
    return f"{_value_and_ci(row, '')}, {verdict(row)}"


def is_detectable(row: Mapping[str, Any], sign: int = 0) -> bool:
    """Whether the row's verdict is a detectable difference, of that `sign` (+1, -1; 0: either)."""
    if not _flag(row, "detectable") or _one_seed(row) or _flag(row, "deterministic"):
        return False
    estimate = _number(row, "estimate")
    return sign == 0 or (estimate > 0 if sign > 0 else estimate < 0)


# ---------------------------------------------------------------------------------------------- numbers as text
def pct(x: float, digits: int = 1) -> str:
    """A share in [0, 1] as a percentage: `47.3%`."""
    return f"{100 * x:.{digits}f}%"


def points(x: float, digits: int = 1) -> str:
    """A difference of shares in percentage points, signed: `+24.3`."""
    return f"{100 * x:+.{digits}f}"


def interval(value: float, lo: float, hi: float, *, scale: float = 100.0, digits: int = 1, sign: bool = True) -> str:
    """`value [lo, hi]` at `scale`, or "—" when the value is missing (a table cell with nothing to show)."""
    if not math.isfinite(value):
        return "—"
    f = f"{{:{'+' if sign else ''}.{digits}f}}"
    return f"{f.format(scale * value)} [{f.format(scale * lo)}, {f.format(scale * hi)}]"


def duration(seconds: float) -> str:
    """A wall time as a table reads it: `11 s`, `10.4 min` (under 20 minutes), `25 min`, `6 h 7 min`."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 20 * 60:
        return f"{seconds / 60:.1f} min"
    return whole_minutes(seconds)


def whole_minutes(seconds: float) -> str:
    """`18 min`, `60 min`, `3 h 52 min`: whole minutes, with hours above one hour."""
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60} min" if minutes > 60 else f"{minutes} min"


def minutes_and_seconds(seconds: float) -> str:
    """`44 min 0 s`: a total measured to the second."""
    whole = round(seconds)
    return f"{whole // 60} min {whole % 60} s"


def plain_seconds(seconds: float) -> str:
    """`1,473 s`."""
    return f"{seconds:,.0f} s"


def gigabytes(megabytes: float) -> str:
    """Resident memory in MiB (as the runner records it) as `3.3 GB`."""
    return f"{megabytes / 1024:.1f} GB"


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """A markdown table's lines: the header, its rule, then one line per row of cells."""
    return [f"| {' | '.join(header)} |", "|" + "---|" * len(header), *(f"| {' | '.join(r)} |" for r in rows)]
