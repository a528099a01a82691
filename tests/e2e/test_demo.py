"""`jupyter gpu-share demo`: one command brings up a broker, a host and JupyterLab that work."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import time

import pytest

from .harness import CLI, clean_env, eventually, free_port
from .test_remote_kernels import ServerKernel

pytestmark = pytest.mark.e2e


def test_demo_serves_a_working_lab_and_stops_cleanly(tmp_path):
    port = free_port()
    log_path = tmp_path / "demo.log"
    with log_path.open("wb") as log:
        demo = subprocess.Popen(
            [*CLI, "demo", f"--port={port}", f"--dir={tmp_path / 'demo'}"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=clean_env(),
            start_new_session=True,  # its own group, as a terminal's foreground job
        )
    try:
        match = eventually(
            lambda: re.search(
                r"JupyterLab: (http://\S+)/lab/tree/\S+\?token=(\w+)", log_path.read_text()
            ),
            120,
            0.5,
            "the demo to print the JupyterLab URL",
        )
        url, token = match.group(1), match.group(2)
        assert "offer online: CPU on demo-host" in log_path.read_text()
        lab = ServerKernel(url, token)
        assert "gpu-share" in lab.rest("GET", "/api/kernelspecs")["kernelspecs"]
        assert (tmp_path / "demo" / "notebooks" / "gpu-share-demo.ipynb").exists()

        async def run_cell() -> str:
            kernel = lab.rest("POST", "/api/kernels", {"name": "gpu-share"})
            await lab.connect(kernel["id"])
            reply, text = await lab.execute("import os; print(os.environ['GPU_SHARE_HOST_ID'])")
            assert reply["status"] == "ok"
            lab.rest("DELETE", f"/api/kernels/{kernel['id']}")
            return text.strip()

        assert asyncio.run(run_cell()) == "demo-host"
    finally:
        os.killpg(demo.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole group
        demo.wait(60)
    output = log_path.read_text()
    assert "stopping" in output
    assert "Traceback" not in output
    # Only the demo took the Ctrl-C: its servers stopped on its SIGTERM, in order, and none
    # was interrupted itself (jupyter_server's "Interrupted...", a self-test "signal 2").
    assert "received signal 15" in output
    assert "Interrupted..." not in output and "signal 2" not in output
    time.sleep(0.5)
    leftovers = subprocess.run(
        ["pgrep", "-f", str(tmp_path / "demo")], capture_output=True, text=True
    )
    assert leftovers.stdout.strip() == "", "demo left processes behind"
