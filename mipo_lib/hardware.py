"""The machine: which device runs the work and in what precision (a leaf module, no library imports but errors).

- device: CUDA if present, else CPU;
- dtype: bf16 on GPUs that support it, fp16 on older GPUs (a T4 has no bf16), bf16 on CPUs with native bf16
  instructions (AVX512-BF16/AMX), else fp32 (emulated bf16 on an AVX2 CPU is ~5x slower than fp32 here).
"""

from __future__ import annotations

from pathlib import Path

import torch

from mipo_lib.errors import MipoError


def select_device(requested: str | None = None) -> torch.device:
    """CUDA when available (or when asked), else CPU."""
    if requested:
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise MipoError("device 'cuda' was asked for but no CUDA GPU is visible; use device='cpu' or preset 'cpu'")
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_has_native_bf16() -> bool:
    """True where the CPU has bf16 instructions; elsewhere torch emulates bf16 and fp32 is much faster."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def select_dtype(device: torch.device, requested: str = "auto") -> torch.dtype:
    """Compute dtype for a device. `requested` may force one of float32/float16/bfloat16."""
    if requested != "auto":
        try:
            return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[requested]
        except KeyError:
            raise MipoError(f"unknown dtype {requested!r}; use auto, float32, float16 or bfloat16") from None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
