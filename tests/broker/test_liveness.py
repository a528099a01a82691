"""Finding silent hosts: how often the broker looks, and what it does with what it finds."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from jupyter_gpu_share.broker.service import (
    Broker,
    BrokerSettings,
    HostLink,
    liveness_check_interval,
)
from jupyter_gpu_share.clock import now_us
from jupyter_gpu_share.store import Store


@pytest.mark.parametrize(
    ("interval", "timeout", "expected"),
    [
        (0.5, 3.5, 0.5),  # the tests' brokers: each heartbeat interval
        (5.0, 17.0, 2.125),  # the default broker: an eighth of the timeout, not every second
        (10.0, 32.0, 4.0),  # the benchmark's 10,000 hosts
        (10.0, 4.0, 1.0),  # a short timeout: still at most a second
    ],
)
def test_hosts_are_looked_at_often_enough_and_no_more(interval, timeout, expected):
    assert liveness_check_interval(interval, timeout) == pytest.approx(expected)


class Channel:
    def __init__(self) -> None:
        self.closed: tuple[int | None, str | None] | None = None

    def write_message(self, message: str | bytes, binary: bool = False) -> None:
        pass

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        self.closed = (code, reason)


def test_only_hosts_silent_past_the_timeout_are_dropped(tmp_path: Path):
    store = Store(f"sqlite:///{tmp_path / 'broker.sqlite'}")
    broker = Broker(store, BrokerSettings(heartbeat_timeout=20.0))
    now = now_us()
    ages_s = {"fresh": 1.0, "at-the-limit": 19.0, "silent": 21.0, "long-gone": 600.0}
    channels = {name: Channel() for name in ages_s}
    for name, age in ages_s.items():
        store.ensure_account(name, "host")
        broker.hosts[name] = HostLink(
            name=name,
            max_kernels=1,
            offers=[],
            channel=channels[name],
            last_heartbeat_us=now - int(age * 1_000_000),
        )
    asyncio.run(broker.check_hosts())
    broker.db.close()
    assert sorted(broker.hosts) == ["at-the-limit", "fresh"]
    assert channels["silent"].closed == (4001, "heartbeat timeout")
    assert channels["long-gone"].closed == (4001, "heartbeat timeout")
    assert channels["fresh"].closed is None
    store.close()
