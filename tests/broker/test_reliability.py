"""Reliability arithmetic and matching: pure functions."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from jupyter_gpu_share.broker.matching import (
    HostLoad,
    NoMatch,
    OfferView,
    SessionRequest,
    choose_offer,
)
from jupyter_gpu_share.broker.reliability import (
    ALWAYS,
    open_seconds,
    ranking_reliability,
    reliability,
    uptime_fraction,
)
from jupyter_gpu_share.host.schedule import Schedule

HOUR = 3600
US = 1_000_000


def ts(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp()


def test_open_seconds_counts_weekly_windows():
    office = Schedule.parse("mon-fri 09:00-17:00").windows
    clipped = [(max(s, 0), min(e, 7 * 86400)) for s, e in office if min(e, 7 * 86400) > max(s, 0)]
    monday = ts("2026-11-23T00:00:00")  # a Monday
    assert open_seconds(clipped, monday, monday + 7 * 86400) == 5 * 8 * HOUR
    assert open_seconds(clipped, monday + 10 * HOUR, monday + 12 * HOUR) == 2 * HOUR
    assert open_seconds(clipped, monday + 18 * HOUR, monday + 20 * HOUR) == 0
    assert open_seconds(ALWAYS, monday, monday + 3 * 86400) == 3 * 86400
    # Windows across midnight and the week's end.
    nights = Schedule.parse("sun 22:00-02:00").windows
    clipped = [(max(s, 0), min(e, 7 * 86400)) for s, e in nights if min(e, 7 * 86400) > max(s, 0)]
    assert open_seconds(clipped, monday - 86400, monday + 86400) == 4 * HOUR


def test_uptime_is_measured_inside_declared_windows():
    monday = int(ts("2026-11-23T00:00:00") * US)
    day = 86400 * US
    # Declared mon-fri 09-17 (UTC); connected Monday 09-13 and all of Tuesday.
    connections = [
        (monday + 9 * HOUR * US, monday + 13 * HOUR * US, None),
        (monday + day, monday + 2 * day, None),
    ]
    uptime = uptime_fraction(connections, "mon-fri 09:00-17:00", 0, monday, monday + 2 * day)
    assert uptime == pytest.approx((4 + 8) / 16)
    # Windows are in the host's time zone: Monday 16-18 UTC is 18-20 at UTC+2, outside.
    evening = [(monday + 16 * HOUR * US, monday + 18 * HOUR * US, None)]
    assert uptime_fraction(
        evening, "mon-fri 09:00-17:00", 0, monday, monday + day
    ) == pytest.approx(1 / 8)
    assert uptime_fraction(evening, "mon-fri 09:00-17:00", 2 * HOUR, monday, monday + day) == 0
    # Outside any window there is nothing to measure.
    assert uptime_fraction([], "sat 10:00-11:00", 0, monday, monday + day) is None
    # No schedule: the whole time counts.
    assert uptime_fraction(connections, None, 0, monday, monday + 2 * day) == pytest.approx(28 / 48)


def test_reliability_combines_uptime_and_completion():
    assert reliability(None, 0, 0).score is None
    assert reliability(0.5, 0, 0).score == 0.5
    assert reliability(None, 10, 2).score == pytest.approx(0.8)
    assert reliability(0.5, 10, 2).score == pytest.approx(0.4)
    assert ranking_reliability(None) == 0.9
    assert ranking_reliability(0.0) == 0.05


def offer(id: int, host: str, price: int, rel: float | None, model: str = "CPU") -> OfferView:
    return OfferView(id, host, model, 0, 0, price, rel)


def loads(*hosts: str) -> dict[str, HostLoad]:
    return {h: HostLoad(max_kernels=2) for h in hosts}


def test_matching_prices_reliable_seconds():
    cheap_flaky = offer(1, "a", 100, 0.5)
    steady = offer(2, "b", 150, 1.0)
    assert (
        choose_offer([cheap_flaky, steady], loads("a", "b"), SessionRequest(), 10**9, 60) == steady
    )
    cheap_steady = offer(3, "c", 100, 0.95)
    assert (
        choose_offer(
            [cheap_flaky, steady, cheap_steady], loads("a", "b", "c"), SessionRequest(), 10**9, 60
        )
        == cheap_steady
    )
    picky = SessionRequest(min_reliability=0.99)
    assert (
        choose_offer([cheap_flaky, steady, cheap_steady], loads("a", "b", "c"), picky, 10**9, 60)
        == steady
    )


def test_matching_explains_why_nothing_matches():
    offers = [offer(1, "a", 1000, None, "NVIDIA L4")]
    with pytest.raises(NoMatch) as nothing:
        choose_offer(offers, loads("a"), SessionRequest(gpu_model="H100"), 10**9, 60)
    assert nothing.value.status == 404
    busy = {"a": HostLoad(max_kernels=1, live_kernels=1)}
    with pytest.raises(NoMatch) as full:
        choose_offer(offers, busy, SessionRequest(), 10**9, 60)
    assert full.value.status == 409
    with pytest.raises(NoMatch) as poor:
        choose_offer(offers, loads("a"), SessionRequest(), 59_999, 60)
    assert poor.value.status == 402 and "60 s" in poor.value.message


def test_a_shared_gpu_takes_renters_up_to_the_host_limit():
    gpu = OfferView(7, "a", "NVIDIA L4", 1, 24_000, 1000, None)
    shared = OfferView(8, "b", "NVIDIA L4", 1, 24_000, 1000, None, shared=True)
    busy = {
        "a": HostLoad(max_kernels=4, live_kernels=1, busy_offer_ids={7}),
        "b": HostLoad(max_kernels=4, live_kernels=1, busy_offer_ids={8}),
    }
    assert choose_offer([gpu, shared], busy, SessionRequest(), 10**9, 60) == shared
    full = {"b": HostLoad(max_kernels=1, live_kernels=1, busy_offer_ids={8})}
    with pytest.raises(NoMatch):
        choose_offer([shared], full, SessionRequest(), 10**9, 60)
