"""What this machine is and which versions run: the environment cell at the top and the versions cell at the end
of every notebook, and the Colab install cell's source of truth (`requirements-colab.txt`, `REPO`)."""

from __future__ import annotations

import importlib.metadata
import platform
from pathlib import Path

from mipo_lib.config import repo_root

#: The one place the repository's address lives (badges and the Colab install cell are checked against it).
REPO = "mipo-workbook/mipo-workbook"
STACK = ("torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate", "datasets", "pandas", "matplotlib", "mipo-lib")


def colab_badge(notebook: str) -> str:
    """Markdown for the 'Open in Colab' badge of `notebooks/<notebook>`."""
    url = f"https://colab.research.google.com/github/{REPO}/blob/main/notebooks/{notebook}"
    return f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({url})"


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
    from mipo_lib.models import check_4bit_backend, select_device

    try:
        check_4bit_backend(select_device())
        return True, "ok"
    except MipoError as exc:
        return False, str(exc)


def recommend_preset(gpu_memory_gb: float | None) -> str:
    """`cpu` without a GPU, `t4` on a 12-20 GB GPU (free Colab), `paper` on 24 GB or more."""
    if gpu_memory_gb is None:
        return "cpu"
    if gpu_memory_gb >= 23:
        return "paper"
    return "t4"


def environment_report() -> str:
    """Device, GPU memory, bf16 support, 4-bit support, version mismatches and the preset that fits this machine."""
    import torch

    from mipo_lib.models import select_device, select_dtype

    device = select_device()
    lines = [f"device: {device.type}"]
    gpu_gb = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        gpu_gb = props.total_memory / 2**30
        lines += [f"GPU: {props.name}, {gpu_gb:.1f} GiB", f"bf16 supported: {torch.cuda.is_bf16_supported()}"]
    else:
        lines.append(f"CPU threads: {torch.get_num_threads()}")
    dtype = select_dtype(device)
    lines.append(f"compute dtype: {str(dtype).replace('torch.', '')}" + (" (no bf16 here: LoRA weights stay fp32)" if dtype == torch.float16 else ""))
    ok, why = four_bit_works()
    lines.append(f"bitsandbytes 4-bit: {'works' if ok else 'unavailable - ' + why}")
    mismatches = version_mismatches()
    lines.append("versions: as tested" if not mismatches else "WARNING versions differ from requirements-colab.txt: " + "; ".join(mismatches))
    lines.append(f"recommended preset: {recommend_preset(gpu_gb)}")
    return "\n".join(lines)
