"""The host agent: one outbound control websocket to the broker, one relay per kernel.

See docs/protocol.md for the messages. The agent only connects out; kernel traffic is
relayed as opaque frames (jupyter_gpu_share.wire) and never parsed or re-signed here.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import signal
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from traitlets import Any as AnyTrait
from traitlets import Bool, Dict, Enum, Float, Int, List, TraitError, Unicode, default, validate
from traitlets.config import LoggingConfigurable

from .. import __version__, wire
from ..files.transfer import TransferError, drained
from ..ledger import format_credits, parse_credits, price_per_second_from_hour
from ..transport import tls
from ..transport.websocket import ClientEnd, ConnectionClosed, HandshakeError, connect
from .cgroups import CgroupLimits, cleanup_stale
from .files import SessionFiles
from .gateway import GatewayKernel
from .idle import IdleWorkload
from .inventory import Inventory
from .kernels import RemoteKernel, default_scratch_root
from .leftovers import AgentAlreadyRunning, RunDir, clean_leftovers, run_dir_path
from .network import NetworkPolicy, parse_network
from .sandbox import (
    BwrapSandbox,
    ResourceLimits,
    Sandbox,
    SandboxError,
    cgroup_prefix,
    make_sandbox,
    usable_by_others,
)
from .schedule import Schedule, parse_schedule
from .selftest import SelfTestRunner, attach_benchmarks
from .tokens import TokenFileError, read_token_file
from .uids import DEFAULT_RANGE as DEFAULT_UID_RANGE
from .uids import UidError, UidPool, parse_range
from .warm import WarmKernel, WarmPool

CONTROL_PATH = "/gpu-share/api/hosts/connect"
RUN_ROOT = "/run/jupyter-gpu-share"
RELAY_MARK = "/gpu-share/api/relay/"
MAX_RELAY_BUFFER = 64 * 1024 * 1024  # bytes held for a relay while it reconnects
_FATAL_RELAY_CODES = {401, 403, 404, 410}
NO_SANDBOX_WARNING = (
    "WARNING: kernels run WITHOUT A SANDBOX (--no-sandbox): renters' code runs as this "
    "user and can read this user's files and environment. Use it only for renters you trust."
)


def local_now() -> datetime:
    """The host's wall clock, in its time zone."""
    return datetime.now().astimezone()


def run_dir_root(scratch_root: str) -> str:
    """Where the agent of a scratch root keeps its lock, kernel records and runtime folders.

    Short, so the kernels' Unix socket paths fit (100 bytes) whatever the scratch root: as
    root under /run, else in $XDG_RUNTIME_DIR when it is this user's, else in the scratch
    root itself.
    """
    digest = hashlib.sha256(os.fsencode(os.path.realpath(scratch_root))).hexdigest()[:8]
    if os.geteuid() == 0:
        return os.path.join(RUN_ROOT, digest)
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    with contextlib.suppress(OSError):
        if runtime and os.stat(runtime).st_uid == os.geteuid():
            return os.path.join(runtime, "jupyter-gpu-share", digest)
    return run_dir_path(scratch_root)


def _utc_offset_s(moment: datetime) -> int:
    offset = moment.utcoffset()
    return int(offset.total_seconds()) if offset is not None else 0


class AgentAuthError(RuntimeError):
    """The broker refused the host token (HTTP 401/403)."""


class AgentConfigError(ValueError):
    """The agent's settings cannot work (missing URL or token, bad price)."""


def parse_price_per_hour(text: str) -> int:
    """Parse a decimal credits-per-hour string into integer micro-credits per hour."""
    try:
        micro = parse_credits(text)
    except ValueError as err:
        raise AgentConfigError(f"price_per_hour: {err}") from None
    if micro < 0:
        raise AgentConfigError(f"price_per_hour must not be negative: {text!r}")
    return micro


def backoff_delay(attempt: int, base: float = 0.5, cap: float = 30.0) -> float:
    """Return the wait before reconnect ``attempt`` (0-based): doubling, capped, jittered."""
    delay = min(cap, base * (2 ** min(attempt, 32)))
    return delay * random.uniform(0.75, 1.0)


def _consume(future: asyncio.Future[Any]) -> None:
    """Retrieve a write future's exception so a dropped connection is not logged as unhandled."""
    if not future.cancelled():
        future.exception()


def _write(conn: ClientEnd, message: str | bytes, binary: bool = False) -> None:
    """Queue one websocket message in order; raise ConnectionClosed if closed."""
    future = conn.write_message(message, binary=binary)
    if future is not None:  # a future only while the connection's buffer drains
        future.add_done_callback(_consume)


DELIVERED_REMEMBERED = 4096  # requests a session remembers it passed to its kernel


class HostSession:
    """One rented kernel: its relay websocket, its kernel process and its lifecycle."""

    def __init__(
        self, agent: HostAgent, session_id: str, gpu_indices: list[int], relay_path: str
    ) -> None:
        self.agent = agent
        self.log = agent.log
        self.session_id = session_id
        self.gpu_indices = gpu_indices
        self.relay_path = relay_path
        self.state = "starting"  # -> "ready" -> "ended"
        self.kernel: RemoteKernel | GatewayKernel | None = None
        self.relay: ClientEnd | None = None
        self.key: str | None = None
        self._inbox: list[bytes] = []  # relay -> kernel, held until the kernel is ready
        self._inbox_used = False  # something reached the kernel before kernel_ready
        self._outbox: deque[tuple[str | bytes, bool]] = deque()  # kernel -> relay, while down
        self._outbox_bytes = 0
        self._dropped = 0
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self.warned_close: datetime | None = None  # the window close we warned about
        # The msg_ids of the requests passed to the kernel: one the bridge sends again
        # after a reconnect (its answer was lost, not the request) is not run twice.
        self._delivered: OrderedDict[bytes, None] = OrderedDict()
        self.files = SessionFiles(
            session_id,
            work_dir=lambda: getattr(self.kernel, "work_dir", None),
            owner=lambda: getattr(self.kernel, "owner", None),
            write=self._write_files,
            send_record=lambda record: self._to_relay(json.dumps(record)),
            max_bytes=agent.max_transfer_mib * 1024 * 1024,
            spool_dir=lambda: getattr(self.kernel, "scratch_root", None),
            log=agent.log,
        )

    def launch(self) -> None:
        """Start the session in the background."""
        self._task = asyncio.ensure_future(self.run())

    # -- start --------------------------------------------------------------------------

    async def run(self) -> None:
        """Start the kernel and connect the relay, then report ready."""
        timeout = self.agent.kernel_start_timeout
        try:
            await asyncio.wait_for(self._start(), timeout)
        except asyncio.CancelledError:
            raise
        except Exception as err:
            if isinstance(err, asyncio.TimeoutError):
                message = f"kernel did not start within {timeout:g} s"
            else:
                message = str(err) or type(err).__name__
            self.log.warning("session %s failed to start: %s", self.session_id, message)
            self._closing = True
            if self.kernel is not None:
                await self.kernel.stop()
            self._end({"type": "kernel_failed", "session_id": self.session_id, "message": message})

    async def _start(self) -> None:
        """The kernel starts at once, with a key of the host's own (sent to the renter with
        kernel_ready, as a warm kernel's is), while the relay connects: a start waits on
        no round trip to the renter (over a slow link, each is a link's latency twice)."""
        relay = asyncio.ensure_future(self._connect_relay())
        try:
            pool = self.agent.warm_pool
            warm = pool.take(self.gpu_indices) if pool is not None else None
            if warm is not None and warm.kernel is not None:
                await self.agent.pause_idle()
                warm.owner = self
                self.kernel = warm.kernel
                self.kernel.on_kernel_batch = self._from_kernel_batch
                await self.kernel.adopt(self.session_id)
                self.key = warm.key
                self.log.info("session %s: handed warm kernel %s", self.session_id, warm.name)
            else:
                self.key = str(uuid.uuid4())
                await self.agent.pause_idle()
                self.kernel = self.agent.new_kernel(
                    self.session_id,
                    self.key,
                    "hmac-sha256",
                    self.gpu_indices,
                    self._from_kernel,
                    self._kernel_exited,
                )
                if isinstance(self.kernel, RemoteKernel):
                    self.kernel.on_kernel_batch = self._from_kernel_batch
                await self.kernel.start()
            self.relay = await relay
            # What the renter sent while the kernel started waits in the inbox (so that
            # kernel_ready knows whether anything reached the kernel before it).
            self.relay.deliver_to(self._handle_relay_message)
            self._flush_outbox()  # what the kernel said before the relay was up
        finally:
            if not relay.done():
                relay.cancel()
        self._reader = asyncio.ensure_future(self._read_relay())
        self.state = "ready"
        self._inbox_used = bool(self._inbox)
        for data in self._inbox:
            self._to_kernel(data)
        self._inbox.clear()
        ready = {"type": "kernel_ready", "session_id": self.session_id}
        self.agent.send_control(ready)
        self._to_relay(json.dumps(self._ready_record(first=True)))
        self.log.info("session %s: kernel ready", self.session_id)

    def _ready_record(self, first: bool = False) -> dict[str, Any]:
        """The relay's kernel_ready, with the kernel's key (the host's: the renter adopts it)
        and, the first time, while nothing has reached the kernel, the kernel's info (the
        renter's bridge answers its clients' first kernel_info_requests with it)."""
        record: dict[str, Any] = {"type": "kernel_ready", "session_id": self.session_id}
        if self.key is not None:
            record.update(key=self.key, signature_scheme="hmac-sha256")
        info = getattr(self.kernel, "kernel_info", None)
        if first and info is not None and not self._inbox_used:
            record["kernel_info"] = info
            identity = getattr(self.kernel, "kernel_identity", {})
            record["kernel_session"] = identity.get("session", "")
            record["kernel_username"] = identity.get("username", "")
        return record

    # -- relay --------------------------------------------------------------------------

    async def _connect_relay(self) -> ClientEnd:
        attempt = 0
        while True:
            try:
                return await self.agent.connect_websocket(self.relay_path, relay=True)
            except HandshakeError as err:
                if err.code in _FATAL_RELAY_CODES:
                    raise RuntimeError(
                        f"broker refused the relay ({err.code}: {err.message})"
                    ) from None
                problem: str = f"HTTP {err.code}"
            except (OSError, asyncio.TimeoutError) as err:
                url = self.agent.active_broker_url
                problem = tls.describe(err, url) or str(err) or type(err).__name__
            delay = backoff_delay(attempt, cap=self.agent.reconnect_max_delay)
            attempt += 1
            self.log.warning(
                "session %s: relay connection failed (%s); retry %d in %.1f s",
                self.session_id,
                problem,
                attempt,
                delay,
            )
            await asyncio.sleep(delay)

    async def _read_relay(self) -> None:
        while not self._closing:
            conn = self.relay
            if conn is not None:
                conn.deliver_to(self._handle_relay_message)  # read_message: the close only
            message = await conn.read_message() if conn is not None else None
            if message is None:
                if self._closing:
                    return
                code = conn.close_code if conn is not None else None
                self.log.warning(
                    "session %s: relay closed (code %s); reconnecting", self.session_id, code
                )
                self.relay = None
                try:
                    self.relay = await self._connect_relay()
                except RuntimeError as err:
                    self.log.warning("session %s: %s; stopping it", self.session_id, err)
                    self.agent._spawn(self.stop())
                    return
                self._flush_outbox()
                continue
            self._handle_relay_message(message)

    def _handle_relay_message(self, message: str | bytes | bytearray) -> None:
        try:
            self._from_relay(message)
        except Exception:
            self.log.exception("session %s: failed to handle a relay message", self.session_id)

    def _from_relay(self, message: str | bytes) -> None:
        if not isinstance(message, str):
            if self.state == "ready":
                self._to_kernel(message)
            elif len(self._inbox) < 1024:
                self._inbox.append(message)
            else:
                self.log.warning("session %s: dropped an early message", self.session_id)
        else:
            self._relay_text(message)

    def _relay_text(self, text: str) -> None:
        try:
            record = json.loads(text)
            kind = record["type"]
        except (ValueError, KeyError, TypeError):
            self.log.warning("session %s: ignored a malformed relay record", self.session_id)
            return
        if kind == "hello":
            # The renter's side attached (again, after a broker restart): the kernel's key
            # is the host's, and goes with kernel_ready; a kernel already up says so again.
            if self.state == "ready":
                self._to_relay(json.dumps(self._ready_record()))
        elif kind == "signal":
            try:
                signum = signal.Signals(int(record.get("signum", signal.SIGINT)))
            except (ValueError, TypeError):
                self.log.warning("session %s: ignored a bad signal", self.session_id)
                return
            if self.kernel is not None and self.kernel.alive:
                self.log.info("session %s: sending %s to the kernel", self.session_id, signum.name)
                self.kernel.signal(signum)
        elif isinstance(kind, str) and kind.startswith("files_"):
            if self.state == "ready":
                self.files.record(record)
            else:
                message = "the kernel is not ready for files yet"
                answer = {"type": "files_error", "id": record.get("id"), "message": message}
                self._to_relay(json.dumps(answer))
        else:
            self.log.debug("session %s: ignored relay record %r", self.session_id, kind)

    async def _write_files(self, message: bytes) -> None:
        """One chunk of files to the renter, after what the relay holds has drained."""
        relay = self.relay
        if relay is None or self._outbox:
            raise TransferError("the relay to the renter dropped")
        try:
            written = relay.write_message(message, binary=True)
        except ConnectionClosed:
            raise TransferError("the relay to the renter dropped") from None
        await drained(relay, written)

    def _to_kernel(self, data: bytes) -> None:
        assert self.kernel is not None
        try:
            channel, frames = wire.decode(data)
            if channel == wire.FILES:
                self.files.chunk(frames)
                return
            if channel in (wire.SHELL, wire.CONTROL) and self._delivered_before(frames):
                return  # sent again by the bridge after a reconnect (kernel/resend.py)
            self.kernel.send(channel, frames)
        except (wire.FrameError, ValueError, RuntimeError) as err:
            self.log.warning("session %s: dropped a relay message: %s", self.session_id, err)

    def _delivered_before(self, frames: list[memoryview]) -> bool:
        """Whether a request with this msg_id already went to the kernel (and note it)."""
        msg_id = wire.request_id(frames)
        if msg_id is None:
            return False
        if msg_id in self._delivered:
            self.log.info("session %s: a request sent again was delivered before", self.session_id)
            return True
        self._delivered[msg_id] = None
        if len(self._delivered) > DELIVERED_REMEMBERED:
            self._delivered.popitem(last=False)
        return False

    def _from_kernel(self, channel: int, frames: list[bytes]) -> None:
        self._to_relay(wire.encode(channel, frames), binary=True)

    def _from_kernel_batch(self, channel: int, batch: list[list[Any]]) -> None:
        """What the kernel sent on one channel since the last wake-up: one relay write."""
        relay = self.relay
        if relay is not None and not self._outbox:
            try:
                written = relay.write_many([wire.encode_parts(channel, frames) for frames in batch])
            except ConnectionClosed:
                pass
            else:
                if written is not None:
                    self._hold(channel, written)
                return
        for frames in batch:
            self._from_kernel(channel, frames)

    def _hold(self, channel: int, written: asyncio.Future[Any]) -> None:
        """The relay is backlogged (the broker holds the host while the renter's side
        drains): read no more of this channel from the kernel until it has drained, so the
        output waits in the kernel's sockets (its memory, under its limits), not here."""
        pause = getattr(self.kernel, "pause_reading", None)
        if pause is None:
            written.add_done_callback(_consume)
            return
        pause(channel, True)

        def drained(future: asyncio.Future[Any]) -> None:
            _consume(future)
            pause(channel, False)

        written.add_done_callback(drained)

    def _to_relay(self, message: str | bytes, binary: bool = False) -> None:
        """Write to the relay in order; hold messages (bounded) while it reconnects."""
        if self.relay is not None and not self._outbox:
            try:
                _write(self.relay, message, binary)
                return
            except ConnectionClosed:
                pass
        self._outbox.append((message, binary))
        self._outbox_bytes += len(message)
        while self._outbox_bytes > MAX_RELAY_BUFFER and self._outbox:
            old, _ = self._outbox.popleft()
            self._outbox_bytes -= len(old)
            self._dropped += 1
        if self._dropped == 1:
            self.log.warning("session %s: relay buffer full; dropping output", self.session_id)

    def _flush_outbox(self) -> None:
        while self._outbox and self.relay is not None:
            message, binary = self._outbox[0]
            try:
                _write(self.relay, message, binary)
            except ConnectionClosed:
                return
            self._outbox.popleft()
            self._outbox_bytes -= len(message)

    # -- end ----------------------------------------------------------------------------

    def _kernel_exited(self, exit_code: int | None) -> None:
        if self.state == "ready" and not self._closing:
            self._closing = True
            record: dict[str, Any] = {
                "type": "kernel_ended",
                "session_id": self.session_id,
                # Code 0: the kernel ended itself, as a shutdown_request asks.
                "reason": "exited" if exit_code == 0 else "died",
                "exit_code": exit_code,
            }
            why = getattr(self.kernel, "stop_reason", None)
            if why:  # the host's limit stopped it: out of memory, scratch over its quota
                record.update(reason="host_limit", message=f"stopped by the host: {why}")
            self._end(record)

    def send_status(self, message: str) -> None:
        """Tell the renter something through the relay (a text ``status`` record)."""
        self._to_relay(json.dumps({"type": "status", "message": message}))

    async def stop(
        self, reason: str = "stopped", report: bool = True, message: str | None = None
    ) -> None:
        """Stop the kernel (or the start in progress) and report ``kernel_ended``."""
        if self.state == "ended":
            return
        self._closing = True
        task = self._task
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.state == "ended":
            return
        exit_code = await self.kernel.stop() if self.kernel is not None else None
        record: dict[str, Any] = {
            "type": "kernel_ended",
            "session_id": self.session_id,
            "reason": reason,
            "exit_code": exit_code,
        }
        if message:
            record["message"] = message
        self._end(record, report=report)

    def _end(self, record: dict[str, Any], report: bool = True) -> None:
        if self.state == "ended":
            return
        self.state = "ended"
        self.log.info(
            "session %s: %s%s",
            self.session_id,
            record["type"],
            f" ({record['reason']}, exit code {record['exit_code']})" if "reason" in record else "",
        )
        if report:
            self.agent.send_control(record)
            self._to_relay(json.dumps(record))
        if self.relay is not None:
            self.relay.close(1000, record["type"])
        if self._reader is not None and self._reader is not asyncio.current_task():
            self._reader.cancel()
        self.files.close()
        self.agent.forget(self)


class HostAgent(LoggingConfigurable):
    """Offer this machine's GPUs to a broker and run renters' kernels on them."""

    broker_url = Unicode(
        help="Broker base URL, http(s)://host:port[/prefix]; websockets use ws(s). Several "
        "brokers of one service, comma-separated, are tried in order: when one cannot be "
        "reached the agent goes on to the next at once. Defaults to $GPU_SHARE_BROKER_URL."
    ).tag(config=True)

    token = Unicode(
        help="Host token issued by the broker. Defaults to $GPU_SHARE_TOKEN. Never logged. "
        "On the command line (--token) `ps` shows it to every local user: prefer token_file "
        "or the environment."
    ).tag(config=True)

    token_file = Unicode(
        "",
        help="File holding the host token (--token-file PATH), read at start. It must be a "
        "regular file that only its owner can read or write (chmod 600 PATH). When set, it "
        "takes the place of $GPU_SHARE_TOKEN. Example: umask 077; echo TOKEN > "
        "~/.gpu-share-token; jupyter gpu-share host --token-file ~/.gpu-share-token",
    ).tag(config=True)

    ca_file = Unicode(
        "",
        help="A CA certificate (PEM) to trust for the broker's TLS besides the system's, for "
        "a broker with a certificate of a private CA (--ca-file). Defaults to "
        "$GPU_SHARE_CA_FILE. Certificates and host names are always verified.",
    ).tag(config=True)

    client_cert = Unicode(
        "",
        help="A client certificate (PEM, with its key unless client_key is set) the agent "
        "presents to a broker or TLS proxy that asks for one (mutual TLS; --client-cert).",
    ).tag(config=True)

    client_key = Unicode(
        "", help="The private key of client_cert, when it is in a file of its own (--client-key)."
    ).tag(config=True)

    price_per_hour = Unicode(
        "1.00", help="Price of each offer in credits per hour, as a decimal string (e.g. 0.50)."
    ).tag(config=True)

    share_gpus = Bool(
        False,
        help="Let several renters use one GPU at once (up to max_kernels kernels). Off by "
        "default: one renter per GPU. GPU memory is not partitioned between them; offers say "
        "'shared' so renters know.",
    ).tag(config=True)

    warm_kernels = Int(
        0,
        help="Kernels to keep started per offer, each handed to the next renter (never one "
        "another renter used), so a rented kernel is ready in milliseconds. 0: none.",
    ).tag(config=True)

    price_per_hour_by_model = Dict(
        key_trait=Unicode(),
        value_trait=Unicode(),
        help="Price per hour by GPU model name (as NVML names it, or CPU), as decimal "
        "strings, e.g. {'NVIDIA A100-SXM4-80GB': '1.50'}; other models use price_per_hour.",
    ).tag(config=True)

    sandbox = Enum(
        ["bwrap", "none"],
        "bwrap",
        help="How kernels are isolated: 'bwrap' (bubblewrap; the default, required unless "
        "'none') or 'none' (renters' code runs as this user: only for trusted renters).",
    ).tag(config=True)

    memory_limit_mib = Int(
        0,
        help="Memory limit per kernel in MiB (0: none): a cgroup memory limit where the "
        "machine has one (it counts shared memory and /dev/shm too), and the rlimit of "
        "memory_limit_kind per process.",
    ).tag(config=True)

    memory_limit_kind = Enum(
        ["data", "as"],
        "data",
        help="Which rlimit memory_limit_mib sets: 'data' (RLIMIT_DATA: heap and private "
        "memory; CUDA keeps working) or 'as' (RLIMIT_AS: all address space; CUDA reserves "
        "huge address ranges and fails under it, so use 'as' only for CPU hosts).",
    ).tag(config=True)

    max_processes = Int(
        1024,
        help="Processes and threads per kernel (0: none): a cgroup pids limit where the "
        "machine has one, and RLIMIT_NPROC (counted per uid: each kernel has its own uid "
        "when the agent runs as root, see kernel_uids).",
    ).tag(config=True)

    max_open_files = Int(4096, help="RLIMIT_NOFILE for kernels (0: inherit).").tag(config=True)

    network = Unicode(
        "public",
        help="""What each sandboxed kernel's own network reaches: 'public' (the default: the
        public internet only, through pasta from the passt package; never this host's
        loopback services, its LAN, link-local or cloud metadata, or any private range),
        'none' (only its own loopback), a comma-separated allow-list of addresses, networks
        and host names (e.g. 'pypi.org,files.pythonhosted.org'; names resolved at start), or
        'host' (shared with this machine: only for renters you trust). Renters see it in the
        marketplace.""",
    ).tag(config=True)

    network_bandwidth_kbit = Int(
        100_000,
        help="Bandwidth of each kernel's network, each way, in kbit/s (0: no limit).",
    ).tag(config=True)

    network_connections_per_minute = Int(
        600,
        help="New outbound connections a kernel may open per minute (0: no limit); keeps a "
        "renter from using this host for scans or spam.",
    ).tag(config=True)

    kernel_uids = Unicode(
        "auto",
        help=f"""The host uids kernels run as. 'auto': when the agent runs as root, each kernel
        gets a uid of its own from {DEFAULT_UID_RANGE} (no account, no /etc/subuid range of
        any user may hold them), so process limits hold and an escaped kernel owns nothing;
        as another user, kernels run as that user. 'FIRST-LAST': that range (the agent must
        run as root). 'agent': always this agent's uid (root stays root outside the
        sandbox's user namespace: not recommended).""",
    ).tag(config=True)

    scratch_quota_mib = Int(
        10240,
        help="Disk each kernel may fill in its scratch folder, in MiB (0: no limit). Checked "
        "every 2 s; a kernel over it is stopped and the renter is told why.",
    ).tag(config=True)

    cpu_limit = Float(
        0.0,
        help="CPUs each kernel may use (a cgroup CPU quota, e.g. 2.5; 0: no limit).",
    ).tag(config=True)

    sandbox_ro_paths = List(
        Unicode(),
        help="Extra host paths mounted read-only in the sandbox (e.g. a CUDA toolkit in /opt).",
    ).tag(config=True)

    schedule = Unicode(
        "",
        help="Availability windows in the host's time zone, e.g. 'mon-fri 18:00-08:00; "
        "sat,sun' (empty: always). Offers are listed only inside them.",
    ).tag(config=True)

    min_session_minutes = Float(
        10.0, help="Refuse a session that could run less than this before the window closes."
    ).tag(config=True)

    schedule_warning_minutes = Float(
        10.0, help="Warn running sessions this many minutes before the window closes."
    ).tag(config=True)

    schedule_poll_interval = Float(
        15.0, help="Seconds between checks of the availability schedule."
    ).tag(config=True)

    clock = AnyTrait(None, help="Callable returning the host's local time (tests).")

    idle_command = Unicode(
        "",
        help="Command (shell-quoted, not run by a shell) that runs while no kernel is rented, "
        "e.g. a folding client; stopped before a renter's kernel starts, restarted after.",
    ).tag(config=True)

    idle_stop_grace = Float(
        10.0, help="Seconds the idle command gets after SIGTERM before SIGKILL."
    ).tag(config=True)

    idle_sandbox = Bool(
        True,
        help="Run the idle command in the kernels' sandbox (their network, a uid of its own, "
        "their limits; its home is <scratch_root>/idle, kept between runs, with the "
        "command's own folder read-only). False: it runs as this agent's user, with its "
        "files and network.",
    ).tag(config=True)

    gpus = List(Int(), help="GPU indices to offer; empty offers every GPU NVML finds.").tag(
        config=True
    )

    max_kernels = Int(4, help="Most kernels this host runs at once.").tag(config=True)

    heartbeat_interval = Float(
        5.0, help="Seconds between heartbeats (the broker's welcome may override it)."
    ).tag(config=True)

    scratch_root = Unicode(
        help="Directory holding each session's private scratch directory (wiped after it)."
    ).tag(config=True)

    reconnect_max_delay = Float(
        30.0, help="Longest wait in seconds between reconnection attempts."
    ).tag(config=True)

    kernel_start_timeout = Float(
        60.0, help="Seconds a kernel may take from start_kernel to ready before it fails."
    ).tag(config=True)

    kernel_stop_grace = Float(
        5.0, help="Seconds a kernel gets after SIGTERM before it is killed."
    ).tag(config=True)

    max_message_size = Int(
        256 * 1024 * 1024, help="Largest websocket message accepted from the broker, in bytes."
    ).tag(config=True)

    max_transfer_mib = Int(
        1024,
        help="Most MiB of files one transfer brings into a kernel's working folder (the "
        "notebook's folder, sent at start) or takes back from it (what the kernel wrote); "
        "the scratch quota applies besides.",
    ).tag(config=True)

    ping_interval = Float(
        60.0,
        help="Seconds between websocket pings that detect a dead broker connection (0: none). "
        "Each ping costs the broker a pong; heartbeats already keep the connection busy.",
    ).tag(config=True)

    nvml_module = AnyTrait(None, help="pynvml-like module to use instead of pynvml (tests).")

    gateway_url = Unicode(
        "",
        help="Base URL of a Jupyter Kernel Gateway or Enterprise Gateway (http(s)://...). "
        "When set, renters' kernels start there (REST and websocket) instead of as local "
        "processes, so a cluster becomes one host; the sandbox does not apply and warm "
        "kernels are unavailable. The gateway must allow the env names GPU_SHARE_SESSION_ID, "
        "GPU_SHARE_HOST_ID and CUDA_VISIBLE_DEVICES (Kernel Gateway: "
        "--JupyterWebsocketPersonality.env_whitelist; Enterprise Gateway: "
        "--EnterpriseGatewayApp.client_envs).",
    ).tag(config=True)

    gateway_token = Unicode(
        help="Auth token of the gateway (sent as 'Authorization: token ...'). "
        "Defaults to $GPU_SHARE_GATEWAY_TOKEN. Never logged. Prefer gateway_token_file or the "
        "environment to --gateway-token, which `ps` shows to every local user."
    ).tag(config=True)

    gateway_token_file = Unicode(
        "",
        help="File holding the gateway's token (--gateway-token-file PATH), read at start; "
        "a regular file of mode 0600, as token_file. When set, it takes the place of "
        "$GPU_SHARE_GATEWAY_TOKEN.",
    ).tag(config=True)

    gateway_kernel_name = Unicode("python3", help="Kernel spec name to start on the gateway.").tag(
        config=True
    )

    selftest = Bool(
        True,
        help="Measure the offered GPUs (or the CPU) at start and every selftest_interval "
        "hours, in a subprocess, and publish the result with each offer as 'benchmark'.",
    ).tag(config=True)

    selftest_interval = Float(
        24.0, help="Hours between self-test measurements (0: only at start)."
    ).tag(config=True)

    @default("gateway_token")
    def _default_gateway_token(self) -> str:
        return os.environ.get("GPU_SHARE_GATEWAY_TOKEN", "")

    @validate("gateway_url")
    def _validate_gateway_url(self, proposal: dict[str, Any]) -> str:
        url = str(proposal["value"]).strip().rstrip("/")
        if url and urlsplit(url).scheme not in ("http", "https"):
            raise TraitError(f"gateway_url must start with http:// or https://, not {url!r}")
        return url

    @default("broker_url")
    def _default_broker_url(self) -> str:
        return os.environ.get("GPU_SHARE_BROKER_URL", "")

    @default("token")
    def _default_token(self) -> str:
        return os.environ.get("GPU_SHARE_TOKEN", "")

    @default("scratch_root")
    def _default_scratch_root(self) -> str:
        return default_scratch_root()

    @validate("broker_url")
    def _validate_broker_url(self, proposal: dict[str, Any]) -> str:
        urls = [url.strip().rstrip("/") for url in str(proposal["value"]).split(",")]
        for url in urls:
            if url and urlsplit(url).scheme not in ("http", "https", "ws", "wss"):
                raise TraitError(f"broker_url must start with http:// or https://, not {url!r}")
        return ",".join(url for url in urls if url)

    @property
    def broker_urls(self) -> list[str]:
        """The brokers to try, in order."""
        return [url for url in self.broker_url.split(",") if url]

    @property
    def active_broker_url(self) -> str:
        """The broker the agent is connected to, or tries next."""
        urls = self.broker_urls
        return urls[self._broker_index % len(urls)] if urls else ""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sessions: dict[str, HostSession] = {}
        self.host_id: str | None = None
        self.inventory: Inventory | None = None
        self._broker_index = 0  # which of broker_urls
        self.price_per_second_micro = 0
        self.on_connected: Callable[[HostAgent], None] | None = None
        self._control: ClientEnd | None = None
        self._pending: deque[dict[str, Any]] = deque(maxlen=1000)
        self._stop_event: asyncio.Event | None = None
        self._stopping = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self.model_prices_micro: dict[str, int] = {}
        self.sandbox_impl: Sandbox | None = None
        self.run_dir: RunDir | None = None
        self.schedule_impl: Schedule | None = None
        self.idle: IdleWorkload | None = None
        self.warm_pool: WarmPool | None = None
        self.offering = True  # inside an availability window (offers listed)
        self.benchmarks: dict[str, dict[str, Any]] = {}  # self-test results, "cpu" or index
        self.selftest_runner: SelfTestRunner | None = None

    # -- configuration ------------------------------------------------------------------

    def check_config(self) -> None:
        """Raise AgentConfigError when the settings cannot work."""
        if not self.broker_url:
            raise AgentConfigError("no broker URL: pass --broker URL or set GPU_SHARE_BROKER_URL")
        self._read_token_files()
        if not self.token:
            raise AgentConfigError(
                "no host token: pass --token-file PATH (mode 0600) or set GPU_SHARE_TOKEN"
            )
        try:  # a CA or client certificate that cannot be read is said now, not per retry
            for url in self.broker_urls:
                tls.context_for(url, self.ca_file, self.client_cert, self.client_key)
        except tls.TLSConfigError as err:
            raise AgentConfigError(str(err)) from None
        if self.client_cert and not all(u.startswith("https") for u in self.broker_urls):
            raise AgentConfigError("client_cert is for a broker served over https")
        per_hour = parse_price_per_hour(self.price_per_hour)
        self.price_per_second_micro = price_per_second_from_hour(per_hour)
        prices = {}
        for model, text in self.price_per_hour_by_model.items():
            try:
                prices[model] = price_per_second_from_hour(parse_price_per_hour(text))
            except AgentConfigError as err:
                raise AgentConfigError(f"price for {model!r}: {err}") from None
        self.model_prices_micro = prices
        if self.max_kernels < 1:
            raise AgentConfigError("max_kernels must be at least 1")
        try:
            self.schedule_impl = parse_schedule(self.schedule)
        except ValueError as err:
            raise AgentConfigError(f"schedule: {err}") from None
        if self.min_session_minutes < 0:
            raise AgentConfigError("min_session_minutes must not be negative")
        if self.gateway_url:
            if self.warm_kernels > 0:
                raise AgentConfigError(
                    "warm kernels are not available with a gateway (--gateway-url): "
                    "drop --warm-kernels"
                )
            self.sandbox_impl = None  # the gateway isolates its kernels
        else:
            self.sandbox_impl = self._make_sandbox()
        if self.idle_command.strip():
            try:
                IdleWorkload(self.idle_command)
            except ValueError as err:  # shlex: "No closing quotation"
                raise AgentConfigError(f"idle_command: {err}") from None

    def _read_token_files(self) -> None:
        """Take the tokens from token_file and gateway_token_file, where they are set."""
        try:
            if self.token_file:
                self.token = read_token_file(self.token_file, "host token")
            if self.gateway_token_file:
                self.gateway_token = read_token_file(self.gateway_token_file, "gateway token")
        except TokenFileError as err:
            raise AgentConfigError(str(err)) from None

    def _make_sandbox(self) -> Sandbox:
        try:
            limits = ResourceLimits(
                memory_mib=self.memory_limit_mib,
                max_processes=self.max_processes,
                max_open_files=self.max_open_files,
                memory_rlimit=self.memory_limit_kind,
                max_file_mib=self.scratch_quota_mib,
            )
            network: str | NetworkPolicy = self.network.strip()
            if network != "host":
                network = parse_network(
                    str(network),
                    bandwidth_kbit=self.network_bandwidth_kbit,
                    connections_per_minute=self.network_connections_per_minute,
                )
            sandbox = make_sandbox(
                self.sandbox,
                limits,
                self.sandbox_ro_paths,
                network,
                uid_pool=self._uid_pool() if self.sandbox == "bwrap" else None,
                cgroup_limits=CgroupLimits(
                    memory_mib=self.memory_limit_mib,
                    max_processes=self.max_processes,
                    cpu=self.cpu_limit,
                ),
            )
            sandbox.check()
            parent = os.path.dirname(os.path.abspath(self.scratch_root))
            own_uid = isinstance(sandbox, BwrapSandbox) and sandbox.own_uid
            if own_uid and not usable_by_others(parent, os.X_OK):
                raise SandboxError(
                    f"kernels run as uids of their own, and the scratch root "
                    f"{self.scratch_root} lies in a folder other users cannot pass through "
                    "(a home folder?): choose one under /tmp or /var/lib (--scratch-root)"
                )
        except (ValueError, SandboxError, UidError) as err:
            raise AgentConfigError(str(err)) from None
        return sandbox

    def _uid_pool(self) -> UidPool | None:
        """The kernels' uids (see kernel_uids), or None to run them as the agent's uid."""
        setting = self.kernel_uids.strip()
        if setting == "agent":
            return None
        if setting == "auto":
            return UidPool(parse_range(DEFAULT_UID_RANGE)) if os.geteuid() == 0 else None
        uids = parse_range(setting)
        if os.geteuid() != 0:
            raise UidError(f"kernel_uids {setting}: the agent must run as root to use them")
        return UidPool(uids)

    @property
    def price_label(self) -> str:
        """Return the price per hour for people, e.g. ``0.50/h``."""
        label = f"{format_credits(parse_price_per_hour(self.price_per_hour))}/h"
        models = self.inventory.summary() if self.inventory is not None else ""
        special = [
            f"{model} {format_credits(parse_price_per_hour(text))}/h"
            for model, text in sorted(self.price_per_hour_by_model.items())
            if model in models
        ]
        return label + (f" ({', '.join(special)})" if special else "")

    def now(self) -> datetime:
        """The host's local time (the injected clock in tests)."""
        return (self.clock or local_now)()

    def is_open(self, now: datetime | None = None) -> bool:
        """Tell whether the host is inside an availability window."""
        return self.schedule_impl is None or self.schedule_impl.is_open(now or self.now())

    def offers(self) -> list[dict[str, Any]]:
        """The offers to list now: none outside the availability windows."""
        assert self.inventory is not None
        if not self.is_open():
            return []
        offers = self.inventory.offers(self.price_per_second_micro)
        for offer in offers:
            price = self.model_prices_micro.get(offer["gpu_model"])
            if price is not None:
                offer["price_per_second_micro"] = price
        attach_benchmarks(offers, self.benchmarks)
        if self.share_gpus:
            for offer in offers:
                offer["shared"] = True
        return offers

    def gpu_info(self, indices: list[int]) -> list[Any]:
        """The inventory entries of these GPU indices (empty for a CPU session)."""
        if self.inventory is None:
            return []
        by_index = {gpu.index: gpu for gpu in self.inventory.gpus}
        return [by_index[i] for i in indices if i in by_index]

    def websocket_url(self, path: str) -> str:
        """Build the ws(s) URL of a broker path (the broker's URL prefix is kept)."""
        parts = urlsplit(self.active_broker_url)
        scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
        prefix = parts.path.rstrip("/")
        if prefix and path.startswith(prefix + "/"):
            prefix = ""
        return urlunsplit((scheme, parts.netloc, prefix + path, "", ""))

    async def connect_websocket(self, path: str, relay: bool = False) -> ClientEnd:
        """Open a websocket to the broker with the host token and TCP_NODELAY: the control
        channel, or a relay (kernel traffic); the same transport with or without TLS."""
        url = self.websocket_url(path)
        return await connect(
            url,
            headers={"Authorization": f"Bearer {self.token}"},
            ssl_context=tls.context_for(url, self.ca_file, self.client_cert, self.client_key),
            max_message_size=self.max_message_size,
            ping_interval=self.ping_interval or None,
            connect_timeout=10,
            handshake_timeout=30,
        )

    # -- running ------------------------------------------------------------------------

    def hello(self) -> dict[str, Any]:
        """Build the `hello` the agent sends after every (re)connect."""
        assert self.inventory is not None
        offers = self.offers()
        self.offering = bool(offers)
        return {
            "type": "hello",
            "host_agent_version": __version__,
            "gpus": [gpu.to_json() for gpu in self.inventory.gpus],
            "offers": offers,
            "max_kernels": self.max_kernels,
            **({"sandbox": self.sandbox_impl.describe()} if self.sandbox_impl else {}),
            "sessions": [sid for sid, s in self.sessions.items() if s.state != "ended"],
            # For the broker's reliability score: uptime is measured inside these windows.
            "schedule": self.schedule,
            "utc_offset_s": _utc_offset_s(self.now()),
        }

    async def run(self) -> None:
        """Serve the broker until stop(); raise AgentAuthError when the token is refused."""
        self.check_config()
        self._stop_event = asyncio.Event()
        self.inventory = Inventory(self.gpus or None, self.nvml_module)
        if self.inventory.missing:
            self.log.warning("GPUs %s were asked for but not found", self.inventory.missing)
        self.log.info(
            "offering %s at %s (%d micro-credits/s)",
            self.inventory.summary(),
            self.price_label,
            self.price_per_second_micro,
        )
        self._log_sandbox()
        await self._clean_previous_run()
        if self.selftest:
            self.selftest_runner = SelfTestRunner(self, self.selftest_interval * 3600)
            self._spawn(self.selftest_runner.run())
        if self.schedule_impl is not None:
            self.log.info(
                "availability schedule %r: %s now",
                self.schedule_impl.spec,
                "open" if self.is_open() else "closed",
            )
            self._spawn(self._watch_schedule())
        if self.warm_kernels > 0:
            self.warm_pool = WarmPool(self.warm_kernels, self._start_warm, self.log)
            for offer in self.inventory.offers(self.price_per_second_micro):
                self.warm_pool.fill(tuple(offer["gpu_indices"]))
            self.log.info("keeping %d warm kernel(s) per offer", self.warm_kernels)
        if self.idle_command.strip():
            sandboxed = self.idle_sandbox and self.sandbox_impl is not None
            self.idle = IdleWorkload(
                self.idle_command,
                stop_grace=self.idle_stop_grace,
                logger=self.log,
                sandbox=self.sandbox_impl if sandboxed else None,
                work_dir=os.path.join(self.scratch_root, "idle"),
                gpu_minors=[
                    gpu.index if gpu.minor_number is None else gpu.minor_number
                    for gpu in self.inventory.gpus
                ],
            )
            if not sandboxed:
                self.log.warning("the idle command runs unsandboxed, as this agent's user")
            await self.idle.start()
        attempt = tried = 0
        try:
            while not self._stop_event.is_set():
                welcomed = False
                try:
                    welcomed = await self._serve_control()
                except HandshakeError as err:
                    if err.code in (401, 403):
                        raise AgentAuthError(
                            f"the broker refused the host token (HTTP {err.code}: {err.message})"
                        ) from None
                    self.log.warning("broker connection failed: HTTP %s", err.code)
                except (OSError, asyncio.TimeoutError) as err:
                    url = self.active_broker_url
                    problem = tls.describe(err, url) or str(err) or type(err).__name__
                    self.log.warning("broker connection failed: %s", problem)
                if self._stop_event.is_set():
                    break
                if welcomed:
                    attempt = tried = 0
                delay = backoff_delay(attempt, cap=self.reconnect_max_delay)
                if len(self.broker_urls) > 1:
                    # Another broker of the service, at once, until each was tried since the
                    # last welcome; then around the list again, backing off.
                    self._broker_index = (self._broker_index + 1) % len(self.broker_urls)
                    tried += 1
                    if tried < len(self.broker_urls):
                        delay = 0.0
                attempt += 1
                self.log.info(
                    "reconnecting to %s in %.1f s (attempt %d)",
                    self.active_broker_url,
                    delay,
                    attempt,
                )
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stop_event.wait(), delay)
        finally:
            await self._shutdown()

    async def _serve_control(self) -> bool:
        conn = await self.connect_websocket(CONTROL_PATH)
        try:
            if self._stop_event is not None and self._stop_event.is_set():
                return False
            _write(conn, json.dumps(self.hello()))
            welcome = await asyncio.wait_for(self._read_welcome(conn), 30)
            if welcome is None:
                self.log.warning("broker closed the control connection before its welcome")
                return False
            self.host_id = str(welcome.get("host_id", ""))
            interval = float(welcome.get("heartbeat_interval") or self.heartbeat_interval)
            self._control = conn
            for sid in welcome.get("stop") or []:
                session = self.sessions.get(sid)
                if session is not None:
                    self.log.info("broker already ended session %s; stopping it", sid)
                    self._spawn(session.stop(report=False))
            while self._pending and self._control is conn:
                self.send_control(self._pending.popleft())
            self.log.info("connected to %s as host %s", self.active_broker_url, self.host_id)
            if self.on_connected is not None:
                self.on_connected(self)
            beat = asyncio.ensure_future(self._heartbeats(conn, interval))
            try:
                while True:
                    message = await conn.read_message()
                    if message is None:
                        self.log.warning(
                            "control connection closed (code %s%s)",
                            conn.close_code,
                            f": {conn.close_reason}" if conn.close_reason else "",
                        )
                        return True
                    if isinstance(message, str):
                        try:
                            self._dispatch(message)
                        except Exception:
                            self.log.exception("failed to handle a control message")
            finally:
                beat.cancel()
                if self._control is conn:
                    self._control = None
        finally:
            conn.close()

    async def _read_welcome(self, conn: ClientEnd) -> dict[str, Any] | None:
        while True:
            message = await conn.read_message()
            if message is None:
                return None
            record = self._parse(message)
            if record is not None and record.get("type") == "welcome":
                return record
            self.log.warning("expected welcome from the broker, ignored %r", message[:80])

    async def _heartbeats(self, conn: ClientEnd, interval: float) -> None:
        assert self.inventory is not None
        while True:
            telemetry = self.inventory.telemetry()
            telemetry["kernels"] = sum(1 for s in self.sessions.values() if s.state == "ready")
            # Sessions running a cell, or that ran one since the last heartbeat: the broker
            # keeps them longer with no renter connected, and counts them as not idle.
            busy = [
                s.session_id
                for s in self.sessions.values()
                if s.state == "ready"
                and s.kernel is not None
                and (s.kernel.busy or getattr(s.kernel, "was_busy", False))
            ]
            for s in self.sessions.values():
                if s.kernel is not None:
                    s.kernel.was_busy = False
            beat = {"type": "heartbeat", "telemetry": telemetry, "busy_sessions": busy}
            try:
                _write(conn, json.dumps(beat))
            except ConnectionClosed:
                return
            await asyncio.sleep(interval)

    def _parse(self, message: str | bytes) -> dict[str, Any] | None:
        try:
            record = json.loads(message)
        except ValueError:
            return None
        return record if isinstance(record, dict) else None

    def _dispatch(self, message: str) -> None:
        record = self._parse(message)
        if record is None:
            self.log.warning("ignored a malformed control message")
            return
        kind = record.get("type")
        if kind == "start_kernel":
            self._start_kernel(record)
        elif kind == "stop_kernel":
            sid = str(record.get("session_id"))
            session = self.sessions.get(sid)
            if session is None:
                ended = {"type": "kernel_ended", "session_id": sid, "reason": "stopped"}
                self.send_control({**ended, "exit_code": None})
            else:
                self.log.info("stopping session %s (%s)", sid, record.get("reason", ""))
                self._spawn(session.stop())
        elif kind == "interrupt_kernel":
            session = self.sessions.get(str(record.get("session_id")))
            if session is not None and session.kernel is not None:
                session.kernel.interrupt()
        elif kind == "welcome":
            self.host_id = str(record.get("host_id", self.host_id))
        elif kind == "error":  # the broker refused one of our messages, and says why
            self.log.warning("broker: %s", str(record.get("message"))[:1000])
        else:
            self.log.debug("ignored control message %r", kind)

    def _start_kernel(self, record: dict[str, Any]) -> None:
        assert self.inventory is not None
        sid = record.get("session_id")
        if not isinstance(sid, str) or not 0 < len(sid) <= 128:
            self.log.warning("ignored start_kernel without a valid session_id")
            return

        def fail(message: str) -> None:
            self.log.warning("refused session %s: %s", sid, message)
            self.send_control({"type": "kernel_failed", "session_id": sid, "message": message})

        if sid in self.sessions:
            existing = self.sessions[sid]
            if existing.state == "ready":
                self.send_control({"type": "kernel_ready", "session_id": sid})
            return
        if self._stopping:
            return fail("host agent is shutting down")
        refusal = self._schedule_refusal()
        if refusal:
            return fail(refusal)
        live = [s for s in self.sessions.values() if s.state != "ended"]
        if len(live) >= self.max_kernels:
            return fail(f"host is running its maximum of {self.max_kernels} kernels")
        indices = record.get("gpu_indices") or []
        if not isinstance(indices, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in indices
        ):
            return fail("gpu_indices must be a list of integers")
        offered = set(self.inventory.indices)
        if set(indices) - offered:
            return fail(f"GPUs {sorted(set(indices) - offered)} are not offered by this host")
        busy = set(indices) & {i for s in live for i in s.gpu_indices}
        if busy and not self.share_gpus:
            return fail(f"GPUs {sorted(busy)} are already rented")
        relay_path = record.get("relay_path")
        if (
            not isinstance(relay_path, str)
            or not relay_path.startswith("/")
            or relay_path.startswith("//")
            or RELAY_MARK not in relay_path
        ):
            return fail("relay_path must be a broker path under /gpu-share/api/relay/")
        if self.selftest_runner is not None:
            self.selftest_runner.yield_to(list(indices))
        session = HostSession(self, sid, list(indices), relay_path)
        self.sessions[sid] = session
        self.log.info("starting session %s on GPUs %s", sid, indices)
        session.launch()

    def new_kernel(
        self,
        name: str,
        key: str,
        signature_scheme: str,
        gpu_indices: list[int],
        on_message: Any,
        on_exit: Any,
    ) -> RemoteKernel | GatewayKernel:
        """A kernel (not yet started) on these GPUs, in this host's sandbox or gateway."""
        gpus = self.gpu_info(gpu_indices)
        if self.gateway_url:
            return GatewayKernel(
                name,
                self.host_id or "",
                key,
                on_message,
                on_exit,
                gateway_url=self.gateway_url,
                gateway_token=self.gateway_token,
                kernel_name=self.gateway_kernel_name,
                signature_scheme=signature_scheme,
                gpu_indices=gpu_indices,
                gpu_uuids=[gpu.uuid for gpu in gpus if gpu.uuid],
                ready_timeout=self.kernel_start_timeout,
                stop_grace=self.kernel_stop_grace,
                max_message_size=self.max_message_size,
                logger=self.log,
            )
        return RemoteKernel(
            name,
            self.host_id or "",
            key,
            on_message,
            on_exit,
            signature_scheme=signature_scheme,
            gpu_indices=gpu_indices,
            gpu_minors=[gpu.index if gpu.minor_number is None else gpu.minor_number for gpu in gpus]
            if gpus
            else None,
            gpu_uuids=[gpu.uuid for gpu in gpus if gpu.uuid],
            sandbox=self.sandbox_impl,
            scratch_root=self.scratch_root,
            ready_timeout=self.kernel_start_timeout,
            stop_grace=self.kernel_stop_grace,
            logger=self.log,
            run_dir=self.run_dir,
            scratch_quota_mib=self.scratch_quota_mib if self.sandbox_impl is not None else 0,
        )

    async def _start_warm(self, warm: WarmKernel) -> None:
        warm.kernel = self.new_kernel(
            warm.name,
            warm.key,
            "hmac-sha256",
            list(warm.gpu_indices),
            warm.route_message,
            warm.route_exit,
        )
        await warm.kernel.start()

    def send_control(self, record: dict[str, Any]) -> None:
        """Send a record to the broker now, or after the next welcome if disconnected."""
        if self._control is not None:
            try:
                _write(self._control, json.dumps(record))
                return
            except ConnectionClosed:
                self._control = None
        self._pending.append(record)

    def forget(self, session: HostSession) -> None:
        """Drop an ended session; restart the idle command after the last one."""
        if self.sessions.get(session.session_id) is session:
            del self.sessions[session.session_id]
        if self.idle is not None and not self._stopping and not self._live_sessions():
            self._spawn(self._resume_idle())

    def _live_sessions(self) -> list[HostSession]:
        return [s for s in self.sessions.values() if s.state != "ended"]

    # -- sandbox, schedule and idle workload ---------------------------------------------

    def _log_sandbox(self) -> None:
        if self.gateway_url:
            self.log.info(
                "kernels start on the gateway %s (kernel %s); the local sandbox does not "
                "apply to them: the gateway isolates its kernels",
                self.gateway_url,
                self.gateway_kernel_name,
            )
            return
        sandbox = self.sandbox_impl
        if sandbox is None or sandbox.kind == "none":
            self.log.warning(NO_SANDBOX_WARNING)
            return
        enforced, missing = sandbox.enforcement()
        limits = sandbox.limits
        self.log.info(
            "kernels run in a %s sandbox (%s; memory %s, processes %s, open files %s)",
            sandbox.kind,
            ", ".join(enforced),
            f"{limits.memory_mib} MiB" if limits.memory_mib else "-",
            limits.max_processes or "-",
            limits.max_open_files or "-",
        )
        for name, reason in missing.items():
            self.log.warning("NOT ENFORCED: %s: %s", name, reason)

    async def _clean_previous_run(self) -> None:
        """Take this scratch root for this agent, and clear what a crashed one left in it:
        kernels still running, their scratch folders and connection files (with keys)."""
        if self.gateway_url:
            return
        self.run_dir = RunDir(run_dir_root(self.scratch_root))
        os.makedirs(self.scratch_root, mode=0o700, exist_ok=True)
        try:
            self.run_dir.acquire()
        except AgentAlreadyRunning as err:
            self.run_dir = None
            raise AgentConfigError(str(err)) from None
        report = await asyncio.get_running_loop().run_in_executor(
            None, clean_leftovers, self.run_dir, self.scratch_root, self.log
        )
        stale = await asyncio.get_running_loop().run_in_executor(
            None, cleanup_stale, cgroup_prefix(self.scratch_root)
        )
        if report or stale:
            extra = f", {len(stale)} stale cgroup(s)" if stale else ""
            self.log.warning("%s%s", report.summary(), extra)

    async def pause_idle(self) -> None:
        """Stop the idle command before a renter's kernel starts."""
        if self.idle is not None and self.idle.running:
            self.log.info("stopping the idle command for a renter's kernel")
            await self.idle.stop()

    async def _resume_idle(self) -> None:
        if self.idle is not None and not self._stopping and not self._live_sessions():
            await self.idle.start()

    def _schedule_refusal(self) -> str | None:
        """Why a new session cannot start now because of the schedule, or None."""
        if self.schedule_impl is None:
            return None
        now = self.now()
        if not self.schedule_impl.is_open(now):
            opens = self.schedule_impl.next_open(now)
            when = f"; it opens again {opens:%a %H:%M}" if opens is not None else ""
            return f"this host is outside its availability window{when}"
        closes = self.schedule_impl.closes_at(now)
        if closes is not None and (closes - now).total_seconds() < self.min_session_minutes * 60:
            return (
                f"this host's availability window closes at {closes:%H:%M}, less than "
                f"{self.min_session_minutes:g} minutes from now"
            )
        return None

    async def _watch_schedule(self) -> None:
        while not self._stopping:
            try:
                self.check_schedule()
            except Exception:
                self.log.exception("availability schedule check failed")
            await asyncio.sleep(self.schedule_wait())

    def schedule_wait(self) -> float:
        """Seconds to the next schedule check: the poll interval, or less to land on the
        window's close and on its warning (the stop is then at the close, not up to a poll
        interval after it: billing ends there)."""
        wait = self.schedule_poll_interval
        schedule = self.schedule_impl
        closes = schedule.closes_at(self.now()) if schedule is not None else None
        if closes is not None:
            left = (closes - self.now()).total_seconds()
            warn_in = left - self.schedule_warning_minutes * 60
            for due in (left, warn_in):
                if due > 0:
                    wait = min(wait, due + 0.01)
        return max(wait, 0.01)

    def check_schedule(self) -> None:
        """Follow the availability windows: offers, warnings, and stops at the close."""
        schedule = self.schedule_impl
        if schedule is None:
            return
        now = self.now()
        is_open = schedule.is_open(now)
        if is_open != self.offering:
            self.log.info(
                "availability window %s: %s offers",
                "opened" if is_open else "closed",
                "sending" if is_open else "withdrawing",
            )
            if self._control is not None:
                self.send_control(self.hello())  # a new hello replaces the offers
            else:
                self.offering = is_open  # the next connect's hello carries the change
        if not is_open:
            for session in self._live_sessions():
                if not session._closing:
                    self.log.info("session %s: availability window closed", session.session_id)
                    self._spawn(session.stop(message="availability window closed"))
            return
        closes = schedule.closes_at(now)
        if closes is None:
            return
        if (closes - now).total_seconds() <= self.schedule_warning_minutes * 60:
            text = f"this host's availability window closes at {closes:%H:%M}; save your work"
            for session in self._live_sessions():
                if session.state == "ready" and session.warned_close != closes:
                    session.warned_close = closes
                    session.send_status(text)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- stopping -----------------------------------------------------------------------

    async def stop(self) -> None:
        """Stop every kernel, report them ended, and close the broker connection."""
        if self._stopping:
            return
        self._stopping = True
        await self._stop_sessions()
        if self._stop_event is not None:
            self._stop_event.set()
        if self._control is not None:
            self._control.close(1000, "host agent shutting down")

    def request_stop(self) -> None:
        """Ask the agent to stop (safe from a signal handler)."""
        self._spawn(self.stop())

    async def _stop_sessions(self) -> None:
        sessions = list(self.sessions.values())
        if sessions:
            self.log.info("stopping %d kernel(s)", len(sessions))
            await asyncio.gather(*(s.stop() for s in sessions), return_exceptions=True)

    async def _shutdown(self) -> None:
        self._stopping = True
        await self._stop_sessions()
        for task in list(self._tasks):
            if task is not asyncio.current_task():
                task.cancel()
        if self.warm_pool is not None:
            await self.warm_pool.close()
        if self.selftest_runner is not None:
            await self.selftest_runner.close()
        if self.idle is not None:
            await self.idle.stop()
        if self.inventory is not None:
            self.inventory.close()
        if self.run_dir is not None:
            self.run_dir.close()
            self.run_dir = None
