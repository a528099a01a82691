"""Bad or hostile input gets a clear 4xx (or a one-line CLI error) and changes nothing."""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request
from typing import Any

import pytest

from jupyter_gpu_share.ledger import MICRO

from .harness import CLI, clean_env

pytestmark = pytest.mark.e2e


def call(
    url: str, method: str, path: str, token: str | None = None, body: bytes | None = None
) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(
        url + "/gpu-share/api" + path, data=body, method=method, headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


@pytest.fixture
def cluster(make_cluster):
    cluster = make_cluster()
    cluster.start_host("host-a", "3.6")
    return cluster


def test_tokens_roles_and_ownership(cluster):
    url = cluster.url
    alice = cluster.account("alice", "user", 100 * MICRO)
    bob = cluster.account("bob", "user", 100 * MICRO)
    host_token = cluster.account("host-x", "host")

    for token in (None, "not-a-token", alice[:-2] + "xx"):
        status, error = call(url, "GET", "/me", token)
        assert status == 401 and "token" in error["message"]
    status, error = call(url, "GET", "/offers")
    assert status == 401

    # The broker is a jupyter_server, but none of the server's own APIs are open to tokens.
    request = urllib.request.Request(
        url + "/api/kernels", headers={"Authorization": f"Bearer {cluster.admin_token}"}
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 403

    status, error = call(url, "POST", "/sessions", host_token, b"{}")
    assert status == 403 and "user" in error["message"]
    status, error = call(
        url, "POST", "/accounts", alice, json.dumps({"name": "eve", "role": "admin"}).encode()
    )
    assert status == 403
    status, error = call(url, "POST", "/accounts/alice/credit", alice, b'{"amount_micro": 5}')
    assert status == 403

    status, session = call(url, "POST", "/sessions", alice, b"{}")
    assert status == 201, session
    sid = session["id"]
    assert call(url, "GET", f"/sessions/{sid}", bob)[0] == 404
    assert call(url, "DELETE", f"/sessions/{sid}", bob)[0] == 404
    assert all(s["id"] != sid for s in call(url, "GET", "/sessions", bob)[1])
    assert call(url, "GET", f"/sessions/{sid}", alice)[1]["state"] in ("starting", "running")
    status, stopped = call(url, "DELETE", f"/sessions/{sid}", alice)
    assert status == 200 and stopped["state"] == "ended"


def test_malformed_and_out_of_range_bodies_change_nothing(cluster):
    url, admin = cluster.url, cluster.admin_token
    alice = cluster.account("alice", "user", 100 * MICRO)
    before = call(url, "GET", "/me", alice)[1]["balance_micro"]

    status, error = call(url, "POST", "/accounts/alice/credit", admin, b"{not json")
    assert status == 400 and "JSON" in error["message"]
    for amount in (-5, 0, "12", 1.5, None):
        status, error = call(
            url,
            "POST",
            "/accounts/alice/credit",
            admin,
            json.dumps({"amount_micro": amount}).encode(),
        )
        assert status == 400, amount
    status, error = call(
        url, "POST", "/sessions", alice, json.dumps({"max_price_per_hour_micro": -1}).encode()
    )
    assert status == 400 and "max_price_per_hour_micro" in error["message"]
    status, error = call(url, "POST", "/sessions", alice, json.dumps({"offer_id": "one"}).encode())
    assert status == 400
    status, error = call(
        url, "POST", "/accounts", admin, json.dumps({"name": "x", "role": "emperor"}).encode()
    )
    assert status == 400
    status, error = call(url, "POST", "/sessions", alice, b"[1, 2]")
    assert status == 400
    assert call(url, "GET", "/me", alice)[1]["balance_micro"] == before
    assert call(url, "GET", "/sessions", alice)[1] == []


def test_a_start_needs_a_minute_of_credit(cluster):
    poor = cluster.account("poor", "user", 30 * 1000)  # 30 s at 1000 micro/s
    status, error = call(cluster.url, "POST", "/sessions", poor, b"{}")
    assert status == 402
    assert "insufficient credit" in error["message"] and "60 s" in error["message"]
    assert call(cluster.url, "GET", "/sessions", poor)[1] == []


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=60, env=clean_env(**env)
    )


def test_cli_reports_one_line_errors(cluster):
    env = {"GPU_SHARE_BROKER_URL": cluster.url, "GPU_SHARE_TOKEN": cluster.admin_token}
    made = run_cli("admin", "token", "--role", "user", "--name", "carol", **env)
    assert made.returncode == 0, made.stderr
    carol = made.stdout.strip().splitlines()[-1]

    for args, fragment in (
        (("admin", "credit", "carol", "-3"), "greater than zero"),
        (("admin", "credit", "carol", "lots"), "AMOUNT"),
        (("admin", "credit", "nobody", "5"), "nobody"),
        (("admin", "token", "--role", "emperor", "--name", "x"), "emperor"),
    ):
        result = run_cli(*args, **env)
        assert result.returncode != 0, args
        assert "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert fragment in result.stderr, (args, result.stderr)

    wrong = run_cli("balance", GPU_SHARE_BROKER_URL=cluster.url, GPU_SHARE_TOKEN="wrong")
    assert wrong.returncode == 1 and "token" in wrong.stderr and len(wrong.stderr.splitlines()) == 1
    nowhere = run_cli("offers", GPU_SHARE_BROKER_URL="http://127.0.0.1:9", GPU_SHARE_TOKEN=carol)
    assert nowhere.returncode == 1 and "cannot reach" in nowhere.stderr
    host = run_cli("host", "--broker", cluster.url, "--price-per-hour", "-1", GPU_SHARE_TOKEN=carol)
    assert host.returncode != 0 and "Traceback" not in host.stderr and "price" in host.stderr

    balance = run_cli("balance", "--json", GPU_SHARE_BROKER_URL=cluster.url, GPU_SHARE_TOKEN=carol)
    me = json.loads(balance.stdout)
    assert (me["name"], me["role"], me["balance_micro"]) == ("carol", "user", 0)
    offers = run_cli("offers", "--json", GPU_SHARE_BROKER_URL=cluster.url, GPU_SHARE_TOKEN=carol)
    offer = json.loads(offers.stdout)[0]
    assert offer["gpu_model"] == "CPU" and offer["gpu_count"] == 0
    assert offer["price_per_hour_micro"] == 3_600_000
    table = run_cli("offers", GPU_SHARE_BROKER_URL=cluster.url, GPU_SHARE_TOKEN=carol)
    assert "host-a" in table.stdout and "3.60/h" in table.stdout
