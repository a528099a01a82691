"""The authorization matrix, generated from the broker's own OpenAPI document (issue 15).

Every operation the document lists is called by every kind of caller: anonymous, a
malformed token, an expired one, a revoked one, the owner, another user, the session's
host, another host, the class's teacher, another teacher, a student, an admin. Each call
must be refused exactly as the access rule below says (401 with no or a bad token, 403 for a
role that may never, 404 for "not yours") or let through (anything else, which for writes is
a 400: the matrix sends bodies that fail validation, so letting a call through changes
nothing). An operation the document lists and the rules do not, or the reverse, fails the
test: the document and the rules cannot drift apart. The websocket routes are checked too.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.websocket import websocket_connect

from jupyter_gpu_share.ledger import MICRO

pytestmark = pytest.mark.e2e

API = "/gpu-share/api"

# Who may call each operation. Roles: the token's role; "renter" and "session-host": of the
# session in the path; "class-teacher", "class-student": of the class in the path.
ANYONE = {"admin", "user", "host", "teacher", "student"}
ACCESS: dict[tuple[str, str], set[str]] = {
    ("get", "/me"): ANYONE,
    ("get", "/me/caps"): {"user", "student"},
    ("put", "/me/caps"): {"user", "student"},
    ("post", "/accounts"): {"admin"},
    ("get", "/accounts/{name}/tokens"): {"admin"},
    ("post", "/accounts/{name}/tokens"): {"admin"},
    ("delete", "/accounts/{name}/tokens"): {"admin"},
    ("post", "/accounts/{name}/credit"): {"admin"},
    ("get", "/offers"): ANYONE,
    ("get", "/sessions"): ANYONE,
    ("post", "/sessions"): {"user", "student"},
    ("get", "/sessions/{session_id}"): {"admin", "renter", "session-host"},
    ("delete", "/sessions/{session_id}"): {"admin", "renter"},
    ("get", "/earnings"): {"host"},
    ("get", "/classes"): ANYONE,
    ("post", "/classes"): {"teacher", "admin"},
    ("get", "/classes/{name}"): {"admin", "class-teacher", "class-student"},
    ("post", "/classes/{name}/budget"): {"admin", "class-teacher"},
    ("get", "/classes/{name}/students"): {"admin", "class-teacher"},
    ("post", "/classes/{name}/students"): {"admin", "class-teacher"},
    ("delete", "/classes/{name}/students/{student}"): {"admin", "class-teacher"},
    ("post", "/classes/{name}/students/{student}/stop"): {"admin", "class-teacher"},
    ("get", "/classes/{name}/notebooks"): {"admin", "class-teacher", "class-student"},
    ("get", "/classes/{name}/notebooks/{notebook}"): {"admin", "class-teacher", "class-student"},
    ("put", "/classes/{name}/notebooks/{notebook}"): {"admin", "class-teacher"},
    ("get", "/classes/{name}/usage"): {"admin", "class-teacher", "class-student"},
    ("get", "/sessions/{session_id}/receipt"): {"admin", "renter", "session-host"},
    ("get", "/receipts/public-key"): ANYONE,
    ("get", "/receipts"): {"admin"},
    ("get", "/ledger/check"): {"admin"},
}
# Operations that take no token (a load balancer's probe): says only serving or not.
PUBLIC = {("get", "/health")}
# Operations whose allowed call would change what the other calls see: only refusals are
# checked (the allowed calls of these are covered by their own tests).
DESTRUCTIVE = {
    ("delete", "/accounts/{name}/tokens"),
    ("delete", "/sessions/{session_id}"),
    ("delete", "/classes/{name}/students/{student}"),
}
# What each caller is, for the rules above.
CALLERS = {
    "admin": {"admin"},
    "alice": {"user", "renter"},  # the session's renter
    "bob": {"user"},
    "h1": {"host", "session-host"},  # the session's host
    "h2": {"host"},
    "t1": {"teacher", "class-teacher"},
    "t2": {"teacher"},
    "s1": {"user", "student", "class-student"},
}
BAD = ("anonymous", "malformed", "expired", "revoked")


def call(url: str, method: str, path: str, token: str | None, body: Any) -> tuple[int, str]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, method=method.upper(), headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()[:200]
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")[:200]


@pytest.fixture(scope="module")
def world(tmp_path_factory):  # type: ignore[no-untyped-def]
    from ..e2e.harness import Cluster

    workdir = tmp_path_factory.mktemp("authz")
    for folder in (workdir.parent.parent, workdir.parent, workdir):  # kernels' own uids
        folder.chmod(folder.stat().st_mode | 0o111)
    cluster = Cluster(workdir)
    try:
        tokens = {"admin": cluster.admin_token}
        people = (("alice", "user"), ("bob", "user"), ("t1", "teacher"), ("t2", "teacher"))
        for name, role in people:
            tokens[name] = cluster.account(name, role, 10 * MICRO)
        tokens["h2"] = cluster.account("h2", "host")
        cluster.start_host("h1", "3.6")
        # h1's agent has its own token: the matrix calls with another of h1's
        tokens["h1"] = cluster.admin.request("POST", "/accounts/h1/tokens")["token"]
        offer = cluster.admin.request("GET", "/offers")[0]
        session = cluster.client(tokens["alice"]).request(
            "POST", "/sessions", {"offer_id": offer["id"]}
        )
        # it stays "starting" (no renter relay connects): enough to be someone's session
        t1 = cluster.client(tokens["t1"])
        t1.request("POST", "/classes", {"name": "c1", "quota_seconds": 3600})
        enrolled = t1.request("POST", "/classes/c1/students", {"students": ["s1"]})
        tokens["s1"] = enrolled["new_accounts"]["s1"]
        notebook = {"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
        t1.request("PUT", "/classes/c1/notebooks/week1.ipynb", notebook)
        tokens["expired"] = cluster.admin.request(
            "POST", "/accounts/bob/tokens", {"expires_in_s": 1}
        )["token"]
        cluster.account("revokee", "user")
        tokens["revoked"] = cluster.admin.request("POST", "/accounts/revokee/tokens")["token"]
        cluster.admin.request("DELETE", "/accounts/revokee/tokens")
        tokens["malformed"] = "gs_" + "x" * 43
        tokens["anonymous"] = None  # type: ignore[assignment]
        time.sleep(1.2)  # the expiring token is past its time
        params = {
            "name": "c1",
            "session_id": session["id"],
            "student": "s1",
            "notebook": "week1.ipynb",
        }
        yield cluster, tokens, params
    finally:
        cluster.close()


def _operations(cluster) -> list[tuple[str, str]]:  # type: ignore[no-untyped-def]
    document = cluster.admin.request("GET", "/openapi.json")
    ops = []
    for path, item in document["paths"].items():
        for method in item:
            if method in ("get", "post", "put", "patch", "delete"):
                ops.append((method, path.removeprefix(API)))
    return ops


def _fill(path: str, params: dict[str, str], caller: str) -> str:
    filled = path
    for key, value in params.items():
        if key == "name" and path.startswith("/accounts/"):
            value = "bob"  # an account's routes name a user account
        filled = filled.replace("{" + key + "}", value)
    return API + filled


def test_the_rules_cover_every_documented_operation(world) -> None:  # type: ignore[no-untyped-def]
    cluster, _, _ = world
    documented = set(_operations(cluster)) - PUBLIC
    assert documented - set(ACCESS) == set(), "documented operations without an access rule"
    assert set(ACCESS) - documented == set(), "access rules for operations not documented"
    for method, path in PUBLIC:  # with no token, or a bad one: the same few words
        for token in (None, "not-a-token"):
            status, text = call(cluster.url, method, API + path, token, None)
            assert status == 200 and set(json.loads(text)) == {"status", "broker_id"}, text


def test_every_operation_for_every_caller(world, security_counts) -> None:  # type: ignore[no-untyped-def]
    cluster, tokens, params = world
    wrong: list[str] = []
    calls = server_errors = 0
    for method, path in sorted(ACCESS):
        allowed = ACCESS[(method, path)]
        body = None if method in ("get", "delete") else {"bogus": True}
        url_path = _fill(path, params, "")
        for caller in (*BAD, *CALLERS):
            if (method, path) in DESTRUCTIVE and caller in CALLERS and CALLERS[caller] & allowed:
                continue  # it would do it (revoke, stop, remove) for the calls after it
            status, text = call(cluster.url, method, url_path, tokens[caller], body)
            calls += 1
            if status >= 500:
                server_errors += 1
                wrong.append(f"{method.upper()} {path} as {caller}: {status} {text}")
            elif caller in BAD:
                if status != 401:
                    wrong.append(f"{method.upper()} {path} as {caller}: {status}, want 401")
            elif CALLERS[caller] & allowed:
                if (method, path) not in DESTRUCTIVE and status in (401, 403):
                    wrong.append(f"{method.upper()} {path} as {caller}: {status}, want through")
            elif status not in (403, 404):
                wrong.append(f"{method.upper()} {path} as {caller}: {status}, want 403 or 404")
    line = f"authorization matrix: {calls} calls, {len(wrong)} wrong, {server_errors} 5xx"
    security_counts.append(line)
    print(line)
    assert not wrong, "\n".join(wrong)


def test_websocket_routes_for_every_caller(world) -> None:  # type: ignore[no-untyped-def]
    cluster, tokens, params = world
    sid = params["session_id"]
    routes = {
        "/hosts/connect": {"h1", "h2"},
        f"/relay/{sid}/user": {"alice", "admin"},
        f"/relay/{sid}/host": {"h1"},
    }

    async def status_of(path: str, token: str | None) -> int:
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        url = cluster.url.replace("http://", "ws://") + API + path
        try:
            conn = await websocket_connect(HTTPRequest(url, headers=headers))
        except HTTPClientError as error:
            return error.code
        conn.close()
        return 101

    async def run() -> list[str]:
        wrong = []
        for path, allowed in routes.items():
            for caller in (*BAD, *CALLERS):
                if caller in allowed and path.startswith("/relay/"):
                    continue  # connecting would replace the live session's own relay
                status = await status_of(path, tokens[caller])
                if caller in BAD and status != 401:
                    wrong.append(f"ws {path} as {caller}: {status}, want 401")
                elif caller not in BAD and caller not in allowed and status not in (403, 404):
                    wrong.append(f"ws {path} as {caller}: {status}, want 403 or 404")
                elif caller in allowed and status != 101:
                    wrong.append(f"ws {path} as {caller}: {status}, want 101")
        return wrong

    wrong = asyncio.run(run())
    assert not wrong, "\n".join(wrong)
