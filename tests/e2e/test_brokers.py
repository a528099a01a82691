"""Several brokers on one database (issue 17): SQLite refuses a second broker; on
PostgreSQL a broker that starts beside another leaves the other's sessions alone."""

from __future__ import annotations

import asyncio
import re
import ssl
import subprocess

import httpx
import pytest
from jupyter_client.manager import AsyncKernelManager

from jupyter_gpu_share.client import BrokerClient, BrokerError, websocket_url
from jupyter_gpu_share.ledger import MICRO
from jupyter_gpu_share.store import Store
from jupyter_gpu_share.transport.websocket import HandshakeError, connect

from ..nginx import Nginx, nginx_path
from ..tlsca import ScratchCA
from .harness import CLI, ROOT_FLAG, clean_env, eventually, free_port, remote_kernel

pytestmark = pytest.mark.e2e


def _broker_args(db_url: str, folder) -> list[str]:
    return [
        *CLI,
        "broker",
        f"--port={free_port()}",
        "--ServerApp.ip=127.0.0.1",
        "--ServerApp.port_retries=0",
        f"--db={db_url}",
        f"--ServerApp.root_dir={folder}",
        f"--BrokerApp.receipt_key_file={folder / 'second-key.pem'}",
        *ROOT_FLAG,
    ]


def test_a_second_broker_on_one_sqlite_file_refuses_to_start(make_cluster, tmp_path):
    cluster = make_cluster()
    second = subprocess.run(
        _broker_args(cluster.db_url, tmp_path),
        env=clean_env(GPU_SHARE_ADMIN_TOKEN="second-admin-token"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert second.returncode == 1, second.stderr[-2000:]
    pid = cluster.broker.popen.pid
    assert (
        f"gpu-share broker: error: another broker (pid {pid}) already serves {cluster.db_url}; "
        "SQLite is for one broker: run several on PostgreSQL" in second.stderr
    )
    assert "Traceback" not in second.stderr
    assert cluster.admin.request("GET", "/me")["name"] == "admin"  # the first serves on
    # Once the first has gone, however it went, a broker starts on the file again.
    cluster.broker.kill()
    cluster.start_broker()
    assert "no other broker on this store" in cluster.broker.output()


@pytest.mark.postgres
def test_a_broker_started_beside_another_leaves_its_sessions_alone(
    make_cluster, postgres_url, monkeypatch
):
    """Before leases, the second broker loaded the first one's running session and, after
    its resume grace, settled it as "host lost" while the kernel ran on unbilled."""
    one = make_cluster(db_url=postgres_url)
    one.start_host("host-a", "3.6")
    token = one.account("nina", "user", 100 * MICRO)
    monkeypatch.setenv("GPU_SHARE_BROKER_URL", one.url)
    monkeypatch.setenv("GPU_SHARE_TOKEN", token)
    first_id = re.search(r"gpu-share broker (b-[0-9a-f]{12}): no other broker", one.broker.output())
    assert first_id, one.broker.output()[-2000:]

    async def scenario() -> None:
        async with remote_kernel() as (_km, client):
            reply = await client.execute_interactive("x = 41", timeout=30)
            assert reply["content"]["status"] == "ok"
            session = one.session_of(token, "running")

            two = make_cluster(db_url=postgres_url, resume_grace_s=1.0)
            eventually(
                lambda: (
                    f"1 other broker(s) on this store: {first_id.group(1)}" in two.broker.output()
                ),
                30,
                what="the second broker to see the first",
            )
            # Past the second broker's resume grace, several of its liveness checks: the
            # first broker's session is not its to settle, so nothing may happen to it.
            await asyncio.sleep(4.0)
            assert one.session_of(token)["id"] == session["id"]
            assert one.session_of(token)["state"] == "running"
            outputs = []
            reply = await client.execute_interactive(
                "print(x + 1)", timeout=30, output_hook=outputs.append
            )
            assert reply["content"]["status"] == "ok"
            assert any(o["content"].get("text") == "42\n" for o in outputs)
            assert "host lost" not in two.broker.output()

    asyncio.run(scenario())
    ended = eventually(lambda: one.session_of(token, "ended"), 30, what="the session to settle")
    lifetime = (ended["ended_us"] - ended["started_us"]) / 1e6
    assert ended["end_reason"] in ("stopped", "kernel exited")  # a shutdown_request
    assert lifetime - 1 <= ended["billed_seconds"] <= lifetime + 1  # the whole life, once
    with Store(postgres_url) as store:
        store.check_ledger()


@pytest.mark.postgres
def test_one_payer_on_two_brokers_cannot_overspend(make_cluster, postgres_url, monkeypatch):
    """Each broker counted only its own sessions: with credit for 10 s, one session ran
    10 s on broker one and the other, on broker two, as long, billed 0 s when the balance
    ran out (stopped "when the credit ran out": at its start). Its host ran it unpaid."""
    credit, price = 10_000, 1_000  # micro-credits; "3.6" credits an hour is 1,000 a second
    traits = {"db_url": postgres_url, "minimum_start_seconds": 1}
    one = make_cluster(**traits)
    two = make_cluster(**traits)
    eventually(lambda: "now 1 other broker(s)" in one.broker.output(), 30, what="peers")
    # One kernel a host: the second start goes to host-b, whichever broker it reaches.
    one.start_host("host-a", "3.6", "--max-kernels=1")
    two.start_host("host-b", "3.6", "--max-kernels=1")
    token = one.account("nina", "user", credit)
    monkeypatch.setenv("GPU_SHARE_TOKEN", token)

    async def scenario() -> None:
        managers = []
        for cluster in (one, two):
            monkeypatch.setenv("GPU_SHARE_BROKER_URL", cluster.url)  # read at each start
            km = AsyncKernelManager(kernel_name="gpu-share")
            await km.start_kernel()
            managers.append(km)
        try:
            eventually(
                lambda: len([s for s in _sessions(one, token) if s["state"] == "ended"]) == 2,
                60,
                what="both sessions to be stopped for credit",
            )
        finally:
            for km in managers:
                await km.shutdown_kernel(now=True)

    asyncio.run(scenario())
    ended = _sessions(one, token)
    assert {s["host_id"] for s in ended} == {"host-a", "host-b"}
    assert all(s["end_reason"] == "credit exhausted" for s in ended), ended
    billed = sum(s["amount_micro"] for s in ended)
    assert billed <= credit + 2 * price, ended  # at most a second's price per session over
    # Both ran at once, and both were stopped as the shared credit ran out: each billed
    # about half of it (the second started a second or so later), neither run for free.
    assert all(s["billed_seconds"] >= 3 for s in ended), ended
    assert one.client(token).request("GET", "/me")["balance_micro"] >= -2 * price
    with Store(postgres_url) as store:
        store.check_ledger()


def _failover_pair(make_cluster, postgres_url, monkeypatch):  # type: ignore[no-untyped-def]
    """Two brokers on one store; host-a and the user given both, the host on the first."""
    one = make_cluster(db_url=postgres_url)
    two = make_cluster(db_url=postgres_url)
    both = f"{one.url},{two.url}"
    one.start_host("host-a", "3.6", broker_url=both)
    token = one.account("nina", "user", 100 * MICRO)
    monkeypatch.setenv("GPU_SHARE_BROKER_URL", both)
    monkeypatch.setenv("GPU_SHARE_TOKEN", token)
    return one, two, token


def _sessions(cluster, token: str) -> list[dict]:
    return cluster.client(token).request("GET", "/sessions")


@pytest.mark.postgres
def test_kill_9_of_the_hosts_broker_mid_cell_fails_over_and_bills_once(
    make_cluster, postgres_url, monkeypatch
):
    """The host and the user are given both brokers; the host's broker is killed while a
    cell runs: the host and the relay move to the other broker, which takes the host's
    lease at a higher epoch and the session from the store; the cell's output arrives,
    the kernel keeps its state, and the session is billed once for its whole life."""
    one, two, token = _failover_pair(make_cluster, postgres_url, monkeypatch)

    async def scenario() -> None:
        async with remote_kernel() as (_km, client):
            reply = await client.execute_interactive("x = 41", timeout=30)
            assert reply["content"]["status"] == "ok"
            printed: list[str] = []

            def output(msg: dict) -> None:
                if msg["msg_type"] == "stream":
                    printed.append(msg["content"]["text"])
                    if len(printed) == 1:
                        one.broker.kill()  # mid-cell, no goodbye

            cell = (
                "import time\nfor i in range(8):\n"
                "    print(i, flush=True)\n    time.sleep(0.5)\nx += 1"
            )
            reply = await client.execute_interactive(cell, timeout=60, output_hook=output)
            assert reply["content"]["status"] == "ok"
            assert "".join(printed).split() == [str(i) for i in range(8)]
            outputs: list[dict] = []
            reply = await client.execute_interactive(
                "print(x)", timeout=30, output_hook=outputs.append
            )
            assert any(o["content"].get("text") == "42\n" for o in outputs)  # its state

    asyncio.run(scenario())
    assert "host host-a connected" in two.broker.output()
    ended = eventually(lambda: two.session_of(token, "ended"), 30, what="the session to settle")
    lifetime = (ended["ended_us"] - ended["started_us"]) / 1e6
    assert lifetime - 2 <= ended["billed_seconds"] <= lifetime + 1, ended  # once, all of it
    with Store(postgres_url) as store:
        store.check_ledger()
        assert store.host_leases()["host-a"].epoch == 2


def test_a_kernel_starts_when_the_first_broker_of_the_list_is_down(make_cluster, monkeypatch):
    """The start went to the second broker, but the relay was opened on the first only:
    the kernel failed to start."""
    cluster = make_cluster()
    cluster.start_host("host-a", "3.6")
    token = cluster.account("nina", "user", 100 * MICRO)
    monkeypatch.setenv("GPU_SHARE_BROKER_URL", f"http://127.0.0.1:{free_port()},{cluster.url}")
    monkeypatch.setenv("GPU_SHARE_TOKEN", token)

    async def scenario() -> None:
        async with remote_kernel() as (_km, client):
            outputs: list[dict] = []
            reply = await client.execute_interactive(
                "print(6 * 7)", timeout=30, output_hook=outputs.append
            )
            assert reply["content"]["status"] == "ok"
            assert any(o["content"].get("text") == "42\n" for o in outputs)

    asyncio.run(scenario())


@pytest.mark.postgres
def test_a_user_on_another_broker_than_the_host_runs_a_notebook(
    make_cluster, postgres_url, monkeypatch
):
    """Offers, sessions and relays lived in each broker's memory: a host connected to one
    broker was invisible on the other (offers [], POST /sessions 404)."""
    one = make_cluster(db_url=postgres_url)
    two = make_cluster(db_url=postgres_url)
    one.start_host("host-a", "3.6")
    token = one.account("nina", "user", 100 * MICRO)
    offers = eventually(lambda: two.client(token).request("GET", "/offers"), 30, what="offers")
    assert [o["host_id"] for o in offers] == ["host-a"]
    assert offers[0]["state"] == "free" and offers[0]["price_per_hour_micro"] == 3_600_000
    monkeypatch.setenv("GPU_SHARE_BROKER_URL", two.url)
    monkeypatch.setenv("GPU_SHARE_TOKEN", token)

    async def scenario() -> None:
        async with remote_kernel() as (_km, client):
            outputs: list[dict] = []
            reply = await client.execute_interactive(
                "x = 6 * 7\nprint(x)", timeout=30, output_hook=outputs.append
            )
            assert reply["content"]["status"] == "ok"
            assert any(o["content"].get("text") == "42\n" for o in outputs)
            # Asked of the user's broker, answered by the host's: the cost so far runs.
            running = two.session_of(token, "running")
            assert running["broker_url"] == one.url
            asked = two.client(token).request("GET", f"/sessions/{running['id']}")
            assert asked["state"] == "running" and asked["cost_so_far_micro"] > 0
            # A relay opened on the user's broker is sent to the host's.
            path = f"/gpu-share/api/relay/{running['id']}/user"
            with pytest.raises(HandshakeError) as refused:
                await connect(
                    websocket_url(two.url, path), headers={"Authorization": f"Bearer {token}"}
                )
            assert refused.value.code == 307
            assert refused.value.location == f"{one.url}{path}"

    asyncio.run(scenario())
    ended = eventually(lambda: two.session_of(token, "ended"), 30, what="the session to settle")
    assert f"session {ended['id']} ended" in one.broker.output()  # the host's broker
    assert f"session {ended['id']} ended" not in two.broker.output()
    lifetime = (ended["ended_us"] - ended["started_us"]) / 1e6
    assert lifetime - 1 <= ended["billed_seconds"] <= lifetime + 1
    with Store(postgres_url) as store:
        store.check_ledger()
        assert len(store.list_sessions(renter="nina")) == 1


async def _run_cell(code: str) -> list[str]:
    """Run one cell on a new gpu-share kernel (broker and token from the environment)."""
    async with remote_kernel() as (_km, client):
        outputs: list[dict] = []
        reply = await client.execute_interactive(code, timeout=60, output_hook=outputs.append)
        assert reply["content"]["status"] == "ok", reply["content"]
        return [o["content"]["text"] for o in outputs if o["msg_type"] == "stream"]


@pytest.mark.postgres
@pytest.mark.skipif(nginx_path() is None, reason="nginx is not installed (.ci/run installs it)")
def test_three_brokers_and_nginx_are_one_service(make_cluster, postgres_url, tmp_path, monkeypatch):
    """The deployment of server_extension/deploy/nginx-brokers.conf: TLS at nginx, the
    service's address in front of brokers two and three, each broker at a TLS port of its
    own (its public_url); the host on broker one. A user on broker two and one through
    the service see its offer and run a notebook on it, every relay over TLS; each
    session is settled once, by the host's broker."""
    ca = ScratchCA(tmp_path / "ca")
    server = ca.issue("proxy")
    own = [free_port() for _ in range(3)]
    one, two, three = (
        make_cluster(
            db_url=postgres_url, public_url=f"https://127.0.0.1:{port}", ca_file=ca.ca_file
        )
        for port in own
    )
    upstreams = [f"127.0.0.1:{c.port}" for c in (two, three)]
    mapping = {port: f"127.0.0.1:{c.port}" for port, c in zip(own, (one, two, three), strict=True)}
    proxy = Nginx(tmp_path / "nginx", "", server.cert, server.key, upstreams, mapping)
    try:
        one.start_host("host-a", "3.6")
        nina = one.account("nina", "user", 100 * MICRO)
        omar = one.account("omar", "user", 100 * MICRO)
        through = BrokerClient(proxy.url, omar, timeout=10, ca_file=str(ca.ca_file))
        offers = eventually(lambda: through.request("GET", "/offers"), 30, what="offers")
        assert [o["host_id"] for o in offers] == ["host-a"]
        trust = ssl.create_default_context(cafile=str(ca.ca_file))
        health = httpx.get(f"{proxy.url}/gpu-share/api/health", verify=trust)
        assert health.status_code == 200 and health.json()["status"] == "ok"
        assert health.json()["broker_id"] in (_broker_id(two), _broker_id(three))

        monkeypatch.setenv("GPU_SHARE_CA_FILE", str(ca.ca_file))
        for url, token, name in ((two.url, nina, "nina"), (proxy.url, omar, "omar")):
            monkeypatch.setenv("GPU_SHARE_BROKER_URL", url)
            monkeypatch.setenv("GPU_SHARE_TOKEN", token)
            assert asyncio.run(_run_cell(f"print('hello {name}')")) == [f"hello {name}\n"]
        for token in (nina, omar):
            ended = eventually(lambda t=token: one.session_of(t, "ended"), 30, what="a bill")
            lifetime = (ended["ended_us"] - ended["started_us"]) / 1e6
            assert lifetime - 1 <= ended["billed_seconds"] <= lifetime + 1
            assert f"session {ended['id']} ended" in one.broker.output()
            for other in (two, three):
                assert f"session {ended['id']} ended" not in other.broker.output()
    finally:
        proxy.close()
    with Store(postgres_url) as store:
        store.check_ledger()
        assert len(store.list_sessions(host="host-a")) == 2
    for cluster in (one, two, three):
        assert "Traceback" not in cluster.broker.output()


def _broker_id(cluster) -> str:
    found = re.search(r"gpu-share broker (b-[0-9a-f]{12})", cluster.broker.output())
    assert found, cluster.broker.output()[-2000:]
    return found.group(1)


@pytest.mark.postgres
def test_the_health_endpoint_says_503_while_the_store_is_away(make_cluster, postgres_url):
    """What a load balancer probes: no token; 200 while the broker serves, 503 with the
    reason while its database refuses connections, 200 again once it is back."""
    import psycopg
    from sqlalchemy.engine import make_url

    cluster = make_cluster(db_url=postgres_url)
    url = f"{cluster.url}/gpu-share/api/health"
    answer = httpx.get(url)
    assert answer.status_code == 200 and answer.json()["status"] == "ok", answer.text
    assert answer.headers["Cache-Control"] == "no-store"
    database = make_url(postgres_url).database
    admin_url = make_url(postgres_url).set(drivername="postgresql", database="postgres")
    with psycopg.connect(admin_url.render_as_string(hide_password=False), autocommit=True) as pg:
        pg.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
        pg.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
            (database,),
        )
        try:
            away = eventually(
                lambda: (a := httpx.get(url, timeout=10)).status_code == 503 and a,
                30,
                what="a 503 while the store is away",
            )
            assert away.json()["status"] == "unavailable"
            assert "store" in away.json()["reason"]
        finally:
            pg.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
    eventually(lambda: httpx.get(url, timeout=10).status_code == 200, 30, what="200 again")
    assert "Traceback" not in cluster.broker.output()


@pytest.mark.postgres
def test_hosts_of_a_broker_without_a_public_url_stay_its_own(make_cluster, postgres_url):
    """No other broker can send it a start: its hosts are not offered elsewhere (they were,
    and every start placed on them answered 503)."""
    one = make_cluster(db_url=postgres_url, public_url="")
    two = make_cluster(db_url=postgres_url)
    one.start_host("host-a", "3.6")
    token = one.account("nina", "user", 100 * MICRO)
    assert [o["host_id"] for o in one.client(token).request("GET", "/offers")] == ["host-a"]
    assert two.client(token).request("GET", "/offers") == []
    with pytest.raises(BrokerError) as refused:
        two.client(token).request("POST", "/sessions", {})
    assert refused.value.status == 404


async def _reply_and_output(client, msg_id: str, timeout: float = 60) -> tuple[dict, list[str]]:
    printed: list[str] = []
    reply = None
    while reply is None:
        msg = await client.get_shell_msg(timeout=timeout)
        if msg["parent_header"].get("msg_id") == msg_id:
            reply = msg
    while True:
        msg = await client.get_iopub_msg(timeout=timeout)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "stream":
            printed.append(msg["content"]["text"])
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            return reply, printed


def test_an_execute_sent_as_the_broker_restarts_gets_its_reply(make_cluster, monkeypatch):
    """The bridge dropped what the user sent while its relay reconnected (bridge.py said
    so): an execute sent at the moment of a broker restart never ran."""
    cluster = make_cluster()
    cluster.start_host("host-a", "3.6")
    token = cluster.account("nina", "user", 100 * MICRO)
    monkeypatch.setenv("GPU_SHARE_BROKER_URL", cluster.url)
    monkeypatch.setenv("GPU_SHARE_TOKEN", token)

    async def scenario() -> None:
        async with remote_kernel() as (_km, client):
            reply = await client.execute_interactive("x = 41", timeout=30)
            assert reply["content"]["status"] == "ok"
            cluster.broker.kill()
            msg_id = client.execute("x += 1\nprint(x)")  # at once
            cluster.start_broker()
            reply, printed = await _reply_and_output(client, msg_id)
            assert reply["content"]["status"] == "ok"
            assert printed == ["42\n"]  # run once, on the kernel's state

    asyncio.run(scenario())


@pytest.mark.postgres
def test_an_execute_sent_right_after_kill_9_of_the_hosts_broker_runs_once(
    make_cluster, postgres_url, monkeypatch
):
    """The request was written to the dying broker's socket and lost: the bridge sends the
    requests the kernel has not answered again once its relay is back (the host agent
    drops one it passed on before), so it runs, once."""
    one, two, token = _failover_pair(make_cluster, postgres_url, monkeypatch)

    async def scenario() -> None:
        async with remote_kernel() as (_km, client):
            reply = await client.execute_interactive("x = 41", timeout=30)
            assert reply["content"]["status"] == "ok"
            one.broker.kill()
            msg_id = client.execute("x += 1\nprint(x)")  # at once
            reply, printed = await _reply_and_output(client, msg_id)
            assert reply["content"]["status"] == "ok"
            assert printed == ["42\n"]

    asyncio.run(scenario())
    ended = eventually(lambda: two.session_of(token, "ended"), 30, what="the session to settle")
    lifetime = (ended["ended_us"] - ended["started_us"]) / 1e6
    assert lifetime - 2 <= ended["billed_seconds"] <= lifetime + 1, ended
