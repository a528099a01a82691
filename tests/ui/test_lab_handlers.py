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
        f"{url}/gpu-share/user/{path}", data=data, method=method,
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
        status, answer = call(url, token, "POST", "preference",
                              {"path": "a.ipynb", "offer_id": 3, "gpu_model": "T4"})
        assert status == 200, answer
        assert answer == {"path": "a.ipynb", "offer_id": 3, "gpu_model": "T4"}
        for bad in ({"offer_id": -1}, {"offer_id": "3"}, {"offer_id": True}, [1],
                    {"offer_id": 1, "gpu_model": 5}, {"offer_id": 1, "path": 7}):
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
