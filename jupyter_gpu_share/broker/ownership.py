"""Which broker owns a host: leases with epochs (fencing tokens), as plain rules.

Several brokers share one PostgreSQL. A host is connected to one broker at a time, and the
broker it is connected to owns it: that broker meters its sessions, stops them and settles
them. Ownership is a lease in the database, renewed while the host stays connected. Each
change of owner raises the lease's epoch, and the store refuses a settlement made under an
epoch that is no longer the lease's: a broker that was cut off (its host moved, its
database connection hung) cannot bill what another broker now runs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Lease:
    """A host's owner: the broker, the epoch it took the host at, and until when."""

    host: str
    broker_id: str
    epoch: int
    expires_us: int

    def live(self, now_us: int) -> bool:
        """Whether the lease still holds (its owner renewed it in time)."""
        return self.expires_us >= now_us


def take(current: Lease | None, host: str, broker_id: str, now_us: int, ttl_us: int) -> Lease:
    """A host connected to ``broker_id``: the host is there, so the lease is that broker's.

    The epoch stays when the broker holds it already (a reconnect to the same broker) and
    rises on every change of owner, a lease that lapsed included.
    """
    expires = now_us + ttl_us
    if current is None:
        return Lease(host, broker_id, 1, expires)
    if current.broker_id == broker_id and current.live(now_us):
        return replace(current, expires_us=max(current.expires_us, expires))
    return Lease(host, broker_id, current.epoch + 1, expires)


def renew(current: Lease | None, broker_id: str, now_us: int, ttl_us: int) -> Lease | None:
    """Extend a lease its holder still holds, live; None: it is lost (another broker took
    the host, or it lapsed: another broker may have settled its sessions meanwhile, so the
    host must connect again to be taken anew, at a higher epoch). The holder is the one
    broker at the lease's epoch (``take`` raises it on every change of owner), so the store
    renews all of a broker's leases at once by this rule (``store/brokers.py``)."""
    if current is None or current.broker_id != broker_id or not current.live(now_us):
        return None
    return replace(current, expires_us=max(current.expires_us, now_us + ttl_us))


def may_settle(current: Lease | None, broker_id: str, epoch: int | None, now_us: int) -> bool:
    """Whether ``broker_id`` may end and bill a session on the lease's host.

    The holder may, at the lease's epoch; anyone may when no broker holds the host (never
    leased, or the lease lapsed: the host is gone from every broker). A broker that holds
    an older epoch, or none, may not while another broker's lease is live.
    """
    if current is None:
        return True
    if epoch is not None and current.broker_id == broker_id and current.epoch == epoch:
        return True
    return not current.live(now_us)


def peers_live(seen_us: dict[str, int], own_id: str, now_us: int, within_us: int) -> list[str]:
    """The other brokers seen within ``within_us`` (their heartbeats in the store)."""
    return sorted(
        broker
        for broker, seen in seen_us.items()
        if broker != own_id and now_us - seen <= within_us
    )
