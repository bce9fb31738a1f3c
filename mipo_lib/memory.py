"""Resident memory of this process, stage by stage: what a laptop (or Colab's CPU runtime) must hold.

A notebook kernel that trains and evaluates several models grows: Python frees a model's tensors, but the C
allocator keeps the pages, so the kernel's resident size is the high-water mark of everything it ever did. `stage`
measures one stage at a time, in the process that runs it (the kernel, not summed with the runner):
- before the stage, it returns what earlier stages freed to the system (`gc.collect`, then glibc's `malloc_trim`), so
  a stage is not charged for its predecessors' leftovers;
- it resets the kernel's peak resident size (Linux: writing 5 to /proc/self/clear_refs resets VmHWM) and reads it
  after the stage; where that is not possible (macOS), a thread samples the resident size every 20 ms instead;
- it records (stage, peak MB, seconds) in `recorded()` and, when the runner set `MIPO_MEMORY_LOG`, appends the row
  with the notebook's name to that CSV (`runs/<preset>/notebooks/memory.csv`).
A leaf module: psutil and the standard library only.
"""

from __future__ import annotations

import csv
import ctypes
import gc
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

#: Set by the runner for each notebook's kernel: the CSV that collects every stage's row, and the notebook's name.
LOG_ENV, NOTEBOOK_ENV = "MIPO_MEMORY_LOG", "MIPO_MEMORY_NOTEBOOK"
COLUMNS = ("notebook", "stage", "peak_rss_mb", "seconds")
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass(frozen=True)
class StageMemory:
    notebook: str
    stage: str
    peak_rss_mb: float
    seconds: float


_RECORDED: list[StageMemory] = []


def recorded() -> list[StageMemory]:
    """Every stage measured in this process so far, in order."""
    return list(_RECORDED)


def rss_mb() -> float:
    """This process's resident size now, in MB (2**20 bytes)."""
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def release_freed_memory() -> None:
    """Give back to the system what Python has freed: collect cycles, then trim glibc's heap (a no-op elsewhere)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _high_water_mb() -> float | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def _reset_high_water() -> bool:
    """Reset the kernel's peak resident size to the current one; False where the system cannot."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return _high_water_mb() is not None


class _Sampler:
    """The peak resident size seen by a thread sampling every `interval` seconds (where VmHWM cannot be reset)."""

    def __init__(self, interval: float = 0.02) -> None:
        self.peak = rss_mb()
        self._interval, self._stop = interval, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.peak = max(self.peak, rss_mb())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak, rss_mb())


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Measure the peak resident memory of the block (see the module docstring) and record it as stage `name`."""
    release_freed_memory()
    exact = _reset_high_water()
    sampler = None if exact else _Sampler()
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds = time.perf_counter() - start
        peak = (_high_water_mb() or 0.0) if exact else sampler.stop()  # type: ignore[union-attr]
        row = StageMemory(os.environ.get(NOTEBOOK_ENV, ""), name, round(peak, 1), round(seconds, 2))
        _RECORDED.append(row)
        _append(row)


def _append(row: StageMemory) -> None:
    log = os.environ.get(LOG_ENV)
    if not log or os.environ.get("RANK", "0") != "0":  # under `accelerate launch`, the main process writes the log
        return
    path = Path(log)
    new = not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow(asdict(row))
