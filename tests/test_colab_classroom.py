"""Colab and classroom path: every notebook carries the badge, the generated Colab install cell (Drive option, restart),
the automatic preset and the environment cell; student runs never overwrite the reference figures; the pins exist;
the environment report is honest; `accelerate launch` runs the DPO stage."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from mipo_lib.workbook import environment
from mipo_lib.workbook.environment import REPO, colab_badge

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_badge_colab_cell_and_environment_cell(path):
    nb = nbformat.read(path, as_version=4)
    first = nb.cells[0]
    assert first.cell_type == "markdown" and colab_badge(path.name) in first.source, f"{path.name}: badge missing or not for {REPO}"
    code = [c for c in nb.cells if c.cell_type == "code"]
    colab = code[0].source
    assert colab == environment.colab_cell(), f"{path.name}: regenerate with `python -m mipo_lib.workbook.environment colab-cells`"
    assert colab.startswith("# NBVAL_SKIP") and '"google.colab" in sys.modules' in colab and REPO in colab
    assert "parameters" in code[1].get("metadata", {}).get("tags", []), f"{path.name}: parameters must follow the Colab cell"
    assert any("environment_report()" in c.source for c in code[2:5]), f"{path.name}: no environment cell near the top"


def test_one_short_install_cell_the_same_in_every_notebook():
    """The set-up boilerplate lives in the library (`colab_install`): each notebook's cell is the same few lines."""
    cells = {path.name: [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"][0].source
             for path in NOTEBOOKS}
    assert len(set(cells.values())) == 1, "the install cells differ between notebooks"
    cell = next(iter(cells.values()))
    assert len(cell.splitlines()) <= 6, f"the install cell has {len(cell.splitlines())} lines; keep the logic in the library"
    compile(cell, "<colab cell>", "exec")
    code_lines = [line for line in cell.splitlines() if not line.lstrip().startswith("#")]
    assert not any("torch" in line for line in code_lines), "the Colab cell must leave torch alone"


def _fake_colab(monkeypatch, tmp_path, versions):
    """A Colab machine whose preloaded packages have `versions`; returns (pip calls, restarts)."""
    (tmp_path / "requirements-colab.txt").write_text((ROOT / "requirements-colab.txt").read_text())
    calls, shutdowns = [], []
    monkeypatch.setattr("subprocess.run", lambda args, **kw: calls.append(args))
    monkeypatch.setattr(environment, "on_colab", lambda: True)
    monkeypatch.setattr(environment, "_installed_version", lambda name: versions.get(name))
    kernel = type("K", (), {"do_shutdown": lambda self, restart: shutdowns.append(restart)})()
    monkeypatch.setattr("IPython.get_ipython", lambda: type("S", (), {"kernel": kernel})())
    return calls, shutdowns


def test_colab_install_does_nothing_elsewhere(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr("subprocess.run", lambda args, **kw: calls.append(args))
    environment.colab_install(str(tmp_path))
    assert calls == [], "off Colab the install must do nothing"


def test_colab_install_keeps_colabs_pandas_and_matplotlib_without_a_restart(tmp_path, monkeypatch):
    """Colab's own pandas 2.2.2 and matplotlib 3.10.0 (tested versions) stay: everything else is pinned, no restart."""
    calls, shutdowns = _fake_colab(monkeypatch, tmp_path, {"pandas": "2.2.2", "matplotlib": "3.10.0"})
    environment.colab_install(str(tmp_path))
    installed = [a for args in calls for a in args]
    assert shutdowns == [], "a tested preloaded version needs no restart"
    assert any(a.startswith("trl==") for a in installed), "the stack is pinned"
    assert not any(a.startswith(("pandas", "matplotlib")) for a in installed), "Colab's pandas/matplotlib are kept"
    assert not any("torch" in a for a in installed), "Colab's CUDA torch is kept"
    calls.clear()
    environment.colab_install(str(tmp_path))  # Run all again: the marker skips the install
    assert calls == []


def test_colab_install_replaces_an_old_pandas_and_restarts_once(tmp_path, monkeypatch):
    calls, shutdowns = _fake_colab(monkeypatch, tmp_path, {"pandas": "2.1.4", "matplotlib": "3.10.0"})
    environment.colab_install(str(tmp_path))
    installed = [a for args in calls for a in args]
    assert any(a.startswith("pandas==") for a in installed) and not any(a.startswith("matplotlib") for a in installed)
    assert shutdowns == [True], "a replaced preloaded package takes effect only after a restart"
    calls.clear()
    environment.colab_install(str(tmp_path))  # the second run, after the restart
    assert calls == [] and shutdowns == [True]


def test_colab_pins_keep_only_tested_preloaded_versions():
    lines = ["# comment", "pandas==3.1.1", "matplotlib==3.11.2", "trl==1.16.0", ""]
    assert environment.colab_pins(lines, {"pandas": "2.2.2", "matplotlib": "3.11.0"}) == (["trl==1.16.0"], [])
    assert environment.colab_pins(lines, {"pandas": "2.2.1", "matplotlib": None}) == (
        ["pandas==3.1.1", "matplotlib==3.11.2", "trl==1.16.0"], ["pandas", "matplotlib"])


def _training(path: Path) -> bool:
    """Whether a notebook trains an adapter when run from scratch (a training entry point in its code)."""
    nb = nbformat.read(path, as_version=4)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    return any(call in code for call in ("train_for_seed(", "run_ablation(", "evaluate_all(")) and path.name[:2] not in ("04", "05")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_training_notebooks_ask_colab_for_a_t4_and_say_what_each_runtime_costs(path):
    nb = nbformat.read(path, as_version=4)
    trains = path.name[:2] in environment.TRAINING_NOTEBOOKS
    assert trains == _training(path), f"{path.name}: TRAINING_NOTEBOOKS disagrees with the notebook's code"
    if not trains:
        assert "accelerator" not in nb.metadata
        return
    assert nb.metadata["accelerator"] == "GPU" and nb.metadata["colab"]["gpuType"] == "T4"
    first_code = next(i for i, c in enumerate(nb.cells) if c.cell_type == "code")
    top = "\n".join(c.source for c in nb.cells[:first_code] if c.cell_type == "markdown")
    assert "<!-- runtime:" in top and "T4 GPU" in top and "from scratch" in top, f"{path.name}: say which runtime first"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_notebook_keeps_runs_on_drive_without_a_prompt_and_picks_its_preset(path):
    """Runs kept on Drive by default (a parameter, used by the set-up), nothing that waits for an answer, and a preset
    chosen from the machine unless the parameters cell names one."""
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    params, derive = code[1].source, code[2].source
    assert params.splitlines()[0].startswith('PRESET = "auto"'), f"{path.name}: PRESET should default to 'auto'"
    assert "RUNS_ON_DRIVE = True" in params and "runs_on_colab_drive(RUNS_ON_DRIVE)" in derive
    assert "get_preset(resolve_preset(PRESET)" in derive, f"{path.name}: the derive cell must resolve 'auto'"
    assert not any("input(" in c.source or "drive.mount" in c.source for c in code), f"{path.name}: nothing may ask"


def test_runs_on_drive_falls_back_to_local_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr(environment, "on_colab", lambda: True)
    monkeypatch.setattr(environment, "DRIVE_MOUNT", "/nonexistent-drive")
    monkeypatch.delenv("MIPO_RUNS_DIR", raising=False)
    environment.runs_on_colab_drive(True)  # google.colab is not importable here: the mount fails
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("Google Drive not mounted") and "MIPO_RUNS_DIR" not in os.environ
    environment.runs_on_colab_drive(False)
    assert capsys.readouterr().out == ""


def test_the_library_never_asks_for_input():
    root = ROOT / "mipo_lib"
    asking = [p for p in root.rglob("*.py") if "input(" in p.read_text().replace("_input(", "")]
    assert not asking, f"Run all must never block on a prompt: {asking}"


def test_colab_cell_is_python_and_takes_a_fork():
    cell = environment.colab_cell(repo="course/fork")
    compile(cell, "<colab cell>", "exec")
    assert 'os.environ.get("MIPO_REPO", "course/fork")' in cell
    assert "course/fork" in colab_badge("03_dpo_training.ipynb", repo="course/fork")


def test_write_colab_cells_points_badges_and_cells_at_a_fork_and_back(tmp_path):
    import shutil

    path = tmp_path / NOTEBOOKS[1].name
    shutil.copy(NOTEBOOKS[1], path)
    ids = [c.id for c in nbformat.read(path, as_version=4).cells]
    assert environment.write_colab_cells([path], repo="course/fork") == [path]
    nb = nbformat.read(path, as_version=4)
    assert [c.id for c in nb.cells] == ids
    assert colab_badge(path.name, "course/fork") in nb.cells[0].source and REPO not in nb.cells[0].source
    assert '"course/fork"' in next(c for c in nb.cells if c.cell_type == "code").source
    environment.write_colab_cells([path])
    assert path.read_text() == NOTEBOOKS[1].read_text()


#: Where the workbook names its own repository: a Colab badge, a clone command, an install cell's default.
ADDRESS_MARKERS = ("colab.research.google.com/github/", "git clone https://github.com/", '"MIPO_REPO", "')


def repository_addresses(text: str) -> list[str]:
    """Every `owner/name` that follows an address marker in `text` (a badge, a clone command, an install cell)."""
    found = []
    for marker in ADDRESS_MARKERS:
        for chunk in text.split(marker)[1:]:
            owner, _, rest = chunk.partition("/")
            name = rest.split("/")[0].split(" ")[0].split('"')[0].split(")")[0].split("\n")[0]
            found.append(f"{owner}/{name}")
    return found


def _committed_texts() -> dict[str, str]:
    """README.md, every docs/ page and every notebook's cell sources (solutions included), by path."""
    paths = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    texts = {str(p.relative_to(ROOT)): p.read_text() for p in paths}
    for path in sorted((ROOT / "notebooks").rglob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        texts[str(path.relative_to(ROOT))] = "\n".join(c.source for c in nb.cells)
    return texts


def test_every_badge_and_install_address_is_the_one_repository_address():
    """README, docs and notebooks name the repository only through `environment.REPO` (badges, clone, install)."""
    texts = _committed_texts()
    wrong = {path: sorted(set(a for a in repository_addresses(t) if a != REPO)) for path, t in texts.items()}
    assert not {p: w for p, w in wrong.items() if w}, f"addresses other than {REPO}: {wrong}"
    counts = {path: len(repository_addresses(t)) for path, t in texts.items()}
    assert counts["README.md"] >= len(NOTEBOOKS) + 2, "the README's badges and clone command should be found"
    assert all(counts[str(p.relative_to(ROOT))] >= 2 for p in NOTEBOOKS), "each notebook: its badge and install cell"


def test_the_address_check_can_fail():
    text = ("[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
            "(https://colab.research.google.com/github/old/repo/blob/main/notebooks/00_quickstart.ipynb)\n"
            "git clone https://github.com/other/fork && cd fork\n"
            'repo = os.environ.get("MIPO_REPO", "third/one")')
    assert repository_addresses(text) == ["old/repo", "other/fork", "third/one"]


def test_colab_pins_cover_the_stack_but_not_torch():
    pins = environment.pinned_versions()
    assert "torch" not in pins
    for name in ("transformers", "trl", "peft", "bitsandbytes", "accelerate"):
        assert name in pins


def _pins(path: Path) -> dict[str, str]:
    """name -> version of every `name==version` line (names canonical: huggingface_hub == huggingface-hub)."""
    from packaging.utils import canonicalize_name

    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version.strip(), f"{path.name}: {line!r} is not an exact pin name==version"
            pins[canonicalize_name(name)] = version.strip()
    return pins


def _direct_dependencies() -> set[str]:
    """Every package pyproject.toml names (dependencies and extras), except the package itself."""
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    names = {canonicalize_name(Requirement(spec).name) for spec in specs}
    return names - {canonicalize_name(project["name"])}


def test_colab_pins_agree_with_the_constraints_local_and_ci_install():
    """Local set-up, CI and Colab must test the same versions: requirements-colab.txt is a subset of constraints.txt
    with the same versions, and the constraints pin every direct dependency the Makefile installs (torch apart)."""
    constraints, colab = _pins(ROOT / "constraints.txt"), _pins(ROOT / "requirements-colab.txt")
    differ = {n: (v, constraints.get(n)) for n, v in colab.items() if constraints.get(n) != v}
    assert not differ, f"requirements-colab.txt and constraints.txt disagree (colab, constraints): {differ}; make them equal"
    unpinned = sorted(_direct_dependencies() - set(constraints) - {"torch", "tensorboard"})
    assert not unpinned, f"pyproject.toml dependencies without an exact pin in constraints.txt: {unpinned}"
    assert "torch" not in constraints, "torch's build is chosen by the Makefile's TORCH_SPEC, not by constraints.txt"
    assert 'pip install --quiet -c constraints.txt -e ".[dev]"' in (ROOT / "Makefile").read_text()
    assert "- -c constraints.txt" in (ROOT / "environment.yml").read_text()


def test_installed_versions_are_the_constraints():
    """What runs here is what constraints.txt pins (set-up installs with it), so a test result is one of those versions."""
    import importlib.metadata

    installed = {}
    for name in _pins(ROOT / "constraints.txt"):
        try:
            installed[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    differ = {n: v for n, v in installed.items() if v != _pins(ROOT / "constraints.txt")[n]}
    assert not differ, f"installed versions differ from constraints.txt: {differ}; rerun `make setup` or update the pins"


def test_environment_report_on_this_machine():
    report = environment.environment_report()
    assert "device:" in report and "recommended preset:" in report and "bitsandbytes 4-bit:" in report


@pytest.mark.parametrize("gb,logged_in,preset", [(None, False, "cpu"), (15.0, False, "t4"), (16.0, True, "t4"),
                                                  (40.0, True, "paper"), (80.0, True, "paper"), (80.0, False, "t4")])
def test_recommended_preset_never_picks_a_gated_model_without_a_login(gb, logged_in, preset):
    assert environment.recommend_preset(gb, logged_in) == preset


# What torch reports as total memory (GiB) for cards sold as 8, 12, 16 (T4: 15.0), 24 (RTX 3090/4090: ~23.6), 40, 80 GB.
@pytest.mark.parametrize("gb, preset", [(7.6, "cpu"), (11.2, "t4"), (15.0, "t4"), (23.6, "paper-gc"), (39.4, "paper"),
                                        (79.3, "paper")])
def test_recommended_preset_fits_the_card_by_the_measured_peaks(gb, preset):
    chosen = environment.recommend_preset(gb, logged_in=True)
    assert chosen == preset
    if chosen != "cpu":  # the measured peak of what was chosen fits, with the margin
        peak = next(r for r in environment.gpu_peaks() if r["preset"] == chosen)["peak_reserved_mib"]
        assert environment.fits(peak, gb)


def test_the_measured_peaks_table_names_presets_as_they_are():
    from mipo_lib.config import PRESETS

    for row in environment.gpu_peaks():
        assert PRESETS[row["preset"]].gradient_checkpointing == (row["gradient_checkpointing"] == "true"), row["preset"]
    # a 24 GB card: paper without checkpointing does not fit (its DPO step peaked at 26.0 GB), with it it does
    assert not environment.fits(next(r for r in environment.gpu_peaks() if r["preset"] == "paper")["peak_reserved_mib"], 23.6)


def test_resolve_preset_auto_explains_and_an_explicit_name_wins(monkeypatch, capsys):
    assert environment.resolve_preset("smoke") == "smoke" and capsys.readouterr().out == ""
    monkeypatch.setattr(environment, "gpu_memory_gb", lambda: None)
    assert environment.resolve_preset("auto") == "cpu"
    monkeypatch.setattr(environment, "gpu_memory_gb", lambda: 80.0)
    monkeypatch.setattr(environment, "hub_logged_in", lambda: False)
    capsys.readouterr()
    assert environment.resolve_preset("auto") == "t4"
    said = capsys.readouterr().out
    assert "gated" in said and "login" in said and 'PRESET = "paper"' in said
    monkeypatch.setattr(environment, "hub_logged_in", lambda: True)
    assert environment.resolve_preset("auto") == "paper"


def test_only_the_reference_run_writes_the_committed_figures(monkeypatch):
    """A student's run of the cpu preset must not overwrite figures/: only the runner's kernels (MIPO_REFERENCE_RUN=1) do."""
    from mipo_lib.analysis import plots
    from mipo_lib.config import repo_root, runs_dir

    monkeypatch.delenv("MIPO_FIGURES_DIR", raising=False)
    monkeypatch.delenv(plots.REFERENCE_RUN_ENV, raising=False)
    assert plots.figures_dir("cpu") == runs_dir() / "cpu" / "figures"
    monkeypatch.setenv(plots.REFERENCE_RUN_ENV, "1")
    assert plots.figures_dir("cpu") == repo_root() / "figures"
    assert plots.figures_dir("smoke") == runs_dir() / "smoke" / "figures"


def test_the_runner_marks_its_kernels_as_the_reference_run(monkeypatch, tmp_path):
    import papermill

    from mipo_lib.analysis import plots
    from mipo_lib.workbook import runner

    seen = []
    monkeypatch.delenv(plots.REFERENCE_RUN_ENV, raising=False)
    monkeypatch.setattr(papermill, "execute_notebook", lambda *a, **k: seen.append(os.environ.get(plots.REFERENCE_RUN_ENV)))
    runner.run_notebook(NOTEBOOKS[1], "smoke", None, False, tmp_path, progress=False, reference=True)
    runner.run_notebook(NOTEBOOKS[1], "cpu", [0], False, tmp_path, progress=False)  # not the reference run
    assert seen == ["1", "0"] and plots.REFERENCE_RUN_ENV not in os.environ


def test_version_mismatch_is_reported(monkeypatch):
    monkeypatch.setattr(environment, "pinned_versions", lambda path=None: {"trl": "0.0.1"})
    assert environment.version_mismatches() and "0.0.1" in environment.version_mismatches()[0]


@pytest.mark.slow
def test_accelerate_launch_runs_the_dpo_stage_on_cpu(tmp_path):
    env = dict(os.environ, MIPO_RUNS_DIR=str(tmp_path / "runs"), ACCELERATE_USE_CPU="true", PYTHONWARNINGS="ignore")
    config = ROOT / "mipo_lib" / "accelerate" / "cpu.yaml"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
           "-m", "mipo_lib.experiments.launch_dpo", "--preset", "smoke", "--seed", "0"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "MIPO seed 0:" in proc.stdout and "reward accuracy" in proc.stdout
    assert list((tmp_path / "runs" / "smoke").rglob("adapter_config.json"))


def test_multi_gpu_configs_take_accumulation_from_the_preset():
    """A hard-coded `gradient_accumulation_steps` in a DeepSpeed config contradicts any preset with grad_accum != 1
    (t4 uses 2) and transformers refuses the mismatch; without it, DeepSpeed takes the TrainingArguments' value."""
    import yaml

    for name in ("zero2.yaml", "multi_gpu.yaml"):
        config = yaml.safe_load((ROOT / "mipo_lib" / "accelerate" / name).read_text())
        assert "gradient_accumulation_steps" not in config.get("deepspeed_config", {}), name
    assert yaml.safe_load((ROOT / "mipo_lib" / "accelerate" / "multi_gpu.yaml").read_text())["distributed_type"] == "MULTI_GPU"


# ------------------------------------------------------------------------------------------------- hub access
def _hub_error(cls):
    """An instance of one of huggingface_hub's HTTP errors without a real response (their __init__ wants one)."""
    err = cls.__new__(cls)
    Exception.__init__(err, f"{cls.__name__} (simulated)")
    return err


@pytest.fixture
def online(monkeypatch):
    """Pretend offline mode is off; every test using it replaces the request itself, so nothing leaves the machine."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def test_hub_check_offline_sends_no_request(monkeypatch):
    """HF_HUB_OFFLINE (even when set after huggingface_hub read it) answers False without asking the hub."""
    import huggingface_hub
    from huggingface_hub import constants

    from mipo_lib import models

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "model_info", lambda *a, **k: pytest.fail("offline must not ask the hub"))
    assert models.hub_reachable("Qwen/Qwen2.5-1.5B-Instruct") is False


def test_hub_check_goes_through_huggingface_hub(monkeypatch, online):
    """The check is huggingface_hub's own request (so HF_ENDPOINT, proxies and tokens apply), not a raw socket."""
    import huggingface_hub

    from mipo_lib import models

    asked = []
    monkeypatch.setattr(huggingface_hub, "model_info", lambda repo_id, timeout: asked.append((repo_id, timeout)))
    assert models.hub_reachable("org/model", timeout=3.0) is True
    assert models.resolve_model_path("org/model") == "org/model"
    assert asked == [("org/model", 3.0), ("org/model", 10.0)]


def test_hub_answers_are_one_line_fixes_network_errors_fall_back_to_the_cache(monkeypatch, online):
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    from mipo_lib import models
    from mipo_lib.errors import MipoError

    for cls, fix in ((GatedRepoError, "hf auth login"), (RepositoryNotFoundError, "check the id")):
        monkeypatch.setattr(huggingface_hub, "model_info", lambda *a, cls=cls, **k: (_ for _ in ()).throw(_hub_error(cls)))
        with pytest.raises(MipoError, match=fix) as err:
            models.resolve_model_path("org/model")
        assert "\n" not in str(err.value)

    def no_network(*args, **kwargs):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(huggingface_hub, "model_info", no_network)
    assert models.hub_reachable("org/model") is False
    with pytest.raises(MipoError, match="not in the local Hugging Face cache") as err:
        models.resolve_model_path("org/not-cached-model")
    assert "\n" not in str(err.value) and "bundled" in str(err.value)
