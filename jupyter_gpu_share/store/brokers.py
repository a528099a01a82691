"""Several brokers on one database: their heartbeats, and the leases by which each owns
the hosts connected to it (the rules are ``broker/ownership.py``; this persists them)."""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, bindparam, insert, select, text, update
from sqlalchemy.exc import IntegrityError

from .. import clock
from ..broker.ownership import Lease, may_settle, take
from . import models
from .records import StoreError

accounts = models.Account.__table__
brokers = models.Broker.__table__
leases = models.HostLease.__table__
sessions = models.Session.__table__

_RENEW = (
    update(leases)
    .where(
        leases.c.broker_id == bindparam("holder"),
        leases.c.expires_us >= bindparam("now_us"),
        leases.c.expires_us < bindparam("until_us"),
    )
    .values(expires_us=bindparam("until_us"))
)
_HELD = (
    select(accounts.c.name)
    .select_from(leases.join(accounts, accounts.c.id == leases.c.host_account_id))
    .where(leases.c.broker_id == bindparam("holder"), leases.c.expires_us >= bindparam("now_us"))
)
_RELEASE = (
    update(leases)
    .where(
        leases.c.broker_id == bindparam("holder"),
        leases.c.expires_us >= bindparam("now_us"),
        leases.c.host_account_id.in_(
            select(accounts.c.id).where(accounts.c.name == bindparam("host")).scalar_subquery()
        ),
    )
    .values(expires_us=bindparam("now_us") - 1)
)
_SELECT_LEASE = select(
    accounts.c.name, leases.c.broker_id, leases.c.epoch, leases.c.expires_us
).select_from(leases.join(accounts, accounts.c.id == leases.c.host_account_id))


class LeaseHeld(StoreError):
    """Another broker owns the host of a session under a live lease: not ours to settle."""

    def __init__(self, session_ids: list[str], holders: dict[str, str]):
        self.session_ids = session_ids
        self.holders = holders  # session id -> the broker that owns its host
        names = ", ".join(f"{s} (broker {holders[s]})" for s in session_ids)
        super().__init__(f"owned by another broker: {names}")


@dataclass(frozen=True)
class HostElsewhere:
    """A host another broker serves now (a live lease), as the store has it: where that
    broker is, what the host said in its hello, and which of its offers are taken."""

    host: str
    broker_id: str
    public_url: str | None
    profile: dict[str, Any]
    offers: list[Any]
    taken_offer_ids: list[int] = field(default_factory=list)

    @property
    def max_kernels(self) -> int:
        value = self.profile.get("max_kernels")
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 1

    @property
    def schedule(self) -> tuple[str | None, int]:
        """Its availability window and UTC offset, as reliability reads them."""
        schedule, offset = self.profile.get("schedule"), self.profile.get("utc_offset_s")
        return (
            schedule if isinstance(schedule, str) else None,
            offset if isinstance(offset, int) and not isinstance(offset, bool) else 0,
        )

    def about(self, offer_id: int) -> dict[str, Any]:
        """What the hello said of one offer: shared, benchmark, sandbox."""
        described = self.profile.get("offers")
        about = described.get(str(offer_id)) if isinstance(described, dict) else None
        return about if isinstance(about, dict) else {}


MAX_PROFILE_CHARS = 256 * 1024  # a hello is bounded well below this (host_hello_max_bytes)


def _profile(text: str | None) -> dict[str, Any]:
    try:
        value = json.loads(text) if text else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _lease(row: Any) -> Lease:
    return Lease(row.name, row.broker_id, int(row.epoch), int(row.expires_us))


class BrokerStore:
    """The brokers part of ``Store`` (mixed in; uses its engines)."""

    # Store provides: _write(), _reader, _account_id(), dialect.
    _write: Any
    _reader: Any
    _account_id: Any
    dialect: str
    # Leases are timed by the database's clock, which every broker shares (their own
    # clocks may differ): how far it is ahead of this machine's, as last measured.
    lease_offset_us = 0

    def lease_now_us(self) -> int:
        """Now, on the database's clock (this machine's on SQLite: one machine)."""
        return clock.now_us() + self.lease_offset_us

    def measure_clock_offset(self) -> int:
        """Measure how far the database's clock is ahead of this machine's (PostgreSQL;
        0 on SQLite), keep it for lease_now_us and return it."""
        if self.dialect != "postgresql":
            return 0
        query = text("SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint")
        with self._reader.connect() as connection:
            before = clock.now_us()
            database = int(connection.execute(query).scalar_one())
            after = clock.now_us()
        self.lease_offset_us = database - (before + after) // 2
        return self.lease_offset_us

    # -- brokers ------------------------------------------------------------------------

    def register_broker(self, broker_id: str, public_url: str | None, now_us: int) -> None:
        """Record a broker that starts (a configured id comes back at each restart)."""
        values = {"public_url": (public_url or None) and public_url[:512], "seen_us": now_us}
        with self._write() as connection:
            updated = connection.execute(
                update(brokers)
                .where(brokers.c.id == broker_id)
                .values(started_us=now_us, stopped_us=None, **values)
            ).rowcount
            if not updated:
                connection.execute(
                    insert(brokers).values(id=broker_id, started_us=now_us, **values)
                )

    def touch_broker(self, broker_id: str, now_us: int) -> None:
        """A broker's heartbeat."""
        with self._write() as connection:
            connection.execute(
                update(brokers).where(brokers.c.id == broker_id).values(seen_us=now_us)
            )

    def stop_broker(self, broker_id: str, now_us: int, *, all_but: bool = False) -> None:
        """A broker stops: its row says so, and its leases lapse now (another broker may
        settle what the hosts it owned left behind). With ``all_but``, every broker but
        ``broker_id`` (the one broker of a SQLite file knows the others are gone)."""
        chosen = brokers.c.id != broker_id if all_but else brokers.c.id == broker_id
        owned = leases.c.broker_id != broker_id if all_but else leases.c.broker_id == broker_id
        with self._write() as connection:
            connection.execute(
                update(brokers)
                .where(chosen, brokers.c.stopped_us.is_(None))
                .values(stopped_us=now_us)
            )
            connection.execute(
                update(leases)
                .where(owned, leases.c.expires_us > now_us)
                .values(expires_us=now_us - 1)
            )

    def broker_heartbeats(self) -> dict[str, int]:
        """Every broker not stopped, and when it was last seen."""
        query = select(brokers.c.id, brokers.c.seen_us).where(brokers.c.stopped_us.is_(None))
        with self._reader.connect() as connection:
            return {row.id: int(row.seen_us) for row in connection.execute(query)}

    def running_costs(self, payers: list[str]) -> list[tuple[str, str, int, int]]:
        """Every running session of these payers, whichever broker meters it: ``(session
        id, payer, ready_us, price per second)``; what a payer has committed on every
        broker, for the funds checks."""
        if not payers:
            return []
        query = (
            select(
                sessions.c.id,
                accounts.c.name,
                sessions.c.ready_us,
                sessions.c.price_per_second_micro,
            )
            .select_from(sessions.join(accounts, accounts.c.id == sessions.c.payer_account_id))
            .where(
                sessions.c.state == "running",
                sessions.c.ready_us.is_not(None),
                accounts.c.name.in_(sorted(set(payers))),
            )
        )
        with self._reader.connect() as connection:
            return [(r[0], r[1], int(r[2]), int(r[3])) for r in connection.execute(query)]

    # -- host leases --------------------------------------------------------------------

    def take_host_lease(
        self, host: str, broker_id: str, now_us: int, ttl_us: int
    ) -> tuple[Lease, str | None]:
        """A host connected to ``broker_id``: the lease is that broker's (``ownership.take``).
        Returns it, and the broker that held it before (None: none, or this one)."""
        for attempt in range(2):
            try:
                with self._write() as connection:
                    host_id = self._account_id(connection, host)
                    current = self._locked_lease(connection, host_id)
                    lease = take(current, host, broker_id, now_us, ttl_us)
                    values = {
                        "broker_id": lease.broker_id,
                        "epoch": lease.epoch,
                        "expires_us": lease.expires_us,
                    }
                    if current is None:
                        connection.execute(insert(leases).values(host_account_id=host_id, **values))
                    else:
                        connection.execute(
                            update(leases).where(leases.c.host_account_id == host_id).values(values)
                        )
                    before = None if current is None or current.broker_id == broker_id else current
                    return lease, None if before is None else before.broker_id
            except IntegrityError:  # another broker inserted the first lease meanwhile
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def release_host_lease(self, host: str, broker_id: str, now_us: int) -> None:
        """A host this broker held is gone from it: its lease lapses now."""
        with self._write() as connection:
            connection.execute(_RELEASE, {"host": host, "holder": broker_id, "now_us": now_us})

    def renew_host_leases(
        self, broker_id: str, hosts: Collection[str], now_us: int, ttl_us: int
    ) -> set[str]:
        """Renew every live lease a broker holds (two fixed statements, whatever the number
        of hosts); return those of ``hosts`` it holds no more (another broker took them, or
        the lease lapsed before this renewal)."""
        with self._write() as connection:
            params = {"holder": broker_id, "now_us": now_us, "until_us": now_us + ttl_us}
            connection.execute(_RENEW, params)
            held = {row[0] for row in connection.execute(_HELD, params)}
        return set(hosts) - held

    def set_host_profile(self, host: str, broker_id: str, profile: dict[str, Any]) -> None:
        """Record what a host this broker serves said in its hello (for the others)."""
        text = json.dumps(profile, separators=(",", ":"))
        if len(text) > MAX_PROFILE_CHARS:
            text = json.dumps({k: v for k, v in profile.items() if k != "offers"})
        with self._write() as connection:
            connection.execute(
                update(leases)
                .where(
                    leases.c.broker_id == broker_id,
                    leases.c.host_account_id.in_(
                        select(accounts.c.id).where(accounts.c.name == host).scalar_subquery()
                    ),
                )
                .values(profile=text)
            )

    def hosts_elsewhere(self, broker_id: str, now_us: int) -> list[HostElsewhere]:
        """The hosts other brokers serve now, with their active offers (three reads)."""
        query = (
            select(accounts.c.name, leases.c.broker_id, leases.c.profile, brokers.c.public_url)
            .select_from(
                leases.join(accounts, accounts.c.id == leases.c.host_account_id).outerjoin(
                    brokers, brokers.c.id == leases.c.broker_id
                )
            )
            .where(leases.c.broker_id != broker_id, leases.c.expires_us >= now_us)
        )
        with self._reader.connect() as connection:
            # Skipped: a broker with no public URL (none can send it a start).
            rows = [row for row in connection.execute(query) if row.public_url]
            names = sorted(row.name for row in rows)
            taken: dict[str, list[int]] = {}
            if names:
                live = (
                    select(accounts.c.name, sessions.c.offer_id)
                    .select_from(
                        sessions.join(accounts, accounts.c.id == sessions.c.host_account_id)
                    )
                    .where(
                        sessions.c.state.in_(("starting", "running")),
                        accounts.c.name.in_(names),
                    )
                )
                for host, offer_id in connection.execute(live):
                    taken.setdefault(host, []).append(int(offer_id))
        offers: dict[str, list[Any]] = {}
        for offer in self.list_offers(hosts=names) if names else []:  # type: ignore[attr-defined]
            offers.setdefault(offer.host, []).append(offer)
        return [
            HostElsewhere(
                host=row.name,
                broker_id=row.broker_id,
                public_url=row.public_url,
                profile=_profile(row.profile),
                offers=offers.get(row.name, []),
                taken_offer_ids=taken.get(row.name, []),
            )
            for row in sorted(rows, key=lambda r: r.name)
        ]

    def serving_broker(self, host: str, now_us: int) -> tuple[str, str | None] | None:
        """The broker that serves a host now (a live lease) and its public URL (one read)."""
        query = (
            select(leases.c.broker_id, brokers.c.public_url)
            .select_from(
                leases.join(accounts, accounts.c.id == leases.c.host_account_id).outerjoin(
                    brokers, brokers.c.id == leases.c.broker_id
                )
            )
            .where(accounts.c.name == host, leases.c.expires_us >= now_us)
        )
        with self._reader.connect() as connection:
            row = connection.execute(query).first()
        return None if row is None else (row.broker_id, row.public_url)

    def host_leases(self, hosts: list[str] | None = None) -> dict[str, Lease]:
        """The leases of some hosts (all, when None)."""
        with self._reader.connect() as connection:
            return self._leases(connection, hosts, lock=False)

    def _leases(
        self, connection: Connection, hosts: list[str] | None, *, lock: bool
    ) -> dict[str, Lease]:
        query = _SELECT_LEASE
        if hosts is not None:
            query = query.where(accounts.c.name.in_(sorted(hosts)))
        if lock and self.dialect == "postgresql":
            query = query.order_by(leases.c.host_account_id).with_for_update(of=leases)
        return {row.name: _lease(row) for row in connection.execute(query)}

    def _locked_lease(self, connection: Connection, host_id: int) -> Lease | None:
        query = _SELECT_LEASE.where(leases.c.host_account_id == host_id)
        if self.dialect == "postgresql":
            query = query.with_for_update(of=leases)
        row = connection.execute(query).first()
        return None if row is None else _lease(row)

    def check_fence(
        self,
        connection: Connection,
        hosts_by_session: Mapping[str, str],
        fence: tuple[str, Mapping[str, int]],
        now_us: int,
    ) -> None:
        """Refuse (``LeaseHeld``), inside a settlement's transaction, to settle sessions on
        hosts another broker owns: ``fence`` is the settling broker and the epochs of the
        leases it holds."""
        broker_id, epochs = fence
        current = self._leases(connection, sorted(set(hosts_by_session.values())), lock=True)
        refused = {}
        for session_id, host in hosts_by_session.items():
            lease = current.get(host)
            if not may_settle(lease, broker_id, epochs.get(host), now_us):
                assert lease is not None
                refused[session_id] = lease.broker_id
        if refused:
            raise LeaseHeld(sorted(refused), refused)
