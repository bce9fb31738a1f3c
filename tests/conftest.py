"""Test-wide settings: never touch the Hugging Face hub (offline here; a hub call would waste ~45 s in retries),
no progress bars, a non-interactive matplotlib backend, and generated files in a temporary runs folder."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_runs(tmp_path_factory, monkeypatch):
    """Every test writes runs and figures under a temporary folder, never into the repository."""
    root = tmp_path_factory.getbasetemp()
    monkeypatch.setenv("MIPO_RUNS_DIR", str(root / "runs"))
    monkeypatch.setenv("MIPO_FIGURES_DIR", str(root / "figures"))
    from mipo_lib import cache

    cache._reused.clear()  # a test's reuse summary starts empty (another test's pending lines are not its own)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny-model tests run on one torch thread: on a busy 2-core machine two threads are ~25x slower for them."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(preset):
    """The test module's `preset` model and tokenizer, loaded once per module."""
    from mipo_lib.models import load_for_preset

    return load_for_preset(preset)


@pytest.fixture(scope="module")
def task():
    from mipo_lib.tasks import get_task

    return get_task("personalization")


# ------------------------------------------------------------------------------------- the CPU's two code paths
# CPUs differ between machines (DESIGN.md): with AVX512-BF16 the `cpu` preset computes in bf16 and bitsandbytes
# repacks 4-bit weights at the first eval forward; without, fp32 and no repacking. These fixtures force each path so
# that every machine, CI included, runs both.


def _cpu_has_avx512bf16() -> bool:
    """What bitsandbytes' native library reports for this CPU, whatever the fixture below has patched."""
    import bitsandbytes.functional as bnbf

    try:
        return bool(bnbf.lib.has_avx512bf16_cpu())
    except (AttributeError, RuntimeError, OSError):
        return False


@pytest.fixture(params=[False, True], ids=["bnb-plain", "bnb-avx512bf16"])
def bnb_avx512bf16(request, monkeypatch) -> bool:
    """Force bitsandbytes' CPU AVX512-BF16 flag off or on for the 4-bit layers a test builds; returns it.

    bitsandbytes 0.50 reads it through `functional.has_avx512bf16()` in two places: `Linear4bit.__init__` (via the
    name imported into `bitsandbytes.nn.modules`, stored per layer as `support_avx512bf16_for_cpu`, which decides the
    repacking at the first eval forward) and `backends/cpu/ops.py` at import, which registers the fused CPU kernel
    that reads repacked weights only where the CPU has the instructions. The first is patched (both names, so a
    layer built either way sees it); the second happens once, at import: forcing the flag on where the CPU lacks
    the instructions would repack weights for a native kernel that is not registered (bitsandbytes' generic kernel
    would misread them) and could not run there anyway, so "on" is skipped on such a CPU and runs everywhere else.
    """
    import bitsandbytes.functional as bnbf
    import bitsandbytes.nn.modules as bnb_modules

    import torch

    if request.param and not _cpu_has_avx512bf16():
        pytest.skip("this CPU lacks AVX512-BF16: bitsandbytes has no kernel here for its repacked 4-bit weights")
    if request.param and torch.cuda.is_available():
        pytest.skip("models load on the GPU here, and the repacking is a CPU path")
    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: request.param)
    monkeypatch.setattr(bnbf, "has_avx512bf16", lambda: request.param)
    return request.param


@pytest.fixture(params=[False, True], ids=["cpu-fp32", "cpu-bf16"])
def cpu_native_bf16(request, monkeypatch) -> bool:
    """Force the answer of `hardware.cpu_has_native_bf16`, so dtype "auto" on the CPU means fp32 or bf16; returns it."""
    from mipo_lib import hardware

    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: request.param)
    return request.param


@pytest.fixture(scope="module")
def smoke_pairs(preset, tmp_path_factory):
    """Seed 0's personalization pairs for the test module's `preset`, built once per module in its own runs folder."""
    from mipo_lib.models import load_for_preset
    from mipo_lib.pairs import build_pairs
    from mipo_lib.tasks import get_task

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MIPO_RUNS_DIR", str(tmp_path_factory.mktemp("pairs-runs")))
        model, tok = load_for_preset(preset)
        return build_pairs(model, tok, get_task("personalization"), preset, seed=0, progress=False)
