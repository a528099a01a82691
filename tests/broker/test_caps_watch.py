"""The broker's caps watch (broker/caps.py) against a store double: what a stranger's
review found about money (a cap lowered later cancelled what had run; a session begun
before midnight escaped the daily cap)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from jupyter_gpu_share.broker.caps import END_CAP_DAY, END_CAP_SESSION, CapWatch
from jupyter_gpu_share.ledger.caps import DAY_US
from jupyter_gpu_share.store.caps import Caps

S = 1_000_000
HOUR = 3600 * S


@dataclass
class Live:
    id: str
    ready_us: int | None
    price_per_second_micro: int
    created_us: int = 0


class Store:
    def __init__(self, caps: dict[str, Caps], spent: int = 0) -> None:
        self.caps, self.spent = caps, spent

    async def caps_of(self, names):
        return {n: c for n, c in self.caps.items() if n in names}

    async def spent_since_many(self, names, day):
        return dict.fromkeys(names, self.spent)


def watch(store: Store, now: int) -> CapWatch:
    clock = [now]
    caps = CapWatch(store, lambda: clock[0])
    caps.clock_value = clock  # type: ignore[attr-defined]
    return caps


def test_a_cap_lowered_later_never_bills_less_than_what_ran():
    t0 = 10 * DAY_US
    session = Live("s-1", t0, 1000)  # 1000 micro a second
    store = Store({})
    caps = watch(store, t0 + 5 * HOUR)
    asyncio.run(caps.refresh({"ann"}))
    assert caps.check(t0 + 5 * HOUR, {"ann": [session]}, {}) == ([], [])
    store.caps = {"ann": Caps(session_micro=0)}  # set 5 h in
    caps.changed()
    asyncio.run(caps.refresh({"ann"}))
    stops, _ = caps.check(t0 + 5 * HOUR, {"ann": [session]}, {})
    [(_, reason, bill_at)] = stops
    assert reason == END_CAP_SESSION and bill_at == t0 + 5 * HOUR  # not t0: 18 credits billed


def test_the_daily_cap_counts_a_session_begun_before_midnight_from_midnight():
    midnight = 20 * DAY_US
    session = Live("s-2", midnight - 60 * S, 1000, created_us=midnight - 60 * S)
    store = Store({"bo": Caps(day_micro=10_000)})  # 10 s at this price
    caps = watch(store, midnight - 120 * S)
    asyncio.run(caps.refresh({"bo"}))  # the cap was known before the session began
    now = midnight + 11 * S
    caps.clock_value[0] = now
    caps.changed()
    asyncio.run(caps.refresh({"bo"}))
    stops, _ = caps.check(now, {"bo": [session]}, {})
    [(_, reason, bill_at)] = stops
    assert reason == END_CAP_DAY and bill_at == midnight + 10 * S


def test_a_warning_is_given_again_for_a_new_cap_and_only_once_delivered():
    t0 = 30 * DAY_US
    session = Live("s-3", t0, 1000)
    store = Store({"cy": Caps(session_micro=10_000)})
    caps = watch(store, t0)
    asyncio.run(caps.refresh({"cy"}))
    _, warnings = caps.check(t0 + 8 * S, {"cy": [session]}, {})
    [(_, text, key)] = warnings
    assert "of your 0.01-credit session spending cap" in text
    _, again = caps.check(t0 + 8 * S, {"cy": [session]}, {})
    assert again  # not delivered (no relay): asked again
    caps.warned(key)
    assert caps.check(t0 + 9 * S, {"cy": [session]}, {})[1] == []
    store.caps = {"cy": Caps(session_micro=11_000)}
    caps.changed()
    asyncio.run(caps.refresh({"cy"}))
    assert caps.check(t0 + 9 * S, {"cy": [session]}, {})[1]  # 80 % of the new cap
