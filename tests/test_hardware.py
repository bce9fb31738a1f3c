"""Device and dtype choices for machines CI does not have: a T4, an Ampere/Hopper GPU, an Apple-silicon Mac.

Each test fakes what torch reports (compute capability, CUDA or MPS availability), so the choice a user's machine
would make is checked here on a CPU-only runner.
"""

from __future__ import annotations

import pytest
import torch

from mipo_lib import hardware, models
from mipo_lib.errors import MipoError


@pytest.fixture
def fake_cuda(monkeypatch):
    """A visible CUDA GPU of the given compute capability (torch's own bf16 check left as it is: True by emulation)."""
    def install(capability: tuple[int, int]) -> None:
        monkeypatch.setattr(hardware.torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(hardware.torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(hardware.torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    return install


@pytest.mark.parametrize("capability, expected", [
    ((7, 5), torch.float16),   # T4 (free Colab): no bf16 in hardware
    ((7, 0), torch.float16),   # V100
    ((8, 0), torch.bfloat16),  # A100
    ((8, 6), torch.bfloat16),  # RTX 30xx
    ((9, 0), torch.bfloat16),  # H100/H200
])
def test_auto_dtype_follows_native_bf16_not_emulation(fake_cuda, capability, expected):
    fake_cuda(capability)
    device = hardware.select_device()
    assert device.type == "cuda"
    assert hardware.select_dtype(device) is expected


def test_a_forced_dtype_wins_on_any_gpu(fake_cuda):
    fake_cuda((7, 5))
    assert hardware.select_dtype(torch.device("cuda"), "bfloat16") is torch.bfloat16


@pytest.fixture
def fake_mac(monkeypatch):
    monkeypatch.setattr(hardware.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(hardware, "mps_available", lambda: True)


def test_a_mac_runs_on_mps_in_fp32(fake_mac):
    device = hardware.select_device()
    assert device.type == "mps"
    assert hardware.select_dtype(device) is torch.float32


def test_cuda_wins_over_mps_and_cpu_is_the_fallback(monkeypatch):
    monkeypatch.setattr(hardware.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(hardware, "mps_available", lambda: True)
    assert hardware.select_device().type == "cuda"
    monkeypatch.setattr(hardware.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(hardware, "mps_available", lambda: False)
    assert hardware.select_device().type == "cpu"


def test_asking_for_mps_without_it_names_the_fix(monkeypatch):
    monkeypatch.setattr(hardware, "mps_available", lambda: False)
    with pytest.raises(MipoError, match="device='cpu'"):
        hardware.select_device("mps")


def test_4bit_on_a_mac_fails_in_one_line_naming_the_fix(fake_mac):
    with pytest.raises(MipoError, match="load_in_4bit=false") as err:
        models.check_4bit_backend(torch.device("mps"))
    assert "\n" not in str(err.value)
