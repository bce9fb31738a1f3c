"""The machine: which device runs the work and in what precision (a leaf module, no library imports but errors).

- device: CUDA if present, else Apple's MPS (an Apple-silicon Mac), else CPU;
- dtype ("auto"): bf16 on GPUs with *native* bf16 (compute capability 8.0 or newer: A100, RTX 30xx/40xx, H100), fp16
  on older GPUs (a T4 is sm 7.5: `torch.cuda.is_bf16_supported()` says True there, because by default it counts
  emulation, which trains at a fraction of fp16's speed), fp32 on MPS (fp16 training there needs loss scaling and
  bf16 depends on the macOS version; a 135M-1B model fits in fp32 on any Apple-silicon Mac), bf16 on CPUs with
  native bf16 instructions (AVX512-BF16/AMX), else fp32 (emulated bf16 on an AVX2 CPU is ~5x slower than fp32).
"""

from __future__ import annotations

from pathlib import Path

import torch

from mipo_lib.errors import MipoError

#: The first CUDA compute capability with bf16 in hardware (Ampere). Below it (T4: 7.5, V100: 7.0) bf16 is emulated.
NATIVE_BF16_CAPABILITY: tuple[int, int] = (8, 0)


def mps_available() -> bool:
    """True on an Apple-silicon Mac whose torch build has the MPS backend."""
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def select_device(requested: str | None = None) -> torch.device:
    """CUDA when available, else MPS on an Apple-silicon Mac, else CPU; `requested` forces one ("cpu", "cuda", "mps")."""
    if requested:
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise MipoError("device 'cuda' was asked for but no CUDA GPU is visible; use device='cpu' or preset 'cpu'")
        if requested == "mps" and not mps_available():
            raise MipoError("device 'mps' was asked for but this torch has no MPS backend (Apple silicon only); use device='cpu'")
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("mps" if mps_available() else "cpu")


def cpu_has_native_bf16() -> bool:
    """True where the CPU has bf16 instructions; elsewhere torch emulates bf16 and fp32 is much faster."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cuda_has_native_bf16(device: torch.device) -> bool:
    """True on GPUs that compute in bf16 in hardware (compute capability >= 8.0). Not `torch.cuda.is_bf16_supported()`:
    its default `including_emulation=True` answers True on a T4, which would then train in slow emulated bf16."""
    return tuple(torch.cuda.get_device_capability(device)) >= NATIVE_BF16_CAPABILITY


def select_dtype(device: torch.device, requested: str = "auto") -> torch.dtype:
    """Compute dtype for a device (see the module docstring). `requested` may force float32/float16/bfloat16."""
    if requested != "auto":
        try:
            return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[requested]
        except KeyError:
            raise MipoError(f"unknown dtype {requested!r}; use auto, float32, float16 or bfloat16") from None
    if device.type == "cuda":
        return torch.bfloat16 if cuda_has_native_bf16(device) else torch.float16
    if device.type == "mps":
        return torch.float32
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def check_4bit_device(device: torch.device) -> None:
    """bitsandbytes quantizes on CUDA and on the CPU only: on a Mac, say so before any download or probe."""
    if device.type == "mps":
        raise MipoError("4-bit NF4 (bitsandbytes) runs on CUDA GPUs and CPUs, not on Apple's MPS; set load_in_4bit=false "
                        "(the cpu preset does; a Mac runs it in fp32 on MPS) or device='cpu'")
