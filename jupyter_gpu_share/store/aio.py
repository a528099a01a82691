"""The store's methods as coroutines, run on threads so the event loop never waits on a lock.

The broker is one tornado process. A store call made on its event loop stalls every request,
relay and heartbeat for as long as the database takes: with SQLite locked by another writer
(a backup, a second broker) that is up to the busy timeout, 30 s. ``AsyncStore`` runs each
call on a thread instead:

- **one writer thread**, so writes reach the database in the order the loop asked for them
  (an offer deactivated before the same host's new offers are stored, a settlement before
  the next one of the same payer), as when they ran on the loop; SQLite has one writer at a
  time anyway, and the broker's writes are short transactions;
- **a few reader threads** for the methods that only read (``READS``). They use the store's
  reader engine, which on SQLite runs in WAL mode beside a writer, so a reader never queues
  behind a write that waits on a lock.

An in-memory SQLite database is one shared connection: everything then runs on the writer
thread. Nothing here changes what a method does; ``Store`` stays synchronous and is still
what the CLI, the tests and the benchmarks call directly.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .records import StoreUnavailable
from .store import Store

# Methods that only read (through the store's reader engine): they run beside the writer.
READS = frozenset(
    {
        "get_account",
        "get_account_by_id",
        "balance",
        "authenticate",  # its occasional last-used touch is deferred (see Broker.authenticate)
        "list_tokens",
        "list_offers",
        "get_offer",
        "get_session",
        "list_sessions",
        "entries_sum",
        "check_ledger",
        "get_class",
        "list_classes",
        "class_role",
        "teacher_counts",
        "class_students",
        "list_class_notebooks",
        "get_class_notebook",
        "class_usage",
        "presence",
        "first_seen",
        "host_session_outcomes",
        "earnings",
        "get_receipt",
        "list_receipts",
        "broker_heartbeats",
        "running_costs",
        "host_leases",
        "hosts_elsewhere",
        "serving_broker",
        "measure_clock_offset",
        "get_caps",
        "caps_of",
        "spent_since",
        "spent_since_many",
    }
)
DEFAULT_READERS = 4


class AsyncStore:
    """``await astore.method(...)`` runs ``store.method(...)`` on the store's threads."""

    def __init__(self, store: Store, readers: int = DEFAULT_READERS) -> None:
        self.store = store
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="gpu-share-store-write")
        if store.shared_connection:
            self._reader = self._writer
        else:
            self._reader = ThreadPoolExecutor(readers, thread_name_prefix="gpu-share-store-read")
        self._calls: dict[str, Callable[..., Any]] = {}
        self.closed = False

    async def run(
        self, function: Callable[..., Any], *args: Any, write: bool = True, **kwargs: Any
    ) -> Any:
        """Run any function of the store on its threads (``write``: on the writer thread)."""
        if self.closed:  # the broker is stopping: answered as a store that is down
            raise StoreUnavailable("the broker is shutting down")
        pool = self._writer if write else self._reader
        call = functools.partial(function, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(pool, call)

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name.startswith("_"):
            raise AttributeError(name)
        cached = self._calls.get(name)
        if cached is not None:
            return cached
        method = getattr(self.store, name)
        if not callable(method):
            raise AttributeError(f"Store.{name} is not a method")
        write = name not in READS

        async def call(*args: Any, **kwargs: Any) -> Any:
            return await self.run(method, *args, write=write, **kwargs)

        call.__name__ = name
        self._calls[name] = call
        return call

    def close(self) -> None:
        """Refuse new calls, drop the queued ones, finish the running ones, stop the threads."""
        self.closed = True
        self._writer.shutdown(wait=True, cancel_futures=True)
        if self._reader is not self._writer:
            self._reader.shutdown(wait=True, cancel_futures=True)
