"""Our websocket server ends against real sockets on loopback: the batched tornado reader,
and the asyncio protocol the broker hands its connections to after the upgrade (plain and,
falling back to tornado, over TLS)."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import socket
import ssl
import struct
import subprocess
from typing import ClassVar

import pytest
from tornado import httpclient, web
from tornado.httpserver import HTTPServer
from tornado.util import _websocket_mask
from tornado.websocket import WebSocketClosedError

from jupyter_gpu_share import fastws

try:
    import uvloop
except ImportError:  # a dependency everywhere but Windows
    uvloop = None

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


class ProtocolEcho(fastws.ProtocolWebSocketHandler):
    """The same echo, served by a ServerEnd after the upgrade; batches echo in one write."""

    closes: ClassVar[list[tuple[int | None, str | None]]] = []
    batches: ClassVar[list[int]] = []

    @property
    def max_message_size(self) -> int:
        return LIMIT

    def on_messages(self, messages: list[tuple[int, bytes]]) -> None:
        ProtocolEcho.batches.append(len(messages))
        if (fastws.OP_TEXT, b"close please") in messages:
            self.close(4002, "credit exhausted")
            return
        self.send_many(messages)

    def on_message(self, message: str | bytes) -> None:  # over TLS only
        if isinstance(message, str):
            self.on_messages([(fastws.OP_TEXT, message.encode())])
        else:
            self.on_messages([(fastws.OP_BINARY, message)])

    def on_close(self) -> None:
        ProtocolEcho.closes.append((self.close_code, self.close_reason))


LOOPS = [
    pytest.param(asyncio.run, id="asyncio"),
    pytest.param(
        getattr(uvloop, "run", None),
        id="uvloop",
        marks=pytest.mark.skipif(uvloop is None, reason="uvloop is not installed"),
    ),
]


HANDLERS = pytest.mark.parametrize("handler", [Echo, ProtocolEcho], ids=["batched", "protocol"])


async def serve(
    handler: type = Echo, ssl_options: ssl.SSLContext | None = None
) -> tuple[HTTPServer, int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.setblocking(False)
    server = HTTPServer(web.Application([(r"/ws", handler)]), ssl_options=ssl_options)
    server.add_sockets([sock])
    return server, sock.getsockname()[1]


async def client(port: int, scheme: str = "ws", end: bool = False, **kwargs):
    request = httpclient.HTTPRequest(f"{scheme}://127.0.0.1:{port}/ws", **kwargs)
    if end:
        return await fastws.connect_end(request, LIMIT)
    return await fastws.connect(request, LIMIT)


async def send(ws, message: str | bytes) -> None:
    written = ws.write_message(message, binary=isinstance(message, bytes))
    if written is not None:  # tornado always; a ClientEnd only while its buffer drains
        await written


@HANDLERS
@pytest.mark.parametrize("client_end", [False, True], ids=["tornado-client", "client-end"])
def test_bursts_big_messages_and_close_codes(handler, client_end):
    async def run() -> None:
        server, port = await serve(handler)
        ws = await client(port, end=client_end)
        if client_end:
            assert isinstance(ws, fastws.ClientEnd)
        else:
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
            await send(ws, message)
            assert await ws.read_message() == message
        # One 50 MB message arrives whole, both ways.
        big = os.urandom(50 * 1024 * 1024)
        await send(ws, big)
        assert await ws.read_message() == big
        # The server's close code and reason reach the client.
        await send(ws, "close please")
        assert await ws.read_message() is None
        assert (ws.close_code, ws.close_reason) == (4002, "credit exhausted")
        await asyncio.sleep(0.1)
        assert handler.closes[-1][0] == 4002
        server.stop()

    asyncio.run(run())


async def raw_client(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A websocket client by hand: the upgrade, then whatever bytes a test writes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    assert b"101" in await reader.readuntil(b"\r\n\r\n")
    return reader, writer


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


@HANDLERS
def test_fragments_pings_and_oversize_from_a_raw_client(handler):
    async def run() -> None:
        server, port = await serve(handler)
        reader, writer = await raw_client(port)
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


@HANDLERS
@pytest.mark.parametrize("client_end", [False, True], ids=["tornado-client", "client-end"])
def test_a_closed_connection_refuses_writes(handler, client_end):
    async def run() -> None:
        server, port = await serve(handler)
        ws = await client(port, end=client_end)
        ws.close()
        with pytest.raises(WebSocketClosedError):
            await send(ws, b"x")
        server.stop()

    asyncio.run(run())


def test_the_protocol_end_echoes_a_burst_in_few_writes_and_sees_the_client_close():
    async def run() -> None:
        ProtocolEcho.batches.clear()
        server, port = await serve(ProtocolEcho)
        reader, writer = await raw_client(port)
        await asyncio.sleep(0.05)  # the socket has been handed over
        writer.write(b"".join(_frame(0x2, bytes([i])) for i in range(200)))
        echoed = await reader.readexactly(200 * 3)
        assert echoed == b"".join(b"\x82\x01" + bytes([i]) for i in range(200))
        assert sum(ProtocolEcho.batches) == 200 and len(ProtocolEcho.batches) < 200
        # A client's close frame is answered with the same code, and on_close sees it.
        writer.write(_frame(0x8, struct.pack("!H", 1001) + b"bye"))
        assert await reader.readexactly(4) == b"\x88\x02" + struct.pack("!H", 1001)
        assert await reader.read() == b""  # then the server closes the connection
        await asyncio.sleep(0.05)
        assert ProtocolEcho.closes[-1] == (1001, "bye")
        writer.close()
        server.stop()

    asyncio.run(run())


def test_a_slow_reader_pauses_its_peer_instead_of_growing_the_buffer():
    ends: list[fastws.ServerEnd] = []
    paused: list[bool] = []

    class Slow(ProtocolEcho):
        def on_taken_over(self) -> None:
            ends.append(self.end)

        def on_pause(self, end: fastws.ServerEnd, is_paused: bool) -> None:
            paused.append(is_paused)

    async def run() -> None:
        server, port = await serve(Slow)
        reader, writer = await raw_client(port)
        while not ends:
            await asyncio.sleep(0.01)
        end = ends[0]
        chunk = os.urandom(1024 * 1024)
        # The client reads nothing: the socket buffers fill, then the end's write buffer.
        sent = 0
        while not paused and sent < 256:
            end.send(fastws.OP_BINARY, chunk)
            sent += 1
            await asyncio.sleep(0)
        assert paused == [True]
        received = 0
        while paused[-1] is True:
            received += len(await reader.read(1024 * 1024))
        assert paused[-1] is False and received > 0
        writer.close()
        server.stop()

    asyncio.run(run())


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl makes the test certificate")
def test_over_tls_tornado_keeps_the_connection(tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    async def run() -> None:
        server, port = await serve(ProtocolEcho, context)
        plain = await client(port, "wss", validate_cert=False)
        await plain.write_message(b"tornado client", binary=True)
        assert await plain.read_message() == b"tornado client"
        # connect_end keeps tornado's connection over TLS.
        ws = await client(port, "wss", end=True, validate_cert=False)
        assert not isinstance(ws, fastws.ClientEnd)
        for message in (b"one", "two", os.urandom(3 * 1024 * 1024)):
            await ws.write_message(message, binary=isinstance(message, bytes))
            assert await ws.read_message() == message
        await ws.write_message("close please")
        assert await ws.read_message() is None
        assert ws.close_code == 4002
        server.stop()

    asyncio.run(run())


def test_frames_split_anywhere_arrive_whole():
    """Frames of every size class, written in random slices: headers, masking keys and
    large payloads split across reads (a large frame is read into its own buffer)."""

    async def run() -> None:
        server, port = await serve(ProtocolEcho)
        reader, writer = await raw_client(port)
        sizes = [0, 5, 125, 126, 4000, 65535, fastws.LARGE, 300_000, 5, 2 * fastws.CHUNK + 3]
        payloads = [os.urandom(size) for size in sizes]
        stream = b"".join(_frame(0x2, payload) for payload in payloads)
        # A large message in fragments, with a ping between them.
        pieces = [os.urandom(fastws.LARGE + 7), os.urandom(3), os.urandom(fastws.CHUNK)]
        stream += _frame(0x2, pieces[0], final=False) + _frame(0x9, b"p")
        stream += _frame(0x0, pieces[1], final=False) + _frame(0x0, pieces[2])
        rng = random.Random(7)
        position = 0
        while position < len(stream):
            step = rng.choice([1, 2, 3, 9, 14, 1000, 70_000])
            writer.write(stream[position : position + step])
            position += step
            if rng.random() < 0.3:
                await writer.drain()
                await asyncio.sleep(0)
        for payload in payloads:
            assert await _read_server_frame(reader) == (0x2, payload)
        assert await _read_server_frame(reader) == (0xA, b"p")
        assert await _read_server_frame(reader) == (0x2, b"".join(pieces))
        writer.close()
        server.stop()

    asyncio.run(run())


async def _read_server_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    first, second = await reader.readexactly(2)
    assert not second & 0x80, "a server's frames are not masked"
    length = second & 0x7F
    if length == 126:
        length = struct.unpack("!H", await reader.readexactly(2))[0]
    elif length == 127:
        length = struct.unpack("!Q", await reader.readexactly(8))[0]
    return first & 0x0F, await reader.readexactly(length)


@pytest.mark.parametrize("run_loop", LOOPS)
def test_a_message_of_parts_goes_out_as_one_frame_in_chunk_sized_writes(run_loop):
    """``write_many`` takes messages as lists of parts (bytes, bytearray, memoryview, any
    size) and sends each as one frame; a large one is masked piece by piece. The echo
    sends them back unmasked, header and parts as one ``writelines`` (uvloop: writev)."""

    async def run() -> None:
        server, port = await serve(ProtocolEcho)
        ws = await client(port, end=True)
        big = bytearray(os.urandom(3 * fastws.CHUNK + 5))
        messages = [
            [b"head", memoryview(big)[:10], b"", os.urandom(3)],
            [os.urandom(7), big, memoryview(os.urandom(fastws.CHUNK))[1:], b"tail"],
            [os.urandom(fastws.LARGE - 1)],
        ]
        written = ws.write_many(messages)
        if written is not None:
            await written
        for parts in messages:
            assert await ws.read_message() == b"".join(bytes(part) for part in parts)
        ws.close()
        server.stop()

    run_loop(run())


@pytest.mark.parametrize("masked", [False, True])
def test_frame_pieces_are_chunk_sized_and_byte_exact(masked):
    key = os.urandom(4) if masked else None
    parts = [b"ab", os.urandom(300_000), b"", bytearray(os.urandom(fastws.CHUNK)), b"x" * 9]
    payload = b"".join(bytes(part) for part in parts)
    header = fastws.frame_header(fastws.OP_BINARY, len(payload), key)
    # A write is a buffer, or a list of buffers for writelines (the header not copied).
    pieces = [fastws.as_bytes(piece) for piece in fastws._frame_pieces(header, parts, key)]
    body = b"".join(pieces)[len(header) :]
    assert body == (_websocket_mask(key, payload) if key else payload)
    assert len(pieces[0]) == len(header) + fastws.CHUNK
    assert all(len(piece) == fastws.CHUNK for piece in pieces[1:-1])


def test_deliver_to_hands_messages_over_in_order_and_read_message_reports_the_close():
    async def run() -> None:
        server, port = await serve(ProtocolEcho)
        ws = await client(port, end=True)
        for n in range(3):
            ws.write_message(b"early %d" % n, binary=True)
        while len(ws._queue_in) < 3:  # echoed and queued before a handler is set
            await asyncio.sleep(0.01)
        got: list[str | bytes | bytearray] = []
        ws.deliver_to(got.append)
        assert got == [b"early 0", b"early 1", b"early 2"]
        ws.write_message("text")
        ws.write_message(b"late", binary=True)
        while len(got) < 5:
            await asyncio.sleep(0.01)
        assert got[3:] == ["text", b"late"] and not ws._queue_in
        await send(ws, "close please")
        assert await ws.read_message() is None  # nothing queued: only the close
        assert ws.close_code == 4002
        server.stop()

    asyncio.run(run())


def test_a_read_buffer_starts_small_grows_when_filled_and_keeps_what_is_unparsed():
    buffer = fastws.ReadBuffer()
    room = buffer.room()
    assert len(room) == fastws.FIRST_READ_SIZE  # what an idle connection holds
    room[:10] = b"0123456789"
    del room
    assert buffer.filled(10) == b"0123456789"
    buffer.keep_from(4)  # 6 bytes left unparsed
    kept = b"456789"
    for _ in range(12):  # every read fills all the room it is offered
        room = buffer.room()
        offered = len(room)
        room[:] = b"x" * offered
        del room
        data = buffer.filled(offered)
        assert data == kept + b"x" * offered
        buffer.keep_from(len(data) - 6)
        kept = data[-6:]
    assert len(buffer.data) == fastws.READ_SIZE  # doubled up to the cap, no further


@pytest.mark.parametrize("run_loop", LOOPS)
def test_frames_written_with_the_upgrade_arrive_first_and_in_order(run_loop):
    """Bytes tornado read past the handshake come before anything the new end reads itself,
    also where the loop reads as soon as the socket is handed over (uvloop)."""

    async def run() -> None:
        ProtocolEcho.batches.clear()
        server, port = await serve(ProtocolEcho)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        upgrade = (
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        early = b"".join(_frame(0x2, bytes([i])) for i in range(50))
        writer.write(upgrade + early)  # tornado reads these frames with the request
        assert b"101" in await reader.readuntil(b"\r\n\r\n")
        # These arrive while the socket is being handed over.
        writer.write(b"".join(_frame(0x2, bytes([i])) for i in range(50, 100)))
        echoed = await asyncio.wait_for(reader.readexactly(100 * 3), 10)
        assert echoed == b"".join(b"\x82\x01" + bytes([i]) for i in range(100))
        writer.close()
        server.stop()

    run_loop(run())
