"""Atomic file writes: a result appears whole or not at all.

Every stage writes through `atomic` (a temporary file or folder renamed into place), so an interrupted run never
leaves a half-written result that a later run would take for a finished one. A leaf module: it imports nothing from
the library, so any module may use it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic(target: Path, *, directory: bool = False) -> Iterator[Path]:
    """A temporary file (or folder) next to `target` to write into; it becomes `target` in one rename when the block
    ends, and is removed if the block fails, so no reader ever sees a half-written result.

    A file replaces an older `target`. A folder is only renamed if `target` does not exist yet: when another process
    finished the same conversion first, its folder is kept and this one dropped.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    else:
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if not directory:
        os.replace(tmp, target)
    elif target.exists():
        _remove(tmp)
    else:
        tmp.rename(target)


def write_text(path: Path, text: str) -> None:
    """Write a text file atomically (see `atomic`)."""
    with atomic(path) as tmp:
        tmp.write_text(text)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
