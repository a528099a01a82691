"""A tiny broker for host-agent tests: the control websocket and the relay's host side."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from tornado.web import Application
from tornado.websocket import WebSocketHandler

HOST_ID = "host-1"


class _Authed(WebSocketHandler):
    def initialize(self, broker: FakeBroker) -> None:
        self.broker = broker

    def prepare(self) -> None:
        if self.request.headers.get("Authorization") != f"Bearer {self.broker.token}":
            self.set_status(403)
            self.set_header("Content-Type", "application/json")
            self.finish(json.dumps({"message": "invalid host token", "reason": "Forbidden"}))


class ControlHandler(_Authed):
    def open(self) -> None:
        self.broker.handlers.append(self)
        self.broker.control = self

    def on_message(self, message: str | bytes) -> None:
        record = json.loads(message)
        self.broker.control_messages.put_nowait(record)
        if record["type"] == "hello":
            welcome = {"type": "welcome", "host_id": HOST_ID, "heartbeat_interval": 0.2}
            if self.broker.stop_on_welcome:
                welcome["stop"] = self.broker.stop_on_welcome
            self.write_message(json.dumps(welcome))


class RelayHostHandler(_Authed):
    def open(self, session_id: str) -> None:
        self.session_id = session_id
        self.broker.handlers.append(self)
        self.broker.relays[session_id] = self
        self.broker.relay_queue(session_id)
        self.broker.relay_opened.put_nowait(session_id)

    def on_message(self, message: str | bytes) -> None:
        self.broker.relay_queue(self.session_id).put_nowait(message)

    def on_close(self) -> None:
        self.broker.relay_queue(self.session_id).put_nowait(None)


class FakeBroker:
    """Just enough of the broker's host side to drive a HostAgent."""

    def __init__(self, token: str = "good") -> None:
        self.token = token
        self.port = 0
        self.server: HTTPServer | None = None
        self.handlers: list[WebSocketHandler] = []
        self.control: ControlHandler | None = None
        self.control_messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.relays: dict[str, RelayHostHandler] = {}
        self.relay_messages: dict[str, asyncio.Queue[str | bytes | None]] = {}
        self.relay_opened: asyncio.Queue[str] = asyncio.Queue()
        self.stop_on_welcome: list[str] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def relay_queue(self, session_id: str) -> asyncio.Queue[str | bytes | None]:
        return self.relay_messages.setdefault(session_id, asyncio.Queue())

    async def start(self, port: int = 0) -> None:
        app = Application(
            [
                (r"/gpu-share/api/hosts/connect", ControlHandler, {"broker": self}),
                (r"/gpu-share/api/relay/([^/]+)/host", RelayHostHandler, {"broker": self}),
            ],
            websocket_max_message_size=256 * 1024 * 1024,
        )
        sockets = bind_sockets(port, "127.0.0.1")
        self.port = sockets[0].getsockname()[1]
        self.server = HTTPServer(app)
        self.server.add_sockets(sockets)

    async def stop(self) -> None:
        assert self.server is not None
        self.server.stop()
        for handler in self.handlers:
            handler.close()
        await self.server.close_all_connections()
        await asyncio.sleep(0.05)

    def send(self, record: dict[str, Any]) -> None:
        assert self.control is not None
        self.control.write_message(json.dumps(record))

    async def next_control(self, kind: str, timeout: float = 30) -> dict[str, Any]:
        async def scan() -> dict[str, Any]:
            while True:
                record = await self.control_messages.get()
                if record["type"] == kind:
                    return record

        return await asyncio.wait_for(scan(), timeout)

    async def next_relay_text(self, session_id: str, kind: str, timeout: float = 30) -> dict:
        queue = self.relay_queue(session_id)

        async def scan() -> dict[str, Any]:
            while True:
                message = await queue.get()
                if isinstance(message, str) and json.loads(message)["type"] == kind:
                    return json.loads(message)

        return await asyncio.wait_for(scan(), timeout)
