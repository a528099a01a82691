"""Several brokers on one database: heartbeats, host leases with epochs, and the fence that
refuses a settlement by a broker that no longer owns the session's host."""

from __future__ import annotations

import pytest

from jupyter_gpu_share import clock
from jupyter_gpu_share.broker.ownership import Lease
from jupyter_gpu_share.store import ENDED, LeaseHeld, OfferSpec, Store

SECOND = 1_000_000
TTL = 10 * SECOND


@pytest.fixture
def running(store: Store) -> str:
    """A running session on host bob."""
    (offer,) = store.replace_offers(
        "bob",
        [
            OfferSpec(
                gpu_model="CPU",
                gpu_count=0,
                gpu_memory_mib=0,
                gpu_indices=[],
                price_per_second_micro=100,
            )
        ],
    )
    now = clock.now_us()
    session = store.create_session("alice", "alice", offer.id, now - 60 * SECOND)
    store.mark_ready(session.id, now - 50 * SECOND)
    return session.id


def test_a_host_lease_changes_epoch_with_its_owner(store: Store) -> None:
    now = clock.now_us()
    first = store.take_host_lease("bob", "b-one", now, TTL)
    assert first == (Lease("bob", "b-one", 1, now + TTL), None)
    again, before = store.take_host_lease("bob", "b-one", now + SECOND, TTL)
    assert again.epoch == 1 and again.expires_us == now + SECOND + TTL  # a reconnect
    assert before is None
    moved, before = store.take_host_lease("bob", "b-two", now + 2 * SECOND, TTL)
    assert (moved.broker_id, moved.epoch, before) == ("b-two", 2, "b-one")
    # The first broker's renewal finds the lease gone; the new owner's holds.
    assert store.renew_host_leases("b-one", ["bob"], now + 3 * SECOND, TTL) == {"bob"}
    assert store.renew_host_leases("b-two", ["bob"], now + 3 * SECOND, TTL) == set()
    assert store.host_leases()["bob"] == Lease("bob", "b-two", 2, now + 3 * SECOND + TTL)
    # A lapsed lease is not renewed: the host must connect again, and gets a new epoch.
    assert store.renew_host_leases("b-two", ["bob"], now + 60 * SECOND, TTL) == {"bob"}
    back, before = store.take_host_lease("bob", "b-one", now + 60 * SECOND, TTL)
    assert (back.broker_id, back.epoch, before) == ("b-one", 3, "b-two")
    # A host gone from its broker: released, its lease lapses at once.
    store.release_host_lease("bob", "b-one", now + 61 * SECOND)
    assert not store.host_leases()["bob"].live(now + 61 * SECOND)


def test_a_stale_epoch_cannot_settle(store: Store, running: str) -> None:
    now = clock.now_us()
    store.take_host_lease("bob", "b-one", now, TTL)
    store.take_host_lease("bob", "b-two", now, TTL)  # the host moved to broker two
    balance = store.balance("alice")
    with pytest.raises(LeaseHeld, match="b-two") as refused:
        store.end_session(running, now, "host lost", 0, fence=("b-one", {"bob": 1}))
    assert refused.value.session_ids == [running]
    with pytest.raises(LeaseHeld):  # holding no lease at all does not help
        store.end_session(running, now, "host lost", 0, fence=("b-one", {}))
    assert store.get_session(running).state != ENDED
    assert store.balance("alice") == balance  # nothing billed
    # The owner settles it, once.
    ready_us = store.get_session(running).ready_us
    ended = store.end_session(
        running, ready_us + 50 * SECOND, "stopped", 0, fence=("b-two", {"bob": 2})
    )
    assert ended.state == ENDED and ended.billed_seconds == 50
    store.check_ledger()
    # An ended session is returned as it is, to anyone.
    assert store.end_session(running, now, "host lost", 0, fence=("b-one", {"bob": 1})) == ended


def test_a_host_no_broker_holds_may_be_settled_by_any(store: Store, running: str) -> None:
    now = clock.now_us()
    store.take_host_lease("bob", "b-one", now - 60 * SECOND, TTL)  # lapsed long ago
    ended = store.end_session(running, now, "host lost", 0, fence=("b-two", {}))
    assert ended.state == ENDED


def test_a_stopping_broker_lets_its_leases_lapse(store: Store, running: str) -> None:
    now = clock.now_us()
    store.register_broker("b-one", "https://one.example", now)
    store.register_broker("b-two", None, now)
    store.take_host_lease("bob", "b-one", now, TTL)
    store.touch_broker("b-one", now + SECOND)
    assert store.broker_heartbeats() == {"b-one": now + SECOND, "b-two": now}
    stopped = clock.now_us()
    store.stop_broker("b-one", stopped)
    assert store.broker_heartbeats() == {"b-two": now}
    assert not store.host_leases()["bob"].live(stopped)
    assert store.end_session(running, now, "host lost", 0, fence=("b-two", {})).state == ENDED


def test_a_batch_with_one_session_of_another_broker_settles_nothing(
    store: Store, running: str
) -> None:
    now = clock.now_us()
    store.take_host_lease("bob", "b-two", now, TTL)
    with pytest.raises(LeaseHeld):
        store.end_sessions([(running, now, "host lost")], 0, fence=("b-one", {}))
    assert store.get_session(running).state != ENDED


def test_a_broker_with_a_configured_id_registers_again_at_each_start(store: Store) -> None:
    now = clock.now_us()
    store.register_broker("broker-1", "https://one.example", now)
    store.stop_broker("broker-1", now + SECOND)
    assert store.broker_heartbeats() == {}
    store.register_broker("broker-1", "https://one.example", now + 2 * SECOND)  # a restart
    assert store.broker_heartbeats() == {"broker-1": now + 2 * SECOND}


def test_leases_are_timed_by_the_databases_clock(store: Store, running: str, monkeypatch) -> None:
    """Brokers on machines whose clocks differ compared expiries each by its own clock:
    one ahead took the others' live leases for lapsed. The fence reads the database's."""
    offset = store.measure_clock_offset()
    if store.dialect != "postgresql":
        assert offset == 0 and store.lease_now_us() - clock.now_us() <= SECOND
        return
    assert abs(offset) < 5 * SECOND  # one machine here: nearly none
    # This machine's clock runs a minute ahead: measured, the offset undoes it.
    real = clock.now_us
    monkeypatch.setattr(clock, "now_us", lambda: real() + 60 * SECOND)
    assert store.measure_clock_offset() == pytest.approx(offset - 60 * SECOND, abs=SECOND)
    assert abs(store.lease_now_us() - real()) < 5 * SECOND
    # A lease another broker took on the database's clock holds for this broker too: by
    # this machine's clock it lapsed 50 s ago, and a broker holding none may settle.
    store.take_host_lease("bob", "b-other", real(), TTL)
    with pytest.raises(LeaseHeld):
        store.end_session(running, real(), "host lost", 0, fence=("b-mine", {}))
    store.lease_offset_us = 0  # as before: this machine's clock alone
    assert store.end_session(running, real(), "host lost", 0, fence=("b-mine", {})).state == ENDED
