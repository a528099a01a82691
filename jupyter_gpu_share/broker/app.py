"""``jupyter gpu-share broker``: the broker as a jupyter_server ExtensionApp."""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from jupyter_core.paths import jupyter_data_dir
from jupyter_server.extension.application import ExtensionApp
from tornado.httpserver import HTTPServer
from traitlets import Bool, Enum, Float, Int, TraitError, Unicode, default, validate

from ..heap import freeze_startup_objects
from ..ledger import receipts
from ..loops import EVENT_LOOPS, choice_in_argv, install_event_loop, loop_in_use
from ..store import Store
from ..store.classes import MAX_NOTEBOOK_BYTES
from ..store.onebroker import AnotherBroker, hold_single_broker_lock
from .handlers import default_handlers
from .host_messages import HEARTBEAT_MAX_BYTES, HELLO_MAX_BYTES
from .keys import KeyFileError, load_or_create, public_pem
from .service import Broker, BrokerSettings

ADMIN_TOKEN_ENV = "GPU_SHARE_ADMIN_TOKEN"


def _env(name: str, fallback: str) -> str:
    return os.environ.get(name, fallback)


class BrokerApp(ExtensionApp):
    """The GPU marketplace broker: accounts, offers, sessions, the kernel relay and the ledger."""

    name = "gpu_share_broker"
    description = (
        "Broker for shared GPU kernels: matches renters to hosts, relays kernels, bills per second."
    )
    extension_url = "/gpu-share/api/openapi.json"
    default_url = "/gpu-share/api/openapi.json"
    load_other_extensions = False
    open_browser = False

    serverapp_config = {  # noqa: RUF012 - ExtensionApp reads this class attribute
        "identity_provider_class": "jupyter_gpu_share.broker.auth.BrokerIdentityProvider",
        "authorizer_class": "jupyter_gpu_share.broker.auth.BrokerAuthorizer",
        "open_browser": False,
        # tornado refuses a larger body by its Content-Length, before reading any of it
        # (jupyter_server's default, 512 MiB, let an anonymous caller take 500 MiB of RAM);
        # the largest body the broker takes is a class notebook (16 MiB).
        "max_body_size": MAX_NOTEBOOK_BYTES + 1024 * 1024,
        "max_buffer_size": MAX_NOTEBOOK_BYTES + 1024 * 1024,
    }

    aliases = {  # noqa: RUF012
        "db": "BrokerApp.db_url",
        "fee-bps": "BrokerApp.platform_fee_bps",
        "heartbeat-interval": "BrokerApp.heartbeat_interval",
        "event-loop": "BrokerApp.event_loop",
        # TLS served by the broker itself (README: "Run a broker with TLS").
        "certfile": "ServerApp.certfile",
        "keyfile": "ServerApp.keyfile",
    }
    flags = {  # noqa: RUF012
        "upgrade-db": (
            {"BrokerApp": {"upgrade_db": True}},
            "Upgrade the database schema, then serve.",
        ),
    }

    db_url = Unicode(
        config=True,
        help="""SQLAlchemy URL of the store. SQLite under the Jupyter data dir by default,
        for one broker (a second broker on the same file refuses to start); PostgreSQL, e.g.
        postgresql+psycopg://broker@db/gpu_share, for several brokers on one database: each
        host is owned by the broker it is connected to, under a lease in the database.
        Environment: GPU_SHARE_DB_URL.""",
    )

    broker_id = Unicode(
        "",
        config=True,
        help="""This broker's id on the store, printed at start (empty: a fresh one per
        process, b-<12 hex digits>). Leases of hosts are held under it.""",
    )

    @validate("broker_id")
    def _validate_broker_id(self, proposal: dict[str, Any]) -> str:
        value = str(proposal["value"]).strip()
        if len(value) > 32 or not all(c.isalnum() or c in "-_." for c in value):
            raise TraitError("broker_id: at most 32 letters, digits, '-', '_' or '.'")
        return value

    public_url = Unicode(
        "",
        config=True,
        help="""The URL at which users and the other brokers reach this broker itself (not
        a load balancer in front of several), recorded in the store beside its id, e.g.
        https://gpu.example.org:8441. With several brokers on one store it is needed: the
        others send it the starts placed on its hosts, and users' relays go to it. Use
        https when users reach the service over TLS (a plain-text one is then not used
        for their relays). Without it, this broker's hosts are offered on it alone.""",
    )

    @validate("public_url")
    def _validate_public_url(self, proposal: dict[str, Any]) -> str:
        value = str(proposal["value"]).strip().rstrip("/")
        if not value:
            return ""
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - raises ValueError on a port that is no number
        except ValueError:
            parts = urlsplit("")
        if (
            parts.scheme not in ("http", "https")
            or not parts.hostname
            or parts.query
            or parts.fragment
            or any(c.isspace() or ord(c) < 32 for c in value)
            or len(value) > 500
        ):
            raise TraitError(
                f"public_url: {value!r} is not a URL like https://broker-1.example.org:8765"
            )
        return value

    @default("db_url")
    def _db_url_default(self) -> str:
        default_path = Path(jupyter_data_dir()) / "gpu_share" / "broker.sqlite"
        return _env("GPU_SHARE_DB_URL", f"sqlite:///{default_path}")

    upgrade_db = Bool(
        False,
        config=True,
        help="""Run database migrations at start. A new, empty database is always set up; an
        existing one on an older schema is refused unless this is True (take a backup, then run
        `jupyter gpu-share broker --upgrade-db`).""",
    )

    db_busy_timeout_ms = Int(
        30_000,
        config=True,
        help="""How long a store call waits for a SQLite database another process has locked,
        in ms. Past it, a stop is kept as pending (billed to the instant it was asked,
        settled when the store answers) and other writes answer 503 with Retry-After.""",
    )

    stop_journal = Unicode(
        config=True,
        help="""File where stops the store could not settle yet are kept (fsynced) until
        they are, so a restarted broker bills them to the instant they were asked. Default:
        beside a SQLite database (<db>.stops), else in the Jupyter data dir per database.""",
    )

    @default("stop_journal")
    def _stop_journal_default(self) -> str:
        if self.db_url.startswith("sqlite:///") and self.db_url != "sqlite:///:memory:":
            return self.db_url.removeprefix("sqlite:///") + ".stops"
        digest = hashlib.sha256(self.db_url.encode()).hexdigest()[:12]
        return str(Path(jupyter_data_dir()) / "gpu_share" / f"stops-{digest}.jsonl")

    resume_grace_s = Float(
        60.0,
        config=True,
        help="""After a restart, how long the hosts of unfinished sessions may take to come
        back before those sessions end as 'host lost' (billed to their last evidence of
        life). A host's reconnect backoff can outgrow a short outage.""",
    )

    host_hello_timeout = Float(
        30.0,
        config=True,
        help="Seconds a host's control connection may stay open before its hello; then it "
        "is closed (4408).",
    )

    handshake_timeout = Float(
        30.0,
        config=True,
        help="""Seconds a connection may take to send a request's headers (a websocket
        upgrade's included), and may stay idle between requests; then it is closed. A client
        that opens connections and says nothing holds none for long (tornado's default is an
        hour).""",
    )

    idle_timeout_s = Float(
        1800.0,
        config=True,
        help="""Seconds a running kernel may be idle (no cell running and its GPUs unused,
        by its host's reports) before it is stopped as "idle", billed to the instant the
        limit was reached; 0 never stops one. Renters set their own (PUT /me/caps
        idle_limit_s, `jupyter gpu-share caps --idle`, or per session).""",
    )

    idle_warning_s = Float(
        300.0,
        config=True,
        help="""Seconds before an idle stop that the notebook is warned (a line in its
        running cell and a banner in the lab), and its files are brought back.""",
    )

    orphan_grace_s = Float(
        600.0,
        config=True,
        help="""Seconds a running session may have no renter connected before it is stopped
        ("client gone"): a client that died must not bill until the credit runs out. While
        its host reports a cell running, orphan_max_keep_alive_s applies instead; a renter
        may set either when starting it (keep_alive_s, up to orphan_max_keep_alive_s).""",
    )

    orphan_max_keep_alive_s = Float(
        3600.0,
        config=True,
        help="""Seconds a session running a cell (its host says the kernel is busy) may have
        no renter connected before it is stopped, and the longest keep_alive_s a renter
        may ask for.""",
    )

    max_classes_per_teacher = Int(
        100, config=True, help="Classes a teacher token may create (an admin's are not counted)."
    )

    max_students_per_teacher = Int(
        5000,
        config=True,
        help="Distinct students a teacher may enrol over all their classes: enrolling creates "
        "accounts, and a teacher token must not mint them without bound.",
    )

    requests_per_minute = Int(
        1200,
        config=True,
        help="""API requests each token may make a minute on average (0: no limit); past it,
        429 with Retry-After. request_burst requests may come at once.""",
    )

    request_burst = Int(300, config=True, help="Requests a token may make at once (see above).")

    platform_fee_bps = Int(
        1000,
        config=True,
        help="Platform fee kept from each settlement, in basis points (1000 = 10 %).",
    )

    @validate("platform_fee_bps")
    def _valid_fee(self, proposal: dict) -> int:
        value = proposal["value"]
        if not 0 <= value <= 10_000:
            raise ValueError("platform_fee_bps must be between 0 and 10000")
        return value

    minimum_start_seconds = Int(
        60,
        config=True,
        help="A session starts only if the renter's credit covers this many seconds.",
    )
    heartbeat_interval = Float(
        5.0,
        config=True,
        help="Seconds between host heartbeats (told to each host when it connects).",
    )
    heartbeat_timeout = Float(
        0.0,
        config=True,
        help="Seconds without a heartbeat before a host is lost; 0: 3 heartbeat intervals + 2 s.",
    )
    start_timeout = Float(
        120.0, config=True, help="Seconds a host has to report a new kernel ready."
    )
    budget_check_interval = Float(
        0.25, config=True, help="Seconds between checks that running sessions are still paid for."
    )
    checkpoint_interval = Float(
        5.0,
        config=True,
        help="Seconds between checkpoints of hosts' last heartbeats (the evidence after a crash).",
    )
    event_loop = Enum(
        EVENT_LOOPS,
        "auto",
        config=True,
        help="""The asyncio event loop the broker runs on: auto (uvloop where it is installed,
        as it is with this package on Linux and macOS), uvloop, or asyncio (the standard
        loop). On uvloop the broker took 12-26 % less CPU per heartbeat and 6-13 % per relayed
        message. Read from the command line (--event-loop) before the server starts: a config
        file cannot set it.""",
    )
    max_message_size = Int(
        256 * 1024 * 1024, config=True, help="Largest kernel message the relay carries, in bytes."
    )
    relay_buffer_bytes = Int(
        64 * 1024 * 1024,
        config=True,
        help="Bytes the relay holds for one side of a session while the other side (re)connects.",
    )
    host_hello_max_bytes = Int(
        HELLO_MAX_BYTES,
        config=True,
        help="""Largest hello a host may send, in bytes (its GPUs, offers with their self-tests
        and sandboxes, its sessions). A larger one is refused and the connection closed; so is
        any control message over the larger of this and host_heartbeat_max_bytes, unread.""",
    )
    host_heartbeat_max_bytes = Int(
        HEARTBEAT_MAX_BYTES,
        config=True,
        help="""Largest heartbeat (or other control message but hello) a host may send, in
        bytes. A larger heartbeat is refused with an error to the host and its telemetry is
        not kept: renters see telemetry in every GET /offers, so it stays small.""",
    )

    @validate("host_hello_max_bytes", "host_heartbeat_max_bytes")
    def _valid_host_cap(self, proposal: dict) -> int:
        value = proposal["value"]
        if not 4096 <= value <= 64 * 1024 * 1024:
            raise ValueError(f"{proposal['trait'].name} must be from 4096 to 67108864 bytes")
        return value

    admin_token_file = Unicode(
        config=True,
        help=f"""Where the generated admin token is written (mode 0600) when {ADMIN_TOKEN_ENV}
        is not set.""",
    )

    @default("admin_token_file")
    def _admin_token_file_default(self) -> str:
        return str(Path(jupyter_data_dir()) / "gpu_share" / "admin-token")

    receipt_key_file = Unicode(
        config=True,
        help="""The Ed25519 key (PEM, mode 0600) that signs settlement receipts; made at the first
        start. Default: receipt-key.pem beside admin_token_file. To rotate it, move the file
        away and restart: later receipts carry the new key_id; keep the old public key.""",
    )

    @default("receipt_key_file")
    def _receipt_key_file_default(self) -> str:
        return str(Path(self.admin_token_file).parent / "receipt-key.pem")

    @classmethod
    def initialize_server(cls, argv: Sequence[str] | None = None, **kwargs: Any) -> Any:
        """Pick the event loop first: jupyter_server creates it while it initializes."""
        choice = choice_in_argv(list(argv or []), ("event-loop", "BrokerApp.event_loop"))
        install_event_loop(choice or "auto")  # EventLoopError: the CLI prints it in one line
        return super().initialize_server(argv=argv, **kwargs)

    @classmethod
    def get_extension_package(cls) -> str:
        """Load as ``jupyter_gpu_share.broker``, never the whole package (that is the user side)."""
        return "jupyter_gpu_share.broker"

    def initialize_settings(self) -> None:
        """Open the store, bootstrap the admin token and create the broker."""
        # The broker's own records (hosts connected and lost, sessions ended, peers) in the
        # server's log, at INFO; without a handler Python showed only its warnings, bare.
        service_log = logging.getLogger("jupyter_gpu_share")
        if not service_log.handlers:
            for handler in self.serverapp.log.handlers:
                service_log.addHandler(handler)
            service_log.setLevel(logging.INFO)
            service_log.propagate = False
        # jupyter_server creates its HTTPServer after the extensions load, with no say over
        # its timeouts: HTTPServer is a tornado Configurable, whose public configure() sets
        # the keyword arguments every later instance gets.
        HTTPServer.configure(None, idle_connection_timeout=self.handshake_timeout)
        if self.db_url.startswith("sqlite:///"):
            Path(self.db_url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        try:
            receipt_key = load_or_create(self.receipt_key_file)
        except KeyFileError as error:
            print(f"gpu-share broker: error: {error}", file=sys.stderr, flush=True)
            raise SystemExit(1) from None
        try:
            self._single_broker_lock = hold_single_broker_lock(self.db_url)
        except (AnotherBroker, OSError) as error:
            print(f"gpu-share broker: error: {error}", file=sys.stderr, flush=True)
            raise SystemExit(1) from None
        store = Store(
            self.db_url,
            upgrade=self.upgrade_db,
            busy_timeout_ms=self.db_busy_timeout_ms,
            signer=functools.partial(receipts.sign, private_key=receipt_key),
        )
        admin_token = os.environ.get(ADMIN_TOKEN_ENV) or None
        if admin_token is None:
            self._bootstrap_admin_token(store)
        else:
            self.log.info("admin token taken from %s", ADMIN_TOKEN_ENV)
        running = loop_in_use()
        if self.event_loop not in ("auto", running):
            self.log.warning(
                "event_loop %r is read from the command line only (--event-loop); running on %s",
                self.event_loop,
                running,
            )
        heartbeat_timeout = self.heartbeat_timeout or self.heartbeat_interval * 3 + 2
        settings = BrokerSettings(
            platform_fee_bps=self.platform_fee_bps,
            minimum_start_seconds=self.minimum_start_seconds,
            heartbeat_interval=self.heartbeat_interval,
            heartbeat_timeout=heartbeat_timeout,
            start_timeout=self.start_timeout,
            budget_check_interval=self.budget_check_interval,
            checkpoint_interval=self.checkpoint_interval,
            relay_buffer_bytes=self.relay_buffer_bytes,
            host_hello_max_bytes=self.host_hello_max_bytes,
            host_heartbeat_max_bytes=self.host_heartbeat_max_bytes,
            stop_journal=self.stop_journal or None,
            host_hello_timeout=self.host_hello_timeout,
            resume_grace_s=self.resume_grace_s,
            orphan_grace_s=self.orphan_grace_s,
            orphan_max_keep_alive_s=self.orphan_max_keep_alive_s,
            idle_timeout_s=self.idle_timeout_s,
            idle_warning_s=self.idle_warning_s,
            max_classes_per_teacher=self.max_classes_per_teacher,
            max_students_per_teacher=self.max_students_per_teacher,
            requests_per_minute=self.requests_per_minute,
            request_burst=self.request_burst,
            broker_id=self.broker_id,
            public_url=self.public_url,
        )
        self.broker = Broker(store, settings, admin_token=admin_token)
        self.settings.update(
            gpu_share_broker=self.broker,
            gpu_share_max_message_size=self.max_message_size,
            gpu_share_receipt_public_pem=public_pem(receipt_key),
            gpu_share_receipt_key_id=receipts.key_id(receipt_key.public_key()),
        )

    def _bootstrap_admin_token(self, store: Store) -> None:
        path = Path(self.admin_token_file)
        if path.exists():
            existing = path.read_text().strip()
            account = store.authenticate(existing)
            if account is not None and account.role == "admin":
                self.log.info("admin token in %s", path)
                return
        store.ensure_account("admin", "admin")
        token = store.issue_token("admin")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(token + "\n")
        os.chmod(path, 0o600)
        print(f"gpu-share broker: a new admin token was written to {path}", flush=True)

    def initialize_handlers(self) -> None:
        """Register the REST, host-control and relay routes."""
        self.handlers.extend(default_handlers())

    async def _start_jupyter_server_extension(self, serverapp: Any) -> None:
        """Start metering, budget checks and host liveness checks."""
        warning = plain_text_warning(
            getattr(serverapp, "ip", ""),
            bool(getattr(serverapp, "certfile", "")),
            bool(getattr(serverapp, "sock", "")),
        )
        if warning:
            self.log.warning(warning)
        await self.broker.start()
        frozen = freeze_startup_objects()
        self.log.info(
            "gpu-share broker ready (store %s, %s event loop)",
            self.db_url.split("@")[-1],
            loop_in_use(),
        )
        peers = self.broker.peers
        print(
            f"gpu-share broker {self.broker.broker_id}: "
            + (
                f"{len(peers)} other broker(s) on this store: {', '.join(peers)}"
                if peers
                else "no other broker on this store"
            ),
            flush=True,
        )
        self.log.debug("%d start-up objects left out of garbage collection", frozen)

    async def stop_extension(self) -> None:
        """Stop the background loops and checkpoint."""
        broker = getattr(self, "broker", None)
        if broker is not None:
            await broker.stop()
            broker.store.close()


def plain_text_warning(ip: str, tls: bool, unix_socket: bool) -> str | None:
    """What to say when the broker serves beyond this machine without TLS (None: nothing)."""
    if tls or unix_socket:
        return None
    try:
        if ip and (ip == "localhost" or ipaddress.ip_address(ip).is_loopback):
            return None
    except ValueError:  # a host name: it may resolve to anything
        pass
    return (
        f"listening on {ip or 'every interface'} without TLS: tokens and kernel traffic "
        "cross the network in clear text. Serve TLS (--certfile CERT --keyfile KEY) or put a "
        "TLS proxy in front and listen on 127.0.0.1 (README: Run a broker with TLS)"
    )


main = launch_new_instance = BrokerApp.launch_instance
