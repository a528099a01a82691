"""The transport's websocket ends (``transport/websocket.py``) against real sockets on
loopback, plain and TLS, and against the reference implementations on both sides:
tornado's ``WebSocketHandler`` and ``websocket_connect``, and the ``websockets`` library's
asyncio client. Hostile frames (truncated, oversized, fragmented, wrong opcodes, wrong
masks) come from a hand-written client and from Hypothesis."""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import ssl
import struct
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tornado import httpclient, web
from tornado.httpserver import HTTPServer
from tornado.websocket import WebSocketHandler, websocket_connect
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.server import ServerProtocol

from jupyter_gpu_share.transport import websocket as ws
from jupyter_gpu_share.transport.websocket import (
    OP_BINARY,
    OP_TEXT,
    ConnectionClosed,
    HandshakeError,
    WebSocketEnd,
    WebSocketEndpoint,
)

from .tlsca import ScratchCA
from .wsraw import upgrade_answer

try:
    import uvloop
except ImportError:  # a dependency everywhere but Windows
    uvloop = None

LIMIT = 64 * 1024 * 1024


class Echo(WebSocketEndpoint):
    """Echoes each read's batch in one write; "close please" closes with 4002."""

    closes: ClassVar[list[tuple[int | None, str | None]]] = []
    batches: ClassVar[list[int]] = []
    opened: ClassVar[list[Echo]] = []
    max_message_size = LIMIT

    def on_open(self) -> None:
        Echo.opened.append(self)

    def on_messages(self, messages: list[tuple[int, Any]]) -> None:
        Echo.batches.append(len(messages))
        if (OP_TEXT, b"close please") in messages:
            self.close(4002, "credit exhausted")
            return
        self.send_many(messages)

    def on_close(self) -> None:
        Echo.closes.append((self.close_code, self.close_reason))


class Refusing(WebSocketEndpoint):
    async def get(self, *args: Any) -> None:
        raise web.HTTPError(404, "no running session")

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        self.finish({"message": kwargs["exc_info"][1].log_message})


class TornadoEcho(WebSocketHandler):
    """The reference server end."""

    def on_message(self, message: str | bytes) -> None:
        if message == "close please":
            self.close(4002, "credit exhausted")
            return
        self.write_message(message, binary=isinstance(message, bytes))


LOOPS = [
    pytest.param(asyncio.run, id="asyncio"),
    pytest.param(
        getattr(uvloop, "run", None),
        id="uvloop",
        marks=pytest.mark.skipif(uvloop is None, reason="uvloop is not installed"),
    ),
]


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context with a certificate for 127.0.0.1, and a client that trusts it."""
    ca = ScratchCA(tmp_path_factory.mktemp("ca"))
    pair = ca.issue("server")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(pair.cert, pair.key)
    return server, ssl.create_default_context(cafile=str(ca.ca_file))


async def serve(ssl_options: ssl.SSLContext | None = None) -> tuple[HTTPServer, int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.setblocking(False)
    app = web.Application(
        [(r"/ws", Echo), (r"/refused", Refusing), (r"/tornado", TornadoEcho)],
        websocket_max_message_size=LIMIT,
    )
    server = HTTPServer(app, ssl_options=ssl_options, max_buffer_size=LIMIT)
    server.add_sockets([sock])
    return server, sock.getsockname()[1]


async def until(check: Any, seconds: float) -> None:
    """Wait until ``check()`` holds, or ``seconds`` pass (the assertion after it says)."""
    deadline = asyncio.get_running_loop().time() + seconds
    while not check() and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)


async def send(conn: Any, message: str | bytes) -> None:
    written = conn.write_message(message, binary=isinstance(message, bytes))
    if written is not None:  # tornado always; a ClientEnd only while its buffer drains
        await written


SECURE = pytest.mark.parametrize("secure", [False, True], ids=["plain", "tls"])


@SECURE
@pytest.mark.parametrize("client", ["ours", "tornado", "websockets"])
def test_bursts_big_messages_and_close_codes(secure, client, tls):
    async def run() -> None:
        server, port = await serve(tls[0] if secure else None)
        url = f"{'wss' if secure else 'ws'}://127.0.0.1:{port}/ws"
        context = tls[1] if secure else None
        if client == "ours":
            conn = await ws.connect(url, ssl_context=context, max_message_size=LIMIT)
        elif client == "tornado":
            request = httpclient.HTTPRequest(url, ssl_options=context)
            conn = await websocket_connect(request, max_message_size=LIMIT)
        else:
            from websockets.asyncio.client import connect

            conn = await connect(url, ssl=context, max_size=LIMIT, compression=None)
            conn.write_message = lambda m, binary=False: asyncio.ensure_future(conn.send(m))
            conn.read_message = conn.recv
        # A burst of small messages arrives whole and in order (many per read).
        messages = [os.urandom(n % 300 + 1) for n in range(2000)]
        for message in messages:
            conn.write_message(message, binary=True)
        for message in messages:
            assert await conn.read_message() == message
        # Text, an empty message, and sizes around the 16- and 64-bit length forms.
        for message in ("héllo", b"", *(os.urandom(n) for n in (125, 126, 65535, 65536))):
            await send(conn, message)
            assert await conn.read_message() == message
        big = os.urandom(20 * 1024 * 1024)  # one large message, both ways
        await send(conn, big)
        assert await conn.read_message() == big
        if client == "websockets":
            await conn.send("close please")
            with pytest.raises(Exception, match="4002"):
                await conn.recv()
        else:
            await send(conn, "close please")
            assert await conn.read_message() is None
            assert (conn.close_code, conn.close_reason) == (4002, "credit exhausted")
        await until(lambda: Echo.closes and Echo.closes[-1][0] == 4002, 2)
        assert Echo.closes[-1][0] == 4002
        server.stop()

    asyncio.run(run())


@SECURE
def test_our_client_against_the_reference_server(secure, tls):
    async def run() -> None:
        server, port = await serve(tls[0] if secure else None)
        url = f"{'wss' if secure else 'ws'}://127.0.0.1:{port}/tornado"
        conn = await ws.connect(url, ssl_context=tls[1] if secure else None)
        got: list[Any] = []
        for message in (b"one", "two", os.urandom(3 * 1024 * 1024)):
            await send(conn, message)
            got.append(await conn.read_message())
        assert got[:2] == [b"one", "two"] and len(got[2]) == 3 * 1024 * 1024
        await send(conn, "close please")
        assert await conn.read_message() is None
        assert conn.close_code == 4002
        server.stop()

    asyncio.run(run())


def test_a_refused_upgrade_and_an_untrusted_certificate_say_why(tls):
    async def run() -> None:
        server, port = await serve(tls[0])
        with pytest.raises(HandshakeError) as refused:
            await ws.connect(f"wss://127.0.0.1:{port}/refused", ssl_context=tls[1])
        assert refused.value.code == 404 and refused.value.message == "no running session"
        with pytest.raises(ssl.SSLCertVerificationError):
            await ws.connect(f"wss://127.0.0.1:{port}/ws")  # the system's CAs only
        with pytest.raises((HandshakeError, ConnectionError)):  # plain text on a TLS port
            await ws.connect(f"ws://127.0.0.1:{port}/ws")
        server.stop()

    asyncio.run(run())


@SECURE
def test_messages_of_many_parts_arrive_whole_and_in_order(secure, tls):
    """A kernel message is written as its parts: small frames around large ones, which
    the socket ends join in runs (at most ``SMALL_WRITE`` each) and write large ones as
    they are."""

    async def run() -> None:
        server, port = await serve(tls[0] if secure else None)
        url = f"{'wss' if secure else 'ws'}://127.0.0.1:{port}/ws"
        conn = await ws.connect(url, ssl_context=tls[1] if secure else None, max_message_size=LIMIT)
        sizes = [
            [3, 40, 200, 90_000, 2, 70_000],  # small, large, small, large
            [ws.SMALL_WRITE - 1, ws.SMALL_WRITE - 1, 1, ws.SMALL_WRITE],  # runs that fill
            [10] * 2000,  # many small parts: several runs
            [5 * 1024 * 1024, 0, 7],
        ]
        messages = [[os.urandom(n) for n in parts] for parts in sizes]
        written = conn.write_many([*messages, *(parts[:1] for parts in messages)])
        if written is not None:
            await written
        for parts in [*messages, *(parts[:1] for parts in messages)]:
            assert await conn.read_message() == b"".join(parts)
        conn.close()
        server.stop()

    asyncio.run(run())


def test_connecting_by_name_and_to_servers_that_do_not_answer(tls):
    """The client's own connect (a socket the loop watches, TLS handshaken on it): a name
    that resolves to several addresses, a closed port, a TLS server that never speaks."""

    async def run() -> None:
        server, port = await serve()
        conn = await ws.connect(f"ws://localhost:{port}/ws")  # each address in turn
        await send(conn, b"by name")
        assert await conn.read_message() == b"by name"
        conn.close()
        server.stop()
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        closed_port = closed.getsockname()[1]
        closed.close()
        with pytest.raises(ConnectionRefusedError):
            await ws.connect(f"ws://127.0.0.1:{closed_port}/ws")
        silent = socket.socket()  # accepts (the backlog) and never answers the TLS hello
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        started = asyncio.get_running_loop().time()
        with pytest.raises(TimeoutError):
            await ws.connect(
                f"wss://127.0.0.1:{silent.getsockname()[1]}/ws",
                ssl_context=tls[1],
                connect_timeout=0.5,
            )
        assert asyncio.get_running_loop().time() - started < 5
        silent.close()

    asyncio.run(run())


async def raw_client(port: int, path: str = "/ws") -> tuple[Any, Any]:
    """A websocket client by hand: the upgrade, then whatever bytes a test writes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n".encode()
        + b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    assert b" 101 " in await reader.readuntil(b"\r\n\r\n")
    return reader, writer


def frame(opcode: int, payload: bytes, final: bool = True, masked: bool = True) -> bytes:
    return Frame(Opcode(opcode), payload, fin=final).serialize(mask=masked)


async def read_frame(reader: Any) -> tuple[int, bytes]:
    head = await reader.readexactly(2)
    length = head[1] & 0x7F
    if length == 126:
        length = struct.unpack("!H", await reader.readexactly(2))[0]
    elif length == 127:
        length = struct.unpack("!Q", await reader.readexactly(8))[0]
    return head[0] & 0x0F, await reader.readexactly(length)


def test_fragments_pings_oversize_and_unmasked_frames_from_a_raw_client():
    async def run() -> None:
        server, port = await serve()
        reader, writer = await raw_client(port)
        # A fragmented binary message with a ping between the fragments, all in one write.
        writer.write(
            frame(0x2, b"abc", final=False)
            + frame(0x9, b"p")
            + frame(0x0, b"def", final=False)
            + frame(0x0, b"ghi")
        )
        assert await read_frame(reader) == (0xA, b"p")
        assert await read_frame(reader) == (0x2, b"abcdefghi")
        # A frame over the limit closes the connection with 1009 before its payload.
        header = bytes([0x82, 0x80 | 127]) + struct.pack("!Q", LIMIT + 1) + os.urandom(4)
        writer.write(header)
        opcode, close = await read_frame(reader)
        assert opcode == 0x8 and struct.unpack("!H", close[:2])[0] == 1009
        assert str(LIMIT) in close[2:].decode()
        writer.close()
        # An unmasked frame from a client, a reserved opcode, a stray continuation: 1002.
        for bad in (
            _raw(0x2, b"x", True, False),
            _raw(0x3, b"", True, True),
            _raw(0x0, b"x", True, True),
            _raw(0x9, b"x" * 126, True, True),  # a control frame over 125 bytes
            _raw(0x8, b"\x03\xe7", True, True),  # close code 999
        ):
            reader, writer = await raw_client(port)
            writer.write(bad)
            opcode, close = await read_frame(reader)
            assert opcode == 0x8 and struct.unpack("!H", close[:2])[0] == 1002, bad
            assert await reader.read() == b""  # then the server closes the connection
            writer.close()
        # A client that stops half way through a frame: the server sees the drop.
        reader, writer = await raw_client(port)
        writer.write(frame(0x2, b"y" * 1000)[:500])
        await writer.drain()
        writer.close()
        await until(lambda: Echo.closes and Echo.closes[-1][0] == 1006, 2)
        assert Echo.closes[-1][0] == 1006
        server.stop()

    asyncio.run(run())


@pytest.mark.parametrize("run_loop", LOOPS)
def test_a_burst_echoes_in_few_writes_and_the_client_close_is_answered(run_loop):
    async def run() -> None:
        Echo.batches.clear()
        server, port = await serve()
        reader, writer = await raw_client(port)
        writer.write(b"".join(frame(0x2, bytes([i])) for i in range(200)))
        echoed = await reader.readexactly(200 * 3)
        assert echoed == b"".join(b"\x82\x01" + bytes([i]) for i in range(200))
        assert sum(Echo.batches) == 200 and len(Echo.batches) < 200
        # A client's close frame is answered with the same code, and on_close sees it.
        writer.write(frame(0x8, struct.pack("!H", 1001) + b"bye"))
        assert await read_frame(reader) == (0x8, struct.pack("!H", 1001) + b"bye")
        assert await reader.read() == b""  # then the server closes the connection
        await until(lambda: Echo.closes and Echo.closes[-1] == (1001, "bye"), 2)
        assert Echo.closes[-1] == (1001, "bye")
        writer.close()
        server.stop()

    run_loop(run())


@pytest.mark.parametrize("side", ["server", "client"])
def test_a_slow_reader_pauses_its_peer_instead_of_growing_the_buffer(side):
    """Output beyond the high-water mark says so (on_pause), and says when it drained;
    ``pause_reading`` leaves the bytes to TCP."""

    async def run() -> None:
        Echo.opened.clear()
        server, port = await serve()
        paused: list[bool] = []
        if side == "server":
            reader, writer = await raw_client(port)
            while not Echo.opened:
                await asyncio.sleep(0.01)
            end = Echo.opened[0].end
            assert end is not None
            end.on_pause = paused.append
        else:
            conn = await ws.connect(f"ws://127.0.0.1:{port}/ws", max_message_size=LIMIT)
            while not Echo.opened:
                await asyncio.sleep(0.01)
            Echo.opened[0].pause_reading(True)  # the server reads nothing: TCP holds us
            end = conn
            end.on_pause = paused.append
        chunk = os.urandom(1024 * 1024)
        sent = 0
        while not paused and sent < 256:
            end.send(OP_BINARY, chunk)
            sent += 1
            await asyncio.sleep(0)
        assert paused == [True] and sent < 256
        if side == "server":
            while paused[-1] is True:
                assert await reader.read(1024 * 1024)
            writer.close()
        else:
            Echo.opened[0].pause_reading(False)
            await until(lambda: paused[-1] is False, 5)
            conn.close()
        assert paused[-1] is False
        server.stop()

    asyncio.run(run())


def test_over_tls_a_slow_reader_holds_the_server_and_everything_arrives_in_order(tls):
    """The TLS server end (the SSL socket watched by the loop): its output backs up while
    the client reads nothing, says so, drains when it reads again; nothing is lost."""

    async def run() -> None:
        Echo.opened.clear()
        server, port = await serve(tls[0])
        conn = await ws.connect(f"wss://127.0.0.1:{port}/ws", ssl_context=tls[1])
        while not Echo.opened:
            await asyncio.sleep(0.01)
        end = Echo.opened[0].end
        assert isinstance(end, ws.SSLSocketEnd)
        paused: list[bool] = []
        end.on_pause = paused.append
        conn.pause_reading(True)
        chunks = [bytes([i]) * (1 << 20) for i in range(64)]
        sent = 0
        while not paused and sent < len(chunks):
            end.send(OP_BINARY, chunks[sent])
            sent += 1
            await asyncio.sleep(0)
        assert paused == [True] and sent < len(chunks)
        conn.pause_reading(False)
        for i in range(sent):
            assert await asyncio.wait_for(conn.read_message(), 10) == chunks[i]
        assert paused[-1] is False
        # A close the client asks for is answered over TLS, and both ends see it.
        conn.close(1001, "going away")
        assert await asyncio.wait_for(conn.read_message(), 10) is None
        await until(lambda: end.closed, 2)
        assert end.closed and Echo.closes[-1] == (1001, "going away")
        server.stop()

    asyncio.run(run())


def test_a_closed_connection_refuses_writes_and_a_dead_peer_is_cut_by_pings():
    async def run() -> None:
        server, port = await serve()
        conn = await ws.connect(f"ws://127.0.0.1:{port}/ws")
        conn.close()
        with pytest.raises(ConnectionClosed):
            conn.write_message(b"x", binary=True)
        assert await conn.read_message() is None
        assert conn.close_code == 1000
        # A peer that answers nothing at all (not even pings) is cut after two intervals.
        silent = await asyncio.start_server(_accept_then_hang, "127.0.0.1", 0)
        silent_port = silent.sockets[0].getsockname()[1]
        conn = await ws.connect(f"ws://127.0.0.1:{silent_port}/", ping_interval=0.2)
        assert await asyncio.wait_for(conn.read_message(), 5) == "first"
        assert await asyncio.wait_for(conn.read_message(), 5) is None
        assert conn.close_code == 1006
        silent.close()
        server.stop()

    asyncio.run(run())


async def _accept_then_hang(reader: Any, writer: Any, behind: bytes | None = None) -> None:
    writer.write(
        await upgrade_answer(reader)
        + (frame(0x1, b"first", masked=False) if behind is None else behind)  # in one write
    )
    if behind is not None:  # the client's close frame: gone at once, unanswered
        await reader.read(2)
        writer.close()
        return
    await asyncio.sleep(30)


def test_frames_right_behind_the_upgrade_response_arrive_first():
    async def run() -> None:
        silent = await asyncio.start_server(_accept_then_hang, "127.0.0.1", 0)
        port = silent.sockets[0].getsockname()[1]
        conn = await ws.connect(f"ws://127.0.0.1:{port}/")
        assert await asyncio.wait_for(conn.read_message(), 5) == "first"
        conn.close()
        silent.close()

    asyncio.run(run())


# -- what a stranger's review found (each was reproduced before it was fixed) -------------


def test_an_end_closed_while_its_reading_is_paused_still_reports_the_close():
    async def run() -> None:
        Echo.opened.clear()
        server, port = await serve()
        reader, writer = await raw_client(port)
        while not Echo.opened:
            await asyncio.sleep(0.01)
        handler = Echo.opened[0]
        handler.close(4000, "bye")
        handler.pause_reading(True)  # ignored: the peer's answer must be read
        writer.write(frame(0x8, struct.pack("!H", 4000)))
        await reader.read()
        await until(lambda: handler.end is not None and handler.end.closed, 2)
        assert handler.end is not None and handler.end.closed
        assert Echo.closes[-1][0] == 4000
        writer.close()
        server.stop()

    asyncio.run(run())


def test_a_peer_that_reads_nothing_is_cut_after_the_close_timeout(monkeypatch):
    monkeypatch.setattr(ws, "CLOSE_TIMEOUT", 0.5)

    async def run() -> None:
        Echo.opened.clear()
        server, port = await serve()
        _reader, writer = await raw_client(port)
        while not Echo.opened:
            await asyncio.sleep(0.01)
        end = Echo.opened[0].end
        assert end is not None
        for _ in range(40):  # 40 MiB the client never reads
            end.send(OP_BINARY, b"z" * (1 << 20))
        assert end.backlogged
        writer.write(frame(0x8, struct.pack("!H", 1000)))  # then closes, still not reading
        await writer.drain()
        await until(lambda: end.closed, 3)
        assert end.closed and not end.backlogged
        writer.close()
        server.stop()

    asyncio.run(run())


def test_many_tiny_fragments_and_bad_utf8_are_refused_with_their_codes():
    class Text(Echo):
        def on_messages(self, messages: list[tuple[int, Any]]) -> None:
            WebSocketEndpoint.on_messages(self, messages)  # decodes text

        def on_message(self, message: str | bytes) -> None:
            self.write_message(message)

    async def run() -> None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(4)
        sock.setblocking(False)
        app = web.Application([(r"/ws", Text)])
        text_server = HTTPServer(app)
        text_server.add_sockets([sock])
        port = sock.getsockname()[1]
        reader, writer = await raw_client(port)
        writer.write(_raw(0x1, b"\xff\xfe", True, True))
        opcode, close = await read_frame(reader)
        assert opcode == 0x8 and struct.unpack("!H", close[:2])[0] == 1007
        writer.close()
        reader, writer = await raw_client(port)
        empty = _raw(0x0, b"", False, True)
        writer.write(_raw(0x2, b"a", False, True) + empty * (ws.MAX_FRAGMENTS + 10))
        opcode, close = await read_frame(reader)
        assert opcode == 0x8 and struct.unpack("!H", close[:2])[0] == 1009
        writer.close()
        text_server.stop()

    asyncio.run(run())


async def _handshake_server(answer: bytes, then_close: bool) -> tuple[Any, int]:
    async def handle(reader: Any, writer: Any) -> None:
        request = await reader.readuntil(b"\r\n\r\n")
        key = next(
            line.split(b":", 1)[1].strip()
            for line in request.split(b"\r\n")
            if line.lower().startswith(b"sec-websocket-key")
        )
        from websockets.utils import accept_key

        writer.write(answer.replace(b"ACCEPT", accept_key(key.decode()).encode()))
        await writer.drain()
        if then_close:
            writer.close()
        else:
            await asyncio.sleep(5)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def test_handshakes_that_end_at_once_say_what_the_server_said():
    upgrade = (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: ACCEPT\r\n\r\n"
    )

    async def run() -> None:
        # A refusal whose body runs to the end of the connection.
        refusal = b'HTTP/1.1 403 Forbidden\r\n\r\n{"message": "go away"}'
        server, port = await _handshake_server(refusal, then_close=True)
        with pytest.raises(HandshakeError) as refused:
            await ws.connect(f"ws://127.0.0.1:{port}/", handshake_timeout=3)
        assert (refused.value.code, refused.value.message) == (403, "go away")
        server.close()
        # An upgrade, a close frame and the end of the connection in one segment.
        closing = upgrade + frame(0x8, struct.pack("!H", 4003) + b"kernel ended", masked=False)
        server, port = await _handshake_server(closing, then_close=True)
        conn = await ws.connect(f"ws://127.0.0.1:{port}/", handshake_timeout=3)
        assert await asyncio.wait_for(conn.read_message(), 3) is None
        assert (conn.close_code, conn.close_reason) == (4003, "kernel ended")
        server.close()
        # A code no close frame may carry is sent as 1011, and the end still closes.
        server, port = await _handshake_server(upgrade, then_close=False)
        conn = await ws.connect(f"ws://127.0.0.1:{port}/", handshake_timeout=3)
        conn.close(1006, "abnormal")
        assert conn.closing and conn.close_code == 1011
        server.close()

    asyncio.run(run())


# -- our framing of data, against the library's parser -------------------------------------


MESSAGE = st.tuples(
    st.sampled_from([OP_TEXT, OP_BINARY]),
    st.lists(st.binary(max_size=70_000), min_size=1, max_size=4),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages=st.lists(MESSAGE, min_size=1, max_size=6), masked=st.booleans())
def test_our_data_frames_are_what_the_reference_parser_reads(messages, masked):
    """``data_frame`` (one header, parts unjoined, a client's masked part by part) against
    the websockets library's own parser on the other side: every size class of length,
    parts that split a masking key's rotation anywhere."""
    from websockets.client import ClientProtocol
    from websockets.uri import parse_uri

    pieces: list[Any] = []
    for opcode, parts in messages:
        ws.data_frame(pieces, opcode, parts, masked)
    wire_bytes = b"".join(bytes(p) for p in pieces)
    if masked:  # a client wrote it: a server reads it
        reader: Any = ServerProtocol(state=State.OPEN, max_size=None)
    else:
        reader = ClientProtocol(parse_uri("ws://x/"), state=State.OPEN, max_size=None)
    reader.receive_data(wire_bytes)
    got = [(int(f.opcode), bytes(f.data)) for f in reader.events_received()]
    assert got == [(opcode, b"".join(parts)) for opcode, parts in messages]
    assert reader.parser_exc is None


# -- hostile frames, fed in slices to the glue around the library's protocol ---------------


class MemoryEnd(WebSocketEnd):
    """A server end whose connection is a list: what a fuzz run checks."""

    def __init__(self, limit: int) -> None:
        super().__init__(ServerProtocol(state=State.OPEN, max_size=limit))
        self.got: list[tuple[int, bytes]] = []
        self.out = bytearray()
        self.eof_written = False
        self.on_messages = lambda batch: self.got.extend((o, bytes(p)) for o, p in batch)

    def _write(self, data: bytes) -> None:
        assert not self.eof_written
        self.out += data

    def _write_eof(self) -> None:
        self.eof_written = True

    def _abort(self) -> None:
        self.eof_written = True

    def _reading(self, on: bool) -> None:
        pass


FRAME = st.one_of(
    # whole messages and fragmented ones, text and binary
    st.tuples(st.sampled_from([1, 2]), st.binary(max_size=300), st.just(True), st.just(True)),
    st.tuples(st.sampled_from([0, 1, 2]), st.binary(max_size=50), st.booleans(), st.just(True)),
    # pings, pongs, reserved opcodes, unmasked frames
    st.tuples(st.sampled_from([9, 10]), st.binary(max_size=20), st.just(True), st.just(True)),
    st.tuples(st.sampled_from([3, 7, 11, 15]), st.binary(max_size=5), st.booleans(), st.booleans()),
    st.tuples(st.sampled_from([1, 2]), st.binary(max_size=5), st.just(True), st.just(False)),
)


def _raw(opcode: int, payload: bytes, final: bool, masked: bool) -> bytes:
    head = bytes([(0x80 if final else 0) | opcode])
    key = os.urandom(4) if masked else b""
    length = len(payload)
    if length < 126:
        head += bytes([(0x80 if masked else 0) | length])
    else:
        head += bytes([(0x80 if masked else 0) | 126]) + struct.pack("!H", length)
    body = bytes(b ^ key[i % 4] for i, b in enumerate(payload)) if masked else payload
    return head + key + body


def _model(frames: list[tuple[int, bytes, bool, bool]], limit: int) -> tuple[list, bool]:
    """RFC 6455 by hand: the messages a server must deliver, and whether it must fail."""
    out: list[tuple[int, bytes]] = []
    partial: tuple[int, bytes] | None = None
    for opcode, payload, final, masked in frames:
        if not masked or opcode not in (0, 1, 2, 9, 10):
            return out, True
        if opcode in (9, 10):
            continue
        if opcode == 0:
            if partial is None:
                return out, True
            partial = (partial[0], partial[1] + payload)
        else:
            if partial is not None:
                return out, True
            partial = (opcode, payload)
        if len(partial[1]) > limit:
            return out, True
        if final:
            out.append(partial)
            partial = None
    return out, False


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames=st.lists(FRAME, max_size=12), cuts=st.lists(st.integers(0, 4000), max_size=8))
def test_hostile_frames_split_anywhere(frames, cuts):
    """Whatever the frames and however the bytes are cut into reads, the end delivers
    exactly the messages RFC 6455 says, in order, and fails the connection exactly when
    a frame breaks the protocol; it never raises."""
    limit = 200
    data = b"".join(_raw(*f) for f in frames)
    end = MemoryEnd(limit)
    positions = sorted({0, len(data), *(c for c in cuts if c < len(data))})

    async def feed() -> None:
        for start, stop in itertools.pairwise(positions):
            end.received(data[start:stop])

    asyncio.run(feed())
    expected, fails = _model(frames, limit)
    assert end.got == expected
    assert end.closing == fails
    if fails:  # a close frame went out, and the end of the connection
        assert end.close_code in (1002, 1009) and end.eof_written and b"\x88" in end.out
    else:
        assert not end.eof_written


@pytest.mark.parametrize(
    ("behind", "code"),
    [
        (bytes([0x82, 127]) + struct.pack("!Q", 1001), 1009),  # over max_message_size
        (frame(0x2, b"x", masked=True), 1002),  # a masked frame from a server
        (bytes([0x83, 0]), 1002),  # a reserved opcode
    ],
)
def test_a_protocol_error_right_behind_the_upgrade_closes_at_once(behind, code):
    """In the same read as the 101, the error was never looked at: no close went out and
    the client waited for as long as the server kept the connection open."""

    async def run() -> None:
        server = await asyncio.start_server(
            lambda r, w: _accept_then_hang(r, w, behind), "127.0.0.1", 0
        )
        port = server.sockets[0].getsockname()[1]
        conn = await ws.connect(f"ws://127.0.0.1:{port}/", max_message_size=1000)
        assert await asyncio.wait_for(conn.read_message(), 5) is None
        assert conn.close_code == code
        conn.abort()
        server.close()

    asyncio.run(run())


@pytest.mark.parametrize("delivered_to", [False, True])
def test_the_messages_before_a_text_that_is_not_utf8_are_delivered(delivered_to):
    """They arrived, in order, before the bad one: a websocket client delivers them, then
    fails the connection with 1007 (they were dropped with it)."""
    burst = (
        frame(0x1, b"one", masked=False)
        + frame(0x2, b"two", masked=False)
        + frame(0x1, b"\xff\xfe", masked=False)
    )

    async def run() -> None:
        server = await asyncio.start_server(
            lambda r, w: _accept_then_hang(r, w, burst), "127.0.0.1", 0
        )
        port = server.sockets[0].getsockname()[1]
        conn = await ws.connect(f"ws://127.0.0.1:{port}/")
        got: list[Any] = []
        if delivered_to:
            conn.deliver_to(got.append)
            assert await asyncio.wait_for(conn.read_message(), 5) is None
        else:
            while (message := await asyncio.wait_for(conn.read_message(), 5)) is not None:
                got.append(message)
        assert [bytes(m) if not isinstance(m, str) else m for m in got] == ["one", b"two"]
        assert conn.close_code == 1007
        conn.abort()
        server.close()

    asyncio.run(run())


def test_a_peer_that_pings_and_reads_nothing_gets_one_pong_owed():
    """Found by a stranger's review: 8 MiB of pings from a server that read nothing left
    21 MiB of pongs queued in the client (a pong for each, masked: 3 bytes for 1)."""
    read_now = asyncio.Event()
    got: list[tuple[int, bytes]] = []
    PINGS = 24 * 2**20 // 127  # 24 MiB of pings (a pong of each would be 25 MiB)

    async def server(reader: Any, writer: Any) -> None:
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        writer.write(await upgrade_answer(reader))
        ping = frame(0x9, b"p" * 125, masked=False)
        for _ in range(PINGS // 64):
            writer.write(ping * 64)
            await writer.drain()
        writer.write(frame(0x9, b"last", masked=False) + frame(0x1, b"done", masked=False))
        await writer.drain()
        await read_now.wait()
        while True:
            try:
                head = await reader.readexactly(2)
                size = head[1] & 0x7F  # pongs of at most 125 bytes, masked
                key = await reader.readexactly(4)
                masked = await reader.readexactly(size)
                payload = bytes(b ^ key[i % 4] for i, b in enumerate(masked))
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            got.append((head[0] & 0x0F, payload))

    async def run() -> None:
        listening = await asyncio.start_server(server, "127.0.0.1", 0)
        port = listening.sockets[0].getsockname()[1]
        conn = await ws.connect(f"ws://127.0.0.1:{port}/")
        assert await asyncio.wait_for(conn.read_message(), 60) == "done"  # every ping read
        assert conn.backlogged
        # At most what one read of pings answered beyond the mark, not a pong for each.
        assert conn._out_bytes <= ws.WRITE_HIGH_WATER + 2 * ws.READ_CHUNK
        read_now.set()
        # Drained: the pongs queued before the backlog, then the one owed, for the last.
        await until(lambda: not conn.backlogged and got and got[-1][1] == b"last", 30)
        assert not conn.backlogged
        assert got[-1] == (0xA, b"last"), (len(got), got[-2:], conn._out_bytes)
        assert len(got) < PINGS // 2
        conn.abort()
        listening.close()

    asyncio.run(run())
