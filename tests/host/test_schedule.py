"""Availability windows: the parser, and the agent following them on an injected clock."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

import pytest

from jupyter_gpu_share.host.agent import AgentConfigError
from jupyter_gpu_share.host.schedule import Schedule, parse_schedule

from .fake_broker import FakeBroker
from .test_agent import CPU_OFFER, make_agent, start_session

SPEC = "mon-fri 18:00-08:00; sat,sun"
# 2026-05-18 is a Monday.
MON = datetime(2026, 5, 18)


def at(day: int, hh: int, mm: int = 0) -> datetime:
    return MON + timedelta(days=day, hours=hh, minutes=mm)


def test_windows_cross_midnight_and_whole_days() -> None:
    s = Schedule.parse(SPEC)
    assert not s.is_open(at(0, 17, 59))
    assert s.is_open(at(0, 18)) and s.closes_at(at(0, 18)) == at(1, 8)
    assert s.is_open(at(1, 7, 59)) and not s.is_open(at(1, 8))
    assert s.next_open(at(1, 8)) == at(1, 18)
    assert s.next_open(at(1, 20)) == at(1, 20)
    # Friday night runs into the weekend, which ends Sunday 24:00 (Monday 00:00).
    assert s.closes_at(at(4, 20)) == at(7, 0)
    assert s.closes_at(at(6, 23)) == at(7, 0)
    assert not s.is_open(at(7, 7))
    assert s.next_open(at(7, 7)) == at(7, 18)
    assert s.seconds_left(at(1, 7, 50)) == 600
    assert s.closes_at(at(2, 12)) is None
    # Sunday night into Monday morning wraps around the week.
    wrap = Schedule.parse("sun 22:00-02:00")
    assert wrap.is_open(at(6, 23)) and wrap.is_open(at(7, 1)) and wrap.is_open(at(0, 1))
    assert wrap.closes_at(at(6, 23)) == at(7, 2)
    assert wrap.next_open(at(0, 3)) == at(6, 22)
    # Aware datetimes keep their zone; every-day ranges; full names; wrapping day ranges.
    tz = timezone(timedelta(hours=2))
    daily = Schedule.parse("09:00-17:00")
    assert daily.closes_at(at(2, 10).replace(tzinfo=tz)) == at(2, 17).replace(tzinfo=tz)
    assert Schedule.parse("Friday-Mon").is_open(at(0, 12))
    always = Schedule.parse("daily")
    assert always.always_open and always.closes_at(at(3, 3)) is None
    assert always.next_open(at(3, 3)) == at(3, 3)
    assert Schedule.parse("mon 00:00-24:00").closes_at(at(0, 5)) == at(1, 0)
    assert parse_schedule("") is None and parse_schedule("  ") is None


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("mon-fri 25:00-08:00", "bad time '25:00'"),
        ("mon-fri 18:00", "bad time range"),
        ("funday", "bad day 'funday'"),
        ("mon 10:00-10:00", "empty window"),
        ("mon 10:60-11:00", "minutes 00-59"),
        (";", "empty schedule"),
        ("mon,,tue", "empty day"),
        ("mon 8-9", "use HH:MM"),
    ],
)
def test_bad_specs_say_what_is_wrong(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Schedule.parse(spec)


def test_agent_rejects_a_bad_schedule_and_prices_by_model(tmp_path) -> None:
    agent = make_agent(FakeBroker(), tmp_path, schedule="weekdays")
    with pytest.raises(AgentConfigError, match="schedule: bad day 'weekdays'"):
        agent.check_config()
    agent = make_agent(FakeBroker(), tmp_path, price_per_hour_by_model={"CPU": "cheap"})
    with pytest.raises(AgentConfigError, match="price for 'CPU'"):
        agent.check_config()


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def test_agent_follows_the_windows(tmp_path) -> None:
    async def main() -> None:
        broker = FakeBroker()
        await broker.start()
        clock = Clock(at(0, 12))  # Monday noon: closed
        agent = make_agent(
            broker,
            tmp_path,
            schedule=SPEC,
            clock=clock,
            schedule_poll_interval=0.05,
            price_per_hour_by_model={"CPU": "2.00"},
        )
        task = asyncio.ensure_future(agent.run())
        priced = {**CPU_OFFER, "price_per_second_micro": 556}  # 2.00 per hour
        try:
            hello = await broker.next_control("hello")
            assert hello["offers"] == []
            broker.send(
                {
                    "type": "start_kernel",
                    "session_id": "early",
                    "gpu_indices": [],
                    "relay_path": "/gpu-share/api/relay/early/host",
                }
            )
            failed = await broker.next_control("kernel_failed")
            assert (
                "outside its availability window; it opens again Mon 18:00" in (failed["message"])
            )

            clock.now = at(0, 18)  # the window opens: a new hello with the offers
            hello = await broker.next_control("hello", timeout=5)
            assert hello["offers"] == [priced]

            clock.now = at(1, 7, 55)  # too close to the 08:00 close for a new session
            broker.send(
                {
                    "type": "start_kernel",
                    "session_id": "late",
                    "gpu_indices": [],
                    "relay_path": "/gpu-share/api/relay/late/host",
                }
            )
            failed = await broker.next_control("kernel_failed")
            assert failed["message"] == (
                "this host's availability window closes at 08:00, less than 10 minutes from now"
            )

            clock.now = at(1, 7, 30)
            await start_session(broker, "s1")
            clock.now = at(1, 7, 51)  # ten minutes before the close: the renter is warned
            status = await broker.next_relay_text("s1", "status", timeout=5)
            assert status == {
                "type": "status",
                "message": "this host's availability window closes at 08:00; save your work",
            }
            clock.now = at(1, 7, 52)
            await asyncio.sleep(0.3)
            queue = broker.relay_queue("s1")
            texts = [m for m in queue._queue if isinstance(m, str)]
            assert all('"status"' not in m for m in texts)  # warned once

            clock.now = at(1, 8)  # the close: the kernel stops and the offers go
            seen: dict[str, dict] = {}
            while len(seen) < 2:
                record = await asyncio.wait_for(broker.control_messages.get(), 10)
                if record["type"] in ("hello", "kernel_ended"):
                    seen[record["type"]] = record
            ended = seen["kernel_ended"]
            assert ended["session_id"] == "s1" and ended["reason"] == "stopped"
            assert ended["message"] == "availability window closed"
            assert seen["hello"]["offers"] == []
            assert agent.sessions == {}
        finally:
            await agent.stop()
            await asyncio.wait_for(task, 30)
            await broker.stop()

    asyncio.run(main())


def test_the_agent_checks_again_at_the_close_and_at_its_warning(tmp_path) -> None:
    """A stop at the window's end, not up to a poll interval after it (billing ends when
    the kernel is stopped)."""
    clock = Clock(at(1, 7, 40))  # Tuesday 07:40, the window closes at 08:00
    agent = make_agent(
        FakeBroker(), tmp_path, schedule=SPEC, clock=clock, schedule_poll_interval=900
    )
    agent.check_config()
    assert agent.schedule_wait() == pytest.approx(10 * 60 + 0.01)  # the 07:50 warning
    clock.now = at(1, 7, 55)
    assert agent.schedule_wait() == pytest.approx(5 * 60 + 0.01)  # the close itself
    clock.now = at(1, 12)  # closed: nothing sooner than the poll
    assert agent.schedule_wait() == 900
