"""Kernel clients for the benchmarks.

``ServerKernelClient`` drives a kernel through a jupyter_server's REST API and its kernel
websocket in the binary ``v1.kernel.websocket.jupyter.org`` subprotocol, as JupyterLab does:
each websocket message is ``[n, offsets..., channel, header, parent_header, metadata,
content, buffers...]`` (little-endian u64 offsets, see
jupyter_server/services/kernels/connection/base.py). The server signs what the client sends
and strips the signature from what it forwards, so the client never holds the HMAC key.

``DirectKernelClient`` drives a kernel with jupyter_client alone (no jupyter_server): the
floor a server can only add to.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tornado import websocket
from tornado.httpclient import HTTPRequest

from jupyter_gpu_share.transport import tls

V1 = "v1.kernel.websocket.jupyter.org"
MAX_MESSAGE = 1 << 30


def pack_v1(channel: str, parts: list[bytes]) -> bytes:
    """Serialise one message for the v1 kernel websocket protocol."""
    chan = channel.encode()
    offsets = [8 * (1 + 1 + len(parts) + 1)]
    offsets.append(offsets[-1] + len(chan))
    for part in parts:
        offsets.append(offsets[-1] + len(part))
    head = len(offsets).to_bytes(8, "little") + b"".join(o.to_bytes(8, "little") for o in offsets)
    return b"".join((head, chan, *parts))


def unpack_v1(data: bytes) -> tuple[str, list[memoryview]]:
    """Split a v1 websocket message into its channel and its parts (views, no copies)."""
    view = memoryview(data)
    count = int.from_bytes(view[:8], "little")
    offsets = [int.from_bytes(view[8 * (i + 1) : 8 * (i + 2)], "little") for i in range(count)]
    channel = bytes(view[offsets[0] : offsets[1]]).decode()
    parts = [view[offsets[i] : offsets[i + 1]] for i in range(1, count - 1)]
    return channel, parts


def deserialize_legacy_binary(data: bytes) -> dict[str, Any]:
    """A legacy-protocol binary message: u32 count, u32 offsets, JSON, buffers (big-endian)."""
    count = struct.unpack("!i", data[:4])[0]
    offsets = list(struct.unpack("!" + "I" * count, data[4 : 4 * (count + 1)]))
    end = offsets[1] if count > 1 else len(data)
    return json.loads(data[offsets[0] : end])


def execute_parts(code: str, session: str, msg_id: str) -> list[bytes]:
    """The four JSON parts of an execute_request."""
    header = {
        "msg_id": msg_id,
        "msg_type": "execute_request",
        "username": "bench",
        "session": session,
        "date": "2026-01-01T00:00:00.000000Z",
        "version": "5.3",
    }
    content = {
        "code": code,
        "silent": False,
        "store_history": True,
        "user_expressions": {},
        "allow_stdin": False,
        "stop_on_error": True,
    }
    return [json.dumps(x).encode() for x in (header, {}, {}, content)]


@dataclass
class Execution:
    """What came back for one execute_request."""

    msg_id: str
    started: float
    reply: dict[str, Any] | None = None
    idle_at: float | None = None
    reply_at: float | None = None
    first_output_at: float | None = None
    output_bytes: int = 0
    messages: int = 0
    on_output: Callable[[str, Callable[[], dict[str, Any]]], None] | None = None
    done: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    @property
    def elapsed(self) -> float:
        assert self.idle_at is not None and self.reply_at is not None
        return max(self.idle_at, self.reply_at) - self.started


class ServerKernelClient:
    """One kernel of a jupyter_server, over REST and the v1 kernel websocket."""

    def __init__(self, url: str, token: str, kernel_name: str):
        self.url, self.token, self.kernel_name = url, token, kernel_name
        self.session = uuid.uuid4().hex
        self.kernel_id: str | None = None
        self.ws: websocket.WebSocketClientConnection | None = None
        self._pending: dict[str, Execution] = {}
        self._reader: asyncio.Task[None] | None = None
        self.closed_reason: str | None = None
        self.protocol = V1

    def rest(
        self, method: str, path: str, body: dict[str, Any] | None = None, timeout: float = 180
    ) -> Any:
        request = urllib.request.Request(
            self.url + path,
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"token {self.token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload = response.read()
        return json.loads(payload) if payload else None

    async def arest(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """The blocking REST call, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(None, self.rest, method, path, body)

    async def start(self) -> None:
        """Ask the server for a kernel and connect its websocket."""
        kernel = await self.arest("POST", "/api/kernels", {"name": self.kernel_name})
        self.kernel_id = kernel["id"]
        await self.connect()

    async def connect(self) -> None:
        ws_url = self.url.replace("http", "ws", 1) + (
            f"/api/kernels/{self.kernel_id}/channels?session_id={self.session}"
        )
        request = HTTPRequest(
            ws_url,
            headers={"Authorization": f"token {self.token}"},
            connect_timeout=60,
            request_timeout=180,
        )
        self.ws = await websocket.websocket_connect(
            request, subprotocols=[V1], max_message_size=MAX_MESSAGE
        )
        # JupyterLab asks for v1 and falls back to the legacy JSON protocol when the server
        # does not select it (a gateway-mode jupyter_server always does).
        self.protocol = self.ws.selected_subprotocol or "legacy"
        # Browsers turn Nagle off on their websockets; so does this client.
        self.ws.protocol.set_nodelay(True)  # type: ignore[union-attr]
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        assert self.ws is not None
        while True:
            data = await self.ws.read_message()
            if data is None:
                self.closed_reason = (
                    f"websocket closed ({self.ws.close_code} {self.ws.close_reason})"
                )
                for execution in self._pending.values():
                    if not execution.done.done():
                        execution.done.set_exception(RuntimeError(self.closed_reason))
                return
            now = time.perf_counter()
            if self.protocol == V1:
                if isinstance(data, str):
                    continue  # v1 messages are binary
                channel, parts = unpack_v1(data)
                parent = json.loads(bytes(parts[1])) if len(parts[1]) > 2 else {}
                execution = self._pending.get(parent.get("msg_id", ""))
                if execution is None:
                    continue
                header = json.loads(bytes(parts[0]))
                content_bytes = parts[3]

                def content(part: memoryview = content_bytes) -> dict[str, Any]:
                    return json.loads(bytes(part))

                size = len(content_bytes)
            else:
                # The legacy protocol (JSON text; binary only for messages with buffers).
                msg = json.loads(data) if isinstance(data, str) else deserialize_legacy_binary(data)
                channel = msg.get("channel", "")
                execution = self._pending.get(msg.get("parent_header", {}).get("msg_id", ""))
                if execution is None:
                    continue
                header = msg["header"]
                body = msg["content"]

                def content(body: dict[str, Any] = body) -> dict[str, Any]:
                    return body

                size = len(data)
            kind = header["msg_type"]
            execution.messages += 1
            if channel == "shell" and kind == "execute_reply":
                execution.reply = content()
                execution.reply_at = now
            elif channel == "iopub" and kind == "status":
                if content().get("execution_state") == "idle":
                    execution.idle_at = now
            elif channel == "iopub" and kind in ("stream", "display_data", "execute_result"):
                if execution.first_output_at is None:
                    execution.first_output_at = now
                execution.output_bytes += size
                if execution.on_output is not None:
                    execution.on_output(kind, content)
            if execution.reply_at is not None and execution.idle_at is not None:
                self._pending.pop(execution.msg_id, None)
                if not execution.done.done():
                    execution.done.set_result(None)

    async def execute(
        self,
        code: str,
        timeout: float = 120,
        on_output: Callable[[str, Callable[[], dict[str, Any]]], None] | None = None,
    ) -> Execution:
        """Run code; return when both execute_reply and the idle status have arrived."""
        assert self.ws is not None
        msg_id = uuid.uuid4().hex
        parts = execute_parts(code, self.session, msg_id)
        if self.protocol == V1:
            message: bytes | str = pack_v1("shell", parts)
        else:
            header, parent, metadata, content = (json.loads(p) for p in parts)
            message = json.dumps(
                {
                    "header": header,
                    "parent_header": parent,
                    "metadata": metadata,
                    "content": content,
                    "channel": "shell",
                    "buffers": [],
                }
            )
        execution = Execution(msg_id=msg_id, started=0.0, on_output=on_output)
        self._pending[msg_id] = execution
        execution.started = time.perf_counter()
        await self.ws.write_message(message, binary=isinstance(message, bytes))
        try:
            await asyncio.wait_for(asyncio.shield(execution.done), timeout)
        finally:
            self._pending.pop(msg_id, None)
        return execution

    async def shutdown(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        if self.ws is not None:
            self.ws.close()
        if self.kernel_id is not None:
            with contextlib.suppress(Exception):
                await self.arest("DELETE", f"/api/kernels/{self.kernel_id}")
            self.kernel_id = None


class DirectKernelClient:
    """A kernel started and driven by jupyter_client alone."""

    def __init__(self, kernel_name: str = "python3"):
        self.kernel_name = kernel_name
        self.km: Any = None
        self.kc: Any = None

    async def start(self, timeout: float = 180) -> None:
        from jupyter_client import AsyncKernelManager

        self.km = AsyncKernelManager(kernel_name=self.kernel_name)
        await self.km.start_kernel()
        self.kc = self.km.client()
        self.kc.start_channels()
        await self.kc.wait_for_ready(timeout=timeout)

    async def execute(self, code: str, timeout: float = 60) -> float:
        """Seconds from execute_request to both execute_reply and idle."""
        kc = self.kc
        started = time.perf_counter()
        msg_id = kc.execute(code)
        reply_at = idle_at = None
        while reply_at is None:
            msg = await kc.get_shell_msg(timeout=timeout)
            if msg["parent_header"].get("msg_id") == msg_id:
                reply_at = time.perf_counter()
        while idle_at is None:
            msg = await kc.get_iopub_msg(timeout=timeout)
            if (
                msg["parent_header"].get("msg_id") == msg_id
                and msg["msg_type"] == "status"
                and msg["content"]["execution_state"] == "idle"
            ):
                idle_at = time.perf_counter()
        return max(reply_at, idle_at) - started

    async def shutdown(self) -> None:
        if self.kc is not None:
            self.kc.stop_channels()
        if self.km is not None:
            with contextlib.suppress(Exception):
                await self.km.shutdown_kernel(now=True)


class RelayKernelClient:
    """A remote kernel driven straight over the broker relay: no bridge, no jupyter_server.

    It does what the bridge does for one client (POST /sessions, the relay's ``hello`` with
    the HMAC key, Jupyter frames in the relay framing), so the remote path can be split into
    the bridge's share and the broker + host agent's share.
    """

    def __init__(self, broker_url: str, token: str):
        self.broker_url, self.token = broker_url.rstrip("/"), token
        self.session_id: str | None = None
        self.ws: websocket.WebSocketClientConnection | None = None
        self._pending: dict[str, Execution] = {}
        self._reader: asyncio.Task[None] | None = None
        self.protocol = "relay"

    def _rest(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        request = urllib.request.Request(
            f"{self.broker_url}/gpu-share/api{path}",
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
        )
        context = tls.context_for(self.broker_url)
        with urllib.request.urlopen(request, timeout=180, context=context) as response:
            payload = response.read()
        return json.loads(payload) if payload else None

    async def start(self) -> None:
        import secrets

        from jupyter_client.session import Session

        loop = asyncio.get_running_loop()
        session = await loop.run_in_executor(None, self._rest, "POST", "/sessions", {})
        self.session_id = session["id"]
        url = self.broker_url.replace("http", "ws", 1) + session["relay_path"]
        request = HTTPRequest(
            url,
            headers={"Authorization": f"Bearer {self.token}"},
            connect_timeout=60,
            request_timeout=180,
            ssl_options=tls.context_for(url),
        )
        self.ws = await websocket.websocket_connect(request, max_message_size=MAX_MESSAGE)
        self.ws.protocol.set_nodelay(True)  # type: ignore[union-attr]
        key = secrets.token_hex(32)
        await self.ws.write_message(
            json.dumps({"type": "hello", "key": key, "signature_scheme": "hmac-sha256"})
        )
        while True:
            message = await asyncio.wait_for(self.ws.read_message(), 180)
            if message is None:
                raise RuntimeError(f"relay closed before kernel_ready: {self.ws.close_reason}")
            if isinstance(message, str):
                record = json.loads(message)
                if record.get("type") == "kernel_ready":
                    key = record.get("key") or key  # a warm kernel's own key
                    break
        self.session = Session(key=key.encode(), signature_scheme="hmac-sha256", username="bench")
        self._reader = asyncio.ensure_future(self._read())
        # The kernel answers once its shell is up.
        await self.execute("pass", timeout=120)

    async def _read(self) -> None:
        from jupyter_gpu_share import wire

        assert self.ws is not None
        while True:
            data = await self.ws.read_message()
            if data is None:
                for execution in self._pending.values():
                    if not execution.done.done():
                        execution.done.set_exception(RuntimeError("relay closed"))
                return
            if isinstance(data, str):
                continue
            now = time.perf_counter()
            channel, frames = wire.decode(data)
            index = next(i for i, f in enumerate(frames) if bytes(f) == b"<IDS|MSG>")
            parent = json.loads(bytes(frames[index + 3]))
            execution = self._pending.get(parent.get("msg_id", ""))
            if execution is None:
                continue
            header = json.loads(bytes(frames[index + 2]))
            kind = header["msg_type"]
            if channel == wire.SHELL and kind == "execute_reply":
                execution.reply = json.loads(bytes(frames[index + 5]))
                execution.reply_at = now
            elif (
                channel == wire.IOPUB and kind == "status" and b'"idle"' in bytes(frames[index + 5])
            ):
                execution.idle_at = now
            if execution.reply_at is not None and execution.idle_at is not None:
                self._pending.pop(execution.msg_id, None)
                if not execution.done.done():
                    execution.done.set_result(None)

    async def execute(self, code: str, timeout: float = 60) -> Execution:
        from jupyter_gpu_share import wire

        assert self.ws is not None
        msg = self.session.msg(
            "execute_request",
            {
                "code": code,
                "silent": False,
                "store_history": True,
                "user_expressions": {},
                "allow_stdin": False,
                "stop_on_error": True,
            },
        )
        msg_id = msg["header"]["msg_id"]
        frames = self.session.serialize(msg)
        execution = Execution(msg_id=msg_id, started=0.0)
        self._pending[msg_id] = execution
        execution.started = time.perf_counter()
        await self.ws.write_message(wire.encode(wire.SHELL, frames), binary=True)
        try:
            await asyncio.wait_for(asyncio.shield(execution.done), timeout)
        finally:
            self._pending.pop(msg_id, None)
        return execution

    async def shutdown(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        if self.ws is not None:
            self.ws.close()
        if self.session_id is not None:
            with contextlib.suppress(Exception):
                await asyncio.get_running_loop().run_in_executor(
                    None, self._rest, "DELETE", f"/sessions/{self.session_id}"
                )
            self.session_id = None
