"""Several brokers on one database (issue 17): SQLite refuses a second broker; on
PostgreSQL a broker that starts beside another leaves the other's sessions alone."""

from __future__ import annotations

import asyncio
import re
import subprocess

import pytest
from jupyter_client.manager import AsyncKernelManager

from jupyter_gpu_share.ledger import MICRO
from jupyter_gpu_share.store import Store

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
    one.start_host("host-a", "3.6")
    two.start_host("host-b", "3.6")
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
    one = make_cluster(db_url=postgres_url)
    two = make_cluster(db_url=postgres_url)
    both = f"{one.url},{two.url}"
    one.start_host("host-a", "3.6", broker_url=both)
    token = one.account("nina", "user", 100 * MICRO)
    monkeypatch.setenv("GPU_SHARE_BROKER_URL", both)
    monkeypatch.setenv("GPU_SHARE_TOKEN", token)

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
