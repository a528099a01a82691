"""Every stop says why, to every client (issue 18, item 4): a cell running when the broker
ends the session gets the reason as its error, where nbconvert and nbclient used to
report only ``DeadKernelError: Kernel died``."""

from __future__ import annotations

import subprocess
import sys
import threading
from datetime import datetime, timedelta

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from jupyter_gpu_share.ledger import MICRO

from .harness import CLI, clean_env, eventually
from .test_remote_kernels import nbconvert_execute, notebook

pytestmark = pytest.mark.e2e

LONG_CELL = "import time\nprint('started', flush=True)\ntime.sleep(120)"


def test_nbconvert_reads_why_its_cell_was_stopped_when_the_credit_ran_out(make_cluster, tmp_path):
    cluster = make_cluster(minimum_start_seconds=1)
    cluster.start_host("host-a", "3.6")  # 1,000 micro-credits a second
    token = cluster.account("thrifty", "user", 4_000)  # 4 seconds of credit
    path = tmp_path / "long.ipynb"
    nbformat.write(notebook(LONG_CELL), path)
    result = nbconvert_execute(path, cluster.url, token)
    assert result.returncode != 0
    assert "SessionStopped: your credit ran out" in result.stderr, result.stderr[-3000:]
    assert "DeadKernelError" not in result.stderr
    session = eventually(lambda: cluster.session_of(token, "ended"), 20, what="the bill")
    assert session["end_reason"] == "credit exhausted"


def test_nbclient_reads_that_its_own_user_stopped_the_session(make_cluster, monkeypatch):
    cluster = make_cluster()
    cluster.start_host("host-a", "3.6")
    token = cluster.account("nina", "user", 100 * MICRO)
    monkeypatch.setenv("GPU_SHARE_BROKER_URL", cluster.url)
    monkeypatch.setenv("GPU_SHARE_TOKEN", token)
    nb = notebook(LONG_CELL)
    client = NotebookClient(nb, kernel_name="gpu-share", timeout=120, startup_timeout=90)

    def stop_when_running() -> None:
        running = eventually(lambda: cluster.session_of(token, "running"), 60, what="a session")
        eventually(
            lambda: cluster.client(token).request("GET", f"/sessions/{running['id']}")[
                "cell_running"
            ],
            30,
            what="the cell to run",
        )
        cluster.client(token).request("DELETE", f"/sessions/{running['id']}")

    stopper = threading.Thread(target=stop_when_running, daemon=True)
    stopper.start()
    with pytest.raises(CellExecutionError) as stopped:
        client.execute()
    stopper.join(30)
    assert "SessionStopped" in str(stopped.value)
    assert "stopped by you" in str(stopped.value)
    outputs = nb.cells[0].outputs
    assert outputs[0]["text"] == "started\n"
    assert outputs[-1]["output_type"] == "error" and outputs[-1]["ename"] == "SessionStopped"
    listed = subprocess.run(
        [*CLI, "sessions"],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(GPU_SHARE_BROKER_URL=cluster.url, GPU_SHARE_TOKEN=token),
    )
    assert listed.returncode == 0, listed.stderr
    assert "stopped by you" in listed.stdout


def test_papermill_runs_a_parameterised_notebook_on_gpu_share(make_cluster, tmp_path):
    """papermill (issue 18, item 9): parameters injected, cells run on the host, outputs
    saved, the session billed (papermill drives nbclient, as nbconvert does)."""
    cluster = make_cluster()
    cluster.start_host("host-a", "3.6")
    token = cluster.account("pam", "user", 100 * MICRO)
    source = notebook("size = 1", "import os\nprint(size * 7, os.environ['GPU_SHARE_HOST_ID'])")
    source.cells[0].metadata["tags"] = ["parameters"]
    path, out = tmp_path / "in.ipynb", tmp_path / "out.ipynb"
    nbformat.write(source, path)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "papermill",
            str(path),
            str(out),
            "-k",
            "gpu-share",
            "-p",
            "size",
            "6",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env=clean_env(GPU_SHARE_BROKER_URL=cluster.url, GPU_SHARE_TOKEN=token),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    executed = nbformat.read(out, as_version=4)
    printed = [o["text"] for c in executed.cells for o in c.get("outputs", []) if "text" in o]
    assert printed == ["42 host-a\n"]
    session = eventually(lambda: cluster.session_of(token, "ended"), 20, what="the bill")
    assert session["billed_seconds"] >= 1


def test_the_hosts_window_closing_warning_shows_in_the_running_cell(make_cluster, monkeypatch):
    """The warning went to the server log only (issue 18, item 7)."""
    now = datetime.now()
    closes = now + timedelta(minutes=12)
    if closes.date() != now.date():
        pytest.skip("the window would close after midnight")
    cluster = make_cluster()
    cluster.start_host(
        "host-a",
        "3.6",
        f"--schedule=mon-sun 00:00-{closes:%H:%M}",
        "--HostAgent.schedule_warning_minutes=15",
        "--HostAgent.schedule_poll_interval=0.5",
    )
    token = cluster.account("nina", "user", 100 * MICRO)
    monkeypatch.setenv("GPU_SHARE_BROKER_URL", cluster.url)
    monkeypatch.setenv("GPU_SHARE_TOKEN", token)
    nb = notebook("import time\nfor _ in range(40):\n    time.sleep(0.1)\nprint('done')")
    NotebookClient(nb, kernel_name="gpu-share", timeout=120, startup_timeout=90).execute()
    outputs = nb.cells[0].outputs
    warned = [o["text"] for o in outputs if o.get("name") == "stderr"]
    assert warned == [
        f"gpu-share: this host's availability window closes at {closes:%H:%M}; save your work\n"
    ], outputs
    assert outputs[-1]["text"] == "done\n"
