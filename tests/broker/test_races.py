"""What can change across an await in the broker (its store calls run on threads): each
case a review found, with the store slowed or locked at the moment that matters."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

from jupyter_gpu_share.broker.handlers import HostControlHandler
from jupyter_gpu_share.broker.matching import SessionRequest
from jupyter_gpu_share.broker.service import Broker, BrokerSettings
from jupyter_gpu_share.clock import now_us
from jupyter_gpu_share.ledger import MICRO
from jupyter_gpu_share.store import Store


class Host:
    """A host's control connection as the broker's handler sees it (no socket)."""

    _closing = False
    _hello_seen = False
    on_message = HostControlHandler.on_message
    _drain_inbox = HostControlHandler._drain_inbox
    _handle_control = HostControlHandler._handle_control

    def __init__(self, broker: Broker, name: str) -> None:
        self.broker, self.host_name = broker, name
        self.sent: list[dict] = []
        self.closed: tuple | None = None

    def write_message(self, message: str, binary: bool = False) -> None:
        self.sent.append(json.loads(message))

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        self.closed = (code, reason)

    def _refuse(self, kind: str, error: object) -> None:
        raise AssertionError(f"refused {kind}: {error}")

    def say(self, message: dict) -> None:
        self.on_message(json.dumps(message))


def hello(offers: int = 1, price: int = 1000) -> dict:
    return {
        "type": "hello",
        "max_kernels": 4,
        "sessions": [],
        "offers": [
            {
                "gpu_model": "T4",
                "gpu_count": 1,
                "gpu_memory_mib": 16000,
                "gpu_indices": [i],
                "price_per_second_micro": price,
            }
            for i in range(offers)
        ],
    }


def make(tmp: Path, **settings) -> tuple[Store, Broker]:
    store = Store(f"sqlite:///{tmp}/b.sqlite", busy_timeout_ms=settings.pop("busy_ms", 3000))
    for user in ("ada", "bob"):
        store.ensure_account(user, "user")
        store.credit(user, 1000 * MICRO)
    for host in ("h1", "h2"):
        store.ensure_account(host, "host")
    broker = Broker(store, BrokerSettings(**settings))
    broker.ready.set()  # what start() sets once the unfinished sessions are loaded
    return store, broker


async def settle_down() -> None:
    for _ in range(20):
        await asyncio.sleep(0.05)


def test_heartbeats_keep_a_host_alive_while_its_reports_wait_on_a_locked_store(tmp_path):
    store, broker = make(tmp_path, heartbeat_timeout=1.0)

    async def main() -> None:
        host = Host(broker, "h1")
        host.say(hello())
        await settle_down()
        record = await broker.start_session("ada", SessionRequest())
        lock = sqlite3.connect(tmp_path / "b.sqlite", isolation_level=None, timeout=30)
        lock.execute("BEGIN IMMEDIATE")
        try:
            host.say({"type": "kernel_ready", "session_id": record.id})  # waits on the lock
            for _ in range(8):
                await asyncio.sleep(0.2)
                host.say({"type": "heartbeat"})  # queued behind it
            await broker.check_hosts()
            assert "h1" in broker.hosts and host.closed is None  # alive: it kept talking
            assert record.id in broker.sessions
        finally:
            lock.rollback()
            lock.close()
        await settle_down()

    asyncio.run(main())
    broker.db.close()
    store.close()


def test_a_host_back_while_another_is_found_lost_keeps_its_offers(tmp_path):
    store, broker = make(tmp_path, heartbeat_timeout=1.0)

    async def main() -> None:
        for name in ("h1", "h2"):
            Host(broker, name).say(hello())
        await settle_down()
        for link in broker.hosts.values():
            link.last_heartbeat_us = now_us() - 5_000_000  # both silent
        deactivate = broker.db.deactivate_offers

        async def slow(name: str) -> None:
            if name == "h1":
                await asyncio.sleep(0.5)  # a busy writer
            await deactivate(name)

        broker.db.deactivate_offers = slow  # type: ignore[method-assign]
        check = asyncio.ensure_future(broker.check_hosts())
        await asyncio.sleep(0.1)
        back = Host(broker, "h2")
        back.say(hello())  # h2 reconnects while h1's offers are being deactivated
        await check
        assert "h2" in broker.hosts and broker.hosts["h2"].channel is back
        assert back.closed is None
        assert [o.host for o in store.list_offers()] == ["h2"]

    asyncio.run(main())
    broker.db.close()
    store.close()


def test_a_session_settled_while_balances_are_read_is_not_counted_twice(tmp_path):
    store, broker = make(tmp_path)
    store.credit("ada", 100 * MICRO)  # 1,100 credits

    async def main() -> None:
        Host(broker, "h1").say(hello(offers=3, price=10 * MICRO))  # 10 credits a second
        await settle_down()
        other = await broker.start_session("bob", SessionRequest())
        a = await broker.start_session("ada", SessionRequest())
        b = await broker.start_session("ada", SessionRequest())
        now = now_us()
        for record, age in ((other, 1), (a, 60), (b, 10)):  # a costs 600, b 100
            broker.sessions[record.id].ready_us = now - age * 1_000_000
            store.mark_ready(record.id, now - age * 1_000_000)
        balance = broker.db.balance

        async def slow(name: str) -> int:
            if name == "bob":
                await asyncio.sleep(0.5)
            return await balance(name)

        broker.db.balance = slow  # type: ignore[method-assign]
        broker.refresh_balances()
        enforce = asyncio.ensure_future(broker.enforce_budgets())
        await asyncio.sleep(0.1)
        await broker.stop_session(a.id)  # 610 billed: 490 left, b has cost about 100
        await enforce
        assert store.get_session(b.id).state == "running"  # not "credit exhausted"

    asyncio.run(main())
    broker.db.close()
    store.close()


def test_hosts_wait_for_the_unfinished_sessions_before_their_hello_is_answered(tmp_path):
    store, broker = make(tmp_path)
    broker.ready.clear()  # start() has not loaded the sessions yet

    async def main() -> None:
        host = Host(broker, "h1")
        host.say(hello())
        await settle_down()
        assert "h1" not in broker.hosts and host.sent == []  # nothing said yet
        broker.ready.set()
        await settle_down()
        assert "h1" in broker.hosts and host.sent[0]["type"] == "welcome"

    asyncio.run(main())
    broker.db.close()
    store.close()


def test_a_host_back_with_a_kernel_whose_stop_waits_on_the_store_is_told_to_stop_it(tmp_path):
    store, broker = make(tmp_path, busy_ms=200, stop_answer_s=0.1)

    async def main() -> None:
        first = Host(broker, "h1")
        first.say(hello())
        await settle_down()
        record = await broker.start_session("ada", SessionRequest())
        broker.hosts["h1"].channel = None  # the host's connection dropped
        lock = sqlite3.connect(tmp_path / "b.sqlite", isolation_level=None, timeout=30)
        lock.execute("BEGIN IMMEDIATE")
        try:
            assert await broker.stop_session(record.id) is None  # pending: store locked
        finally:
            lock.rollback()
            lock.close()
        back = Host(broker, "h1")  # back before the next retry settles the stop
        back.say({**hello(), "sessions": [record.id]})  # and still runs the kernel
        await settle_down()
        stops = [m for m in back.sent if m["type"] == "stop_kernel"]
        assert [m["session_id"] for m in stops] == [record.id]

    asyncio.run(main())
    broker.db.close()
    store.close()
