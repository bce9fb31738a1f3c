"""The committed notebooks show the reference run's outputs, so a reader on GitHub sees results without running them.

After a reference run (`make reproduce` on the `cpu` preset) the runner calls `publish` for each executed notebook:
the committed notebook stays the source of truth for every cell's code and text, and takes from the executed copy
(`runs/cpu/notebooks/<name>.ipynb`) only each cell's outputs and execution count, matched by cell id. On the way,
outputs are sanitized: machine paths become `<repo>`, `<runs>` and `~`, and object addresses and stderr (progress
bars, library warnings) are dropped. (The notebooks are the student edition: they hold no solutions to print.)
nbval (`--nbval-lax`) keeps running smoke copies of these notebooks and compares only `NBVAL_CHECK_OUTPUT` cells:
those keep their committed outputs, which only a deliberate edit changes.
"""

from __future__ import annotations

import copy
import hashlib
import re
from pathlib import Path
from typing import Any

from mipo_lib.config import repo_root, runs_dir
from mipo_lib.errors import MipoError

CHECKED = "NBVAL_CHECK_OUTPUT"  # cells whose committed output nbval compares against every smoke run


def _paths() -> list[tuple[str, str]]:
    """(absolute prefix, placeholder), longest first, so a runs folder inside the repo reads `<runs>`, not `<repo>/runs`."""
    pairs = [(str(runs_dir().resolve()), "<runs>"), (str(runs_dir()), "<runs>"), (str(repo_root()), "<repo>"),
             (str(Path.home()), "~")]
    return sorted({p for p in pairs if p[0] not in ("", "/")}, key=lambda p: -len(p[0]))


#: An object's memory address in its repr (`<pandas.io.formats.style.Styler at 0x7f81400bcb50>`): new on every run.
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+>")


def _clean_text(text: str, paths: list[tuple[str, str]]) -> str:
    """`text` with machine paths replaced by placeholders and object addresses dropped, so a rerun with the same
    results leaves the committed notebook's lines unchanged."""
    for prefix, placeholder in paths:
        text = text.replace(prefix, placeholder)
    return _ADDRESS.sub(">", text)


def _clean_value(value: Any, paths: list[tuple[str, str]]) -> Any:
    if isinstance(value, str):
        return _clean_text(value, paths)
    if isinstance(value, list):
        return [_clean_value(v, paths) for v in value]
    return value


#: The id pandas' Styler gives each rendered table (`T_` and 5 random hex digits), in its CSS and in its cells.
_STYLER_ID = re.compile(r"T_([0-9a-f]{5})(?![0-9a-f])")


def stable_styler_ids(html: str) -> str:
    """`html` with each Styler table id replaced by a digest of the table itself.

    Why: the id is random per render, so every reference run would otherwise rewrite every styled table's lines in
    git, results unchanged. A digest keeps ids equal when the table is, and different tables (whose CSS must not
    mix) apart.
    """
    for found in dict.fromkeys(_STYLER_ID.findall(html)):
        digest = hashlib.sha1(html.replace(f"T_{found}", "T_").encode()).hexdigest()[:5]
        html = re.sub(rf"T_{found}(?![0-9a-f])", f"T_{digest}", html)
    return html


def sanitize_outputs(outputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Outputs without machine paths, without stderr (progress bars, weight loading, warnings) and with stable
    table ids (`stable_styler_ids`)."""
    paths, kept = _paths(), []
    for out in copy.deepcopy(outputs):
        if out.get("output_type") == "stream":
            text = "".join(out.get("text", "")) if isinstance(out.get("text"), list) else out.get("text", "")
            if out.get("name") == "stderr":  # progress bars and library warnings: noise to a reader, not results
                continue
            out["text"] = _clean_text(text, paths)
        elif "data" in out:
            out["data"] = {mime: (v if mime.startswith("image/") else _clean_value(v, paths)) for mime, v in out["data"].items()}
            if "text/html" in out["data"]:
                html = out["data"]["text/html"]
                html = "".join(html) if isinstance(html, list) else html
                out["data"]["text/html"] = stable_styler_ids(html).splitlines(keepends=True)
        elif out.get("output_type") == "error":
            out["traceback"] = [_clean_text(line, paths) for line in out.get("traceback", [])]
        kept.append(out)
    return kept


def merge_outputs(committed: Any, executed: Any) -> Any:
    """`committed` (an nbformat notebook) with each code cell's outputs and execution count from the executed copy's
    cell of the same id; cells the executed copy lacks get none; `NBVAL_CHECK_OUTPUT` cells keep
    their committed outputs."""
    ran = {c.get("id"): c for c in executed.cells if c.get("cell_type") == "code"}
    out = copy.deepcopy(committed)
    for cell in out.cells:
        if cell.cell_type != "code":
            continue
        source = ran.get(cell.get("id"))
        if CHECKED in cell.source:  # nbval's regression truth: only a deliberate edit changes it, never a run
            continue
        if source is None:
            cell.outputs, cell.execution_count = [], None
            continue
        cell.outputs = sanitize_outputs(source.get("outputs", []))
        cell.execution_count = source.get("execution_count")
    return out


def publish(executed_path: Path, target: Path | None = None) -> Path:
    """Write the reference outputs of `executed_path` into the committed notebook of the same name (or `target`)."""
    import nbformat

    executed_path = Path(executed_path)
    target = Path(target) if target is not None else repo_root() / "notebooks" / executed_path.name
    if not target.exists():
        raise MipoError(f"no committed notebook {target.name} to publish {executed_path} into")
    executed = nbformat.read(str(executed_path), as_version=4)
    committed = nbformat.read(str(target), as_version=4)
    nbformat.write(merge_outputs(committed, executed), str(target))
    return target
