"""UI tests: Playwright drives Debian's Chromium against a real JupyterLab, broker and hosts.

The browser side lives in ``labextension/ui-tests`` (``lab.spec.ts``); this test starts the
processes it needs on loopback, runs it, and keeps its screenshot as ``docs/screenshot.png``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from ..e2e.harness import ROOT_FLAG, Cluster, clean_env, eventually, free_port

REPO = Path(__file__).resolve().parents[2]
UI_TESTS = REPO / "labextension" / "ui-tests"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(900),
    pytest.mark.skipif(
        not Path(CHROMIUM).exists(),
        reason=f"no Chromium at {CHROMIUM} (apt-get install chromium, or set CHROMIUM)",
    ),
]


def _jupyter(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jupyter", *args], capture_output=True, text=True, check=False
    )


def _jlpm() -> str:
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    found = shutil.which("jlpm", path=path)
    assert found, "jlpm (from jupyterlab) is needed to install the UI tests' Playwright"
    return found


def _ensure_playwright() -> Path:
    runner = UI_TESTS / "node_modules" / ".bin" / "playwright"
    if not runner.exists():
        subprocess.run([_jlpm(), "install"], cwd=UI_TESTS, check=True)
    return runner


def _start_lab(cluster: Cluster, user_token: str, workdir: Path, *extra: str) -> tuple[str, str]:
    port = free_port()
    token = secrets.token_hex(16)
    root = workdir / "notebooks"
    root.mkdir()
    # No "official Jupyter news?" toast over the screenshot.
    news = workdir / "lab-settings" / "@jupyterlab" / "apputils-extension"
    news.mkdir(parents=True)
    (news / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false"}))
    env = clean_env(
        GPU_SHARE_BROKER_URL=cluster.url,
        GPU_SHARE_TOKEN=user_token,
        JUPYTERLAB_SETTINGS_DIR=str(workdir / "lab-settings"),
        JUPYTERLAB_WORKSPACES_DIR=str(workdir / "lab-workspaces"),
        JUPYTER_RUNTIME_DIR=str(workdir / "runtime"),
    )
    cluster.spawn(
        "lab",
        [
            sys.executable,
            "-m",
            "jupyterlab",
            f"--port={port}",
            "--ServerApp.ip=127.0.0.1",
            "--ServerApp.port_retries=0",
            "--no-browser",
            f"--IdentityProvider.token={token}",
            f"--ServerApp.root_dir={root}",
            *ROOT_FLAG,
            *extra,
        ],
        env,
    )
    url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        request = urllib.request.Request(
            f"{url}/api/status", headers={"Authorization": f"token {token}"}
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status == 200

    eventually(answers, 90, 0.25, "JupyterLab to answer")
    return url, token


def test_marketplace_meter_stop_bill_filter_host_lost(tmp_path: Path) -> None:
    """Open the panel, rent, run a cell, watch the cost rise, stop, see the bill, lose the host."""
    listing = _jupyter("labextension", "list")
    assert "jupyter-gpu-share" in listing.stdout + listing.stderr, (
        "the lab extension is not installed: pip install -e . (it builds labextension/)\n"
        + listing.stdout
        + listing.stderr
    )
    runner = _ensure_playwright()
    (tmp_path / "cluster").mkdir()
    cluster = Cluster(tmp_path / "cluster")
    failed = True
    output = ""
    try:
        user_token = cluster.account("ada", "user", 50_000_000)
        cheap = cluster.start_host("host-cheap", "3.6")
        cluster.start_host("host-dear", "36")
        lab_url, lab_token = _start_lab(cluster, user_token, tmp_path)
        screenshot = tmp_path / "screenshot.png"
        env = {
            **os.environ,
            "LAB_URL": lab_url,
            "LAB_TOKEN": lab_token,
            "CHEAP_HOST": "host-cheap",
            "DEAR_HOST": "host-dear",
            "CHEAP_HOST_PID": str(cheap.pid),
            "SCREENSHOT": str(screenshot),
            "CHROMIUM": CHROMIUM,
        }
        result = subprocess.run(
            [str(runner), "test"],
            cwd=UI_TESTS,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        output = result.stdout + result.stderr
        assert result.returncode == 0, f"the UI tests failed:\n{output}"
        assert screenshot.exists(), "the UI tests wrote no screenshot"
        shutil.copyfile(screenshot, REPO / "docs" / "screenshot.png")
        sessions = cluster.client(user_token).request("GET", "/sessions")
        stopped = [s for s in sessions if s["end_reason"] in ("stopped", "kernel exited")]
        assert stopped and stopped[-1]["amount_micro"] > 0, json.dumps(sessions, indent=1)
        assert any(s["end_reason"] == "host lost" for s in sessions), json.dumps(sessions, indent=1)
        failed = False
    finally:
        if failed:
            print(output)
            print(cluster.logs())
        cluster.close()


SPEC_VARIABLES = (
    "LAB_URL",
    "CULL_LAB_URL",
    "REFRESH_LAB_URL",
    "STUDENT_LAB_URL",
    "TEACHER_LAB_URL",
)


def _run_spec(tmp_path: Path, spec: str, prepare: Callable[[Cluster], dict[str, str]]) -> None:
    """Start a broker, let ``prepare`` start hosts and JupyterLab and return what the spec
    reads from its environment, run that one Playwright spec in Chromium; the logs when
    it fails."""
    runner = _ensure_playwright()
    (tmp_path / "cluster").mkdir()
    cluster = Cluster(tmp_path / "cluster")
    failed = True
    output = ""
    try:
        env = {k: v for k, v in os.environ.items() if k not in SPEC_VARIABLES}
        env.update(prepare(cluster), CHROMIUM=CHROMIUM)
        result = subprocess.run(
            [str(runner), "test", spec],
            cwd=UI_TESTS,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        output = result.stdout + result.stderr
        assert result.returncode == 0, f"the UI test failed:\n{output}"
        assert "1 passed" in output, output
        failed = False
    finally:
        if failed:
            print(output)
            print(cluster.logs())
        cluster.close()


def test_culled_banner(tmp_path: Path) -> None:
    """A lab that culls idle kernels (connected ones too): the notebook shows the cull banner."""

    def prepare(cluster: Cluster) -> dict[str, str]:
        user_token = cluster.account("ada", "user", 50_000_000)
        cluster.start_host("host-idle", "3.6")
        lab_url, lab_token = _start_lab(
            cluster,
            user_token,
            tmp_path,
            "--MappingKernelManager.cull_idle_timeout=6",
            "--MappingKernelManager.cull_interval=1",
            "--MappingKernelManager.cull_connected=True",
        )
        return {"CULL_LAB_URL": lab_url, "CULL_LAB_TOKEN": lab_token, "CULL_HOST": "host-idle"}

    _run_spec(tmp_path, "culled.spec.ts", prepare)


def test_outputs_survive_a_refresh(tmp_path: Path) -> None:
    """A refresh in the middle of a printing cell: every line is in the cell afterwards,
    and the cell keeps streaming into it (issue 18, item 2)."""
    import nbformat

    def prepare(cluster: Cluster) -> dict[str, str]:
        user_token = cluster.account("rae", "user", 50_000_000)
        cluster.start_host("host-print", "3.6")
        lab_url, lab_token = _start_lab(cluster, user_token, tmp_path)
        nb = nbformat.v4.new_notebook()
        nb.metadata["kernelspec"] = {"name": "gpu-share", "display_name": "gpu-share"}
        nb.cells = [
            nbformat.v4.new_code_cell(
                "import time\nfor i in range(40):\n    print(f'line {i}', flush=True)\n"
                "    time.sleep(0.25)\nprint('done')"
            )
        ]
        nbformat.write(nb, tmp_path / "notebooks" / "printer.ipynb")
        return {"REFRESH_LAB_URL": lab_url, "REFRESH_LAB_TOKEN": lab_token}

    _run_spec(tmp_path, "refresh.spec.ts", prepare)
