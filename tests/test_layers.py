"""The library's layout is its architecture: a core, then analysis, experiments and the workbook, imports only downward.

Every import between library modules (function-level ones included, found by walking each module's syntax tree) must
go to a module of a lower layer, or an earlier one of the same layer, in `LAYERS`. That rules out cycles and upward
imports at once, so a change to the core never needs the workbook's machinery, and `docs/architecture.md` stays true.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mipo_lib"

#: Layers from the bottom up; inside a layer, a module may import only the ones listed before it.
LAYERS: dict[str, tuple[str, ...]] = {
    "core": (
        "errors", "files", "hardware", "memory", "decode_memory", "generate", "scoring", "shared_prompt",
        "tasks.numbers", "tasks.base", "tasks.personalization", "tasks.arithmetic", "tasks.datasets", "tasks",
        "config", "models", "cache", "methods", "mi", "pairs", "dpo", "evaluate",
    ),
    "analysis": ("analysis", "analysis.render", "analysis.stats", "analysis.plots", "analysis.reasoning_plots",
                 "analysis.ablation_findings", "analysis.reasoning_findings"),
    "experiments": ("experiments", "experiments.pipeline", "experiments.tune", "experiments.ablation_epochs",
                    "experiments.heldout", "experiments.ablations", "experiments.reasoning", "experiments.launch_dpo", "experiments.ledger",
                    "experiments.constraints", "experiments.regime", "experiments.confirm"),
    "workbook": ("workbook", "workbook.environment", "workbook.publish", "workbook.readme", "workbook.editions",
                 "workbook.exercises", "workbook.grade", "workbook.runner", "__main__"),
}
ORDER = {name: i for i, name in enumerate(n for names in LAYERS.values() for n in names)}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts) or "__init__"


def imports(path: Path) -> set[str]:
    """The library modules `path` imports (`from mipo_lib.x import y` counts `x.y` when that is a module, else `x`)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "mipo_lib":
            base = node.module[len("mipo_lib"):].lstrip(".")
            for alias in node.names:
                sub = f"{base}.{alias.name}" if base else alias.name
                found.add(sub if sub in ORDER or not base else base)
        elif isinstance(node, ast.Import):
            found |= {a.name[len("mipo_lib."):] for a in node.names if a.name.startswith("mipo_lib.")}
    return {m for m in found if m}


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_has_a_place_in_the_layers():
    assert sorted(set(MODULES) - {"__init__"} - set(ORDER)) == [], "add new modules to LAYERS (and docs/architecture.md)"


@pytest.mark.parametrize("name", sorted(set(MODULES) - {"__init__"}))
def test_imports_go_only_downward(name):
    found = imports(MODULES[name]) - {name}
    assert sorted(found - set(ORDER)) == [], f"mipo_lib.{name} imports names that are no module of LAYERS"
    upward = sorted(m for m in found if ORDER[m] >= ORDER[name])
    assert upward == [], f"mipo_lib.{name} imports {upward}, which are not below it in LAYERS"


def test_the_check_catches_an_upward_import(tmp_path):
    bad = tmp_path / "mod.py"
    bad.write_text("def f():\n    from mipo_lib.experiments import pipeline\n    from mipo_lib import stats as s\n")
    assert imports(bad) == {"experiments.pipeline", "stats"}
    assert ORDER["experiments.pipeline"] > ORDER["evaluate"]  # so evaluate importing pipeline would fail above
