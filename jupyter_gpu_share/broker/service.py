"""The broker's live state: connected hosts, running sessions, metering and budget stops.

Handlers call into one ``Broker`` held in the tornado settings. Money is settled by the store
(``Store.end_session``, idempotent per session); this module decides *when* a session ends
and at which instant its billing stops (the rules themselves are ``ledger``'s).

The store is reached through ``self.db`` (``store.aio.AsyncStore``): every call runs on the
store's threads and is awaited, so a locked or slow database delays the requests that need
it and never the event loop (relays, heartbeats, other renters). State in memory changes on
the loop only, before or after an await; what could race across an await is guarded: starts
run one at a time (``_start_lock``), and each session has at most one settlement in flight
(``_ending``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Protocol

from ..classes import (
    Quota,
    Used,
    WaitingLine,
    class_window_problem,
    quota_problem,
    quota_stop_us,
    week_start_us,
)
from ..clock import now_us
from ..ledger import billed_seconds, cost_at, credit_runs_out_us, format_credits, stop_instant_us
from ..ledger.caps import day_start_us
from ..store import Conflict, LeaseHeld, NotFound, Store, StoreUnavailable, unavailable
from ..store.aio import AsyncStore
from ..store.brokers import HostElsewhere
from .caps import END_CAP_DAY, END_CAP_SESSION, CapWatch, status_message
from .host_messages import HEARTBEAT_MAX_BYTES, HELLO_MAX_BYTES
from .idle import GPU_BUSY_PCT, gpus_in_use, idle_state
from .idle import warning_text as idle_warning_text
from .matching import (
    HostLoad,
    NoMatch,
    OfferView,
    SessionRequest,
    choose_offer,
    offer_fits,
    offer_is_free,
)
from .ownership import peers_live
from .peers import close_clients
from .ratelimit import RateLimiter
from .relay import (
    CLOSE_CAP_REACHED,
    CLOSE_CLIENT_GONE,
    CLOSE_CREDIT_EXHAUSTED,
    CLOSE_HOST_LOST,
    CLOSE_IDLE,
    CLOSE_KERNEL_ENDED,
    CLOSE_MOVED,
    CLOSE_QUOTA_REACHED,
    CLOSE_START_FAILED,
    CLOSE_STOPPED,
    HOST,
    USER,
    Relays,
)
from .reliability import MIN_OBSERVED_S, WINDOW_DAYS, Reliability, reliability, uptime_fraction
from .stops import PendingStop, StopJournal

log = logging.getLogger("jupyter_gpu_share.broker")

LIVE_STATES = ("starting", "running")

END_STOPPED = "stopped"
END_HOST_LOST = "host lost"
END_CREDIT = "credit exhausted"
END_KERNEL = "kernel exited"
END_START_FAILED = "start failed"
END_QUOTA = "quota reached"
END_TEACHER = "stopped by the teacher"
END_CLIENT_GONE = "client gone"
END_IDLE = "idle"

CLOSE_CODES = {
    END_CAP_SESSION: CLOSE_CAP_REACHED,
    END_CAP_DAY: CLOSE_CAP_REACHED,
    END_STOPPED: CLOSE_STOPPED,
    END_HOST_LOST: CLOSE_HOST_LOST,
    END_CREDIT: CLOSE_CREDIT_EXHAUSTED,
    END_KERNEL: CLOSE_KERNEL_ENDED,
    END_START_FAILED: CLOSE_START_FAILED,
    END_QUOTA: CLOSE_QUOTA_REACHED,
    END_TEACHER: CLOSE_STOPPED,
    END_CLIENT_GONE: CLOSE_CLIENT_GONE,
    END_IDLE: CLOSE_IDLE,
}
RETRY_AFTER_SECONDS = 5
PRESENCE_INTERVAL_S = 60


class Queued(Exception):
    """The class pool is full; the student holds a place in the waiting line."""

    def __init__(self, position: int, retry_after: int = RETRY_AFTER_SECONDS):
        super().__init__(
            f"the class GPU pool is full; you are number {position} in the queue "
            f"(ask again within {retry_after} s to keep your place)"
        )
        self.position = position
        self.retry_after = retry_after


class Placed(Exception):
    """The chosen offer's host is served by another broker: the start is sent there."""

    def __init__(self, offer_id: int, host: str, broker_id: str, url: str | None):
        super().__init__(f"offer {offer_id} is on host {host}, served by broker {broker_id}")
        self.offer_id = offer_id
        self.host = host
        self.broker_id = broker_id
        self.url = url


class Refused(Exception):
    """A class start refused for a reason the student can read (quota, dates, membership)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class ControlChannel(Protocol):
    """The part of a host's control websocket the broker uses."""

    def write_message(self, message: str | bytes, binary: bool = False) -> object: ...

    def close(self, code: int | None = None, reason: str | None = None) -> None: ...


@dataclass
class HostLink:
    """A host as the broker sees it while it is (or was recently) connected."""

    name: str
    max_kernels: int
    offers: list[OfferView]
    channel: ControlChannel | None
    last_heartbeat_us: int
    telemetry: dict[str, Any] = field(default_factory=dict)
    gpus: list[dict[str, Any]] = field(default_factory=list)
    presence_id: int | None = None
    connected_us: int = 0
    benchmarks: dict[int, dict[str, Any]] = field(default_factory=dict)
    sandboxes: dict[int, dict[str, Any]] = field(default_factory=dict)  # by offer id
    busy_sessions: frozenset[str] = frozenset()  # running a cell, as of the last heartbeat

    def send(self, message: dict[str, Any]) -> None:
        """Send a control message if the host is connected."""
        if self.channel is not None:
            self.channel.write_message(json.dumps(message))


@dataclass
class LiveSession:
    """A session that has not ended: what metering needs, kept in memory."""

    id: str
    renter: str
    payer: str
    host: str
    offer_id: int
    price_per_second_micro: int
    created_us: int
    ready_us: int | None = None
    class_name: str | None = None
    last_seen_us: int | None = None  # as the store had it when loaded (a checkpoint)
    quota: Quota | None = None
    used_before: Used | None = None
    keep_alive_s: float | None = None  # with no renter connected (None: the broker's grace)
    # When this broker began to know the session (monotonic): the renter's absence counts
    # from here until its first connection to the relay.
    known_since: float = field(default_factory=time.monotonic)
    gpu_indices: tuple[int, ...] = ()
    # Idle culling (idle.py): the seconds it may be idle (None: the renter's or the
    # broker's default), when it was last seen active, and the stop it was warned of.
    idle_limit_s: float | None = None
    active_us: int | None = None
    idle_stop_us: int | None = None

    @classmethod
    def from_record(cls, record: Any) -> LiveSession:
        """The live view of a stored session."""
        return cls(
            id=record.id,
            renter=record.renter,
            payer=record.payer,
            host=record.host,
            offer_id=record.offer_id,
            price_per_second_micro=record.price_per_second_micro,
            created_us=record.created_us,
            ready_us=record.ready_us,
            class_name=record.class_name,
            last_seen_us=record.last_seen_us,
            gpu_indices=tuple(int(i) for i in record.gpu_indices),
            # Idle from now at the earliest: a broker that (re)loads a session has not
            # seen its host's reports before (idle.py).
            active_us=now_us(),
        )

    def quota_stop_us(self) -> int | None:
        """When this class session reaches the student's quota (None: not a class, not ready)."""
        if self.quota is None or self.used_before is None or self.ready_us is None:
            return None
        return quota_stop_us(
            self.quota, self.used_before, self.ready_us, self.price_per_second_micro
        )

    def cost_at(self, at_us: int) -> int:
        """Cost so far, billed as if the session ended at ``at_us``."""
        return cost_at(self.ready_us, at_us, self.price_per_second_micro)


@dataclass
class BrokerSettings:
    """Tunables, copied from the BrokerApp's traits."""

    platform_fee_bps: int = 1000
    minimum_start_seconds: int = 60
    heartbeat_interval: float = 5.0
    heartbeat_timeout: float = 20.0
    start_timeout: float = 120.0
    budget_check_interval: float = 0.25
    checkpoint_interval: float = 5.0
    relay_buffer_bytes: int = 64 * 1024 * 1024
    host_hello_max_bytes: int = HELLO_MAX_BYTES
    host_heartbeat_max_bytes: int = HEARTBEAT_MAX_BYTES
    stop_journal: str | None = None  # where pending stops are kept (None: memory only)
    host_hello_timeout: float = 30.0  # seconds from a host's upgrade to its hello
    resume_grace_s: float = 60.0  # at start, how long hosts of unfinished sessions may take
    orphan_grace_s: float = 600.0  # a session with no renter connected this long is stopped
    orphan_max_keep_alive_s: float = 3600.0  # the longest keep-alive a renter may ask
    idle_timeout_s: float = 1800.0  # a kernel idle this long is stopped (0: never)
    idle_warning_s: float = 300.0  # and is warned this long before
    gpu_busy_pct: int = GPU_BUSY_PCT  # a GPU used above this is activity
    max_classes_per_teacher: int = 100
    max_students_per_teacher: int = 5000
    requests_per_minute: int = 1200  # per account (0: no limit)
    request_burst: int = 300
    stop_answer_s: float = 2.0  # a stop not settled by then is answered "stopping" (202)
    broker_id: str = ""  # this broker on the store (empty: a fresh one per process)
    public_url: str = ""  # where users and peers reach this broker (for its peers)


class Broker:
    """Hosts, sessions, metering: the state behind the broker's handlers."""

    def __init__(self, store: Store, settings: BrokerSettings, admin_token: str | None = None):
        self.store = store
        self.db = AsyncStore(store)
        self.settings = settings
        self.admin_token = admin_token
        self.hosts: dict[str, HostLink] = {}
        self.sessions: dict[str, LiveSession] = {}
        self.relays = Relays(settings.relay_buffer_bytes)
        self.caps = CapWatch(self.db, now_us)
        self._balances: dict[str, int] = {}
        self.lines: dict[str, WaitingLine] = {}
        self._host_schedules: dict[str, tuple[str | None, int]] = {}
        self._reliability: dict[str, tuple[int, Reliability]] = {}
        self._presence_touched_us = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._started_us = now_us()
        # Stops the store could not settle yet, by session id (see end_session, stops.py).
        self.pending_stops: dict[str, PendingStop] = {}
        self.journal = StopJournal(settings.stop_journal)
        # The settlement in flight for a session, with the stop it settles (see end_session).
        self._ending: dict[str, tuple[PendingStop, asyncio.Task[Any]]] = {}
        # Sessions whose readiness the store has not recorded yet: retried with the stops.
        self._ready_unsaved: dict[str, int] = {}
        self._start_lock = asyncio.Lock()
        self._balance_epoch = 0  # moves on every change of a balance (see _balance)
        self._store_down = False  # the last settlement met an unavailable store
        self._admin_account: Any = None
        # Set once start() has loaded the unfinished sessions: hosts, starts and stops wait.
        self.ready = asyncio.Event()
        self._touches: dict[int, dict[str, int]] = {}  # tokens' last use, one write queued
        self.rate_limiter = RateLimiter(settings.requests_per_minute, settings.request_burst)
        # Several brokers on one store: this one's id, and the epochs of the leases by which
        # it owns the hosts connected to it (see ownership.py). Settlements are fenced by
        # them: the store refuses one on a host that another broker owns now.
        self.broker_id = settings.broker_id or new_broker_id()
        # SQLite is one broker (store/onebroker.py): no lease to take, renew or fence with.
        self.shared_store = store.dialect != "sqlite"
        self.lease_epochs: dict[str, int] = {}
        self.peers: list[str] = []
        # What payers have running on the other brokers: (when read, {payer: billing}).
        self._elsewhere: tuple[int, dict[str, list[tuple[int, int]]]] = (0, {})
        self._elsewhere_asked: set[str] = set()
        self._balance_read_us = 0
        self.renewed_us = now_us()  # this broker's row and leases last renewed (health)
        # The hosts the other brokers serve, as last read (at most a second ago).
        self._hosts_elsewhere: tuple[int, dict[str, HostElsewhere]] = (0, {})
        # Brokers that did not take a connection lately (a start sent on): until when their
        # hosts are left out of matching.
        self._unreachable: dict[str, int] = {}

    # -- accounts -------------------------------------------------------------------------

    def rate_limited(self, account_name: str) -> int | None:
        """None when the account may make an API request now, else the seconds to wait."""
        return self.rate_limiter.check(account_name, time.monotonic())

    async def authenticate(self, token: str) -> Any:
        """Return the account a token belongs to, or None. Only reads: the token's last-use
        time is queued on the writer thread, not waited for."""
        if self.admin_token is not None:
            from .auth import same_token

            if same_token(token, self.admin_token):
                if self._admin_account is None:
                    self._admin_account = await self.db.ensure_account("admin", "admin")
                return self._admin_account
        touches: list[dict[str, int]] = []
        account = await self.db.authenticate(token, touches)
        if touches:
            queued = bool(self._touches)
            self._touches.update((t["token_id"], t) for t in touches)
            if not queued:  # one write at a time, whatever a locked store lets pile up
                asyncio.get_running_loop().create_task(self._write_touches())
        return account

    async def _write_touches(self) -> None:
        touches = list(self._touches.values())
        try:
            await self.db.touch_tokens(touches)
        except Exception as error:  # the next use of the token tries again
            log.warning("tokens' last use not recorded: %s", error)
        finally:
            self._touches.clear()

    def credited(self, account_name: str, balance_micro: int) -> None:
        """Note a new balance so budget checks see added credit at once."""
        self._balance_epoch += 1
        if account_name in self._balances:
            self._balances[account_name] = balance_micro

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Load unfinished sessions from the store and start the background loops."""
        for stop in self.journal.load():
            self.pending_stops.setdefault(stop.session_id, stop)
        if self.shared_store:
            await self._measure_clock()
        started = self.renewed_us = self.lease_now()
        await self.db.register_broker(self.broker_id, self.settings.public_url or None, started)
        leases = {}
        if self.shared_store:
            self.peers = await self._read_peers(started)
            leases = await self.db.host_leases()
        else:  # one broker a file (onebroker.py): any other broker row is a dead one
            await self.db.stop_broker(self.broker_id, started, all_but=True)
        loaded: dict[str, LiveSession] = {}
        for record in await self.db.list_sessions(states=LIVE_STATES):
            lease = leases.get(record.host)
            if lease is not None and lease.broker_id != self.broker_id and lease.live(started):
                continue  # its host is another broker's: that broker meters and settles it
            loaded[record.id] = LiveSession.from_record(record)
            if record.class_name is not None:
                await self._attach_quota(loaded[record.id], exclude_running=True)
        self.sessions.update(loaded)
        # Stops a previous broker could not settle: at the instants they were asked.
        if self.pending_stops:
            log.info("settling %d stop(s) from the stop journal", len(self.pending_stops))
            for stop in list(self.pending_stops.values()):
                if stop.session_id not in self.sessions:  # settled already (another broker)
                    self.pending_stops.pop(stop.session_id)
            await self.settle_pending()
            self.journal.rewrite(list(self.pending_stops.values()))
        if self.sessions:
            log.info("resuming %d unfinished sessions; waiting for their hosts", len(self.sessions))
        self.ready.set()
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(
                self._every(self.settings.budget_check_interval, self.enforce_budgets)
            ),
            loop.create_task(
                self._every(
                    liveness_check_interval(
                        self.settings.heartbeat_interval, self.settings.heartbeat_timeout
                    ),
                    self.check_hosts,
                )
            ),
            loop.create_task(self._every(self.settings.checkpoint_interval, self.checkpoint)),
            loop.create_task(self._every(STOP_RETRY_INTERVAL, self.settle_pending)),
        ]
        if self.shared_store:
            self._tasks.append(
                loop.create_task(self._every(self.lease_ttl_us / 4e6, self.renew_leases))
            )

    @property
    def _fence(self) -> tuple[str, Any] | None:
        """What a settlement is fenced by: this broker and its leases (None on SQLite)."""
        if not self.shared_store:
            return None
        return (self.broker_id, MappingProxyType(self.lease_epochs))

    async def _read_peers(self, now: int) -> list[str]:
        """The other brokers that said they were alive within a lease's life."""
        heartbeats = await self.db.broker_heartbeats()
        return peers_live(heartbeats, self.broker_id, now, self.lease_ttl_us)

    def lease_now(self) -> int:
        """Now on the database's clock, by which every broker times leases and its row."""
        return now_us() + self.store.lease_offset_us

    async def _measure_clock(self) -> None:
        before = self.store.lease_offset_us
        offset = await self.db.measure_clock_offset()
        if abs(offset) > 1_000_000 and abs(offset - before) > 500_000:
            log.warning(
                "this machine's clock is %.1f s %s the database's; leases follow the "
                "database's clock (run NTP on both)",
                abs(offset) / 1e6,
                "behind" if offset > 0 else "ahead of",
            )

    @property
    def lease_ttl_us(self) -> int:
        """How long a host lease holds unrenewed: twice the heartbeat timeout (renewed
        every quarter of it, one statement for all hosts)."""
        return int(2 * self.settings.heartbeat_timeout * 1_000_000)

    async def renew_leases(self) -> None:
        """Say this broker is alive, renew the leases of its hosts, and let go at once of
        the hosts another broker has taken (they reconnected there)."""
        await self._measure_clock()
        now = self.lease_now()
        await self.db.touch_broker(self.broker_id, now)
        peers = await self._read_peers(now)
        if peers != self.peers:
            log.info("now %d other broker(s) on this store: %s", len(peers), ", ".join(peers))
            self.peers = peers
        held = [name for name in self.hosts if name in self.lease_epochs]
        epochs = {name: self.lease_epochs[name] for name in held}
        lost = await self.db.renew_host_leases(self.broker_id, held, now, self.lease_ttl_us)
        self.renewed_us = now
        current = await self.db.host_leases(sorted(lost)) if lost else {}
        for name in lost:
            if self.lease_epochs.get(name) != epochs[name]:
                continue  # taken anew meanwhile (a hello)
            lease = current.get(name)
            if lease is not None and lease.broker_id != self.broker_id and lease.live(now):
                self._host_moved(name)
                continue
            # Lapsed, not taken (this broker was late to renew, the store was away): the
            # host is still connected here, so it is taken again, at a new epoch.
            taken, _ = await self.db.take_host_lease(name, self.broker_id, now, self.lease_ttl_us)
            self.lease_epochs[name] = taken.epoch

    async def live_elsewhere(
        self, session_id: str, account: str, side: str
    ) -> tuple[str, str | None] | None:
        """For a session this broker does not meter that is live on the store (several
        brokers only), for ``account`` on its ``side`` ("user" or "host"): the broker that
        serves its host and its public URL (``("", None)``: none now, a failover)."""
        if not self.shared_store:
            return None
        try:
            record = await self.db.get_session(session_id)
        except NotFound:
            return None
        if record.state not in LIVE_STATES:
            return None
        if account != (record.renter if side == "user" else record.host):
            return None
        return await self.serving_broker(record.host) or ("", None)

    def _host_moved(self, name: str) -> None:
        """Another broker owns this host now: stop acting on it and its sessions (that
        broker meters and settles them); nothing is billed or ended here."""
        self.lease_epochs.pop(name, None)
        link = self.hosts.pop(name, None)
        if link is not None and link.channel is not None:
            link.channel.close(4005, "the host is served by another broker")
        moved = [sid for sid, live in self.sessions.items() if live.host == name]
        for session_id in moved:
            self.sessions.pop(session_id, None)
            self.pending_stops.pop(session_id, None)
            # Its renter's relay reconnects, and is sent to the broker that has the host.
            self.relays.close(session_id, CLOSE_MOVED, "the host is served by another broker")
        log.warning(
            "host %s is served by another broker now; %d session(s) left to it", name, len(moved)
        )

    async def stop(self) -> None:
        """Stop the background loops, let settlements in flight finish, write a last
        checkpoint, let this broker's leases go and stop the store's threads."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        in_flight = [task for _, task in self._ending.values()]
        if in_flight:
            await asyncio.wait(in_flight, timeout=self.settings.stop_answer_s)
        try:  # bounded: a store that is down must not keep the broker from stopping
            await asyncio.wait_for(self.checkpoint(force=True), self.settings.stop_answer_s)
        except Exception as error:  # the next broker resumes from the last checkpoint
            log.warning("last checkpoint not written: %s", error or type(error).__name__)
        try:
            await asyncio.wait_for(
                self.db.stop_broker(self.broker_id, self.lease_now()), self.settings.stop_answer_s
            )
        except Exception as error:  # its leases lapse by themselves
            log.warning("leases not released: %s", error or type(error).__name__)
        await close_clients()
        await asyncio.get_running_loop().run_in_executor(None, self.db.close)

    async def _every(self, interval: float, job: Any) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await job()
            except Exception as error:
                if unavailable(error):  # the store is locked or down: the next tick retries
                    log.warning("%s: the store did not answer: %s", job.__name__, error)
                else:
                    log.exception("background job %s failed", job.__name__)

    # -- hosts ------------------------------------------------------------------------------

    async def host_connected(
        self, name: str, channel: ControlChannel, hello: dict[str, Any]
    ) -> HostLink:
        """Register a host's offers after its hello, and reconcile the sessions it still runs.

        ``hello`` is a validated one (``host_messages.validate_hello``).
        """
        from ..store import OfferSpec

        await self.ready.wait()  # the sessions it may still run are known
        new_epoch = False
        if self.shared_store:
            lease, _previous = await self.db.take_host_lease(
                name, self.broker_id, self.lease_now(), self.lease_ttl_us
            )
            new_epoch = self.lease_epochs.get(name) != lease.epoch
            self.lease_epochs[name] = lease.epoch
        if new_epoch:
            # A new epoch (from another broker, or after a lapse): the sessions the host
            # runs are in the store, and ours to meter and settle from now on.
            for record in await self.db.list_sessions(host=name, states=LIVE_STATES):
                if record.id not in self.sessions:
                    self.sessions[record.id] = LiveSession.from_record(record)
                    if record.class_name is not None:
                        await self._attach_quota(self.sessions[record.id], exclude_running=True)
        specs = [
            OfferSpec(
                gpu_model=str(o["gpu_model"]),
                gpu_count=int(o["gpu_count"]),
                gpu_memory_mib=int(o["gpu_memory_mib"]),
                gpu_indices=[int(i) for i in o.get("gpu_indices", [])],
                price_per_second_micro=int(o["price_per_second_micro"]),
            )
            for o in hello.get("offers", [])
        ]
        offers = await self.db.replace_offers(name, specs)
        benchmarks: dict[int, dict[str, Any]] = {}
        sandboxes: dict[int, dict[str, Any]] = {}
        shared: set[int] = set()
        for offer, wanted in zip(offers, hello.get("offers", []), strict=False):
            if isinstance(wanted.get("benchmark"), dict):
                benchmarks[offer.id] = wanted["benchmark"]
            if isinstance(wanted.get("sandbox"), dict):
                sandboxes[offer.id] = wanted["sandbox"]
            if wanted.get("shared") is True:
                shared.add(offer.id)
        previous = self.hosts.get(name)
        if previous is not None:
            # A hello without a self-test result keeps the last one (it is re-measured daily).
            for offer_id, result in previous.benchmarks.items():
                benchmarks.setdefault(offer_id, result)
        if (
            previous is not None
            and previous.channel is not None
            and previous.channel is not channel
        ):
            previous.channel.close(4005, "replaced by a new connection of the same host")
        schedule = hello.get("schedule") if isinstance(hello.get("schedule"), str) else None
        same_connection = previous is not None and previous.channel is channel
        connected_us = previous.connected_us if same_connection and previous else now_us()
        # A repeated hello on the same connection (new offers) is the same presence.
        if same_connection and previous is not None:
            presence_id = previous.presence_id
        else:
            presence_id = await self.db.open_presence(name, connected_us, schedule)
        link = HostLink(
            name=name,
            max_kernels=max(1, int(hello.get("max_kernels", 1))),
            offers=[replace(_offer_view(o), shared=o.id in shared) for o in offers],
            channel=channel,
            last_heartbeat_us=now_us(),
            gpus=list(hello.get("gpus", [])),
            presence_id=presence_id,
            connected_us=connected_us,
            benchmarks=benchmarks,
            sandboxes=sandboxes,
        )
        self._host_schedules[name] = (schedule, int(hello.get("utc_offset_s") or 0))
        self._reliability.pop(name, None)
        self.hosts[name] = link
        if self.shared_store:  # what the other brokers show of its offers
            await self.db.set_host_profile(name, self.broker_id, _profile(link, hello))
        still_running = set(hello.get("sessions", []))
        link.send(
            {
                "type": "welcome",
                "host_id": name,
                "heartbeat_interval": self.settings.heartbeat_interval,
            }
        )
        for session_id in still_running:
            live = self.sessions.get(session_id)
            if live is None or live.host != name or session_id in self.pending_stops:
                # Ended, someone else's, or stopped while the host was away (its settlement
                # waits on the store): the kernel must not run on.
                link.send(
                    {"type": "stop_kernel", "session_id": session_id, "reason": "session has ended"}
                )
        gone = [
            self.end_session(live.id, END_HOST_LOST, ended_us=link_last_seen(previous, live))
            for live in list(self.sessions.values())
            # The host came back without this kernel: it died while we were apart.
            if live.host == name and live.id not in still_running and live.ready_us is not None
        ]
        await asyncio.gather(*gone)
        log.info("host %s connected with %d offers", name, len(offers))
        return link

    def host_disconnected(self, name: str, channel: ControlChannel) -> None:
        """Note a host's control channel closed; its sessions wait out the heartbeat timeout."""
        link = self.hosts.get(name)
        if link is not None and link.channel is channel:
            link.channel = None
            log.info(
                "host %s disconnected; waiting %.0fs for it to return",
                name,
                self.settings.heartbeat_timeout,
            )

    def host_alive(self, name: str, channel: ControlChannel) -> None:
        """A message came from a host's current connection: it is alive now."""
        link = self.hosts.get(name)
        if link is not None and link.channel is channel:
            link.last_heartbeat_us = now_us()

    def heartbeat(
        self,
        name: str,
        telemetry: dict[str, Any] | None,
        busy: frozenset[str] | None = None,
    ) -> None:
        """Record a host's heartbeat (``telemetry``: validated, or None to keep the last;
        ``busy``: the sessions running a cell, or None to keep the last)."""
        link = self.hosts.get(name)
        if link is not None:
            link.last_heartbeat_us = now_us()
            if telemetry is not None:
                link.telemetry = telemetry
            if busy is not None:
                link.busy_sessions = busy

    async def check_hosts(self) -> None:
        """End the sessions of hosts silent for longer than the heartbeat timeout."""
        now = now_us()
        timeout_us = int(self.settings.heartbeat_timeout * 1_000_000)
        oldest_allowed = now - timeout_us
        silent = [link for link in self.hosts.values() if link.last_heartbeat_us < oldest_allowed]
        # Every decision before the first await: a host that reconnects meanwhile is new.
        lost: dict[str, int] = {}
        for link in silent:
            name = link.name
            log.warning(
                "host %s lost: no heartbeat for %.1fs", name, (now - link.last_heartbeat_us) / 1e6
            )
            if link.channel is not None:
                link.channel.close(4001, "heartbeat timeout")
            del self.hosts[name]
            lost[name] = link.last_heartbeat_us
        ends = [
            self.end_session(live.id, END_HOST_LOST, ended_us=lost[live.host])
            for live in list(self.sessions.values())
            if live.host in lost
        ]
        await asyncio.gather(*ends)
        for name in lost:
            if name not in self.hosts:  # not back already (its hello stored its offers)
                await self.db.deactivate_offers(name)
                if self.lease_epochs.pop(name, None) is not None:  # ours no more
                    await self.db.release_host_lease(name, self.broker_id, self.lease_now())
        # Sessions loaded at start-up whose host never came back.
        for live in list(self.sessions.values()):
            # A host whose reconnect backoff outgrew the broker's downtime comes back later
            # than a heartbeat timeout: give it resume_grace_s (the bill ends at the session's
            # last evidence of life either way, so waiting costs the renter nothing).
            grace_us = max(timeout_us, int(self.settings.resume_grace_s * 1_000_000))
            if (
                live.host not in self.hosts
                and now - self._started_us > grace_us
                and live.id in self.sessions  # not settled during an earlier await
                and live.id not in self._ending
            ):
                record = await self.db.get_session(live.id)
                ended = record.last_seen_us or live.ready_us or live.created_us
                await self.end_session(live.id, END_HOST_LOST, ended_us=ended)
        await self.reap_orphans()
        await self.cull_idle()
        # Kernels that never became ready.
        start_timeout_us = int(self.settings.start_timeout * 1_000_000)
        late = [
            self.end_session(
                live.id, END_START_FAILED, message="the host did not start the kernel in time"
            )
            for live in list(self.sessions.values())
            if live.ready_us is None and now - live.created_us > start_timeout_us
        ]
        await asyncio.gather(*late)

    async def reap_orphans(self) -> None:
        """Stop running sessions whose renter has been gone longer than its keep-alive (the
        renter's client died, or closed its laptop): they would bill until the credit ran out."""
        now = time.monotonic()
        ends = []
        for live in list(self.sessions.values()):
            if live.ready_us is None or live.id in self.pending_stops or live.id in self._ending:
                continue
            pair = self.relays.pairs.get(live.id)
            # No relay yet in this process (never connected, or a broker restart): the
            # absence counts from when this broker began to know the session.
            since = pair.absent_since[USER] if pair is not None else live.known_since
            limit = live.keep_alive_s
            if limit is None:
                limit = (
                    self.settings.orphan_max_keep_alive_s
                    if self.cell_running(live.id)
                    else self.settings.orphan_grace_s
                )
            if since is not None and now - since > limit:
                gone = now - since
                log.info("session %s: no renter connected for %.0f s; stopping", live.id, gone)
                ends.append(
                    self.end_session(live.id, END_CLIENT_GONE, message=f"no client for {limit:g} s")
                )
        await asyncio.gather(*ends)

    async def cull_idle(self) -> None:
        """Stop the running sessions idle for their limit (no cell running, their GPUs
        unused: idle.py), billed to the instant the limit was reached; warn first, and
        have their files brought back then. Decided only from a host's report made after
        the limit was reached (a cell begun just before it is in that report), never for
        a session whose host is not connected here."""
        now = now_us()
        ends = []
        for live in list(self.sessions.values()):
            link = self.hosts.get(live.host)
            if live.ready_us is None or self._settling(live) or link is None:
                continue
            if live.id in link.busy_sessions or gpus_in_use(
                (link.telemetry or {}).get("gpus") or [],
                live.gpu_indices,
                self.settings.gpu_busy_pct,
            ):
                live.active_us = max(live.active_us or 0, link.last_heartbeat_us)
                live.idle_stop_us = None  # active: a new warning when idle again
                continue
            limit = self.idle_limit_s(live)
            if limit <= 0:
                continue
            warning = min(self.settings.idle_warning_s, limit / 2)
            active = max(live.active_us or 0, live.ready_us)
            state, stop_us = idle_state(now, active, limit, warning)
            if state == "warn" and live.idle_stop_us is None:
                text = idle_warning_text(limit, (stop_us - now) / 1e6)
                if self._notify(live.id, text, sync=True):
                    live.idle_stop_us = stop_us
            elif state == "stop" and link.last_heartbeat_us >= stop_us:
                log.info("session %s: idle for %.0f s; stopping", live.id, limit)
                message = f"idle for {limit:g} s (no cell running, its GPUs unused)"
                ends.append(self.end_session(live.id, END_IDLE, ended_us=stop_us, message=message))
        await asyncio.gather(*ends)

    def idle_limit_s(self, live: LiveSession) -> float:
        """A session's idle limit: its own, else its renter's, else the broker's."""
        if live.idle_limit_s is not None:
            return live.idle_limit_s
        limits = self.caps.limits(live.renter)
        if limits is not None and limits.idle_limit_s is not None:
            return float(limits.idle_limit_s)
        return self.settings.idle_timeout_s

    # -- sessions ---------------------------------------------------------------------------

    def host_loads(self) -> dict[str, HostLoad]:
        """Live kernels per online host, for matching (the other brokers' hosts: as read
        with their offers, see hosts_elsewhere)."""
        loads = {
            name: HostLoad(max_kernels=link.max_kernels)
            for name, link in self.hosts.items()
            if link.channel is not None
        }
        for live in self.sessions.values():
            load = loads.get(live.host)
            if load is not None:
                load.live_kernels += 1
                load.busy_offer_ids.add(live.offer_id)
        for there in self._hosts_elsewhere[1].values():
            if there.host not in loads:
                loads[there.host] = HostLoad(
                    max_kernels=there.max_kernels,
                    live_kernels=len(there.taken_offer_ids),
                    busy_offer_ids=set(there.taken_offer_ids),
                )
        return loads

    async def online_offers(self) -> list[OfferView]:
        """Offers of the online hosts (connected here, or served by another broker of the
        store), with their hosts' reliability."""
        links = [link for link in self.hosts.values() if link.channel is not None]
        scores = {link.name: (await self.host_reliability(link.name)).score for link in links}
        offers = [replace(o, reliability=scores[link.name]) for link in links for o in link.offers]
        for there in (await self.hosts_elsewhere()).values():
            if there.host in scores:
                continue  # connected here too: it is on its way from that broker
            if there.host not in self.hosts:  # a schedule of its own comes with its hello
                self._host_schedules[there.host] = there.schedule
            score = (await self.host_reliability(there.host)).score
            for offer in there.offers:
                shared = there.about(offer.id).get("shared") is True
                offers.append(replace(_offer_view(offer), reliability=score, shared=shared))
        return offers

    async def hosts_elsewhere(self, max_age_us: int = 1_000_000) -> dict[str, HostElsewhere]:
        """The hosts the other brokers of the store serve now, by name (none on SQLite),
        read at most ``max_age_us`` ago; not those of a broker that did not answer lately."""
        if not self.shared_store:
            return {}
        read_us, cached = self._hosts_elsewhere
        now = now_us()
        if now - read_us > max_age_us:
            self._unreachable = {b: t for b, t in self._unreachable.items() if t > now}
            read = await self.db.hosts_elsewhere(self.broker_id, self.lease_now())
            cached = {h.host: h for h in read if h.broker_id not in self._unreachable}
            self._hosts_elsewhere = (now, cached)
        return cached

    def broker_unreachable(self, broker_id: str, for_s: float = 10.0) -> None:
        """A broker did not take a connection: leave its hosts out of matching a while."""
        self._unreachable[broker_id] = now_us() + int(for_s * 1_000_000)
        read_us, cached = self._hosts_elsewhere
        kept = {name: h for name, h in cached.items() if h.broker_id != broker_id}
        self._hosts_elsewhere = (read_us, kept)

    def unreachable(self, broker_id: str) -> bool:
        """Whether a broker took no connection lately (broker_unreachable)."""
        return self._unreachable.get(broker_id, 0) > now_us()

    def serving_url(self, host: str) -> str | None:
        """The public URL of the broker that serves a host: this one's for its own hosts,
        the other's as last read (at most a second ago) for theirs."""
        if host in self.hosts:
            return self.settings.public_url or None
        there = self._hosts_elsewhere[1].get(host)
        return there.public_url if there is not None else None

    def offer_details(self, offer: Any) -> dict[str, Any]:
        """What a host said of an offer: its telemetry (live only for the hosts connected
        here), its self-test result and its sandbox."""
        link = self.hosts.get(offer.host)
        if link is not None:
            return {
                "telemetry": link.telemetry,
                "speed": link.benchmarks.get(offer.id),
                "sandbox": link.sandboxes.get(offer.id),
            }
        about = {}
        there = self._hosts_elsewhere[1].get(offer.host)
        if there is not None:
            about = there.about(offer.id)
        return {"telemetry": {}, "speed": about.get("benchmark"), "sandbox": about.get("sandbox")}

    async def serving_broker(self, host: str) -> tuple[str, str | None] | None:
        """The other broker serving a host now, and its public URL (None: this broker,
        or none: the host is offline or on its way between brokers)."""
        if not self.shared_store:
            return None
        serving = await self.db.serving_broker(host, self.lease_now())
        if serving is None or serving[0] == self.broker_id:
            return None
        return serving

    async def host_reliability(self, name: str, max_age_s: float = 10.0) -> Reliability:
        """A host's reliability over the last 30 days (cached for ``max_age_s``)."""
        now = now_us()
        cached = self._reliability.get(name)
        if cached is not None and now - cached[0] < max_age_s * 1_000_000:
            return cached[1]
        since = now - WINDOW_DAYS * 86_400 * 1_000_000
        first, presence, (total, lost) = await self.db.run(
            self._reliability_inputs, name, since, write=False
        )
        schedule, offset = self._host_schedules.get(name, (None, 0))
        uptime = None
        # Minutes of presence say nothing yet: a new host shows as new, not as 100 %.
        if first is not None and now - first >= MIN_OBSERVED_S * 1_000_000:
            connections = presence
            link = self.hosts.get(name)
            if link is not None and link.channel is not None:
                # The stored row of the live connection lags by a checkpoint; it lasts until now.
                connections = [c for c in connections if c[0] != link.connected_us]
                connections.append((link.connected_us, now, None))
            uptime = uptime_fraction(connections, schedule, offset, max(since, first), now)
        result = reliability(uptime, total, lost)
        self._reliability[name] = (now, result)
        return result

    def _reliability_inputs(self, name: str, since: int) -> tuple[Any, Any, tuple[int, int]]:
        """What a host's reliability is computed from (on a store thread: three reads)."""
        first = self.store.first_seen(name)
        presence = self.store.presence(name, since) if first is not None else []
        return first, presence, self.store.host_session_outcomes(name, since)

    async def start_session(
        self,
        renter: str,
        request: SessionRequest,
        class_name: str | None = None,
        keep_alive_s: float | None = None,
        idle_limit_s: float | None = None,
    ) -> Any:
        """Match an offer, check funds, record the session and ask its host to start a kernel.

        ``keep_alive_s``: how long the session may run with no renter connected (a long cell
        with the laptop closed); at most orphan_max_keep_alive_s, else orphan_grace_s.
        ``idle_limit_s``: how long it may be idle before it is stopped (0: never; None: the
        renter's own limit, else the broker's idle_timeout_s).
        """
        await self.ready.wait()
        if class_name is None:
            await self._check_caps(renter)
        async with self._start_lock:  # what is free and what is funded holds until recorded
            record = await self._start(renter, request, class_name)
        live = self.sessions.get(record.id)
        if live is not None and keep_alive_s is not None:
            live.keep_alive_s = min(float(keep_alive_s), self.settings.orphan_max_keep_alive_s)
        if live is not None and idle_limit_s is not None:
            live.idle_limit_s = float(idle_limit_s)
        return record

    async def spent_today(self, payer: str, now: int) -> int:
        """What the payer's own sessions cost since midnight UTC (the daily cap's count):
        the ended ones from the store, the running ones here from midnight on."""
        day = day_start_us(now)
        return await self.db.spent_since(payer, day) + sum(
            cost_at(max(live.ready_us, day), now, live.price_per_second_micro)
            for live in self.sessions.values()
            if live.payer == payer and live.class_name is None and live.ready_us is not None
        )

    async def _check_caps(self, renter: str) -> None:
        """Refuse a start that a cap of the renter's would stop at once."""
        try:
            caps = await self.db.get_caps(renter)
        except NotFound:
            return
        if caps.session_micro == 0:
            raise Refused(402, "your spending cap per session is 0 (jupyter gpu-share caps)")
        if caps.day_micro is None:
            return
        if await self.spent_today(renter, now_us()) >= caps.day_micro:
            raise Refused(
                402,
                f"your spending cap per day ({format_credits(caps.day_micro)} credits) is "
                "reached; it resets at midnight UTC, or raise it (jupyter gpu-share caps)",
            )

    async def _start(self, renter: str, request: SessionRequest, class_name: str | None) -> Any:
        if class_name is not None:
            return await self._start_class_session(renter, request, class_name)
        balance = await self.db.balance(renter)
        await self.running_elsewhere({renter}, max_age_us=0)  # what it runs on other brokers
        await self.hosts_elsewhere(max_age_us=0)  # which of their offers are free now
        offer = choose_offer(
            await self.online_offers(),
            self.host_loads(),
            request,
            balance - self.committed(renter),
            self.settings.minimum_start_seconds,
        )
        self._placed_here(offer)
        return await self._launch(renter, renter, offer, balance)

    def _placed_here(self, offer: OfferView) -> None:
        """Raise Placed when an offer's host is served by another broker (matching chose
        among every broker's offers)."""
        link = self.hosts.get(offer.host)
        if link is not None and link.channel is not None:
            return
        there = self._hosts_elsewhere[1].get(offer.host)
        if there is not None:
            raise Placed(offer.id, offer.host, there.broker_id, there.public_url)

    def committed(self, payer: str) -> int:
        """The running (not yet settled) cost of a payer's sessions, on this broker and, as
        last read (at most a second ago, see running_elsewhere), on the others."""
        now = now_us()
        here = sum(s.cost_at(now) for s in self.sessions.values() if s.payer == payer)
        there = self._elsewhere[1].get(payer, [])
        return here + sum(cost_at(ready, now, price) for ready, price in there)

    async def running_elsewhere(
        self, payers: set[str], max_age_us: int = 1_000_000
    ) -> dict[str, list[tuple[int, int]]]:
        """``(ready_us, price)`` of the payers' sessions that other brokers meter, read from
        the store at most ``max_age_us`` ago (nothing to read while this broker is alone):
        a payer on two brokers overspends by at most that long at its sessions' prices."""
        if not self.shared_store or not payers:
            return {}
        read_us, cached = self._elsewhere
        now = now_us()
        # Always read after the balances it is set against: a session another broker
        # settled between the two reads is then in neither (a moment's overspend, billed
        # exactly), never in both (a stop too early: the host unpaid for the rest).
        stale = now - read_us > max_age_us or read_us <= self._balance_read_us
        if stale or not payers <= set(cached) | self._elsewhere_asked:
            rows = await self.db.running_costs(sorted(payers | self._elsewhere_asked))
            cached = {}
            for session_id, payer, ready_us, price in rows:
                if session_id not in self.sessions:
                    cached.setdefault(payer, []).append((ready_us, price))
            self._elsewhere_asked = set(payers)
            self._elsewhere = (now, cached)
            if now - read_us > max_age_us:
                # The other brokers settle too: balances are read again at the next check
                # (then this, after them), about once a second.
                self.refresh_balances()
        return {payer: cached.get(payer, []) for payer in payers}

    async def _launch(
        self, renter: str, payer: str, offer: OfferView, balance: int, class_name: str | None = None
    ) -> Any:
        record = await self.db.create_session(
            renter, payer, offer.id, now_us(), class_name=class_name
        )
        live = self.sessions[record.id] = LiveSession.from_record(record)
        if class_name is not None:
            await self._attach_quota(live, exclude_running=False)
        self._balances[payer] = balance
        link = self.hosts.get(offer.host)
        if link is None:  # lost while the session was being recorded: check_hosts ends it
            log.warning("session %s: host %s went away before the start", record.id, offer.host)
            return record
        link.send(
            {
                "type": "start_kernel",
                "session_id": record.id,
                "gpu_indices": list(record.gpu_indices),
                "relay_path": f"/gpu-share/api/relay/{record.id}/host",
            }
        )
        log.info("session %s for %s on host %s (offer %s)", record.id, renter, offer.host, offer.id)
        return record

    # -- classes ----------------------------------------------------------------------------

    async def class_used(
        self, class_name: str, student: str, *, include_running: bool = True
    ) -> Used:
        """What a student has used in a class: ended sessions, plus running ones so far."""
        usage = (await self.db.class_usage(class_name, week_start_us(now_us()))).get(student)
        now = now_us()
        used = (
            Used() if usage is None else Used(usage.seconds, usage.amount_micro, usage.week_seconds)
        )
        if include_running:
            for live in self.sessions.values():
                if live.class_name == class_name and live.renter == student and live.ready_us:
                    seconds = billed_seconds(live.ready_us, now)
                    used = Used(
                        used.seconds + seconds,
                        used.micro + live.cost_at(now),
                        used.week_seconds + seconds,
                    )
        return used

    async def _attach_quota(self, live: LiveSession, *, exclude_running: bool) -> None:
        record = await self.db.get_class(live.class_name)
        live.quota = Quota(record.quota_seconds, record.quota_micro, record.weekly_quota_seconds)
        live.used_before = await self.class_used(
            live.class_name,
            live.renter,
            include_running=not exclude_running,  # type: ignore[arg-type]
        )

    async def _start_class_session(
        self, student: str, request: SessionRequest, class_name: str
    ) -> Any:
        try:
            record = await self.db.get_class(class_name)
        except NotFound:
            raise Refused(404, f"no class named {class_name!r}") from None
        if await self.db.class_role(class_name, student) is None:
            raise Refused(404, f"no class named {class_name!r}")
        now = now_us()
        problem = class_window_problem(record.starts_us, record.ends_us, now)
        if problem:
            raise Refused(403, f"class {class_name}: {problem}")
        here = any(
            s.class_name == class_name and s.renter == student for s in self.sessions.values()
        )
        if here or await self._class_records_elsewhere(class_name, student):
            raise Refused(
                409, f"you already have a running kernel in class {class_name}; stop it first"
            )
        quota = Quota(record.quota_seconds, record.quota_micro, record.weekly_quota_seconds)
        problem = quota_problem(quota, await self.class_used(class_name, student))
        if problem:
            raise Refused(403, f"class {class_name}: {problem}")
        class_request = SessionRequest(
            gpu_model=record.gpu_model or request.gpu_model,
            max_price_per_second_micro=record.max_price_per_second_micro,
            min_gpu_memory_mib=request.min_gpu_memory_mib,
        )
        line = self.lines.setdefault(class_name, WaitingLine())
        await self.hosts_elsewhere(max_age_us=0)
        online = await self.online_offers()
        loads = self.host_loads()
        free = [
            o
            for o in online
            if offer_fits(o, class_request) and offer_is_free(o, loads.get(o.host))
        ]
        place = line.peek(student, now)
        ahead = (place - 1) if place is not None else len(line)
        if ahead >= len(free):
            raise Queued(line.place(student, now))
        # An offer another broker chose (its start sent on here) is taken if it is still
        # free and no dearer than the cheapest free one: the class never pays more for it.
        pinned = [o for o in free if o.id == request.offer_id]
        cheapest = min(o.price_per_second_micro for o in free)
        if pinned and pinned[0].price_per_second_micro <= cheapest:
            class_request = replace(class_request, offer_id=pinned[0].id)
        await self.running_elsewhere({record.account}, max_age_us=0)
        budget = record.budget_micro - self.committed(record.account)
        try:
            offer = choose_offer(
                free, loads, class_request, budget, self.settings.minimum_start_seconds
            )
        except NoMatch as error:
            if error.status == 402:
                raise Refused(402, f"class {class_name}: the class budget is used up") from None
            if error.status == 409:
                raise Queued(line.place(student, now)) from None
            raise
        line.leave(student)
        self._placed_here(offer)  # the serving broker checks it all again, and launches it
        return await self._launch(student, record.account, offer, record.budget_micro, class_name)

    async def _class_records_elsewhere(self, class_name: str, student: str) -> list[Any]:
        """A student's live sessions of a class that other brokers meter."""
        if not self.shared_store:
            return []
        records = await self.db.list_sessions(renter=student, states=LIVE_STATES, limit=100)
        return [r for r in records if r.class_name == class_name and r.id not in self.sessions]

    async def class_sessions_elsewhere(self, class_name: str, student: str) -> dict[str, str]:
        """A student's live kernels of a class on other brokers: {broker URL: session id}."""
        found: dict[str, str] = {}
        for record in await self._class_records_elsewhere(class_name, student):
            serving = await self.serving_broker(record.host)
            if serving is not None and serving[1]:
                found.setdefault(serving[1], record.id)
        return found

    async def stop_student(self, class_name: str, student: str) -> list[Any]:
        """Stop a student's running kernels in a class (the teacher's stop button)."""
        return list(
            await asyncio.gather(
                *(
                    self.end_session(live.id, END_TEACHER)
                    for live in list(self.sessions.values())
                    if live.class_name == class_name and live.renter == student
                )
            )
        )

    async def kernel_ready(self, host: str, session_id: str) -> None:
        """Start billing: the host reports the kernel answering. Billing starts at this
        instant whatever the store does; a write it cannot take now is retried."""
        live = self.sessions.get(session_id)
        if live is None or live.host != host or live.ready_us is not None:
            return
        live.ready_us = now_us()
        self._ready_unsaved[session_id] = live.ready_us
        await self._save_ready(session_id)

    async def _save_ready(self, session_id: str) -> bool:
        """Record a session's readiness; False when the store cannot take it now."""
        ready_us = self._ready_unsaved.get(session_id)
        if ready_us is None:
            return True
        try:
            await self.db.mark_ready(session_id, ready_us)
        except (NotFound, Conflict) as error:  # it ended meanwhile (another broker's stop)
            log.warning("session %s: readiness not recorded: %s", session_id, error)
        except Exception as error:
            if not unavailable(error):
                raise  # kept: the settlement retries it (billing began at the report)
            log.warning("session %s: readiness not recorded yet, retrying: %s", session_id, error)
            return False
        self._ready_unsaved.pop(session_id, None)
        return True

    async def kernel_ended(
        self, host: str, session_id: str, reason: str, message: str = ""
    ) -> None:
        """End a session whose kernel stopped or failed on the host."""
        live = self.sessions.get(session_id)
        if live is None or live.host != host or session_id in self.pending_stops:
            return  # unknown, someone else's, or stopped by us and waiting for the store
        if session_id in self._ending:
            return  # being settled already, at the instant first asked
        if live.ready_us is None:
            await self.end_session(session_id, END_START_FAILED, message=message or reason)
        else:
            # "exited" (code 0) says no more than END_KERNEL does; "died" does.
            detail = message or ("" if reason == "exited" else reason)
            await self.end_session(session_id, END_KERNEL, message=detail)

    async def end_session(
        self,
        session_id: str,
        end_reason: str,
        *,
        ended_us: int | None = None,
        message: str = "",
    ) -> Any:
        """Settle a session once, tell its host to stop the kernel and close its relay.

        Returns the ended record, or None when the store has not settled it within
        ``stop_answer_s`` (locked, gone, disk full): then the session is kept as "stopping",
        on disk in the stop journal, its kernel is stopped, and it is billed to this instant
        whenever the settlement commits (retried every second, and after a restart).

        The first ask fixes the instant and the reason; an ask while a settlement is in
        flight waits for that one.
        """
        ending = self._ending.get(session_id)
        if ending is None:
            live = self.sessions.get(session_id)
            stop = self.pending_stops.get(session_id)
            if stop is None:
                asked = now_us() if ended_us is None else ended_us
                ready = live.ready_us if live is not None else None
                stop = PendingStop(session_id, stop_instant_us(asked, ready), end_reason, message)
            ending = self._begin_settle(live, stop)
        stop, task = ending
        done, _ = await asyncio.wait({task}, timeout=self.settings.stop_answer_s)
        if task in done:
            return task.result()
        # Slow to commit: keep the stop durably and stop the kernel now; _settle goes on.
        self._defer_stop(self.sessions.get(session_id), stop)
        return None

    def _begin_settle(
        self, live: LiveSession | None, stop: PendingStop
    ) -> tuple[PendingStop, asyncio.Task[Any]]:
        """Start the one settlement in flight for a session (see end_session)."""
        task = asyncio.get_running_loop().create_task(self._settle(live, stop))
        self._ending[stop.session_id] = (stop, task)
        return stop, task

    async def _settle(self, live: LiveSession | None, stop: PendingStop) -> Any:
        """Commit one stop's settlement, then let the session go (None: not now)."""
        session_id = stop.session_id
        try:
            try:
                if not await self._save_ready(session_id):
                    raise StoreUnavailable("the session's readiness is not recorded yet")
                record = await self.db.end_session(
                    session_id,
                    stop.ended_us,
                    stop.end_reason,
                    self.settings.platform_fee_bps,
                    fence=self._fence,
                )
            except LeaseHeld as held:  # its host is another broker's now: so is the session
                log.warning(
                    "session %s: its host is served by broker %s; not settled here",
                    session_id,
                    held.holders.get(session_id, "?"),
                )
                self.sessions.pop(session_id, None)
                if self.pending_stops.pop(session_id, None) is not None:
                    self._rewrite_journal()
                return None
            except NotFound:  # never stored (or removed by hand): nothing to bill
                log.error("session %s: not in the store; its stop is dropped", session_id)
                self.sessions.pop(session_id, None)
                if self.pending_stops.pop(session_id, None) is not None:
                    self._rewrite_journal()
                return None
            except Exception as error:  # unavailable, or anything else: kept and retried
                self._store_down = unavailable(error)
                if session_id not in self.pending_stops:
                    self._defer_stop(live, stop)
                    if self._store_down:
                        log.warning(
                            "session %s: stop (%s) not settled yet, retrying: %s",
                            session_id,
                            stop.end_reason,
                            error,
                        )
                    else:
                        log.exception("session %s: settlement failed; retrying", session_id)
                return None
        finally:
            self._ending.pop(session_id, None)
        self._store_down = False
        self._settled(live, stop, record)
        return record

    def _settled(self, live: LiveSession | None, stop: PendingStop, record: Any) -> None:
        """A settlement committed: only now does the session leave the broker."""
        self.sessions.pop(stop.session_id, None)
        was_deferred = self.pending_stops.pop(stop.session_id, None) is not None
        if was_deferred:
            self._rewrite_journal()
            log.info("session %s: deferred stop settled", stop.session_id)
        if live is not None:
            self._balance_epoch += 1
            self._balances.pop(live.payer, None)
            self._reliability.pop(live.host, None)
            self.caps.settled(live.payer, live.ready_us, stop.ended_us, live.price_per_second_micro)
            self.caps.forget([live.id])
            if not was_deferred:
                self._stop_kernel(live, stop.end_reason)
            log.info(
                "session %s ended (%s): %s s, %s micro",
                stop.session_id,
                stop.end_reason,
                record.billed_seconds,
                record.amount_micro,
            )
        self._close_relay(stop)

    def _close_relay(self, stop: PendingStop) -> None:
        reason_text = stop.end_reason if not stop.message else f"{stop.end_reason}: {stop.message}"
        self.relays.close(
            stop.session_id, CLOSE_CODES.get(stop.end_reason, CLOSE_STOPPED), reason_text[:120]
        )

    def _stop_kernel(self, live: LiveSession, end_reason: str) -> None:
        link = self.hosts.get(live.host)
        if link is not None and end_reason != END_KERNEL:
            link.send({"type": "stop_kernel", "session_id": live.id, "reason": end_reason})

    def _defer_stop(self, live: LiveSession | None, stop: PendingStop) -> None:
        """Keep a stop the store has not settled: on disk first, then stop the kernel (the
        renter pays to the instant asked, whenever the settlement commits). Once per stop."""
        if stop.session_id in self.pending_stops:
            return
        try:
            self.journal.add(stop)
        except OSError as error:  # the journal's disk is full too: memory keeps it meanwhile
            log.error(
                "session %s: stop not journalled (%s); kept in memory", stop.session_id, error
            )
        self.pending_stops[stop.session_id] = stop
        if live is not None:
            self._stop_kernel(live, stop.end_reason)
        self._close_relay(stop)

    def _rewrite_journal(self) -> None:
        try:
            self.journal.rewrite(list(self.pending_stops.values()))
        except OSError as error:  # settled stops left in it are settled again, idempotently
            log.error("stop journal not rewritten: %s", error)

    async def settle_pending(self) -> None:
        """Retry the stops the store could not settle (each at the instant it was asked),
        and readiness it could not record."""
        for session_id in list(self._ready_unsaved):
            if session_id not in self._ending and not await self._save_ready(session_id):
                return  # the store is still down: try again at the next tick
        for stop in list(self.pending_stops.values()):
            if stop.session_id in self._ending:
                continue  # a settlement of it is in flight already
            _, task = self._begin_settle(self.sessions.get(stop.session_id), stop)
            if await task is None and self._store_down:
                return  # the store is still down: try again at the next tick

    def stopping_cost(self, session_id: str) -> int | None:
        """What a session whose stop is pending will be billed (None: not stopping)."""
        stop = self.pending_stops.get(session_id)
        if stop is None and session_id in self._ending:
            stop = self._ending[session_id][0]  # being settled now, at this instant
        live = self.sessions.get(session_id)
        if stop is None:
            return None
        return 0 if live is None else live.cost_at(stop.ended_us)

    async def stop_session(self, session_id: str) -> Any:
        """Stop a session at the renter's request; billing ends now (None: the settlement
        is pending, see end_session)."""
        await self.ready.wait()
        if session_id not in self.sessions:
            return await self.db.get_session(session_id)
        return await self.end_session(session_id, END_STOPPED)

    def _settling(self, live: LiveSession) -> bool:
        return live.id in self.pending_stops or live.id in self._ending

    async def enforce_budgets(self) -> None:
        """Stop every session of a payer whose running cost has reached the payer's credit."""
        payers = {live.payer for live in self.sessions.values() if live.ready_us is not None}
        balances = {payer: await self._balance(payer) for payer in payers}
        elsewhere = await self.running_elsewhere(payers)
        # The renters' limits: caps of the payers of their own sessions, idle limits of
        # every renter (cull_idle reads them from here).
        limited = {live.renter for live in self.sessions.values()}
        await self.caps.refresh(limited)
        # Decided from one picture, taken after the last await: a session settled while a
        # balance was read is in that balance, not counted again as running.
        now = now_us()
        by_payer: dict[str, list[LiveSession]] = {}
        for live in self.sessions.values():
            if live.ready_us is not None and not self._settling(live) and live.payer in balances:
                by_payer.setdefault(live.payer, []).append(live)
        ends = []
        for payer, running in by_payer.items():
            # Every broker that meters a session of the payer sees the same sessions and
            # stops its own at the same instant.
            billing = _billing(running) + elsewhere.get(payer, [])
            exhausted_us = credit_runs_out_us(balances[payer], billing)
            if exhausted_us is None or exhausted_us > now:
                continue
            ends += [
                self.end_session(live.id, END_CREDIT, ended_us=min(now, exhausted_us))
                for live in running
                if not self._settling(live)
            ]
        for live in list(self.sessions.values()):
            stop_at = live.quota_stop_us()
            if self._settling(live):
                continue
            if stop_at is not None and stop_at <= now:
                ends.append(self.end_session(live.id, END_QUOTA, ended_us=stop_at))
        # The renters' own spending caps (a class's money has its budget and quotas).
        mine = {
            payer: [live for live in running if live.class_name is None]
            for payer, running in by_payer.items()
        }
        cap_stops, warnings = self.caps.check(now, mine, elsewhere)
        ends += [
            self.end_session(live.id, reason, ended_us=min(now, at))
            for live, reason, at in cap_stops
            if not self._settling(live)
        ]
        for live, text, key in warnings:
            if self._notify(live.id, text):
                self.caps.warned(key)
        await asyncio.gather(*ends)

    def _notify(self, session_id: str, text: str, sync: bool = False) -> bool:
        """A notice for the session's notebook (shown in its running cell, or the next);
        ``sync``: the notebook's side brings back the kernel's files. False: it has no
        relay here yet (a broker that just started), so nothing could be said."""
        pair = self.relays.pairs.get(session_id)
        if pair is None:
            return False
        return pair.forward(HOST, [status_message(text, sync)])

    async def _balance(self, payer: str) -> int:
        """A payer's balance, cached between checkpoints (budget checks run 4 times a second)."""
        balance = self._balances.get(payer)
        if balance is None:
            self._balance_read_us = now_us()  # what runs elsewhere is read again after it
            epoch = self._balance_epoch
            balance = await self.db.balance(payer)
            if epoch == self._balance_epoch:  # no settlement or credit meanwhile: keep it
                self._balances[payer] = balance
        return balance

    def refresh_balances(self) -> None:
        """Forget cached balances so the next budget check reads the store."""
        self._balance_epoch += 1
        self._balances.clear()

    async def checkpoint(self, force: bool = False) -> None:
        """Save each running session's last evidence of life (its host's last heartbeat)."""
        pairs = []
        for live in self.sessions.values():
            link = self.hosts.get(live.host)
            if link is not None and live.ready_us is not None:
                pairs.append((live.id, link.last_heartbeat_us))
        if pairs:
            await self.db.checkpoint_last_seen(pairs)
        now = now_us()
        if force or now - self._presence_touched_us >= PRESENCE_INTERVAL_S * 1_000_000:
            # Uptime is measured over 30 days: a minute's precision is plenty, and one
            # statement for all connected hosts keeps 10,000 hosts cheap.
            fresh = now - int(self.settings.heartbeat_timeout * 1_000_000)
            await self.db.touch_presence(
                [
                    link.presence_id
                    for link in self.hosts.values()
                    if link.presence_id and link.last_heartbeat_us >= fresh
                ],
                now,
            )
            self._presence_touched_us = now
        # Balances may change under us when several brokers share a store.
        self.refresh_balances()

    async def stops_at_us(self, session_id: str) -> int | None:
        """When the broker will stop a running session (quota or credit), if nothing changes."""
        live = self.sessions.get(session_id)
        if live is None or live.ready_us is None:
            return None
        balance = await self._balance(live.payer)
        # The running picture after the await: a session settled meanwhile is in the balance.
        running = [s for s in self.sessions.values() if s.payer == live.payer and s.ready_us]
        deadlines = [live.quota_stop_us(), credit_runs_out_us(balance, _billing(running))]
        known = [d for d in deadlines if d is not None]
        return min(known) if known else None

    def idle_stop_us(self, session_id: str) -> int | None:
        """When a session warned of being idle will be stopped (None: not warned)."""
        live = self.sessions.get(session_id)
        return live.idle_stop_us if live is not None else None

    def cell_running(self, session_id: str) -> bool:
        """Whether the session's host last said its kernel is running a cell."""
        live = self.sessions.get(session_id)
        link = self.hosts.get(live.host) if live is not None else None
        return link is not None and session_id in link.busy_sessions

    def cost_so_far(self, session_id: str) -> int:
        """Cost of a live session up to now (0 for ended or not yet ready)."""
        live = self.sessions.get(session_id)
        return 0 if live is None else live.cost_at(now_us())

    async def session_record(self, session_id: str) -> Any:
        """The stored session, or NotFound."""
        return await self.db.get_session(session_id)


def _billing(running: list[LiveSession]) -> list[tuple[int, int]]:
    """``(ready_us, price)`` of the sessions that bill, for ``ledger.credit_runs_out_us``."""
    return [(s.ready_us, s.price_per_second_micro) for s in running if s.ready_us is not None]


STOP_RETRY_INTERVAL = 1.0  # seconds between settlement retries of pending stops


def new_broker_id() -> str:
    """A fresh id for a broker process on the store."""
    return "b-" + secrets.token_hex(6)


def liveness_check_interval(heartbeat_interval: float, heartbeat_timeout: float) -> float:
    """Seconds between looks for silent hosts: each heartbeat interval, at most a second,
    but no more often than an eighth of the timeout. A look reads every connected host
    (about 16 ms with 10,000 hosts), and a host is then found lost at most an eighth of
    its timeout late."""
    return max(min(1.0, heartbeat_interval), heartbeat_timeout / 8)


def _offer_view(offer: Any) -> OfferView:
    return OfferView(
        id=offer.id,
        host=offer.host,
        gpu_model=offer.gpu_model,
        gpu_count=offer.gpu_count,
        gpu_memory_mib=offer.gpu_memory_mib,
        price_per_second_micro=offer.price_per_second_micro,
    )


def _profile(link: HostLink, hello: dict[str, Any]) -> dict[str, Any]:
    """What the other brokers of the store need of a host's hello to offer its GPUs."""
    offers: dict[str, dict[str, Any]] = {}
    for offer in link.offers:
        offers[str(offer.id)] = {
            "shared": offer.shared,
            "benchmark": link.benchmarks.get(offer.id),
            "sandbox": link.sandboxes.get(offer.id),
        }
    return {
        "max_kernels": link.max_kernels,
        "schedule": hello.get("schedule") if isinstance(hello.get("schedule"), str) else None,
        "utc_offset_s": int(hello.get("utc_offset_s") or 0),
        "offers": offers,
    }


def link_last_seen(link: HostLink | None, live: LiveSession) -> int:
    """The last instant a session's host was known alive: its last heartbeat here, else
    the last one a broker checkpointed (a host that moved from a dead broker), else the
    session's start."""
    if link is not None:
        return link.last_heartbeat_us
    return max(live.last_seen_us or 0, live.ready_us or 0) or live.created_us


__all__ = ["Broker", "BrokerSettings", "NoMatch", "NotFound"]
