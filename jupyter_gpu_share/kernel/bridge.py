"""The user-side bridge: local ZMQ ports that look like a kernel, relayed to a remote one.

jupyter_server, nbclient and every Jupyter client connect to the bridge's ports as to a local
kernel. The bridge copies each multipart message, unchanged, over the broker relay websocket
to the host agent, and back. It runs on its own event-loop thread so it keeps relaying
whatever the caller's loop is doing (nbclient, a sync KernelManager, jupyter_server).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from typing import Any, TypeVar
from urllib.parse import urljoin, urlsplit

import zmq
import zmq.asyncio
from jupyter_client.session import Session

from .. import wire
from ..files.transfer import TransferError, drained
from ..transport import tls
from ..transport.websocket import ClientEnd, ConnectionClosed, HandshakeError, connect
from ..zmqpump import SocketPump
from .files import BridgeFiles, describe
from .kernel_info import KernelInfoAnswer
from .outputs import OutputLog
from .resend import Unanswered
from .stop_notice import WaitingReplies

log = logging.getLogger("jupyter_gpu_share.bridge")

T = TypeVar("T")

CLOSE_REASONS = {
    4000: "stopped",
    4001: "host lost",
    4002: "credit exhausted",
    4003: "kernel exited",
    4004: "start failed",
    4007: "quota reached",
    4009: "spending cap reached",
    4010: "idle",
}
MAX_MESSAGE_SIZE = 256 * 1024 * 1024
# Below common proxies' idle timeouts (nginx's proxy_read_timeout: 60 s by default), so
# a quiet kernel's relay is not cut by one; a relay silent for two of them is dead.
RELAY_PING_S = 25.0


async def _written(future: Any) -> None:
    """Wait for a write where the connection says to (while its buffer drains)."""
    if future is not None:
        await future


def _consume(future: asyncio.Future[Any]) -> None:
    """Retrieve a write's outcome (a closed relay is handled by the reader)."""
    if not future.cancelled():
        future.exception()


class BridgeLoop:
    """One daemon thread running an asyncio loop for all bridges of this process."""

    _instance: BridgeLoop | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.context = zmq.asyncio.Context()
        self.thread = threading.Thread(target=self._run, name="gpu-share-bridge", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    @classmethod
    def get(cls) -> BridgeLoop:
        """Return the process's bridge loop, starting it on first use."""
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def submit(self, coroutine: Awaitable[T]) -> Future[T]:
        """Run a coroutine on the bridge loop from any thread."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)  # type: ignore[arg-type]

    async def run(self, coroutine: Awaitable[T]) -> T:
        """Await a coroutine on the bridge loop from another event loop."""
        return await asyncio.wrap_future(self.submit(coroutine))


class InlineLoop:
    """Run bridges on the caller's event loop: jupyter_server's, which never stops.

    No thread hop on the hot path; used when the kernel manager is jupyter_server's
    (an IOLoop kernel manager), the thread otherwise.
    """

    _instance: InlineLoop | None = None

    def __init__(self) -> None:
        self.context = zmq.asyncio.Context()

    @classmethod
    def get(cls) -> InlineLoop:
        """Return the process's inline loop."""
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    async def run(self, coroutine: Awaitable[T]) -> T:
        """Await the coroutine right here."""
        return await coroutine


class KernelBridge:
    """Local kernel ports for one kernel, relayed to whichever remote session is attached."""

    def __init__(
        self,
        loop: BridgeLoop | InlineLoop,
        transport: str = "tcp",
        context: zmq.Context[Any] | None = None,
    ):
        self.loop = loop
        self.transport = transport
        # With the context of the kernel manager that connects to it, each port is also
        # bound in-process (inproc://), which costs no socket I/O and no copy.
        self.context = context
        self.inproc_urls: dict[str, str] = {}
        # tcp: the loopback address; ipc: the path prefix of the sockets, in a private folder.
        self.ip = "127.0.0.1"
        self._ipc_dir: str | None = None
        if transport == "ipc":
            self._ipc_dir = tempfile.mkdtemp(prefix="gpu-share-bridge-")
            self.ip = os.path.join(self._ipc_dir, "kernel")
        self.ports: dict[str, int] = {}
        self.pumps: dict[int, SocketPump] = {}
        self.hb: SocketPump | None = None
        self.ws: ClientEnd | None = None
        self.session_id: str | None = None
        self.ready = asyncio.Event()
        self.ended = asyncio.Event()
        self.end_reason: str | None = None
        self.exit_code: int | None = None
        self._relay_task: asyncio.Task[Any] | None = None
        self.on_status: Callable[[str], None] | None = None
        self.notices: list[str] = []
        self.kernel_key: tuple[str, str] | None = None
        self.reconnect_timeout = 60.0
        self._relay: tuple[str, str, str] = ("", "", "")
        self._relay_urls: list[str] = []
        # Until a request other than kernel_info goes to the kernel, kernel_info is answered
        # here from the reply the host sent with kernel_ready (see kernel_info.py).
        self.kernel_info = KernelInfoAnswer()
        self._forwarded = False  # a request went to the kernel since this attach
        # While the relay reconnects, what the user's server sends waits here (a batch a
        # channel; the channel's socket is not read meanwhile, so the rest waits in ZMQ),
        # and the requests the kernel has not answered yet are sent again after.
        self._away = False
        self._held: list[tuple[int, list[list[Any]]]] = []
        self.unanswered = Unanswered()
        # The cells running when the broker ends the session are told why (stop_notice.py).
        self.waiting = WaitingReplies()
        self._kernel_identity: dict[str, str] = {}
        self._untold: list[str] = []  # notices that came while no cell ran: for the next
        # The notebook's folder on the host and back (files.py); with a folder, what the
        # kernel wrote comes back before a shutdown_request reaches it.
        self.files = BridgeFiles(self._write_files, self._send_files_record)
        # What the lab's cells printed, for a browser that comes back (outputs.py).
        self.outputs = OutputLog()
        self.sync_on_shutdown = True
        self.shutdown_sync_timeout = 300.0
        self._shutting_down = False
        self._shutdown_sync: asyncio.Future[None] | None = None
        self._sync_task: asyncio.Future[None] | None = None

    # -- runs on the bridge loop ------------------------------------------------------------

    def _bind(self, sock: zmq.Socket, number: int) -> int:
        if self.transport == "ipc":
            # jupyter_client names ipc endpoints "<ip>-<port>".
            sock.bind(f"ipc://{self.ip}-{number}")
            return number
        return sock.bind_to_random_port(f"tcp://{self.ip}")

    def _bind_inproc(self, sock: zmq.Socket, name: str) -> None:
        if self.context is not None:
            url = self.inproc_urls[name] = f"inproc://gpu-share-bridge-{id(self):x}-{name}"
            sock.bind(url)

    async def bind(self) -> dict[str, int]:
        """Bind the five kernel ports (loopback tcp or private ipc, and in-process where a
        context was given) and start the pumps."""
        context = zmq.Context.shadow((self.context or self.loop.context).underlying)
        kinds = {"shell": zmq.ROUTER, "iopub": zmq.PUB, "stdin": zmq.ROUTER, "control": zmq.ROUTER}
        for number, (name, kind) in enumerate(kinds.items(), start=1):
            sock = context.socket(kind)
            sock.linger = 0
            if kind == zmq.ROUTER:
                sock.router_handover = 1
            self.ports[f"{name}_port"] = self._bind(sock, number)
            self._bind_inproc(sock, name)
            channel = wire.CHANNELS[name]
            receive = None if kind == zmq.PUB else functools.partial(self._to_relay, channel)
            self.pumps[channel] = SocketPump(sock, receive)
        # A ROUTER, not a REP: a dead kernel's pings can go unanswered without wedging it.
        hb = context.socket(zmq.ROUTER)
        hb.linger = 0
        self.ports["hb_port"] = self._bind(hb, len(kinds) + 1)
        self._bind_inproc(hb, "hb")
        self.hb = SocketPump(hb, self._answer_heartbeats)
        return dict(self.ports)

    async def restore_endpoints(self) -> None:
        """Re-create ipc socket files (jupyter_client deletes them on every kernel cleanup)."""
        if self.transport != "ipc":
            return
        for name, pump in [
            *((n, self.pumps.get(wire.CHANNELS[n])) for n in wire.CHANNELS),
            ("hb", self.hb),
        ]:
            if pump is None:
                continue
            endpoint = f"ipc://{self.ip}-{self.ports[f'{name}_port']}"
            if not os.path.exists(endpoint[len("ipc://") :]):
                pump.sock.unbind(endpoint)
                pump.sock.bind(endpoint)

    def _to_relay(self, channel: int, batch: list[list[Any]]) -> None:
        """Copy what the user's server sent on one channel to the relay, in one write."""
        ws = self.ws
        if ws is None or self.ended.is_set():
            return  # no kernel attached: the messages have nowhere to go
        if channel != wire.STDIN:
            if self.kernel_info.armed:
                batch = self._answer_here(channel, batch)
                if not batch:
                    return
            self._forwarded = True
        if channel == wire.CONTROL and self._sync_first(batch):
            return
        if channel == wire.SHELL:
            for frames in batch:
                self.outputs.requested(frames)
        if self._away:
            self._hold(channel, batch)
            return
        try:
            written = ws.write_many([wire.encode_parts(channel, frames) for frames in batch])
        except ConnectionClosed:  # it dropped: the pump reconnects, then this goes
            self._hold(channel, batch)
            return
        self._note_sent(channel, batch)
        if channel == wire.SHELL and self._untold and len(self.waiting):
            self._tell_notices()
        if written is None:
            return  # written at once (under the relay's buffer limit)
        # Back-pressure: read no more from this channel until the relay has drained.
        pump = self.pumps[channel]
        pump.pause_reading(True)
        written.add_done_callback(lambda future: (_consume(future), pump.pause_reading(False)))

    def _sync_first(self, batch: list[list[Any]]) -> bool:
        """A shutdown_request to a kernel whose folder came with it: bring back what the
        kernel wrote first, then pass the request on (True: it waits for that)."""
        if (
            not self.sync_on_shutdown
            or self.files.root is None
            or self._shutting_down
            or not any(wire.message_type(frames) == "shutdown_request" for frames in batch)
        ):
            return False
        self._shutting_down = True
        pump = self.pumps[wire.CONTROL]
        pump.pause_reading(True)

        async def sync_then_send() -> None:
            try:
                await self._bring_back("before its shutdown")
            finally:
                pump.pause_reading(False)
                self._to_relay(wire.CONTROL, batch)

        self._shutdown_sync = asyncio.ensure_future(sync_then_send())
        return True

    def _bring_back_on_demand(self) -> None:
        """``%gpu_share sync`` in the kernel: bring its files back, and say so in the next
        cell (the one that asked has ended by then)."""
        if self._sync_task is not None and not self._sync_task.done():
            return

        async def bring_back() -> None:
            text = await self._bring_back("on demand")
            if text is not None:
                self._untold = [*self._untold, f"gpu-share: {text}"][-5:]
                if len(self.waiting):
                    self._tell_notices()

        self._sync_task = asyncio.ensure_future(bring_back())

    async def _bring_back(self, when: str) -> str | None:
        """Bring the kernel's files back; the line that says how it went (logged), None
        after an error that is not the transfer's (logged with its traceback)."""
        try:
            text = describe(await self.files.get(timeout=self.shutdown_sync_timeout))
        except TransferError as error:
            text = f"the kernel's files did not come back: {error}"
        except Exception:
            log.exception("session %s: bringing files back %s", self.session_id, when)
            return None
        log.info("session %s: %s, %s", self.session_id, when, text)
        return text

    async def shutdown_synced(self, start_within: float = 1.0) -> None:
        """Wait for the files to come back before a shutdown (jupyter_client waits on
        this before it starts the kernel's shutdown clock): for the hold to begin, since
        the shutdown_request may still be on its way to the bridge, then for it to end."""
        if not self.sync_on_shutdown or self.files.root is None or self.ended.is_set():
            return
        deadline = asyncio.get_running_loop().time() + start_within
        while self._shutdown_sync is None and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        if self._shutdown_sync is not None:
            await asyncio.wait({self._shutdown_sync}, timeout=self.shutdown_sync_timeout + 5)

    async def _write_files(self, message: bytes) -> None:
        """One chunk of files to the host, after the relay has drained what it holds."""
        ws = self.ws
        if ws is None or self._away:
            raise TransferError("the relay is reconnecting")
        if self.ended.is_set():
            raise TransferError(f"the session ended ({self.end_reason})")
        try:
            written = ws.write_message(message, binary=True)
        except ConnectionClosed:
            raise TransferError("the relay dropped") from None
        await drained(ws, written)

    async def _send_files_record(self, record: dict[str, Any]) -> None:
        ws = self.ws
        if ws is None or self._away or self.ended.is_set():
            raise TransferError("the relay is not connected")
        try:
            await _written(ws.write_message(json.dumps(record)))
        except ConnectionClosed:
            raise TransferError("the relay dropped") from None

    def _hold(self, channel: int, batch: list[list[Any]]) -> None:
        """Keep what came while the relay is away, and read no more of that channel."""
        self._held.append((channel, batch))
        self.pumps[channel].pause_reading(True)

    def _note_sent(self, channel: int, batch: list[list[Any]]) -> None:
        """Requests written to the relay: kept until the kernel answers (resend.py,
        stop_notice.py)."""
        if channel != wire.STDIN:
            self.unanswered.sent(channel, batch)
        if channel == wire.SHELL:
            self.waiting.sent(batch)

    def _back(self, ws: ClientEnd) -> None:
        """The relay reconnected: send the unanswered requests again, then what was held,
        in order, and read the channels again."""
        parts = [wire.encode_parts(c, frames) for c, frames in self.unanswered.pending()]
        resent = len(parts)
        for channel, batch in self._held:
            parts += [wire.encode_parts(channel, frames) for frames in batch]
            self._note_sent(channel, batch)
        if parts:
            log.info(
                "relay of session %s: %d unanswered request(s) sent again, %d held sent",
                self.session_id,
                resent,
                len(parts) - resent,
            )
            with contextlib.suppress(ConnectionClosed):
                written = ws.write_many(parts)
                if written is not None:
                    written.add_done_callback(_consume)
        self._resume_all()

    def _answer_here(self, channel: int, batch: list[list[Any]]) -> list[list[Any]]:
        """Answer the kernel_info_requests at the head of a batch; the rest is the kernel's."""
        pump, iopub = self.pumps[channel], self.pumps[wire.IOPUB]
        for index, frames in enumerate(batch):
            if not self.kernel_info.take(frames, pump.send, iopub.send):
                return batch[index:]
        return []

    def _answer_heartbeats(self, pings: list[list[Any]]) -> None:
        # Answer only while a live remote kernel is attached, so clients see a dead kernel.
        if self.ws is not None and not self.ended.is_set() and self.hb is not None:
            for ping in pings:
                self.hb.send(ping)

    async def attach(
        self, url: str | list[str], token: str, session_id: str, key: bytes, scheme: str
    ) -> None:
        """Connect to a session's relay and hand the host the kernel's HMAC key. ``url``
        may be the relay's URL on each broker of one service, in order: a relay that drops
        reconnects along the list."""
        self.session_id = session_id
        self.ready.clear()
        self.ended.clear()
        self.end_reason = None
        self.exit_code = None
        self.kernel_key = None
        self.kernel_info.disarm()
        self._forwarded = False
        self._resume_all()
        self.unanswered.clear()
        self.waiting.clear()
        self._kernel_identity = {}
        self._untold = []
        self._shutting_down = False
        self._shutdown_sync = None
        self._relay_urls = [url] if isinstance(url, str) else list(url)
        self._relay = (
            self._relay_urls[0],
            token,
            json.dumps({"type": "hello", "key": key.decode(), "signature_scheme": scheme}),
        )
        self.ws = await self._connect_first()
        self._relay_task = asyncio.ensure_future(self._pump_from_relay())

    async def _connect_first(self) -> ClientEnd:
        """The relay on the first broker of the list that can be reached (the session's
        start may have gone to a later one, when the first was down)."""
        _, token, hello = self._relay
        for index, candidate in enumerate(self._relay_urls):
            self._relay = (candidate, token, hello)
            try:
                return await self._connect_relay()
            except (OSError, asyncio.TimeoutError, HandshakeError) as error:
                fatal = isinstance(error, HandshakeError) and error.code in (401, 403, 404, 410)
                if fatal or index == len(self._relay_urls) - 1:
                    raise
        raise AssertionError("unreachable")

    async def _connect_relay(self) -> ClientEnd:
        url, token, hello = self._relay
        try:
            ws = await self._open(url, token)
        except HandshakeError as error:
            # Several brokers: the session's host is served by another one; its relay is
            # there. One redirect, never from https to http (the token goes with it).
            target = relay_redirect(url, error)
            if target is None:
                raise
            log.info("relay of session %s is at %s", self.session_id, target)
            ws = await self._open(target, token)
        # The host ignores a repeated hello with the same key (after a reconnect).
        await _written(ws.write_message(hello))
        return ws

    async def _open(self, url: str, token: str) -> ClientEnd:
        return await connect(
            url,
            headers={"Authorization": f"Bearer {token}"},
            ssl_context=tls.context_for(url),  # the system's CAs and $GPU_SHARE_CA_FILE
            max_message_size=MAX_MESSAGE_SIZE,
            ping_interval=RELAY_PING_S,
            connect_timeout=20,
            handshake_timeout=60,
        )

    async def _reconnect(self) -> ClientEnd | None:
        """Reconnect after the broker went away (not after it ended the session): to the
        next broker of the list at once, around the list backing off."""
        delay, deadline = 0.25, asyncio.get_running_loop().time() + self.reconnect_timeout
        urls, tried = self._relay_urls, 0
        while asyncio.get_running_loop().time() < deadline:
            if len(urls) > 1:  # the next broker of the service
                url, token, hello = self._relay
                self._relay = (urls[(urls.index(url) + 1) % len(urls)], token, hello)
                tried += 1
            if tried == 0 or tried >= len(urls):
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            try:
                ws = await self._connect_relay()
            except HandshakeError as error:
                if error.code in (401, 403, 404, 410):
                    self._mark_ended("the session ended while the broker was unreachable", 1)
                    return None
            except (OSError, asyncio.TimeoutError):
                pass
            else:
                log.info("relay of session %s reconnected to %s", self.session_id, self._relay[0])
                return ws
        self._mark_ended(f"the broker was unreachable for {self.reconnect_timeout:.0f} s", 1)
        return None

    async def _pump_from_relay(self) -> None:
        ws = self.ws
        while ws is not None and ws is self.ws:
            ws.deliver_to(self._from_relay)  # read_message now only reports the close
            message = await ws.read_message()
            if message is None:
                if ws is not self.ws:
                    return  # detached on purpose
                code = ws.close_code
                if code is not None and 4000 <= code < 4100:
                    reason = ws.close_reason or CLOSE_REASONS.get(code, "relay closed")
                    self._tell_running_cells(reason)
                    self._mark_ended(reason, 0 if code in (4000, 4003) else 1)
                    return
                log.warning(
                    "relay of session %s dropped (code %s); reconnecting", self.session_id, code
                )
                self._away = True
                ws = self.ws = await self._reconnect()
                if ws is not None:
                    self._back(ws)
                continue
            self._from_relay(message)

    def _from_relay(self, message: str | bytes | bytearray) -> None:
        """One message from the host: kernel frames to their local port, or a record."""
        if isinstance(message, str):
            self._on_control(json.loads(message))
            return
        try:
            channel, frames = wire.decode(message)
        except wire.FrameError as error:
            log.warning("dropping a malformed relay message: %s", error)
            return
        if channel == wire.FILES:
            self.files.chunk(frames)
            return
        if len(self.unanswered) and channel != wire.STDIN:
            self.unanswered.seen(frames)
        if channel == wire.SHELL and len(self.waiting):
            self.waiting.replied(frames)
        elif channel == wire.IOPUB:
            self.outputs.published(frames)
            if self.files.root is not None and _asks_sync(frames):
                self._bring_back_on_demand()
        # Zero-copy only pays for big messages; for small ones it costs more.
        copy = wire.total_size(frames) < wire.ZERO_COPY_ABOVE
        pump = self.pumps.get(channel)
        if pump is not None and not pump.closed:
            pump.send(frames, copy=copy)

    def _on_control(self, record: dict[str, Any]) -> None:
        kind = record.get("type")
        if kind == "kernel_ready":
            if isinstance(record.get("key"), str):
                # A warm kernel, started before we asked: its key is the host's, adopt it.
                self.kernel_key = (
                    record["key"],
                    str(record.get("signature_scheme", "hmac-sha256")),
                )
            identity = {
                name: record[field]
                for name, field in (("session", "kernel_session"), ("username", "kernel_username"))
                if isinstance(record.get(field), str)
            }
            if identity:
                self._kernel_identity = identity
            # The first ready of this attach, with nothing sent to the kernel yet: it is idle
            # (a later one, after a reconnect, may come while a cell runs).
            if not self.ready.is_set() and not self._forwarded and self.kernel_key is not None:
                self.kernel_info.arm(
                    record.get("kernel_info"),
                    *self.kernel_key,
                    session=record.get("kernel_session"),
                    username=record.get("kernel_username"),
                )
            self.ready.set()
        elif kind == "kernel_ended":
            reason = str(record.get("reason", "kernel exited"))[:200]
            message = record.get("message")
            # The host's own words say more than its reason ("stopped by the host: out of
            # memory (limit 1024 MiB)" over "host_limit").
            told = f"{reason}: {str(message)[:300]}" if isinstance(message, str) else reason
            if reason != "exited":  # a kernel that ended as its shutdown_request asked
                self._tell_running_cells(told)
            self._mark_ended(reason, int(record.get("exit_code") or 0))
        elif kind in ("files_done", "files_end", "files_error"):
            self.files.record(record)
        elif kind == "status":
            message = str(record.get("message", ""))[:500]
            self.notices.append(message)
            del self.notices[:-20]
            # Shown in the running cell, or else in the next one that runs.
            self._untold = [*self._untold, message][-5:]
            if len(self.waiting):
                self._tell_notices()
            if self.on_status is not None:
                self.on_status(message)
            running = self._sync_task is not None and not self._sync_task.done()
            if record.get("sync") is True and self.files.root is not None and not running:
                # The broker is about to stop the kernel (idle): its files come back now.
                self._sync_task = asyncio.ensure_future(self._bring_back("before its stop"))

    def _kernel_session(self) -> Session | None:
        """A session that signs as the kernel does (None: no key known yet)."""
        if self.kernel_key is None:
            return None
        key, scheme = self.kernel_key
        return Session(key=key.encode(), signature_scheme=scheme, **self._kernel_identity)

    def _tell_notices(self) -> None:
        session, iopub = self._kernel_session(), self.pumps.get(wire.IOPUB)
        if session is None or iopub is None:
            return
        running = self.waiting.oldest()  # the kernel runs its cells in order
        for text in self._untold:
            self.waiting.tell(session, text, iopub.send, only=running)
        self._untold = []

    def _tell_running_cells(self, reason: str) -> None:
        """Answer the execute requests still waiting with why the session ended, before
        the kernel's heartbeat goes quiet (a client then reads the reason, not a death)."""
        session = self._kernel_session()
        if not len(self.waiting) or session is None or self.ended.is_set():
            return
        shell, iopub = self.pumps.get(wire.SHELL), self.pumps.get(wire.IOPUB)
        if shell is None or iopub is None:
            return
        told = self.waiting.answer_all(session, reason, shell.send, iopub.send)
        if told:
            log.info(
                "session %s ended (%s): told %d running cell(s)", self.session_id, reason, told
            )

    def _resume_all(self) -> None:
        """Forget what was held while away and read every channel again (a session that
        ended while away, or a new attach, must not leave a channel unread)."""
        held, self._held, self._away = self._held, [], False
        for channel in {c for c, _ in held}:
            pump = self.pumps.get(channel)
            if pump is not None:
                pump.pause_reading(False)

    def _mark_ended(self, reason: str, exit_code: int) -> None:
        if not self.ended.is_set():
            self.end_reason = reason
            self.exit_code = exit_code
            self.ended.set()
            self.files.ended(reason)

    async def mark_stopped(self) -> None:
        """Record that the session was stopped on purpose."""
        self._mark_ended("stopped", 0)

    async def wait_ready(self, timeout: float) -> None:
        """Wait until the host reports the kernel ready, or raise with the reason it ended."""
        ready = asyncio.ensure_future(self.ready.wait())
        ended = asyncio.ensure_future(self.ended.wait())
        done, pending = await asyncio.wait(
            {ready, ended}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        for task in pending:
            task.cancel()
        if ready in done and not self.ended.is_set():
            return
        if self.ended.is_set():
            raise RuntimeError(f"the remote kernel did not start: {self.end_reason}")
        raise TimeoutError(f"the remote kernel was not ready within {timeout:.0f} s")

    async def send_control(self, record: dict[str, Any]) -> None:
        """Send a small JSON record (a signal) to the host over the relay."""
        if self.ws is not None and not self.ended.is_set():
            with contextlib.suppress(ConnectionClosed):
                await _written(self.ws.write_message(json.dumps(record)))

    async def detach(self) -> None:
        """Drop the remote session but keep the local ports (a restart attaches a new one)."""
        ws, self.ws = self.ws, None
        if ws is not None:
            ws.close()
        if self._relay_task is not None:
            self._relay_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._relay_task
            self._relay_task = None
        self._mark_ended(self.end_reason or "detached", self.exit_code or 0)

    async def close(self) -> None:
        """Detach and close the local ports."""
        await self.detach()
        for pump in [*self.pumps.values(), self.hb]:
            if pump is not None:
                pump.close(linger=0)
        self.pumps.clear()
        self.hb = None
        if self._ipc_dir is not None:
            shutil.rmtree(self._ipc_dir, ignore_errors=True)


_SYNC_TARGET = b'"gpu_share.sync"'


def _asks_sync(frames: list[memoryview]) -> bool:
    """Whether an iopub message is the kernel's ``%gpu_share sync``: a comm_open with the
    target ``gpu_share.sync`` (host/kernel_startup.py). Cheap on every other message."""
    # ipykernel publishes a comm's messages on the topic "comm-<id>" (6.x) or on none (7.x,
    # an empty ident): only those are read, every other iopub message has its topic.
    if not frames:
        return False
    topic = bytes(frames[0][:9])
    if topic != b"" and not topic.startswith(b"comm-") and topic != wire.DELIMITER:
        return False
    if wire.message_type(frames) != "comm_open":
        return False
    content = wire.part_after_delimiter(frames, 5) or b""
    return _SYNC_TARGET in content[:4096]


def relay_redirect(url: str, error: HandshakeError) -> str | None:
    """The ws(s) URL a relay's upgrade was redirected to (the broker that serves the
    session's host, several brokers on one store), or None: not a redirect, or one the
    bridge does not follow (no host, a scheme other than http(s) or ws(s), or from TLS to
    plain text: the token goes with it)."""
    if error.code not in (301, 302, 303, 307, 308) or not error.location:
        return None
    base = urlsplit(url)
    http_base = base._replace(scheme="https" if base.scheme.lower() == "wss" else "http")
    target = urlsplit(urljoin(http_base.geturl(), error.location.strip()))
    scheme = target.scheme.lower()
    if scheme not in ("http", "https", "ws", "wss") or not target.hostname:
        return None
    secure = scheme in ("https", "wss")
    if base.scheme.lower() == "wss" and not secure:
        return None
    followed = target._replace(scheme="wss" if secure else "ws").geturl()
    return None if followed == url else followed  # to itself: no way forward
