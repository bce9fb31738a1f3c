"""Figures: one style, saved as png + pdf through `savefig`, with a caption that states what the reader must know.

Reference figures of the default preset (`cpu`) go to the repository's `figures/`; any other preset writes to
`runs/<preset>/figures/`, so a smoke run or a test never overwrites the committed reference. `MIPO_FIGURES_DIR`
overrides both.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mipo_lib.config import Preset, repo_root, run_dir

REFERENCE_PRESET = "cpu"
PALETTE = {
    "base (no context)": "#9e9e9e",
    "prompting": "#4c72b0",
    "SFT": "#dd8452",
    "MIPO": "#55a868",
    "CAD": "#8172b3",
}


def figures_dir(preset: Preset | str) -> Path:
    """Where a preset's figures go (see the module docstring)."""
    env = os.environ.get("MIPO_FIGURES_DIR")
    name = preset if isinstance(preset, str) else preset.name
    if env:
        path = Path(env)
    elif name == REFERENCE_PRESET:
        path = repo_root() / "figures"
    else:
        path = run_dir(name, "figures")
    path.mkdir(parents=True, exist_ok=True)
    return path


def apply_style() -> None:
    """The workbook's one plotting style (seaborn whitegrid, readable sizes, no top/right spines)."""
    import matplotlib as mpl
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook")
    mpl.rcParams.update({"figure.dpi": 100, "savefig.dpi": 150, "axes.spines.top": False, "axes.spines.right": False})


def savefig(fig: Any, name: str, preset: Preset | str, caption: str | None = None) -> Path:
    """Save `fig` as `<name>.png` and `<name>.pdf`; a caption is drawn under the axes so it travels with the file.

    Returns the png path. Metadata dates are dropped so a rerun with equal numbers gives an identical pdf.
    """
    out = figures_dir(preset)
    if caption:
        fig.text(0.01, 0.005, caption, ha="left", va="bottom", fontsize=7.5, wrap=True, color="#333333")
        fig.subplots_adjust(bottom=max(fig.subplotpars.bottom, 0.08 + 0.035 * caption.count("\n")))
    png = out / f"{name}.png"
    fig.savefig(png, bbox_inches="tight", metadata={"Software": None})
    fig.savefig(out / f"{name}.pdf", bbox_inches="tight", metadata={"CreationDate": None, "Producer": None, "Creator": None})
    return png
