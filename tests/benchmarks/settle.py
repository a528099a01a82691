"""Settlements per second on the SQLite store: only ``Store.end_session`` is timed."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from jupyter_gpu_share.store import OfferSpec, Store

FEE_BPS = 1000


def settlements(workdir: Path, count: int) -> dict[str, Any]:
    path = workdir / "settle.sqlite"
    store = Store(f"sqlite:///{path}", upgrade=True)
    try:
        store.ensure_account("renter", "user")
        store.ensure_account("gpu-host", "host")
        store.credit("renter", 10**15, "bench credit")
        offer = store.replace_offers(
            "gpu-host",
            [
                OfferSpec(
                    gpu_model="CPU",
                    gpu_count=0,
                    gpu_memory_mib=0,
                    gpu_indices=(),
                    price_per_second_micro=1000,
                )
            ],
        )[0]
        base_us = 1_700_000_000_000_000
        timed = 0.0
        durations = []
        for i in range(count):
            created = base_us + i * 10_000_000
            record = store.create_session("renter", "renter", offer.id, created)
            store.mark_ready(record.id, created + 1_000_000)
            ended = created + 1_000_000 + 3_500_000 + i
            started = time.perf_counter()
            store.end_session(record.id, ended, "stopped", FEE_BPS)
            spent = time.perf_counter() - started
            timed += spent
            durations.append(spent)
        # The same settlements through the batch API (end_sessions), 50 at a time.
        batch, batched, batched_count = 50, 0.0, 0
        pending = []
        for i in range(count):
            created = base_us + (count + i) * 10_000_000
            record = store.create_session("renter", "renter", offer.id, created)
            store.mark_ready(record.id, created + 1_000_000)
            pending.append((record.id, created + 4_500_000 + i, "stopped"))
            if len(pending) == batch or i == count - 1:
                started = time.perf_counter()
                store.end_sessions(pending, FEE_BPS)
                batched += time.perf_counter() - started
                batched_count += len(pending)
                pending = []
        check = getattr(store, "check_ledger", None)
        ledger_ok = True
        if check is not None:
            try:
                check()
            except Exception:
                ledger_ok = False
        durations.sort()
        return {
            "settlements": count,
            "seconds": round(timed, 3),
            "settlements_per_second": round(count / timed, 1),
            "median_ms": round(durations[len(durations) // 2] * 1000, 3),
            "p99_ms": round(durations[int(len(durations) * 0.99)] * 1000, 3),
            "max_ms": round(durations[-1] * 1000, 3),
            "over_10ms": sum(1 for d in durations if d > 0.010),
            "time_in_over_10ms_s": round(sum(d for d in durations if d > 0.010), 3),
            "batched50_per_second": round(batched_count / batched, 1) if batched else None,
            "ledger_balanced": ledger_ok,
            "db_bytes": path.stat().st_size,
        }
    finally:
        store.close()
