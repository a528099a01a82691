"""Money under faults: a stop that meets a locked store, and a broker killed meanwhile.

The attack (issue 15, finding 1): with the SQLite store locked past its busy timeout, a
renter's stop answered 500, the session vanished from the broker's memory while its kernel
ran on, and after a restart a second stop billed 79 s for a session stopped after about 2 s.
"""

from __future__ import annotations

import asyncio
import math
import sqlite3
import subprocess
import sys
import time

import pytest
from jupyter_client.manager import AsyncKernelManager

from jupyter_gpu_share.ledger import MICRO
from jupyter_gpu_share.store import Store

from .harness import clean_env, eventually

pytestmark = pytest.mark.e2e

PRICE_PER_SECOND = 1000  # "3.6" credits an hour


def _lock(cluster) -> sqlite3.Connection:
    """Take the database's write lock from another process's point of view, as a backup
    tool or a second writer would; readers go on (WAL)."""
    conn = sqlite3.connect(cluster.workdir / "broker.sqlite", isolation_level=None, timeout=30)
    conn.execute("BEGIN IMMEDIATE")
    return conn


async def _running_session(cluster, token: str) -> tuple[AsyncKernelManager, dict]:
    km = AsyncKernelManager(kernel_name="gpu-share")
    await km.start_kernel()
    session = eventually(lambda: cluster.session_of(token, "running"), 30, what="a session")
    return km, session


def _check_bill(cluster, token: str, session_id: str, asked_at: float) -> dict:
    """Billed once, to the instant the stop was asked (never later), and the ledger holds."""
    session = eventually(
        lambda: next(
            (
                s
                for s in cluster.client(token).request("GET", "/sessions")
                if s["id"] == session_id and s["state"] == "ended"
            ),
            None,
        ),
        30,
        what="the pending stop to settle",
    )
    assert session["end_reason"] == "stopped"
    assert session["ended_us"] <= asked_at * 1e6 + 500_000  # the ask, not the settlement
    lifetime = (session["ended_us"] - session["started_us"]) / 1e6
    assert session["billed_seconds"] == math.ceil(lifetime)
    assert session["amount_micro"] == session["billed_seconds"] * PRICE_PER_SECOND
    balance = cluster.client(token).request("GET", "/me")["balance_micro"]
    assert 100 * MICRO - balance == session["amount_micro"]
    store = Store(f"sqlite:///{cluster.workdir / 'broker.sqlite'}")
    try:
        store.check_ledger()
    finally:
        store.close()
    return session


def test_a_stop_during_a_store_lock_is_kept_and_billed_to_the_ask(make_cluster, monkeypatch):
    cluster = make_cluster(db_busy_timeout_ms=500)
    host = cluster.start_host("lockhost", "3.6")
    token = cluster.account("locked", "user", 100 * MICRO)
    monkeypatch.setenv("GPU_SHARE_BROKER_URL", cluster.url)
    monkeypatch.setenv("GPU_SHARE_TOKEN", token)

    async def run() -> None:
        km, session = await _running_session(cluster, token)
        await asyncio.sleep(1.5)
        lock = _lock(cluster)
        try:
            asked_at = time.time()
            answer = cluster.client(token).request("DELETE", f"/sessions/{session['id']}")
            assert answer["state"] == "stopping", answer  # 202: kept, not lost, not "running"
            cost = answer["cost_so_far_micro"]
            # The host is told at once: the kernel stops while the store is still locked.
            eventually(
                lambda: f"stopping session {session['id']}" in host.output(), 20, what="a stop"
            )
            time.sleep(3)  # the lock outlives several retries
            again = cluster.client(token).request("GET", f"/sessions/{session['id']}")
            assert again["state"] == "stopping" and again["cost_so_far_micro"] == cost
        finally:
            lock.rollback()
            lock.close()
        settled = _check_bill(cluster, token, session["id"], asked_at)
        assert settled["amount_micro"] == cost  # what the renter was shown while it waited
        await km.shutdown_kernel(now=True)

    asyncio.run(run())
    assert "Traceback" not in cluster.broker.output()


def test_a_broker_killed_while_a_stop_waits_bills_it_to_the_ask(make_cluster, monkeypatch):
    cluster = make_cluster(db_busy_timeout_ms=500)
    cluster.start_host("crashhost", "3.6")
    token = cluster.account("crashed", "user", 100 * MICRO)
    monkeypatch.setenv("GPU_SHARE_BROKER_URL", cluster.url)
    monkeypatch.setenv("GPU_SHARE_TOKEN", token)

    async def run() -> None:
        km, session = await _running_session(cluster, token)
        await asyncio.sleep(1.5)
        lock = _lock(cluster)
        try:
            asked_at = time.time()
            answer = cluster.client(token).request("DELETE", f"/sessions/{session['id']}")
            assert answer["state"] == "stopping", answer
            cluster.broker.kill()  # settlement never happened
        finally:
            lock.rollback()
            lock.close()
        time.sleep(3)  # a restart later: a lost instant would bill these seconds too
        cluster.start_broker()
        _check_bill(cluster, token, session["id"], asked_at)
        await km.shutdown_kernel(now=True)

    asyncio.run(run())


CLIENT = """
import asyncio, sys, time
from jupyter_client.manager import AsyncKernelManager

async def main():
    km = AsyncKernelManager(kernel_name="gpu-share")
    await km.start_kernel()
    print("ready", flush=True)
    await asyncio.sleep(300)

asyncio.run(main())
"""


def test_a_session_whose_client_died_is_stopped_as_client_gone(make_cluster, monkeypatch):
    """Finding 2: a renter whose client process died paid until the credit ran out."""
    cluster = make_cluster(orphan_grace_s=3)
    cluster.start_host("orphanhost", "3.6")
    token = cluster.account("vanished", "user", 100 * MICRO)
    env = clean_env(GPU_SHARE_BROKER_URL=cluster.url, GPU_SHARE_TOKEN=token)
    client = subprocess.Popen(
        [sys.executable, "-c", CLIENT], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert client.stdout is not None and client.stdout.readline().strip() == "ready"
        session = eventually(lambda: cluster.session_of(token, "running"), 30, what="a session")
        client.kill()  # no goodbye: its relay connection just drops
        client.wait(10)
        killed_at = time.time()
    finally:
        if client.poll() is None:
            client.kill()
    ended = eventually(lambda: cluster.session_of(token, "ended"), 30, what="the reaping")
    assert ended["id"] == session["id"] and ended["end_reason"] == "client gone", ended
    late = ended["ended_us"] / 1e6 - killed_at
    assert 2.0 < late < 3 + 5, late  # the grace, then the next liveness check
    assert ended["amount_micro"] == ended["billed_seconds"] * PRICE_PER_SECOND
