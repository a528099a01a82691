"""A notebook on a host's kernel via the broker: nbclient, jupyter_server, interrupt, restart."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
import urllib.request
import uuid
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient
from tornado import websocket
from tornado.httpclient import HTTPRequest

from jupyter_gpu_share.ledger import MICRO

from .harness import clean_env, eventually, remote_kernel


def loop_in_use_by_default() -> str:
    """What ``--event-loop=auto`` gives here: uvloop where it is installed."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


pytestmark = pytest.mark.e2e

HOSTS = ("host-a", "host-b")


def notebook(*sources: str) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {
        "name": "gpu-share",
        "display_name": "Python 3 (shared GPU)",
        "language": "python",
    }
    nb.cells = [nbformat.v4.new_code_cell(source) for source in sources]
    return nb


def nbconvert_execute(
    path, broker_url: str, token: str, *extra: str
) -> subprocess.CompletedProcess[str]:
    """``jupyter nbconvert --execute`` a notebook on gpu-share into out.ipynb beside it
    (``extra``: more of nbconvert's options)."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "jupyter",
            "nbconvert",
            "--to",
            "notebook",
            "--execute",
            "--ExecutePreprocessor.kernel_name=gpu-share",
            "--output",
            "out.ipynb",
            *extra,
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env=clean_env(GPU_SHARE_BROKER_URL=broker_url, GPU_SHARE_TOKEN=token),
    )


def stream_text(cell: nbformat.NotebookNode) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


@pytest.mark.parametrize("event_loop", ["auto", "asyncio"])
def test_nbclient_runs_a_notebook_on_a_host(make_cluster, monkeypatch, event_loop):
    cluster = make_cluster(event_loop=event_loop)
    for name in HOSTS:
        cluster.start_host(name)
    token = cluster.account("nina", "user", 50 * MICRO)
    monkeypatch.setenv("GPU_SHARE_BROKER_URL", cluster.url)
    monkeypatch.setenv("GPU_SHARE_TOKEN", token)

    nb = notebook(
        "import os\nprint(os.environ['GPU_SHARE_HOST_ID'], os.environ['GPU_SHARE_SESSION_ID'])",
        "print(repr(os.environ.get('CUDA_VISIBLE_DEVICES')))",
        "x = sum(range(1000))\nx",
        "print('GPU_SHARE_TOKEN' in os.environ)",
    )
    NotebookClient(nb, kernel_name="gpu-share", timeout=60, startup_timeout=90).execute()

    host, session_id = stream_text(nb.cells[0]).split()
    assert host in HOSTS
    assert stream_text(nb.cells[1]).strip() == "''"  # a CPU host: no GPU is visible
    assert nb.cells[2].outputs[0]["data"]["text/plain"] == "499500"
    assert stream_text(nb.cells[3]).strip() == "False"

    session = eventually(lambda: cluster.session_of(token, "ended"), 20, what="the session to end")
    assert session["id"] == session_id
    assert session["host_id"] == host
    assert session["billed_seconds"] >= 1
    assert session["amount_micro"] == session["billed_seconds"] * session["price_per_second_micro"]
    expected_loop = "asyncio" if event_loop == "asyncio" else loop_in_use_by_default()
    assert f"{expected_loop} event loop" in cluster.broker.output()


def _execute_request(code: str, session: str) -> dict[str, Any]:
    msg_id = uuid.uuid4().hex
    return {
        "header": {
            "msg_id": msg_id,
            "msg_type": "execute_request",
            "username": "t",
            "session": session,
            "date": "2026-01-01T00:00:00Z",
            "version": "5.3",
        },
        "parent_header": {},
        "metadata": {},
        "content": {
            "code": code,
            "silent": False,
            "store_history": True,
            "user_expressions": {},
            "allow_stdin": False,
            "stop_on_error": True,
        },
        "channel": "shell",
        "buffers": [],
    }


class ServerKernel:
    """A kernel driven through jupyter_server's REST and websocket API, as JupyterLab does."""

    def __init__(self, url: str, token: str):
        self.url, self.token = url, token
        self.session = uuid.uuid4().hex

    def rest(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        request = urllib.request.Request(
            self.url + path,
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"token {self.token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            payload = response.read()
        return json.loads(payload) if payload else None

    async def connect(self, kernel_id: str) -> None:
        ws_url = (
            self.url.replace("http", "ws")
            + f"/api/kernels/{kernel_id}/channels?session_id={self.session}"
        )
        self.ws = await websocket.websocket_connect(
            HTTPRequest(ws_url, headers={"Authorization": f"token {self.token}"})
        )

    async def execute(self, code: str, timeout: float = 60) -> tuple[dict[str, Any], str]:
        """Run code; return the execute_reply content and the stdout/stderr text."""
        request = _execute_request(code, self.session)
        await self.ws.write_message(json.dumps(request))
        text, reply, idle = "", None, False
        deadline = time.monotonic() + timeout
        while reply is None or not idle:
            assert time.monotonic() < deadline, "no reply in time"
            raw = await self.ws.read_message()
            assert raw is not None, "kernel websocket closed"
            message = json.loads(raw)
            if message.get("parent_header", {}).get("msg_id") != request["header"]["msg_id"]:
                continue
            kind = message["msg_type"]
            if kind == "stream":
                text += message["content"]["text"]
            elif kind == "execute_reply":
                reply = message["content"]
            elif kind == "status" and message["content"]["execution_state"] == "idle":
                idle = True
        return reply, text


def test_jupyter_server_kernel_interrupt_and_restart(make_cluster):
    asyncio.run(_server_kernel_interrupt_and_restart(make_cluster))


async def _server_kernel_interrupt_and_restart(make_cluster):
    cluster = make_cluster()
    for name in HOSTS:
        cluster.start_host(name)
    token = cluster.account("sam", "user", 50 * MICRO)
    url, server_token = cluster.start_user_server(token)
    client = ServerKernel(url, server_token)

    names = client.rest("GET", "/api/kernelspecs")["kernelspecs"]
    assert names["gpu-share"]["spec"]["display_name"] == "Python 3 (shared GPU)"
    assert "python3" in names  # local kernels keep working beside it

    kernel = client.rest("POST", "/api/kernels", {"name": "gpu-share"})
    await client.connect(kernel["id"])
    reply, text = await client.execute(
        "import os; print(os.environ['GPU_SHARE_HOST_ID']); y = 41 + 1"
    )
    assert reply["status"] == "ok"
    first_host = text.strip()
    assert first_host in HOSTS

    # Interrupt: a 60 s sleep comes back within 2 s of the interrupt.
    sleeper = _execute_request("import time; time.sleep(60)", client.session)
    await client.ws.write_message(json.dumps(sleeper))
    time.sleep(1.0)
    interrupted_at = time.monotonic()
    client.rest("POST", f"/api/kernels/{kernel['id']}/interrupt")
    while True:
        message = json.loads(await client.ws.read_message())
        if (
            message["msg_type"] == "execute_reply"
            and message["parent_header"]["msg_id"] == sleeper["header"]["msg_id"]
        ):
            break
    assert message["content"]["status"] == "error"
    assert message["content"]["ename"] == "KeyboardInterrupt"
    assert time.monotonic() - interrupted_at < 2.0

    reply, text = await client.execute("print(y)")
    assert text.strip() == "42"

    # Restart: a fresh kernel (a new session) behind the same kernel id.
    first_session = cluster.session_of(token, "running")["id"]
    client.rest("POST", f"/api/kernels/{kernel['id']}/restart")
    client.ws.close()
    await client.connect(kernel["id"])
    reply, text = await client.execute("print('y' in dir())")
    assert text.strip() == "False"
    sessions = cluster.client(token).request("GET", "/sessions")
    assert {s["id"] for s in sessions if s["state"] == "ended"} >= {first_session}
    assert any(s["state"] == "running" and s["id"] != first_session for s in sessions)

    client.rest("DELETE", f"/api/kernels/{kernel['id']}")
    eventually(
        lambda: all(
            s["state"] == "ended" for s in cluster.client(token).request("GET", "/sessions")
        ),
        20,
        what="every session to end after shutdown",
    )


def test_nbconvert_execute_on_gpu_share(make_cluster, tmp_path):
    cluster = make_cluster()
    cluster.start_host("host-a")
    token = cluster.account("nora", "user", 50 * MICRO)
    path = tmp_path / "nb.ipynb"
    nbformat.write(notebook("import os\nprint('ran on', os.environ['GPU_SHARE_HOST_ID'])"), path)
    result = nbconvert_execute(path, cluster.url, token)
    assert result.returncode == 0, result.stderr
    executed = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    assert stream_text(executed.cells[0]).strip() == "ran on host-a"
    session = eventually(lambda: cluster.session_of(token, "ended"), 20, what="the session to end")
    assert session["amount_micro"] == session["billed_seconds"] * session["price_per_second_micro"]


def test_broker_serves_its_openapi_document(make_cluster):
    cluster = make_cluster()
    document = cluster.admin.request("GET", "/openapi.json")
    assert document["openapi"].startswith("3.")
    assert {"/gpu-share/api/sessions", "/gpu-share/api/offers", "/gpu-share/api/me"} <= set(
        document["paths"]
    )


def test_warm_kernels_are_handed_once_and_replaced(make_cluster, monkeypatch):
    cluster = make_cluster()
    cluster.start_host("warm-host", "3.6", "--warm-kernels=1")
    token = cluster.account("wendy", "user", 50 * MICRO)
    monkeypatch.setenv("GPU_SHARE_BROKER_URL", cluster.url)
    monkeypatch.setenv("GPU_SHARE_TOKEN", token)
    host = cluster.processes[-1]
    eventually(lambda: "warm kernel warm-" in host.output(), 60, what="the warm pool's kernel")

    nb = notebook(
        "import os\nprint(os.environ['GPU_SHARE_SESSION_ID'])\nsecret = 'first renter'",
    )
    NotebookClient(nb, kernel_name="gpu-share", timeout=60, startup_timeout=90).execute()
    first_session = stream_text(nb.cells[0]).strip()
    assert "handed warm kernel" in host.output()
    # The pool starts a replacement; wait for it (a renter arriving sooner gets a cold start).
    eventually(
        lambda: len(re.findall(r"warm kernel warm-\w+ ready", host.output())) >= 2,
        60,
        what="the pool's replacement kernel",
    )

    again = notebook("import os\nprint(os.environ['GPU_SHARE_SESSION_ID'], 'secret' in dir())")
    NotebookClient(again, kernel_name="gpu-share", timeout=60, startup_timeout=90).execute()
    second_session, leaked = stream_text(again.cells[0]).split()
    assert second_session != first_session
    assert leaked == "False"
    handed = re.findall(r"handed warm kernel (warm-\w+)", host.output())
    assert len(handed) == 2 and handed[0] != handed[1]  # a fresh kernel each time
    sessions = {s["id"]: s for s in cluster.client(token).request("GET", "/sessions")}
    assert {first_session, second_session} <= set(sessions)


def test_a_fresh_kernels_info_is_answered_by_the_bridge_then_by_the_kernel(
    make_cluster, monkeypatch
):
    """The first kernel_info_requests (jupyter_server's, its nudge's, the lab's) are answered
    by the bridge from the reply the host got at start; from the first other request on,
    every one goes to the kernel, in order."""

    cluster = make_cluster()
    cluster.start_host("host-a")
    token = cluster.account("nina", "user", 50 * MICRO)
    monkeypatch.setenv("GPU_SHARE_BROKER_URL", cluster.url)
    monkeypatch.setenv("GPU_SHARE_TOKEN", token)

    async def scenario() -> None:
        async with remote_kernel() as (km, client):
            bridge = km.provisioner.bridge
            assert bridge.kernel_info.answered >= 1
            reply = await client.kernel_info(reply=True, timeout=10)
            assert reply["content"]["language_info"]["name"] == "python"
            assert reply["content"]["implementation"] == "ipython"
            answered_here = reply["header"]["session"]
            answered = bridge.kernel_info.answered
            # A cell, then kernel_info at once: the kernel answers, after the cell.
            execute_id = client.execute("import time; time.sleep(0.5); x = 41 + 1")
            info_id = client.kernel_info()
            first = await client.get_shell_msg(timeout=30)
            second = await client.get_shell_msg(timeout=30)
            assert first["parent_header"]["msg_id"] == execute_id
            assert first["content"]["status"] == "ok"
            assert second["parent_header"]["msg_id"] == info_id
            assert second["content"]["language_info"]["name"] == "python"
            assert second["header"]["session"] == answered_here  # as if the kernel answered
            assert bridge.kernel_info.answered == answered
            assert not bridge.kernel_info.armed
            # The kernel itself published a status for the kernel_info it answered.
            states = []
            while True:
                msg = await client.get_iopub_msg(timeout=10)
                parent = msg["parent_header"].get("msg_id")
                if msg["msg_type"] == "status" and parent == info_id:
                    states.append(msg["content"]["execution_state"])
                    if states[-1] == "idle":
                        break
            assert states == ["busy", "idle"]

    asyncio.run(scenario())
