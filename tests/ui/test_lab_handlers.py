"""The user-side handlers the lab extension adds: the offer preference and a kernel's session."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from ..e2e.harness import Cluster

pytestmark = [pytest.mark.e2e]


def call(url: str, token: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(
        f"{url}/gpu-share/user/{path}",
        data=data,
        method=method,
        headers={"Authorization": f"token {token}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def test_preference_and_kernel_lookup(tmp_path: Path) -> None:
    """Good choices are kept, bad ones are a 400, unknown kernels a 404, no auth a 403."""
    (tmp_path / "c").mkdir()
    cluster = Cluster(tmp_path / "c")
    try:
        url, token = cluster.start_user_server(cluster.account("ada", "user", 1_000_000))
        status, answer = call(
            url, token, "POST", "preference", {"path": "a.ipynb", "offer_id": 3, "gpu_model": "T4"}
        )
        assert status == 200, answer
        assert answer == {"path": "a.ipynb", "offer_id": 3, "gpu_model": "T4"}
        for bad in (
            {"offer_id": -1},
            {"offer_id": "3"},
            {"offer_id": True},
            [1],
            {"offer_id": 1, "gpu_model": 5},
            {"offer_id": 1, "path": 7},
        ):
            status, answer = call(url, token, "POST", "preference", bad)
            assert status == 400, (bad, answer)
            assert set(answer) >= {"message", "reason"}
        status, answer = call(url, token, "POST", "preference", b"{not json")
        assert status == 400, answer
        status, answer = call(url, token, "GET", "kernels/0123abcd-0000-0000-0000-000000000000")
        assert status == 404, answer
        status, _ = call(url, "wrong-token", "GET", "kernels/0123abcd")
        assert status == 403
    finally:
        cluster.close()


def _start_culling_server(cluster: Cluster, token: str) -> tuple[str, str]:
    """A jupyter_server with the user-side extension that culls kernels idle for 2 s."""
    import secrets
    import sys

    from ..e2e.harness import ROOT_FLAG, clean_env, eventually, free_port

    port = free_port()
    server_token = secrets.token_hex(16)
    root = cluster.workdir / "notebooks-cull"
    root.mkdir(exist_ok=True)
    cluster.spawn(
        "user-server-cull",
        [
            sys.executable,
            "-m",
            "jupyter_server",
            f"--port={port}",
            "--ServerApp.ip=127.0.0.1",
            "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={server_token}",
            f"--ServerApp.root_dir={root}",
            "--ServerApp.open_browser=False",
            "--MappingKernelManager.cull_idle_timeout=2",
            "--MappingKernelManager.cull_interval=1",
            *ROOT_FLAG,
        ],
        clean_env(GPU_SHARE_BROKER_URL=cluster.url, GPU_SHARE_TOKEN=token),
    )
    url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        request = urllib.request.Request(
            f"{url}/api/status", headers={"Authorization": f"token {server_token}"}
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status == 200

    eventually(answers, 60, 0.2, "the culling jupyter_server")
    return url, server_token


def api(url: str, token: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """Call jupyter_server's own REST API (``/api/...``)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"{url}/api/{path}",
        data=data,
        method=method,
        headers={"Authorization": f"token {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def test_culled_kernel_is_remembered(tmp_path: Path) -> None:
    """A gpu-share kernel culled for idleness answers ``culled: true`` with its ended session."""
    from ..e2e.harness import eventually

    (tmp_path / "c").mkdir()
    cluster = Cluster(tmp_path / "c")
    try:
        user_token = cluster.account("ada", "user", 10_000_000)
        cluster.start_host("host-a", "3.6")
        url, token = _start_culling_server(cluster, user_token)
        status, kernel = api(url, token, "POST", "kernels", {"name": "gpu-share"})
        assert status in (200, 201), kernel
        kernel_id = kernel["id"]
        # While it lives it is an ordinary remote kernel (no "culled").
        status, answer = call(url, token, "GET", f"kernels/{kernel_id}")
        if status == 200:
            assert answer["remote"] is True, answer
            assert not answer.get("culled"), answer

        def culled() -> bool:
            status, _ = api(url, token, "GET", f"kernels/{kernel_id}")
            return status == 404

        eventually(culled, 60, 0.5, "the idle kernel to be culled")
        status, answer = call(url, token, "GET", f"kernels/{kernel_id}")
        assert status == 200, answer
        assert answer["culled"] is True, answer
        assert answer["kernel_name"] == "gpu-share", answer
        assert answer["remote"] is True, answer
        session = answer["session"]
        assert session and session["host_id"] == "host-a", answer

        # The session ends with the kernel; the answer carries its final bill.
        def ended() -> bool:
            _, again = call(url, token, "GET", f"kernels/{kernel_id}")
            return again["session"]["state"] == "ended"

        eventually(ended, 30, 0.5, "the culled kernel's session to end")
        _, answer = call(url, token, "GET", f"kernels/{kernel_id}")
        assert answer["session"]["amount_micro"] is not None, answer
        # Kernels that were never here are still a 404.
        status, _ = call(url, token, "GET", "kernels/0123abcd-0000-0000-0000-000000000000")
        assert status == 404
        assert "culled for being idle" in cluster.logs()
    finally:
        cluster.close()
