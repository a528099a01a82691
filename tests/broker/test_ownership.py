"""The rules of host ownership between brokers (broker/ownership.py)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from jupyter_gpu_share.broker.ownership import Lease, may_settle, peers_live, renew, take

TTL = 10


def test_the_first_connect_takes_epoch_one() -> None:
    assert take(None, "h", "b1", 100, TTL) == Lease("h", "b1", 1, 110)


def test_a_reconnect_to_the_owner_keeps_the_epoch_and_a_move_raises_it() -> None:
    lease = take(None, "h", "b1", 100, TTL)
    assert take(lease, "h", "b1", 105, TTL) == Lease("h", "b1", 1, 115)
    assert take(lease, "h", "b2", 105, TTL) == Lease("h", "b2", 2, 115)
    # A lapsed lease taken back by the same broker: another may have acted meanwhile.
    assert take(lease, "h", "b1", 200, TTL) == Lease("h", "b1", 2, 210)


def test_only_the_holder_of_a_live_lease_renews() -> None:
    lease = Lease("h", "b2", 2, 110)
    assert renew(lease, "b2", 105, TTL) == Lease("h", "b2", 2, 115)
    assert renew(lease, "b1", 105, TTL) is None
    assert renew(None, "b1", 105, TTL) is None
    assert renew(lease, "b2", 200, TTL) is None  # lapsed: the host must be taken anew


def test_who_may_settle() -> None:
    lease = Lease("h", "b2", 2, 110)
    assert may_settle(lease, "b2", 2, 105)
    assert not may_settle(lease, "b2", 1, 105)  # an older epoch of its own
    assert not may_settle(lease, "b1", 1, 105)
    assert not may_settle(lease, "b1", None, 105)
    assert may_settle(lease, "b1", None, 111)  # lapsed: no broker holds the host
    assert may_settle(None, "b1", None, 105)


@given(st.lists(st.tuples(st.sampled_from(["b1", "b2", "b3"]), st.integers(0, 50)), max_size=30))
def test_epochs_never_fall_and_two_brokers_never_both_may_settle(moves) -> None:
    lease, now = None, 0
    for broker, wait in moves:
        now += wait
        before = lease
        lease = take(lease, "h", broker, now, TTL)
        assert before is None or lease.epoch >= before.epoch
        assert before is None or lease.broker_id == before.broker_id or lease.epoch > before.epoch
        settlers = [
            b
            for b in ("b1", "b2", "b3")
            if may_settle(lease, b, lease.epoch if b == lease.broker_id else None, now)
        ]
        assert settlers == [lease.broker_id]


def test_peers_are_the_others_seen_lately() -> None:
    seen = {"me": 100, "b1": 95, "b2": 50}
    assert peers_live(seen, "me", 100, 10) == ["b1"]
