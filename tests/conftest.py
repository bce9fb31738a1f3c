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
