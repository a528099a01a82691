"""UI test of classes: a student fetches a class notebook in the lab and runs it on the class
GPU; the teacher's live dashboard shows the running kernel and stops it.

Real processes on loopback (a broker, a host agent, three JupyterLabs: the teacher's, ann's
and ben's); Playwright drives Debian's Chromium through ``labextension/ui-tests/classes.spec.ts``
and keeps a screenshot of the dashboard as ``docs/screenshot-classes.png``. Ben's kernel is
started through his server's REST API, which also checks the fetch handler directly.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import nbformat
import pytest

from ..e2e.harness import CLI, ROOT_FLAG, Cluster, clean_env, eventually, free_port
from .test_lab_ui import CHROMIUM, REPO, UI_TESTS, _ensure_playwright, _jupyter

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(900),
    pytest.mark.skipif(
        not Path(CHROMIUM).exists(),
        reason=f"no Chromium at {CHROMIUM} (apt-get install chromium, or set CHROMIUM)",
    ),
]


def _cli(cluster: Cluster, token: str, *args: str) -> str:
    result = subprocess.run(
        [*CLI, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=clean_env(GPU_SHARE_BROKER_URL=cluster.url, GPU_SHARE_TOKEN=token),
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


class Lab:
    """A JupyterLab of one user, with its own root, settings and Jupyter data dir."""

    def __init__(self, cluster: Cluster, name: str, broker_token: str, workdir: Path):
        self.port = free_port()
        self.token = secrets.token_hex(16)
        self.root = workdir / name / "notebooks"
        self.root.mkdir(parents=True)
        self.data_dir = workdir / name / "data"
        settings = workdir / name / "lab-settings"
        news = settings / "@jupyterlab" / "apputils-extension"
        news.mkdir(parents=True)
        (news / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false"}))
        env = clean_env(
            GPU_SHARE_BROKER_URL=cluster.url,
            GPU_SHARE_TOKEN=broker_token,
            JUPYTER_DATA_DIR=str(self.data_dir),
            JUPYTERLAB_SETTINGS_DIR=str(settings),
            JUPYTERLAB_WORKSPACES_DIR=str(workdir / name / "lab-workspaces"),
            JUPYTER_RUNTIME_DIR=str(workdir / name / "runtime"),
        )
        cluster.spawn(
            f"lab-{name}",
            [
                sys.executable,
                "-m",
                "jupyterlab",
                f"--port={self.port}",
                "--ServerApp.ip=127.0.0.1",
                "--ServerApp.port_retries=0",
                "--no-browser",
                f"--IdentityProvider.token={self.token}",
                f"--ServerApp.root_dir={self.root}",
                *ROOT_FLAG,
            ],
            env,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        eventually(
            lambda: self.call("GET", "/api/status")[0] == 200,
            90,
            0.25,
            f"{name}'s JupyterLab to answer",
        )

    def call(
        self, method: str, path: str, body: Any = None, timeout: float = 120
    ) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={"Authorization": f"token {self.token}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            payload = error.read()
            try:
                return error.code, json.loads(payload or b"null")
            except ValueError:  # tornado's own HTML 404 for paths nobody routes
                return error.code, payload.decode(errors="replace")[:200]


def _usage_row(cluster: Cluster, teacher: str, student: str) -> dict[str, Any]:
    usage = cluster.client(teacher).request("GET", "/classes/ml101/usage")
    return next(row for row in usage["students"] if row["student"] == student)


def test_student_fetches_and_runs_teacher_dashboard_stops(tmp_path: Path) -> None:
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
        cluster.start_host("class-gpu", "3.6")
        teacher = cluster.account("prof", "teacher")
        _cli(cluster, teacher, "class", "create", "ml101", "--quota-per-student", "1h")
        cluster.admin.request("POST", "/classes/ml101/budget", {"amount_micro": 50_000_000})
        out = _cli(cluster, teacher, "class", "add-students", "ml101", "ann", "ben", "cat")
        tokens = dict(
            line.split(",")
            for line in out.splitlines()
            if "," in line and not line.startswith("student,")
        )
        starter = nbformat.v4.new_notebook()
        starter.cells = [
            nbformat.v4.new_code_cell("import os\nprint('on', os.environ['GPU_SHARE_HOST_ID'])")
        ]
        nbformat.write(starter, tmp_path / "week1.ipynb")
        _cli(cluster, teacher, "class", "assign", "ml101", str(tmp_path / "week1.ipynb"))

        # Ben fetches through his server's handler (twice: his copy is kept) and starts
        # the class kernel through its REST API.
        ben = Lab(cluster, "ben", tokens["ben"], tmp_path)
        status, fetched = ben.call("POST", "/gpu-share/user/classes/ml101/fetch")
        assert status == 200, fetched
        assert fetched["fetched"] == ["ml101/week1.ipynb"] and fetched["kept"] == []
        assert fetched["kernel_name"] == "gpu-share-ml101"
        copy = nbformat.read(ben.root / "ml101" / "week1.ipynb", as_version=4)
        assert copy.metadata["kernelspec"]["name"] == "gpu-share-ml101"
        assert (ben.data_dir / "kernels" / "gpu-share-ml101" / "kernel.json").is_file()
        (ben.root / "ml101" / "week1.ipynb").write_text(json.dumps({**copy, "mine": 1}))
        status, again = ben.call("POST", "/gpu-share/user/classes/ml101/fetch")
        assert status == 200 and again["kept"] == ["ml101/week1.ipynb"], again
        assert json.loads((ben.root / "ml101" / "week1.ipynb").read_text())["mine"] == 1
        status, nope = ben.call("POST", "/gpu-share/user/classes/other/fetch")
        assert status == 404, nope
        # The proxy lets a student read their class but not stop anyone.
        status, rows = ben.call("GET", "/gpu-share/user/classes/ml101/usage")
        assert status == 200 and [r["student"] for r in rows["students"]] == ["ben"], rows
        status, refused = ben.call("POST", "/gpu-share/user/classes/ml101/students/ann/stop")
        assert status == 403, refused
        status, refused = ben.call("POST", "/gpu-share/user/classes/ml101/budget")
        assert status in (404, 405), refused
        status, kernel = ben.call("POST", "/api/kernels", {"name": "gpu-share-ml101"})
        assert status == 201, kernel
        eventually(
            lambda: _usage_row(cluster, teacher, "ben")["running"],
            60,
            0.25,
            "ben's class kernel to run",
        )

        ann = Lab(cluster, "ann", tokens["ann"], tmp_path)
        prof = Lab(cluster, "prof", teacher, tmp_path)
        screenshot = tmp_path / "screenshot-classes.png"
        env = {
            **os.environ,
            "STUDENT_LAB_URL": ann.url,
            "STUDENT_LAB_TOKEN": ann.token,
            "TEACHER_LAB_URL": prof.url,
            "TEACHER_LAB_TOKEN": prof.token,
            "CLASS_HOST": "class-gpu",
            "SCREENSHOT": str(screenshot),
            "CHROMIUM": CHROMIUM,
        }
        result = subprocess.run(
            [str(runner), "test", "classes.spec.ts"],
            cwd=UI_TESTS,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        output = result.stdout + result.stderr
        assert result.returncode == 0, f"the UI tests failed:\n{output}"
        assert (ann.root / "ml101" / "week1.ipynb").is_file(), "Fetch did not put the notebook"
        assert screenshot.exists(), "the UI tests wrote no screenshot"
        shutil.copyfile(screenshot, REPO / "docs" / "screenshot-classes.png")

        # The teacher's Stop ended ann's class session, and only hers.
        sessions = cluster.client(tokens["ann"]).request("GET", "/sessions")
        assert sessions and all(s["class"] == "ml101" for s in sessions), sessions
        assert sessions[0]["payer"] == "ml101@class"
        assert any(s["end_reason"] == "stopped by the teacher" for s in sessions), json.dumps(
            sessions, indent=1
        )
        assert _usage_row(cluster, teacher, "ben")["running"], "ben's kernel was stopped too"
        assert cluster.client(tokens["ann"]).request("GET", "/me")["balance_micro"] == 0
        failed = False
    finally:
        if failed:
            print(output)
            print(cluster.logs())
        cluster.close()
