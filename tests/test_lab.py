"""`make lab` works: JupyterLab from this environment serves every notebook and runs them on the project's kernel.

The test starts the server as `make lab` does (notebooks folder as root, the notebooks' kernel as default, the
environment's kernels before any user-level ones) on 127.0.0.1 with a token and no browser, in temporary Jupyter
config/data/runtime folders so it leaves nothing behind, then asks its REST API (standard library only). Every wait
is bounded and the server is always stopped, so it cannot hang CI.
"""

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from importlib.util import find_spec
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
STARTUP_TIMEOUT_S = 60
HTTP_TIMEOUT_S = 5


def _notebook_kernels() -> dict[str, str]:
    """Each committed notebook's file name and the kernel name its metadata asks for."""
    return {
        path.name: json.loads(path.read_text(encoding="utf-8"))["metadata"]["kernelspec"]["name"]
        for path in sorted(NOTEBOOKS.glob("*.ipynb"))
    }


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(port: int, path: str, token: str):
    """GET http://127.0.0.1:port/path with the token; returns (status, body)."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", headers={"Authorization": f"token {token}"}
    )
    with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
        return response.status, response.read()


def _get_json(port: int, path: str, token: str):
    status, body = _get(port, path, token)
    assert status == 200, f"GET {path}: HTTP {status}"
    return json.loads(body)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM (jupyter_server shuts down cleanly on it), then SIGKILL if it has not exited in 10 s."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def test_makefile_lab_target_matches_this_test():
    """The options this test starts the server with are the ones `make lab` uses."""
    makefile = (ROOT / "Makefile").read_text()
    match = re.search(r"^lab: \$\(STAMP\)\n((?:\t.*\n)+)", makefile, re.MULTILINE)
    assert match, "Makefile has no `lab: $(STAMP)` target"
    recipe = match.group(1)
    for option in (
        "JUPYTER_PREFER_ENV_PATH=1",
        "$(BIN)/jupyter lab",
        "--ServerApp.root_dir=notebooks",
        "--MultiKernelManager.default_kernel_name=python3",
        "notebooks/00_quickstart.ipynb",
    ):
        assert option in recipe, f"`make lab` recipe lacks {option!r}"
    assert re.search(r"^\.PHONY:.*\blab\b", makefile, re.MULTILINE), "`lab` is not .PHONY"
    assert (NOTEBOOKS / "00_quickstart.ipynb").is_file()
    assert set(_notebook_kernels().values()) == {"python3"}, "every notebook should name the `python3` kernel"


def test_jupyterlab_serves_notebooks_on_the_project_kernel(tmp_path):
    if find_spec("jupyterlab") is None:
        pytest.fail(
            f"jupyterlab is not installed in {sys.prefix}: run `make setup` (or `pip install -e '.[dev]'`)",
            pytrace=False,
        )
    expected = _notebook_kernels()
    assert expected, f"no notebooks in {NOTEBOOKS}"

    token = secrets.token_hex(16)
    port = _free_port()
    runtime = tmp_path / "runtime"
    env = {
        **os.environ,
        "JUPYTER_CONFIG_DIR": str(tmp_path / "config"),
        "JUPYTER_DATA_DIR": str(tmp_path / "data"),
        "JUPYTER_RUNTIME_DIR": str(runtime),
        "JUPYTER_PREFER_ENV_PATH": "1",
        "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "lab-settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "lab-workspaces"),
        "IPYTHONDIR": str(tmp_path / "ipython"),
    }
    command = [
        sys.executable, "-m", "jupyterlab",
        "--no-browser",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={NOTEBOOKS}",
        "--MultiKernelManager.default_kernel_name=python3",
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        command.append("--allow-root")
    log_path = tmp_path / "lab.log"

    def log_tail() -> str:
        return "\n".join(log_path.read_text(errors="replace").splitlines()[-25:])

    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            command, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        # The server writes jpserver-<pid>.json (with the port it really bound) once it listens.
        info_file = runtime / f"jpserver-{proc.pid}.json"
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"JupyterLab exited with code {proc.returncode} before answering:\n{log_tail()}")
            if info_file.is_file():
                try:
                    port = json.loads(info_file.read_text())["port"]
                    _get_json(port, "/api/status", token)
                    break
                except (OSError, ValueError, KeyError):  # file half-written, or not answering yet
                    pass
            if time.monotonic() > deadline:
                pytest.fail(f"JupyterLab did not answer within {STARTUP_TIMEOUT_S} s:\n{log_tail()}")
            time.sleep(0.25)

        # The notebooks folder is the root, and every notebook is listed.
        listing = _get_json(port, "/api/contents?content=1", token)
        served = {item["name"] for item in listing["content"] if item["type"] == "notebook"}
        missing = set(expected) - served
        assert not missing, f"notebooks not served from the root: {sorted(missing)} (served: {sorted(served)})"

        # The kernel the notebooks name exists, is the default, and runs this environment's python.
        specs = _get_json(port, "/api/kernelspecs", token)
        assert specs["default"] == "python3", specs["default"]
        prefix = Path(sys.prefix).resolve()
        for name in sorted(set(expected.values())):
            assert name in specs["kernelspecs"], f"kernel {name!r} not found; have {sorted(specs['kernelspecs'])}"
            argv0 = Path(specs["kernelspecs"][name]["spec"]["argv"][0])
            # The interpreter is usually a symlink out of the venv: resolve its folder, not the link itself.
            where = (argv0.parent if argv0.is_absolute() else Path(os.path.abspath(argv0)).parent).resolve()
            assert where.is_relative_to(prefix), (
                f"kernel {name!r} runs {argv0}, outside this environment ({prefix}): "
                "run `make setup` (ipykernel install --sys-prefix)"
            )

        # JupyterLab itself (not just the server) answers, and so does the quickstart `make lab` opens.
        for path in ("/lab", "/lab/tree/00_quickstart.ipynb"):
            status, _ = _get(port, path, token)
            assert status == 200, f"GET {path}: HTTP {status}"
    except urllib.error.URLError as err:
        pytest.fail(f"JupyterLab request failed: {err}\n{log_tail()}")
    finally:
        _stop(proc)
    assert not list(runtime.glob("jpserver-*")), "the server left its runtime files behind"
