"""Tokens with a lifecycle: gs_ tokens that expire and are revoked, never logged, never in a
local kernel's environment (issue 15, item 4)."""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

from jupyter_gpu_share.cli import (
    build_parser,
    format_duration,
    join_token_values,
    parse_duration,
    token_lifetime,
)
from jupyter_gpu_share.ledger import MICRO

from .harness import CLI, clean_env
from .test_remote_kernels import ServerKernel

pytestmark = pytest.mark.e2e

TEN_YEARS = 10 * 365 * 86_400


def call(
    url: str, method: str, path: str, token: str | None = None, body: Any = None
) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status, payload = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, payload = error.code, error.read()
    try:
        return status, json.loads(payload or b"null")
    except ValueError:
        return status, payload.decode(errors="replace")


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=60, env=clean_env(**env)
    )


# -- the duration parser and the command line, without a broker ----------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30),
        ("15m", 900),
        ("12h", 43_200),
        ("30d", 2_592_000),
        ("2w", 1_209_600),
        ("1y", 31_536_000),
        (" 7d ", 604_800),
    ],
)
def test_parse_duration(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds
    assert parse_duration(format_duration(seconds)) == seconds


@pytest.mark.parametrize("text", ["", "30", "d", "3x", "1.5h", "-5d", "0s", "0y", "1 day", "1D"])
def test_parse_duration_refuses_what_is_not_a_duration(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_token_lifetime_is_one_second_to_ten_years() -> None:
    assert token_lifetime("1s") == 1
    assert token_lifetime("10y") == TEN_YEARS
    for text in ("11y", "3651d", "0s", "soon"):
        with pytest.raises(argparse.ArgumentTypeError):
            token_lifetime(text)
    assert format_duration(90) == "90s" and format_duration(86_400) == "1d"


def test_token_values_beginning_with_a_dash_parse() -> None:
    legacy = "-Xy3_" + "a" * 38  # a token from before gs_: 1 in 64 began with "-"
    args = build_parser().parse_args(join_token_values(["balance", "--token", legacy]))
    assert args.token == legacy
    assert join_token_values(["offers", "--", "--token", "x"]) == ["offers", "--", "--token", "x"]


@pytest.mark.parametrize("duration", ["3x", "0d", "11y", "30"])
def test_cli_refuses_a_bad_expiry_in_one_line(duration: str) -> None:
    result = run_cli(
        "admin",
        "token",
        "--role",
        "user",
        "--name",
        "x",
        "--expires-in",
        duration,
        GPU_SHARE_BROKER_URL="http://127.0.0.1:9",
        GPU_SHARE_TOKEN="gs_unused",
    )
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "--expires-in" in result.stderr


# -- a real broker --------------------------------------------------------------------


def test_token_lifecycle_over_the_api(make_cluster):
    cluster = make_cluster()
    url, admin = cluster.url + "/gpu-share/api", cluster.admin_token
    carol = cluster.account("carol", "user")
    assert carol.startswith("gs_")

    status, issued = call(url, "POST", "/accounts/carol/tokens", admin, {"expires_in_s": 1})
    assert status == 201 and issued["token"].startswith("gs_") and issued["expires_in_s"] == 1
    short = issued["token"]
    assert call(url, "GET", "/me", short)[0] == 200
    for body in (
        {"expires_in_s": 0},
        {"expires_in_s": -5},
        {"expires_in_s": TEN_YEARS + 1},
        {"expires_in_s": 2**70},
        {"expires_in_s": "60"},
        {"expires_in_s": True},
        {"expires_in_s": 1.5},
        b"[1]",
        b"{nope",
    ):
        status, answer = call(url, "POST", "/accounts/carol/tokens", admin, body)
        assert status == 400, (body, status, answer)
    assert call(url, "POST", "/accounts/carol/tokens", admin, {"expires_in_s": TEN_YEARS})[0] == 201
    for method in ("GET", "POST", "DELETE"):
        assert call(url, method, "/accounts/nobody/tokens", admin)[0] == 404
        assert call(url, method, "/accounts/carol/tokens", carol)[0] == 403

    time.sleep(1.2)
    assert call(url, "GET", "/me", short)[0] == 401  # expired
    status, listed = call(url, "GET", "/accounts/carol/tokens", admin)
    assert status == 200
    assert [t["state"] for t in listed] == ["active", "expired", "active"]
    assert listed[1]["id"] == issued["id"] and listed[1]["expires_at"]
    assert listed[0]["last_used_at"] and listed[0]["expires_at"] is None
    assert not any(t["token"][3:11] in json.dumps(listed) for t in (issued,))

    status, revoked = call(url, "DELETE", "/accounts/carol/tokens", admin)
    assert (status, revoked) == (200, {"name": "carol", "revoked": 2})
    # Refused from the next request on: the broker caches no authentication.
    assert call(url, "GET", "/me", carol)[0] == 401
    status, listed = call(url, "GET", "/accounts/carol/tokens", admin)
    assert [t["state"] for t in listed] == ["revoked", "expired", "revoked"]
    assert call(url, "DELETE", "/accounts/carol/tokens", admin)[1]["revoked"] == 0
    assert call(url, "GET", "/me", cluster.account("carol", "user"))[0] == 200


def test_tokens_in_urls_never_reach_the_broker_log(make_cluster):
    cluster = make_cluster()
    secret = "gs_" + "S3cr3t" * 7 + "x"
    queries = [f"token={secret}", f"x=1&access_token={secret}", f"t={secret}"]
    for path in ("/me", "/relay/s-12/user", "/no-such-route", "/sessions/s-ab"):
        for query in queries:
            for header in (None, cluster.admin_token):
                call(cluster.url, "GET", f"/gpu-share/api{path}?{query}", header)
    call(cluster.url, "GET", f"/api/kernels?token={secret}")
    time.sleep(0.5)
    output = cluster.broker.output()
    assert "401 GET /gpu-share/api/me?token=[secret]" in output  # the warning is still there
    assert secret not in output
    assert "S3cr3t" not in output


def test_cli_issues_lists_and_revokes_tokens(make_cluster):
    cluster = make_cluster()
    admin = {"GPU_SHARE_BROKER_URL": cluster.url, "GPU_SHARE_TOKEN": cluster.admin_token}
    made = run_cli(
        "admin", "token", "--role", "user", "--name", "dana", "--expires-in", "30d", **admin
    )
    assert made.returncode == 0, made.stderr
    assert "valid for 30d" in made.stdout
    dana = made.stdout.strip().splitlines()[-1]
    assert dana.startswith("gs_")
    # The README's form, --token <token>, with the broker named on the command line.
    balance = run_cli("balance", "--broker", cluster.url, "--token", dana)
    assert balance.returncode == 0 and "dana (user)" in balance.stdout, balance.stderr

    listing = run_cli("admin", "tokens", "dana", **admin)
    assert listing.returncode == 0, listing.stderr
    header, row = listing.stdout.strip().splitlines()
    assert header.split() == ["ID", "CREATED", "EXPIRES", "LAST", "USED", "STATE"]
    assert row.split()[0] == made.stdout.split()[1] and row.endswith("active")
    assert dana not in listing.stdout and dana[3:11] not in listing.stdout

    revoked = run_cli("admin", "revoke", "dana", **admin)
    assert (revoked.returncode, revoked.stdout.strip()) == (0, "revoked 1 token(s) of dana")
    refused = run_cli("balance", "--broker", cluster.url, "--token", dana)
    assert refused.returncode == 1 and len(refused.stderr.strip().splitlines()) == 1
    assert run_cli("admin", "tokens", "dana", **admin).stdout.strip().endswith("revoked")
    unknown = run_cli("admin", "revoke", "nobody", **admin)
    assert unknown.returncode == 1 and "nobody" in unknown.stderr


def test_local_kernels_never_inherit_the_broker_token(make_cluster):
    asyncio.run(_local_kernels_never_inherit_the_broker_token(make_cluster))


async def _local_kernels_never_inherit_the_broker_token(make_cluster):
    cluster = make_cluster()
    cluster.start_host("host-a")
    token = cluster.account("sam", "user", 50 * MICRO)
    url, server_token = cluster.start_user_server(token)
    client = ServerKernel(url, server_token)

    local = client.rest("POST", "/api/kernels", {"name": "python3"})
    await client.connect(local["id"])
    reply, text = await client.execute(
        "import os; print(repr(os.environ.get('GPU_SHARE_TOKEN')), "
        "any('gs_' in v for v in os.environ.values()))"
    )
    assert reply["status"] == "ok" and text.strip() == "None False", text
    client.ws.close()
    client.rest("DELETE", f"/api/kernels/{local['id']}")

    # The server still has the token: its gpu-share kernels and its broker proxy work.
    me = client.rest("GET", "/gpu-share/user/me")
    assert me["name"] == "sam"
    remote = client.rest("POST", "/api/kernels", {"name": "gpu-share"})
    await client.connect(remote["id"])
    reply, text = await client.execute("import os; print(os.environ['GPU_SHARE_HOST_ID'])")
    assert reply["status"] == "ok" and text.strip() == "host-a"
    client.ws.close()
    client.rest("DELETE", f"/api/kernels/{remote['id']}")
