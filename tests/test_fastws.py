"""The batched websocket frame reader against real sockets on loopback."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from typing import ClassVar

import pytest
from tornado import httpclient, web
from tornado.httpserver import HTTPServer
from tornado.websocket import WebSocketClosedError

from jupyter_gpu_share import fastws

LIMIT = 64 * 1024 * 1024


class Echo(fastws.BatchedWebSocketHandler):
    closes: ClassVar[list[tuple[int | None, str | None]]] = []

    @property
    def max_message_size(self) -> int:
        return LIMIT

    def on_message(self, message: str | bytes) -> None:
        if message == "close please":
            self.close(4002, "credit exhausted")
            return
        self.write_message(message, binary=isinstance(message, bytes))

    def on_close(self) -> None:
        Echo.closes.append((self.close_code, self.close_reason))


async def serve() -> tuple[HTTPServer, int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.setblocking(False)
    server = HTTPServer(web.Application([(r"/ws", Echo)]))
    server.add_sockets([sock])
    return server, sock.getsockname()[1]


async def client(port: int):
    request = httpclient.HTTPRequest(f"ws://127.0.0.1:{port}/ws")
    return await fastws.connect(request, LIMIT)


def test_bursts_big_messages_and_close_codes():
    async def run() -> None:
        server, port = await serve()
        ws = await client(port)
        assert isinstance(ws.protocol, fastws.BatchedWebSocketProtocol)
        # A burst of small frames arrives whole and in order (many per read).
        messages = [os.urandom(n % 300 + 1) for n in range(2000)]
        for message in messages:
            ws.write_message(message, binary=True)
        for message in messages:
            assert await ws.read_message() == message
        # Text, an empty message, and sizes around the 16- and 64-bit length forms.
        for message in (
            "héllo",
            b"",
            os.urandom(125),
            os.urandom(126),
            os.urandom(65535),
            os.urandom(65536),
        ):
            await ws.write_message(message, binary=isinstance(message, bytes))
            assert await ws.read_message() == message
        # One 50 MB message arrives whole, both ways.
        big = os.urandom(50 * 1024 * 1024)
        await ws.write_message(big, binary=True)
        assert await ws.read_message() == big
        # The server's close code and reason reach the client.
        await ws.write_message("close please")
        assert await ws.read_message() is None
        assert (ws.close_code, ws.close_reason) == (4002, "credit exhausted")
        server.stop()

    asyncio.run(run())


def _frame(opcode: int, payload: bytes, final: bool = True) -> bytes:
    mask = os.urandom(4)
    head = bytes([(0x80 if final else 0) | opcode])
    length = len(payload)
    if length < 126:
        head += bytes([0x80 | length])
    elif length < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", length)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", length)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


def test_fragments_pings_and_oversize_from_a_raw_client():
    async def run() -> None:
        server, port = await serve()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        assert b"101" in await reader.readuntil(b"\r\n\r\n")
        # A fragmented binary message with a ping between the fragments, all in one write.
        writer.write(
            _frame(0x2, b"abc", final=False)
            + _frame(0x9, b"p")
            + _frame(0x0, b"def", final=False)
            + _frame(0x0, b"ghi")
        )
        pong = await reader.readexactly(3)
        assert pong == b"\x8a\x01p"
        echo = await reader.readexactly(2 + 9)
        assert echo == b"\x82\x09abcdefghi"
        # A frame over the limit closes the connection with 1009.
        header = bytes([0x82, 0x80 | 127]) + struct.pack("!Q", LIMIT + 1) + os.urandom(4)
        writer.write(header)
        head = await reader.readexactly(2)
        close = await reader.readexactly(head[1])
        assert head[0] == 0x88 and struct.unpack("!H", close[:2])[0] == 1009
        assert close[2:] == b"message too big"
        writer.close()
        server.stop()

    asyncio.run(run())


def test_a_closed_connection_refuses_writes():
    async def run() -> None:
        server, port = await serve()
        ws = await client(port)
        ws.close()
        with pytest.raises(WebSocketClosedError):
            await ws.write_message(b"x", binary=True)
        server.stop()

    asyncio.run(run())
