"""A renter's kernel on a Jupyter Kernel Gateway or Enterprise Gateway (``--gateway-url``).

Instead of launching a local ipykernel, the agent asks an existing gateway for a kernel
(``POST /api/kernels``) and talks to it over the gateway's kernel websocket
(``/api/kernels/<id>/channels``), so a cluster behind one gateway becomes one host.

This is the only place where the host parses kernel messages (the broker never does, and
:class:`~jupyter_gpu_share.host.kernels.RemoteKernel` relays frames unchanged). It has to:
the relay carries ZMQ multipart frames signed with the renter's HMAC key, while a gateway
speaks its websocket protocol and signs the kernel's messages with its own session key. So
:class:`GatewayKernel` translates both ways:

- relay -> gateway: the frames' signature is checked with the renter's key, the identity
  prefix is remembered under the message's ``msg_id``, and the four JSON parts and buffers
  go to the gateway, in the ``v1.kernel.websocket.jupyter.org`` binary protocol when the
  gateway offers it (the parts pass byte for byte) or else in the legacy JSON protocol;
- gateway -> relay: each message is signed again with the renter's key into ZMQ frames;
  replies on shell, control and stdin get the identity frames of the request they answer
  (or the last ones seen on that channel), iopub messages a topic frame, as ipykernel does.

Kernel Gateway passes a client's ``env`` only for names starting with ``KERNEL_`` unless
configured: start it with ``--JupyterWebsocketPersonality.env_whitelist=GPU_SHARE_SESSION_ID,
GPU_SHARE_HOST_ID,CUDA_VISIBLE_DEVICES`` (or ``KG_ENV_WHITELIST``); Enterprise Gateway
takes ``--EnterpriseGatewayApp.client_envs=...`` (``env_whitelist`` before 3.0). The same
values are also sent as ``KERNEL_GPU_SHARE_SESSION_ID`` and ``KERNEL_GPU_SHARE_HOST_ID``,
which pass everywhere. The agent's sandbox does not apply to gateway kernels: the gateway
(and its cluster) isolates them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import signal as signals
import struct
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from jupyter_client.jsonutil import json_default
from jupyter_client.session import DELIM, Session
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.websocket import WebSocketClientConnection, WebSocketClosedError, websocket_connect

from .. import wire
from .kernels import ExitCallback, KernelStartError, MessageCallback

log = logging.getLogger(__name__)

V1_PROTOCOL = "v1.kernel.websocket.jupyter.org"
MAX_REMEMBERED = 4096  # request msg_ids whose identities are kept for the replies
MAX_PENDING = 1024  # messages held while the gateway websocket reconnects


class GatewayError(RuntimeError):
    """The gateway refused or failed a request."""


def _consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


# -- websocket message formats ---------------------------------------------------------


def pack_v1(channel: str, parts: Sequence[bytes]) -> bytes:
    """Serialize [header, parent, metadata, content, *buffers] as a v1 websocket message."""
    name = channel.encode()
    offsets = [8 * (2 + len(parts) + 1)]
    offsets.append(offsets[-1] + len(name))
    for part in parts:
        offsets.append(offsets[-1] + len(part))
    head = struct.pack(f"<{len(offsets) + 1}Q", len(offsets), *offsets)
    return b"".join((head, name, *parts))


def unpack_v1(data: bytes) -> tuple[str, list[bytes]]:
    """Parse a v1 websocket message into its channel and parts."""
    if len(data) < 8:
        raise ValueError("v1 message shorter than its header")
    (count,) = struct.unpack_from("<Q", data)
    if not 2 <= count <= wire.MAX_FRAMES or len(data) < 8 * (count + 1):
        raise ValueError("bad v1 offset table")
    offsets = list(struct.unpack_from(f"<{count}Q", data, 8))
    if offsets != sorted(offsets) or offsets[-1] > len(data):
        raise ValueError("bad v1 offsets")
    channel = data[offsets[0] : offsets[1]].decode()
    parts = [data[offsets[i] : offsets[i + 1]] for i in range(1, count - 1)]
    return channel, parts


def pack_legacy_binary(msg: dict[str, Any], buffers: Sequence[bytes]) -> bytes:
    """Serialize a message with buffers in the legacy protocol's binary form."""
    body = json.dumps(msg, default=json_default).encode()
    chunks = [body, *buffers]
    offsets = [4 * (len(chunks) + 1)]
    for chunk in chunks[:-1]:
        offsets.append(offsets[-1] + len(chunk))
    return struct.pack(f"!{len(chunks) + 1}I", len(chunks), *offsets) + b"".join(chunks)


def unpack_legacy_binary(data: bytes) -> tuple[dict[str, Any], list[bytes]]:
    """Parse the legacy protocol's binary form into the message and its buffers."""
    (count,) = struct.unpack_from("!I", data)
    if not 1 <= count <= wire.MAX_FRAMES:
        raise ValueError("bad legacy binary message")
    offsets = [*struct.unpack_from(f"!{count}I", data, 4), len(data)]
    chunks = [data[offsets[i] : offsets[i + 1]] for i in range(count)]
    return json.loads(chunks[0]), chunks[1:]


def _http_url(base: str, path: str) -> str:
    parts = urlsplit(base.rstrip("/"))
    return urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/") + path, "", ""))


def _ws_url(base: str, path: str) -> str:
    parts = urlsplit(base.rstrip("/"))
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + path, "", ""))


class GatewayKernel:
    """One renter's kernel on a gateway: the same interface as RemoteKernel, less adopt()."""

    sandboxed = False
    scratch_dir: str | None = None
    runtime_dir: str | None = None

    def __init__(
        self,
        session_id: str,
        host_id: str,
        key: bytes | str,
        on_kernel_message: MessageCallback,
        on_exit: ExitCallback | None = None,
        *,
        gateway_url: str,
        gateway_token: str = "",
        kernel_name: str = "python3",
        signature_scheme: str = "hmac-sha256",
        gpu_indices: Sequence[int] = (),
        gpu_uuids: Sequence[str] = (),
        protocol: str = "auto",
        ready_timeout: float = 60.0,
        stop_grace: float = 5.0,
        request_timeout: float = 60.0,
        max_message_size: int = 256 * 1024 * 1024,
        logger: logging.Logger | logging.LoggerAdapter | None = None,
    ) -> None:
        if protocol not in ("auto", "v1", "json"):
            raise ValueError(f"protocol must be auto, v1 or json, not {protocol!r}")
        if urlsplit(gateway_url).scheme not in ("http", "https"):
            raise ValueError(f"gateway_url must start with http:// or https://: {gateway_url!r}")
        self.session_id = session_id
        self.host_id = host_id
        self.key = key.encode() if isinstance(key, str) else bytes(key)
        self.signature_scheme = signature_scheme
        self.gpu_indices = [int(i) for i in gpu_indices]
        self.gpu_uuids = list(gpu_uuids)
        self.gateway_url = gateway_url.rstrip("/")
        self.gateway_token = gateway_token
        self.kernel_name = kernel_name
        self.protocol = protocol
        self.ready_timeout = ready_timeout
        self.stop_grace = stop_grace
        self.request_timeout = request_timeout
        self.max_message_size = max_message_size
        self.on_kernel_message = on_kernel_message
        self.busy = False  # the kernel said "busy" last (a cell is running), not "idle"
        self.was_busy = False  # it said "busy" since the last heartbeat (a short cell)
        self.on_exit = on_exit
        self.log = logger or log
        # Signs and checks with the renter's key: the gateway's own key never reaches us.
        self.session = Session(key=self.key, signature_scheme=signature_scheme)

        self.kernel_id: str | None = None
        self.exit_code: int | None = None
        self.ready = False
        self.subprotocol: str | None = None
        self._ws: WebSocketClientConnection | None = None
        self._pending: list[str | bytes] = []
        self._idents: OrderedDict[str, list[bytes]] = OrderedDict()
        self._last_idents: dict[int, list[bytes]] = {}
        self._probes: dict[str, asyncio.Future[None]] = {}
        self._stopping = False
        self._exited = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._reader: asyncio.Task[None] | None = None
        self._cleaned = False

    # -- properties -----------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        """Tell whether the gateway kernel was started and has not ended."""
        return self.kernel_id is not None and not self._exited.is_set()

    @property
    def pid(self) -> None:
        """A gateway kernel has no local process."""
        return None

    # -- REST -------------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.gateway_token:
            headers["Authorization"] = f"token {self.gateway_token}"
        return headers

    async def _request(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        request = HTTPRequest(
            _http_url(self.gateway_url, path),
            method=method,
            headers=self._headers(),
            body=json.dumps(body) if body is not None else (b"" if method == "POST" else None),
            connect_timeout=10,
            request_timeout=self.request_timeout,
        )
        try:
            response = await AsyncHTTPClient().fetch(request)
        except HTTPClientError as err:
            detail = ""
            if err.response is not None and err.response.body:
                with contextlib.suppress(ValueError, AttributeError):
                    data = json.loads(err.response.body)
                    detail = str(data.get("message") or data.get("reason") or "")
            raise GatewayError(
                f"gateway {method} {path}: HTTP {err.code}{': ' + detail if detail else ''}"
            ) from err
        if not response.body:
            return {}
        try:
            data = json.loads(response.body)
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}

    def environment(self) -> dict[str, str]:
        """The environment asked for the kernel (the gateway filters it, see the module doc)."""
        visible = (
            ",".join(self.gpu_uuids)
            if self.gpu_uuids and len(self.gpu_uuids) == len(self.gpu_indices)
            else ",".join(str(i) for i in self.gpu_indices)
        )
        return {
            "GPU_SHARE_SESSION_ID": self.session_id,
            "GPU_SHARE_HOST_ID": self.host_id,
            "CUDA_VISIBLE_DEVICES": visible,
            "KERNEL_GPU_SHARE_SESSION_ID": self.session_id,
            "KERNEL_GPU_SHARE_HOST_ID": self.host_id,
        }

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Create the kernel on the gateway, open its websocket, wait for kernel_info_reply."""
        try:
            try:
                model = await self._request(
                    "POST", "/api/kernels", {"name": self.kernel_name, "env": self.environment()}
                )
            except (GatewayError, OSError) as err:
                raise KernelStartError(f"the gateway did not start a kernel: {err}") from None
            kernel_id = model.get("id")
            if not isinstance(kernel_id, str) or not kernel_id:
                raise KernelStartError("the gateway's answer has no kernel id")
            self.kernel_id = kernel_id
            self.log.info(
                "kernel for session %s started on gateway %s as %s (no local sandbox)",
                self.session_id,
                self.gateway_url,
                kernel_id,
            )
            await asyncio.wait_for(self._connect(), self.ready_timeout)
            self._reader = asyncio.ensure_future(self._read())
            await self._wait_ready()
        except BaseException as err:
            await self.stop()
            if isinstance(err, asyncio.TimeoutError):
                raise KernelStartError(
                    f"gateway kernel did not answer within {self.ready_timeout:g} s"
                ) from None
            raise
        self.ready = True

    async def _connect(self) -> None:
        assert self.kernel_id is not None
        url = _ws_url(self.gateway_url, f"/api/kernels/{quote(self.kernel_id)}/channels")
        url += f"?session_id={quote(self.session_id)}"
        request = HTTPRequest(
            url,
            headers={k: v for k, v in self._headers().items() if k == "Authorization"},
            connect_timeout=10,
            request_timeout=self.request_timeout,
        )
        conn = await websocket_connect(
            request,
            max_message_size=self.max_message_size,
            ping_interval=20,
            subprotocols=[V1_PROTOCOL] if self.protocol != "json" else None,
        )
        self.subprotocol = conn.selected_subprotocol
        if self.protocol == "v1" and self.subprotocol != V1_PROTOCOL:
            conn.close()
            raise KernelStartError("the gateway does not speak the v1 kernel websocket protocol")
        self._ws = conn
        pending, self._pending = self._pending, []
        for message in pending:
            self._write(message)

    async def _wait_ready(self) -> None:
        """Send kernel_info_request (signed with the renter's key) until one is answered."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.ready_timeout
        while True:
            if self._exited.is_set():
                raise KernelStartError("the gateway kernel ended before it was ready")
            msg = self.session.msg("kernel_info_request", {})
            msg_id = msg["header"]["msg_id"]
            answered = loop.create_future()
            self._probes[msg_id] = answered
            self.send(wire.SHELL, self.session.serialize(msg, ident=[]))
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise KernelStartError(
                    f"gateway kernel did not answer within {self.ready_timeout:g} s"
                )
            try:
                await asyncio.wait_for(asyncio.shield(answered), min(2.0, remaining))
                return
            except asyncio.TimeoutError:
                continue
            finally:
                self._probes.pop(msg_id, None)

    async def adopt(self, session_id: str, timeout: float = 10.0) -> None:
        """Refuse: a gateway kernel cannot be started before its renter (no warm pools)."""
        raise KernelStartError("warm kernels are not available with a gateway backend")

    async def wait(self) -> int | None:
        """Wait for the kernel to end; return its exit code (None when unknown)."""
        await self._exited.wait()
        return self.exit_code

    # -- relay -> gateway ---------------------------------------------------------------------

    def send(self, channel: int | str, frames: Sequence[bytes | memoryview]) -> None:
        """Check one relay message's signature and forward it to the gateway."""
        if isinstance(channel, str):
            channel = wire.CHANNELS[channel]
        if channel == wire.IOPUB:
            raise ValueError("nothing is sent to a kernel on iopub")
        if self._exited.is_set() or self.kernel_id is None:
            raise RuntimeError("kernel channels are closed")
        raw = [bytes(frame) for frame in frames]
        try:
            split = raw.index(DELIM)
        except ValueError:
            raise ValueError("message without the <IDS|MSG> delimiter") from None
        idents, rest = raw[:split], raw[split + 1 :]
        if len(rest) < 5:
            raise ValueError("message with fewer than five parts")
        signature, parts = rest[0], rest[1:]
        if self.key and not hmac.compare_digest(signature, self.session.sign(parts[:4])):
            raise ValueError("message signature does not match the renter's key")
        header = json.loads(parts[0])
        msg_id = str(header.get("msg_id", ""))
        self._last_idents[channel] = idents
        if msg_id:
            self._idents[msg_id] = idents
            self._idents.move_to_end(msg_id)
            while len(self._idents) > MAX_REMEMBERED:
                self._idents.popitem(last=False)
        name = wire.CHANNEL_NAMES[channel]
        if self.subprotocol == V1_PROTOCOL:
            self._write(pack_v1(name, parts))
            return
        msg = {
            "channel": name,
            "header": header,
            "msg_id": msg_id,
            "msg_type": header.get("msg_type"),
            "parent_header": json.loads(parts[1]),
            "metadata": json.loads(parts[2]),
            "content": json.loads(parts[3]),
            "buffers": [],
        }
        buffers = parts[4:]
        if buffers:
            self._write(pack_legacy_binary(msg, buffers))
        else:
            self._write(json.dumps(msg, default=json_default))

    def _write(self, message: str | bytes) -> None:
        conn = self._ws
        if conn is not None:
            try:
                future = conn.write_message(message, binary=isinstance(message, bytes))
                future.add_done_callback(_consume)
                return
            except WebSocketClosedError:
                self._ws = None
        if len(self._pending) < MAX_PENDING:
            self._pending.append(message)
        else:
            self.log.warning("session %s: gateway unreachable; dropped a message", self.session_id)

    # -- gateway -> relay ---------------------------------------------------------------------

    async def _read(self) -> None:
        while not self._stopping:
            conn = self._ws
            message = await conn.read_message() if conn is not None else None
            if message is None:
                if self._stopping or self._exited.is_set():
                    return
                if not await self._reconnect():
                    return
                continue
            try:
                self._from_gateway(message)
            except Exception:
                self.log.exception("session %s: bad message from the gateway", self.session_id)

    async def _reconnect(self) -> bool:
        """The websocket dropped: reconnect if the kernel still exists, else report death."""
        self._ws = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(self.ready_timeout, 30.0)
        delay = 0.2
        while not self._stopping:
            try:
                await self._request("GET", f"/api/kernels/{quote(self.kernel_id or '')}")
            except GatewayError as err:
                if "HTTP 404" in str(err):
                    self.log.warning("session %s: the gateway kernel is gone", self.session_id)
                    await self._died(None)
                    return False
            except OSError:
                pass
            else:
                try:
                    await self._connect()
                    self.log.info("session %s: gateway websocket reconnected", self.session_id)
                    return True
                except (OSError, HTTPClientError, KernelStartError) as err:
                    self.log.debug("gateway websocket reconnect failed: %s", err)
            if loop.time() > deadline:
                self.log.warning("session %s: lost the gateway", self.session_id)
                await self._died(None)
                return False
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
        return False

    def _from_gateway(self, message: str | bytes) -> None:
        if isinstance(message, bytes) and self.subprotocol == V1_PROTOCOL:
            name, parts = unpack_v1(message)
            if len(parts) < 4:
                raise ValueError("v1 message with fewer than four parts")
            header = json.loads(parts[0])
            parent = json.loads(parts[1])
        else:
            if isinstance(message, bytes):
                msg, buffers = unpack_legacy_binary(message)
            else:
                msg, buffers = json.loads(message), []
            name = msg.get("channel") or "iopub"
            header, parent = msg.get("header") or {}, msg.get("parent_header") or {}
            pack = self.session.pack
            parts = [
                pack(header),
                pack(parent),
                pack(msg.get("metadata") or {}),
                pack(msg.get("content") or {}),
                *buffers,
            ]
        channel = wire.CHANNELS.get(name)
        if channel is None:
            return
        msg_type = str(header.get("msg_type", ""))
        parent_id = str(parent.get("msg_id", "")) if isinstance(parent, dict) else ""
        probe = self._probes.get(parent_id)
        if probe is not None and channel == wire.SHELL:
            if not probe.done():
                probe.set_result(None)
            return  # the readiness probe's reply is ours, not the renter's
        if channel == wire.IOPUB:
            topic = f"kernel.{self.kernel_id}.{msg_type}"
            if msg_type == "stream":
                with contextlib.suppress(ValueError, AttributeError):
                    topic = f"stream.{json.loads(parts[3]).get('name', 'stdout')}"
            idents = [topic.encode()]
        else:
            idents = self._idents.get(parent_id)
            if idents is None:
                idents = self._last_idents.get(channel) or self._last_idents.get(wire.SHELL, [])
        signature = self.session.sign(parts[:4])
        frames = [*idents, DELIM, signature, *parts]
        try:
            self.on_kernel_message(channel, frames)
        except Exception:
            self.log.exception("kernel message handler failed")
        if channel == wire.IOPUB and msg_type == "status":
            state = self._execution_state(parts[3])
            if parent_id:
                if self._parent_is_execute(parts):  # a cell is running, until its idle
                    self.busy = state == "busy"
                    self.was_busy = self.was_busy or self.busy
            elif state in ("restarting", "dead") and self.ready:
                # The gateway's kernel died (and was perhaps restarted, state lost): the
                # renter's kernel ended, as a local one would.
                self.log.warning("session %s: gateway kernel %s", self.session_id, state)
                self._spawn(self._died(None))

    @staticmethod
    def _parent_is_execute(parts: list[Any]) -> bool:
        """Whether a message answers an execute_request (its parent header says so)."""
        return b'"execute_request"' in bytes(parts[1][:2048]) if len(parts) > 1 else False

    @staticmethod
    def _execution_state(content: bytes) -> str:
        with contextlib.suppress(ValueError, AttributeError):
            return str(json.loads(content).get("execution_state", ""))
        return ""

    # -- signals and stop ---------------------------------------------------------------------

    def signal(self, signum: int) -> None:
        """SIGINT interrupts through the gateway; SIGTERM, SIGKILL and SIGHUP end the kernel."""
        if not self.alive:
            return
        if signum == signals.SIGINT:
            self._spawn(self._interrupt())
        elif signum in (signals.SIGTERM, signals.SIGKILL, signals.SIGHUP, signals.SIGQUIT):
            self._spawn(self._kill(signum))
        else:
            self.log.warning(
                "session %s: signal %s cannot be sent to a gateway kernel", self.session_id, signum
            )

    def interrupt(self) -> None:
        """Interrupt the running cell (POST /api/kernels/<id>/interrupt)."""
        self.signal(signals.SIGINT)

    async def _interrupt(self) -> None:
        try:
            await self._request("POST", f"/api/kernels/{quote(self.kernel_id or '')}/interrupt")
        except (GatewayError, OSError) as err:
            self.log.warning("session %s: interrupt failed: %s", self.session_id, err)

    async def _kill(self, signum: int) -> None:
        await self._delete()
        await self._died(-signum)

    async def _delete(self, attempts: int = 5) -> bool:
        """DELETE the kernel; retry a 5xx (a kernel being restarted refuses to shut down)."""
        if self.kernel_id is None:
            return False
        for attempt in range(attempts):
            try:
                await self._request("DELETE", f"/api/kernels/{quote(self.kernel_id)}")
                return True
            except GatewayError as err:
                code = err.__cause__.code if isinstance(err.__cause__, HTTPClientError) else 0
                if code == 404:
                    return False  # already gone
                if code < 500 or attempt == attempts - 1:
                    self.log.warning("session %s: %s", self.session_id, err)
                    return False
            except OSError as err:
                self.log.warning("session %s: gateway unreachable: %s", self.session_id, err)
                return False
            await asyncio.sleep(0.25 * 2**attempt)
        return False

    async def _died(self, code: int | None) -> None:
        if self._exited.is_set():
            return
        self.exit_code = code
        self._exited.set()
        if self._stopping or not self.ready:
            return
        self.log.warning("kernel for session %s died (gateway)", self.session_id)
        await self._delete()
        await self._cleanup()
        if self.on_exit is not None:
            try:
                self.on_exit(code)
            except Exception:
                self.log.exception("kernel exit handler failed")

    async def stop(self) -> int | None:
        """Shut the kernel down on the gateway (DELETE) and close the websocket."""
        self._stopping = True
        if self.kernel_id is not None and not self._exited.is_set():
            try:
                deleted = await asyncio.wait_for(
                    self._delete(), self.stop_grace + self.request_timeout
                )
            except asyncio.TimeoutError:
                deleted = False
            self.exit_code = 0 if deleted else None
            self._exited.set()
        await self._cleanup()
        return self.exit_code

    async def _cleanup(self) -> None:
        if self._cleaned:
            return
        self._cleaned = True
        self._exited.set()
        if self._ws is not None:
            self._ws.close()
            self._ws = None
        current = asyncio.current_task()
        for task in [self._reader, *self._tasks]:
            if task is not None and task is not current:
                task.cancel()
        for probe in self._probes.values():
            if not probe.done():
                probe.cancel()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
