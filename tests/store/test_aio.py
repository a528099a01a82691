"""The store off the event loop: reads answer while a write waits on a locked database."""

from __future__ import annotations

import asyncio
import inspect
import sqlite3
from pathlib import Path

from jupyter_gpu_share.ledger import MICRO
from jupyter_gpu_share.store import Store
from jupyter_gpu_share.store.aio import READS, AsyncStore


def test_every_read_is_a_store_method_that_only_reads():
    """A method run beside the writer must not write: its source names no writer engine."""
    for name in READS:
        method = getattr(Store, name)
        source = inspect.getsource(method)
        if name == "authenticate":  # writes only through touch_tokens, which callers defer
            source = source.replace("self.touch_tokens(", "")
        for writing in ("self._writer", "self._write(", "self.touch_tokens("):
            assert writing not in source, (name, writing)


def test_reads_and_the_loop_go_on_while_a_write_waits_on_a_lock(tmp_path: Path):
    path = tmp_path / "broker.sqlite"
    store = Store(f"sqlite:///{path}", busy_timeout_ms=30_000)
    store.ensure_account("ada", "user")
    store.credit("ada", 5 * MICRO)
    token = store.issue_token("ada")
    astore = AsyncStore(store)
    lock = sqlite3.connect(path, isolation_level=None, timeout=30)
    lock.execute("BEGIN IMMEDIATE")  # another writer (a backup, a second broker) holds it

    async def run() -> None:
        write = asyncio.ensure_future(astore.credit("ada", MICRO))
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.ensure_future(tick())
        touches: list[dict[str, int]] = []
        account = await astore.authenticate(token, touches)
        assert account is not None and account.name == "ada"
        assert await astore.balance("ada") == 5 * MICRO
        assert (await astore.get_account("ada")).balance_micro == 5 * MICRO
        await asyncio.sleep(0.3)
        assert not write.done()  # the write waits on the lock ...
        assert ticks >= 10  # ... and the loop is not waiting with it
        lock.rollback()
        credited = await write
        assert credited.balance_micro == 6 * MICRO
        ticker.cancel()

    try:
        asyncio.run(run())
    finally:
        lock.close()
        astore.close()
        store.close()


def test_writes_reach_the_database_in_the_order_asked(tmp_path: Path):
    store = Store(f"sqlite:///{tmp_path / 'broker.sqlite'}")
    store.ensure_account("ada", "user")
    astore = AsyncStore(store)

    async def run() -> list[int]:
        credits = [astore.credit("ada", amount, f"#{amount}") for amount in range(1, 21)]
        return [account.balance_micro for account in await asyncio.gather(*credits)]

    try:
        balances = asyncio.run(run())
    finally:
        astore.close()
    # Each credit saw every earlier one: one writer, first asked first written.
    assert balances == [sum(range(1, n + 1)) for n in range(1, 21)]
    store.check_ledger()
    store.close()


def test_an_in_memory_database_is_used_by_one_thread_at_a_time():
    store = Store("sqlite://")
    astore = AsyncStore(store)
    assert store.shared_connection
    assert astore._reader is astore._writer  # one connection: no two calls at once

    async def run() -> None:
        await asyncio.gather(*(astore.ensure_account(f"u{i}", "user") for i in range(20)))
        names = await asyncio.gather(*(astore.get_account(f"u{i}") for i in range(20)))
        assert [a.name for a in names] == [f"u{i}" for i in range(20)]

    try:
        asyncio.run(run())
    finally:
        astore.close()
        store.close()
