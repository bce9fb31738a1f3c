"""What this machine is and which versions run: the environment cell at the top and the versions cell at the end
of every notebook."""

from __future__ import annotations

import importlib.metadata
import platform

STACK = ("torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate", "datasets", "pandas", "matplotlib", "mipo-lib")


def versions() -> dict[str, str]:
    """Installed versions of the stack (and Python), 'not installed' where missing."""
    out = {"python": platform.python_version()}
    for name in STACK:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def versions_table() -> str:
    """A plain two-column table for the last cell of each notebook."""
    rows = versions()
    width = max(map(len, rows))
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows.items())
