"""The websocket ends of the broker, the bridge and the host agent, on one library.

Frames are parsed and written by the Sans-I/O protocol of the ``websockets`` library
(``websockets.server.ServerProtocol``, ``websockets.client.ClientProtocol``): maintained and
fuzzed by others, the same code on the server and the client side, with and without TLS.
This module only moves bytes between that protocol and a connection:

- :class:`WebSocketEndpoint` is a tornado ``RequestHandler`` that answers the upgrade
  (jupyter_server keeps the listening socket, authentication and TLS) and takes the
  connection with the public ``detach()``. A plain connection is then served on the event
  loop's own transport (:class:`SocketServerEnd`, after :func:`adopt`); a TLS one keeps
  the SSL socket tornado's ``SSLIOStream`` handshook (its TLS session cannot move), watched
  by the event loop itself (:class:`SSLSocketEnd`, a :class:`SocketEnd`).
- :class:`ClientEnd` is a :class:`SocketEnd` from :func:`connect`: the bridge and the host
  agent, on a socket the loop watches, plain or ``ssl.SSLSocket`` for ``wss://``. asyncio's
  own TLS layer (``sslproto``, pure Python) cost the bridge 0.33 ms of CPU per execute
  against 0.13 ms for the broker's SSL socket (docs/design-notes.md).

Every end has one small interface, what the relay needs (``RelayEnd``): every message of
one read arrives in one batch of ``(opcode, payload)`` pairs; ``send_many`` writes several
messages with one system call; ``pause_reading`` holds the peer (TCP back-pressure), and
``on_pause`` says when this end's own output has queued beyond ``WRITE_HIGH_WATER`` and when
it has drained. Fragmented messages are joined here; one message is at most
``max_message_size`` bytes, fragments included (the library's check).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
import logging
import os
import socket
import ssl
import struct
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, cast

from tornado import web
from tornado.ioloop import IOLoop
from tornado.iostream import IOStream, SSLIOStream
from websockets.client import ClientProtocol
from websockets.datastructures import Headers
from websockets.exceptions import InvalidStatus, PayloadTooBig
from websockets.frames import Close, Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import Protocol, Side, State
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

try:
    from websockets.speedups import apply_mask
except ImportError:  # the library's own fallback, pure Python
    from websockets.utils import apply_mask

log = logging.getLogger(__name__)

OP_TEXT, OP_BINARY = 1, 2
Message = tuple[int, Any]  # (1 text or 2 binary, the payload: bytes-like, or a list of parts)

READ_CHUNK = 256 * 1024
WRITE_HIGH_WATER = 4 * 1024 * 1024  # queued output beyond this holds the other side
READ_QUEUE_BYTES = 16 * 1024 * 1024  # a ClientEnd's unread messages beyond this hold the peer
CLOSE_TIMEOUT = 5.0  # seconds the peer has to answer a close before the connection is cut
LINGER_AFTER_FAILING = 1.0  # seconds a server reads on after failing a connection
MAX_FRAGMENTS = 10_000  # frames of one message: each costs memory whatever its size
INLINE_READ_BYTES = 64 * 1024  # read about this much at most before the loop runs again
TLS_RECORD = 16 * 1024  # the most one TLS record carries
_OPCODES = {Opcode.TEXT: OP_TEXT, Opcode.BINARY: OP_BINARY}
_HEAD16 = struct.Struct("!BBH")
_HEAD64 = struct.Struct("!BBQ")
SMALL_WRITE = 64 * 1024  # pieces under this in all are joined into one write
# The library logs each connection opened and closed at INFO: a broker has thousands.
protocol_log = logging.getLogger(__name__ + ".protocol")
protocol_log.setLevel(logging.WARNING)


class ConnectionClosed(Exception):
    """A write to a websocket that is closing or closed."""


class HandshakeError(Exception):
    """The server answered the upgrade with an HTTP status other than 101.

    ``code`` is the status, ``message`` the server's own words (the ``message`` of a JSON
    error body, as jupyter_server writes it) or the status line; ``location`` the
    ``Location`` of a redirect (a relay served by another broker), else None.
    """

    def __init__(
        self, code: int, message: str, body: bytes = b"", location: str | None = None
    ) -> None:
        super().__init__(f"HTTP {code}: {message}")
        self.code = code
        self.message = message
        self.body = body
        self.location = location


def _ignore(*args: Any) -> None:
    pass


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Take a write's outcome: a dropped connection is reported by the reader."""
    if not future.cancelled():
        future.exception()


def _sendable(code: int) -> bool:
    """Whether a close frame may carry ``code`` (RFC 6455 7.4)."""
    return code in (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014) or (
        3000 <= code <= 4999
    )


def frame_header(opcode: int, length: int, mask: bytes | None) -> bytes:
    """The header of one final, unfragmented frame (RFC 6455 5.2)."""
    first, bit = 0x80 | opcode, 0x80 if mask else 0
    if length < 126:
        head = bytes((first, bit | length))
    elif length < 65536:
        head = _HEAD16.pack(first, bit | 126, length)
    else:
        head = _HEAD64.pack(first, bit | 127, length)
    return head + mask if mask else head


def data_frame(pieces: list[Any], opcode: int, payload: Any, masked: bool) -> int:
    """Append one message as one frame to ``pieces`` (the payload's parts are not joined;
    a client's are masked part by part, the key turned to each part's offset); return its
    size on the wire."""
    parts = payload if isinstance(payload, (list, tuple)) else (payload,)
    length = sum(memoryview(part).nbytes for part in parts)
    key = os.urandom(4) if masked else None
    head = frame_header(opcode, length, key)
    pieces.append(head)
    if key is None:
        pieces.extend(parts)
        return len(head) + length
    offset = 0
    for part in parts:
        turn = offset % 4
        pieces.append(apply_mask(part, key[turn:] + key[:turn]))
        offset += memoryview(part).nbytes
    return len(head) + length


class _OnePongWhileBacklogged:
    """The library answers every ping with a pong. A peer that pings and reads nothing
    would grow our output without bound (pongs of masked pings take 3 bytes for 1); while
    the end is backlogged only the latest ping is answered, once it has drained (RFC 6455
    5.5.3 allows answering the most recent ping only)."""

    backlogged_end: WebSocketEnd | None = None
    owed_pong: bytes | None = None

    def send_frame(self, frame: Frame) -> None:
        end = self.backlogged_end
        if frame.opcode is Opcode.PONG and end is not None and end.backlogged:
            self.owed_pong = bytes(frame.data)
            return
        super().send_frame(frame)  # type: ignore[misc]


class _ServerProtocol(_OnePongWhileBacklogged, ServerProtocol):
    """The library's server protocol, with one pong owed while backlogged."""


class _ClientProtocol(_OnePongWhileBacklogged, ClientProtocol):
    """The library's client protocol, with one pong owed while backlogged."""


class WebSocketEnd(abc.ABC):
    """One websocket after its handshake: bytes in, batches of messages out.

    Subclasses move the bytes (``_write``, ``_write_eof``, ``_abort``, ``_reading``).
    Callbacks: ``on_messages(batch)``, ``on_pause(backlogged)`` and, once,
    ``on_closed(code, reason)`` with the peer's close code (or ours, if it never sent one).
    """

    def __init__(self, protocol: Protocol) -> None:
        self.protocol = protocol
        if isinstance(protocol, _OnePongWhileBacklogged):
            protocol.backlogged_end = self
        self.on_messages: Callable[[list[Message]], None] = _ignore
        self.on_pause: Callable[[bool], None] = _ignore
        self.on_closed: Callable[[int | None, str | None], None] = _ignore
        # a text message to send before closing for a message over the limit (None: none)
        self.on_refusal: Callable[[PayloadTooBig], str | None] = _ignore
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self.closed = False  # the connection is gone
        self.closing = False  # a close frame was sent or received: no more messages
        self.heard = True  # bytes arrived since the last keep-alive ping
        self.backlogged = False
        self._fragments: bytearray | None = None
        self._fragments_opcode = 0
        self._fragments_count = 0
        self._close_timer: asyncio.TimerHandle | None = None

    # -- what subclasses provide ----------------------------------------------------------

    @abc.abstractmethod
    def _write(self, data: Any) -> None:
        """Write bytes after everything written before."""

    @abc.abstractmethod
    def _write_eof(self) -> None:
        """Close the connection once what was written is out."""

    @abc.abstractmethod
    def _abort(self) -> None:
        """Cut the connection now."""

    @abc.abstractmethod
    def _reading(self, on: bool) -> None:
        """Read from the peer (True), or leave its bytes to TCP (False)."""

    # -- bytes in -------------------------------------------------------------------------

    def received(self, data: bytes) -> None:
        """Bytes from the network: answer what the protocol answers, deliver the messages."""
        self.heard = True
        self.protocol.receive_data(data)
        self.handle(self.protocol.events_received())

    def handle(self, events: Sequence[Any]) -> None:
        """Frames the protocol parsed: messages (fragments joined) to ``on_messages``."""
        protocol = self.protocol
        we_closed = self.closing and protocol.close_rcvd is None
        messages: list[Message] = []
        for frame in events:
            opcode = frame.opcode
            kind = _OPCODES.get(opcode)
            if kind is not None:
                if frame.fin:
                    messages.append((kind, frame.data))
                else:
                    self._fragments, self._fragments_opcode = bytearray(frame.data), kind
                    self._fragments_count = 1
            elif opcode is Opcode.CONT:
                if self._fragments is None:  # dropped: we closed over its fragment count
                    continue
                self._fragments += frame.data
                self._fragments_count += 1
                if frame.fin:
                    messages.append((self._fragments_opcode, bytes(self._fragments)))
                    self._fragments = None
                elif self._fragments_count > MAX_FRAGMENTS and not self.closing:
                    self._fragments = None
                    self.close(1009, f"a message in over {MAX_FRAGMENTS} fragments")
            elif opcode is Opcode.CLOSE:
                close = Close.parse(frame.data)
                self.close_code, self.close_reason = close.code, close.reason
                self.closing = True
        error = protocol.parser_exc
        if error is not None and not self.closing:
            self.closing = True
            sent = protocol.close_sent
            self.close_code = sent.code if sent is not None else 1006
            self.close_reason = str(error)
            if isinstance(error, PayloadTooBig):
                note = self.on_refusal(error)
                if note:  # before the close frame the protocol has queued
                    self.send_text_now(note)
            log.info("websocket closed: %s", error)
        self._flush()
        if messages and not we_closed:
            self.on_messages(messages)

    def eof(self) -> None:
        """The peer closed its side of the connection."""
        self.closing = True
        self.protocol.receive_eof()
        self._flush()

    def lost(self) -> None:
        """The connection is gone: tell the owner, once."""
        if self.closed:
            return
        self.closed = self.closing = True
        if self._close_timer is not None:
            self._close_timer.cancel()
        if self.close_code is None:
            self.close_code = 1006  # no close frame: the connection dropped
        self._set_backlogged(False)
        self.on_closed(self.close_code, self.close_reason)

    # -- bytes out ------------------------------------------------------------------------

    def _flush(self) -> None:
        """Write what the protocol has to send; close the connection where it says so."""
        data = self.protocol.data_to_send()
        if not data:
            return
        eof = data[-1] == b""
        chunk = b"".join(data)
        if chunk and not self.closed:
            self._write(chunk)
        if eof:
            self._write_eof()
        elif self.protocol.close_expected() and self._close_timer is None:
            loop = asyncio.get_running_loop()
            self._close_timer = loop.call_later(CLOSE_TIMEOUT, self._abort)

    def _server_eof(self, close: Callable[[], None]) -> None:
        """A server's end of the connection: ``close`` at once when the peer has closed too.
        When we failed the connection, the peer may still be sending, and a socket closed
        with unread bytes resets the connection: the peer would lose our close frame (and
        the refusal before it), so read and discard a little longer. Never later than
        ``CLOSE_TIMEOUT``, for a peer that reads nothing."""
        loop = asyncio.get_running_loop()
        if self._close_timer is None:
            self._close_timer = loop.call_later(CLOSE_TIMEOUT, self._abort)
        if self.protocol.close_rcvd is not None:
            close()
        else:
            loop.call_later(LINGER_AFTER_FAILING, close)

    def _set_backlogged(self, backlogged: bool) -> None:
        if backlogged != self.backlogged:
            self.backlogged = backlogged
            owed = getattr(self.protocol, "owed_pong", None)
            if not backlogged and owed is not None and not self.closed:
                self.protocol.owed_pong = None  # type: ignore[attr-defined]
                self.protocol.send_pong(owed)
                self._flush()
            self.on_pause(backlogged)

    def send_many(self, messages: Sequence[Message]) -> None:
        """Write messages in order (a payload may be a list of parts, written as they are).

        Data frames are framed here (:func:`data_frame`, checked against the library's
        parser by a fuzz test): the library's serializer copies a payload twice more, which
        halved a 20 MiB display's rate. Control frames stay the library's."""
        if not self.closing:
            self._send_frames(messages)

    def send_text_now(self, text: str) -> None:
        """One text message, even while closing (a refusal before the close frame)."""
        self._send_frames([(OP_TEXT, text.encode())])

    def _send_frames(self, messages: Sequence[Message]) -> None:
        masked = self.protocol.side is Side.CLIENT
        pieces: list[Any] = []
        size = 0
        for opcode, payload in messages:
            size += data_frame(pieces, opcode, payload, masked)
        self._write_pieces(pieces, size)

    def _write_pieces(self, pieces: list[Any], size: int) -> None:
        self._write(b"".join(pieces))

    def send(self, opcode: int, payload: Any) -> None:
        self.send_many([(opcode, payload)])

    def ping(self) -> None:
        if not self.closing:
            self.protocol.send_ping(b"")
            self._flush()

    def pause_reading(self, paused: bool) -> None:
        """Stop (or resume) reading from this peer while what it sends cannot go on."""
        if not self.closed and not (paused and self.closing):
            self._reading(not paused)

    def close(self, code: int | None = 1000, reason: str | None = None) -> None:
        """Send a close frame; the connection closes when the peer answers (or soon)."""
        if self.closing or self.closed:
            return
        # a close frame holds at most 123 bytes of reason; a code no close frame may carry
        # (1005, 1006, 1015, or out of range) is sent as 1011
        text = (reason or "").encode()[:123].decode("utf-8", "ignore")
        if code is not None and not _sendable(code):
            code = 1011
        if code is None:
            self.protocol.send_close()
        else:
            self.protocol.send_close(code, text)
        self.closing = True
        self.close_code, self.close_reason = code, reason
        self._reading(True)  # to read the peer's answer
        self._flush()


# -- the server end (the broker) -----------------------------------------------------------


class WebSocketEndpoint(web.RequestHandler):
    """A handler that answers a websocket upgrade and serves it with a :class:`ServerEnd`.

    Subclasses authenticate in ``get`` before awaiting ``super().get()``, and override
    ``on_open`` (messages can be written), ``on_messages`` (each read's batch; by default
    ``on_message`` per message, text decoded), ``on_pause`` and ``on_close``. They write with
    ``write_message``, ``send_many`` and ``close``, as with tornado's ``WebSocketHandler``.
    """

    end: ServerEnd | None = None
    max_message_size = 10 * 1024 * 1024
    close_code: int | None = None
    close_reason: str | None = None

    def refusal(self, error: PayloadTooBig) -> str | None:
        """A text message to send before closing for a message over the size limit."""
        return None

    def check_websocket_origin(self, origin: str) -> bool:
        """Whether a browser at ``origin`` may connect (clients that send none may)."""
        return False

    async def get(self, *args: Any, **kwargs: Any) -> None:
        headers = Headers()
        for name, value in self.request.headers.get_all():
            headers[name] = value
        origin = headers.get("Origin")
        if origin is not None and not self.check_websocket_origin(origin):
            raise web.HTTPError(403, "cross-origin websockets are not allowed")
        handshake = ServerProtocol(max_size=self.max_message_size, logger=protocol_log)
        response = handshake.accept(Request(self.request.uri or "/", headers))
        if response.status_code != 101:
            # Not an upgrade a websocket client sent: say why, as any HTTP error.
            raise web.HTTPError(response.status_code, response.body.decode(errors="replace"))
        handshake.send_response(response)
        answer = b"".join(handshake.data_to_send())
        stream = self.detach()
        if stream.closed():  # the client went away while the upgrade was decided
            return
        if isinstance(stream, SSLIOStream):  # TLS: on tornado's SSL socket, watched by the loop
            tls_end = SSLSocketEnd(stream, self.max_message_size, answer)
            self._attach(tls_end)
            tls_end.set_nodelay(True)
            tls_end.serve(lambda: self._opened(tls_end))
            return
        end = SocketServerEnd(self.max_message_size, answer)
        self._attach(end)
        end.started = lambda: self._opened(end)  # type: ignore[method-assign]
        try:
            await adopt(stream, end)
        except OSError:
            end.lost()  # the client went away meanwhile

    def _attach(self, end: ServerEnd) -> None:
        self.end = end
        end.on_messages = self.on_messages
        end.on_pause = self.on_pause
        end.on_closed = self._closed
        end.on_refusal = self.refusal

    def _opened(self, end: ServerEnd) -> None:
        try:
            self.on_open()
        except Exception:
            log.exception("websocket on_open failed")
            end.close(1011, "internal error")

    def _closed(self, code: int | None, reason: str | None) -> None:
        self.close_code, self.close_reason = code, reason
        try:
            self.on_close()
        except Exception:
            log.exception("websocket on_close failed")

    # hooks
    def on_open(self) -> None:
        """The upgrade is answered: messages can be written."""

    def on_messages(self, messages: list[Message]) -> None:
        for opcode, payload in messages:
            if opcode == OP_TEXT:
                try:
                    text = bytes(payload).decode("utf-8")
                except UnicodeDecodeError:
                    self.close(1007, "a text message that is not UTF-8")
                    return
                self.on_message(text)
            else:
                self.on_message(payload)

    def on_message(self, message: str | bytes) -> None:
        """One message (text as str)."""

    def on_pause(self, backlogged: bool) -> None:
        """This end's output is queued beyond the high-water mark (True), or drained."""

    def on_close(self) -> None:
        """The connection is gone (``close_code``, ``close_reason``)."""

    # what subclasses call
    def send_many(self, messages: Sequence[Message]) -> None:
        if self.end is not None:
            self.end.send_many(messages)

    def write_message(self, message: str | bytes | dict[str, Any], binary: bool = False) -> None:
        end = self.end
        if end is None or end.closing:
            raise ConnectionClosed()
        if isinstance(message, dict):
            message = json.dumps(message)
        if isinstance(message, str):
            end.send(OP_TEXT, message.encode("utf-8"))
        else:
            end.send(OP_BINARY if binary else OP_TEXT, message)

    def pause_reading(self, paused: bool) -> None:
        if self.end is not None:
            self.end.pause_reading(paused)

    def close(self, code: int | None = 1000, reason: str | None = None) -> None:
        if self.end is not None:
            self.end.close(1000 if code is None else code, reason)


# -- ends on asyncio transports: the broker's plain connections, every client -------------


class TransportEnd(WebSocketEnd, asyncio.Protocol):
    """A websocket on an asyncio transport: the plain sockets the broker took from tornado
    (on uvloop, a transport in C). asyncio reads once per loop turn and holds
    output in the transport; its high-water mark is ``WRITE_HIGH_WATER``."""

    transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_HIGH_WATER // 4)
        self.set_nodelay(True)

    def data_received(self, data: bytes) -> None:
        self.received(data)

    def eof_received(self) -> bool | None:
        self.eof()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost()

    def pause_writing(self) -> None:
        self._set_backlogged(True)

    def resume_writing(self) -> None:
        self._set_backlogged(False)

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _write_pieces(self, pieces: list[Any], size: int) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if size < SMALL_WRITE:
            transport.write(b"".join(pieces))
        else:
            transport.writelines(pieces)  # uvloop: one writev, no copy

    def _write_eof(self) -> None:
        if self.transport is not None:
            self.transport.close()  # after what is buffered

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _reading(self, on: bool) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if on:
            transport.resume_reading()
        else:
            transport.pause_reading()

    def set_nodelay(self, value: bool) -> None:
        sock = self.transport.get_extra_info("socket") if self.transport else None
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):  # a connection already gone
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, int(value))


class SocketServerEnd(TransportEnd):
    """The server side on a plain socket taken from tornado after the upgrade: the event
    loop's own transport, one read per loop turn and no future per read or write."""

    def __init__(self, max_message_size: int, answer: bytes = b"") -> None:
        super().__init__(
            _ServerProtocol(state=State.OPEN, max_size=max_message_size, logger=protocol_log)
        )
        self.answer = answer  # the upgrade's 101, written first
        self.early = b""  # bytes tornado had read past the upgrade request

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.answer:
            self._write(self.answer)
        self.started()
        if self.early:
            early, self.early = self.early, b""
            self.received(early)

    def started(self) -> None:
        """The transport is ours (the upgrade's answer goes first)."""

    def _write_eof(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self._server_eof(transport.close)  # the transport closes once its buffer is out


_READ_BUFFERS = threading.local()


def _read_buffer() -> memoryview:
    """The read buffer of this thread's ends: one read at a time per loop, copied out by
    the protocol. A ``recv`` of READ_CHUNK allocated that much for each read and gave back
    the rest: on TLS (a record of at most 16 KiB a read) an mmap and a munmap each time."""
    view = getattr(_READ_BUFFERS, "view", None)
    if view is None:
        view = _READ_BUFFERS.view = memoryview(bytearray(READ_CHUNK))
    return view


class SocketEnd(WebSocketEnd):
    """A websocket on a non-blocking socket, plain or TLS (``ssl.SSLSocket``), that the
    event loop watches for this end (``add_reader``/``add_writer``): one ``recv`` or
    ``send`` per move, with no future, transport or TLS layer of asyncio's in between.
    Output the socket cannot take yet is queued, in order; beyond ``WRITE_HIGH_WATER`` the
    end reports itself backlogged. Subclasses start it with :meth:`_start`."""

    def __init__(self, protocol: Protocol, sock: socket.socket) -> None:
        super().__init__(protocol)
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.error: Exception | None = None  # what cut the connection, if the network did
        self._tls = isinstance(sock, ssl.SSLSocket)
        self._fd = sock.fileno()
        self._buffer = _read_buffer()
        self._out: deque[memoryview] = deque()
        self._out_bytes = 0
        self._reading_on = True
        self._watching_read = False
        self._watching_write = False
        self._close_when_sent = False

    def _start(self) -> None:
        self._watch_read(True)
        if self._tls:
            self.loop.call_soon(self._readable)  # what the TLS layer already decrypted

    # reading
    def _watch_read(self, on: bool) -> None:
        if self.closed or on == self._watching_read:
            return
        self._watching_read = on
        if on:
            self.loop.add_reader(self._fd, self._readable)
        else:
            self.loop.remove_reader(self._fd)

    def _readable(self) -> None:
        budget = INLINE_READ_BYTES
        while self._reading_on and not self.closed:
            try:
                size = self.sock.recv_into(self._buffer)
            except (ssl.SSLWantReadError, BlockingIOError, InterruptedError):
                return
            except ssl.SSLWantWriteError:  # TLS must write before it can read on
                self._watch_write(True)
                return
            except OSError as error:  # ssl.SSLError among them
                self._fail(error)
                return
            if not size:
                self._peer_eof()
                return
            try:
                self.received(self._buffer[:size])  # the protocol copies what it keeps
            except Exception:
                log.exception("handling a websocket message failed")
                self.close(1011, "internal error")
            budget -= size
            if not self._more(size):
                return  # the loop wakes us for what arrives next (level-triggered)
            if budget <= 0:  # a fast sender: let the loop serve everyone else first
                self.loop.call_soon(self._readable)
                return

    def _more(self, read: int) -> bool:
        """Whether another read may find bytes at once: a full read on a plain socket, and
        on TLS bytes already decrypted or a full record (the rest of a burst). Else one
        read per wake-up, with no failing read (an exception) to end it."""
        if self._tls:
            return read >= TLS_RECORD or cast(ssl.SSLSocket, self.sock).pending() > 0
        return read >= READ_CHUNK

    def _peer_eof(self) -> None:
        """The peer closed its side: what it sent is all there is."""
        self.eof()
        self._abort()

    def _reading(self, on: bool) -> None:
        was, self._reading_on = self._reading_on, on
        self._watch_read(on)
        if on and not was and self._tls:
            self.loop.call_soon(self._readable)  # bytes the TLS layer may hold

    # writing
    def _watch_write(self, on: bool) -> None:
        if self.closed or on == self._watching_write:
            return
        self._watching_write = on
        if on:
            self.loop.add_writer(self._fd, self._writable)
        else:
            self.loop.remove_writer(self._fd)

    def _write(self, data: Any) -> None:
        if self.closed:
            return
        view = memoryview(data).cast("B")
        if not self._out:
            try:
                sent = self.sock.send(view)
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError, InterruptedError):
                sent = 0
            except OSError as error:
                self._fail(error)
                return
            if sent == view.nbytes:
                return
            view = view[sent:]
        self._out.append(view)
        self._out_bytes += view.nbytes
        self._watch_write(True)
        if self._out_bytes > WRITE_HIGH_WATER:
            self._set_backlogged(True)

    def _writable(self) -> None:
        out = self._out
        while out:
            head = out[0]
            try:
                sent = self.sock.send(head)
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError, InterruptedError):
                return
            except OSError as error:
                self._fail(error)
                return
            self._out_bytes -= sent
            if sent == head.nbytes:
                out.popleft()
            else:
                out[0] = head[sent:]
        self._watch_write(False)
        if self._reading_on and self._tls:  # TLS may have waited on this write to read on
            self.loop.call_soon(self._readable)
        if self._out_bytes <= WRITE_HIGH_WATER // 4:
            self._set_backlogged(False)
        if self._close_when_sent:
            self._abort()

    def _write_pieces(self, pieces: list[Any], size: int) -> None:
        """Large pieces as they are, the small ones between them joined: a kernel
        message's small frames (header, parent, signature) around its data each cost a
        system call, and on TLS a record of their own."""
        if size < SMALL_WRITE:
            self._write(b"".join(pieces))
            return
        run: list[Any] = []
        joined = 0
        for piece in pieces:
            nbytes = memoryview(piece).nbytes
            if nbytes < SMALL_WRITE and joined + nbytes <= SMALL_WRITE:
                run.append(piece)
                joined += nbytes
                continue
            if run:
                self._write(b"".join(run))
                run, joined = [], 0
            if nbytes < SMALL_WRITE:
                run.append(piece)
                joined = nbytes
            else:
                self._write(piece)
        if run:
            self._write(b"".join(run))

    def _write_eof(self) -> None:
        self._close_once_sent()

    def _close_once_sent(self) -> None:
        if self._out:
            self._close_when_sent = True
        else:
            self._abort()

    def _fail(self, error: Exception) -> None:
        if self.error is None:
            self.error = error
        self._abort()

    def abort(self) -> None:
        """Cut the connection now, without a close frame."""
        self._abort()

    def _abort(self) -> None:
        if self.closed:
            return
        self._watch_read(False)
        self._watch_write(False)
        self._out.clear()
        with contextlib.suppress(OSError):
            self.sock.close()
        self.lost()

    def set_nodelay(self, value: bool) -> None:
        if self.sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, int(value))


class SSLSocketEnd(SocketEnd):
    """The server side of a TLS connection, on the SSL socket tornado's ``SSLIOStream``
    made (its TLS session cannot move to an asyncio transport). Tornado's handler for it
    is removed (``IOLoop.remove_handler``); what tornado had read past the upgrade is
    taken first, with a read that completes at once."""

    def __init__(self, stream: SSLIOStream, max_message_size: int, answer: bytes) -> None:
        super().__init__(
            _ServerProtocol(state=State.OPEN, max_size=max_message_size, logger=protocol_log),
            cast(ssl.SSLSocket, stream.socket),
        )
        self.stream = stream  # tornado's object, kept for its socket; never used again
        self.answer = answer

    def serve(self, started: Callable[[], None]) -> None:
        early = _read_past_upgrade(self.stream)
        IOLoop.current().remove_handler(self._fd)  # tornado no longer watches the socket
        self._write(self.answer)
        started()
        if early:
            self.received(early)
        self._start()

    def _write_eof(self) -> None:
        if not self.closed:
            self._server_eof(self._close_once_sent)


def _read_past_upgrade(stream: IOStream) -> bytes:
    """What tornado had read past the upgrade request: a read that completes at once takes
    it; one that does not is left to end with the stream (nothing had arrived)."""
    pending = stream.read_bytes(READ_CHUNK, partial=True)
    if not pending.done():
        pending.add_done_callback(_retrieve)
        return b""
    if pending.cancelled() or pending.exception() is not None:
        return b""
    return pending.result()


async def adopt(stream: IOStream, end: SocketServerEnd) -> None:
    """Serve a plain connection tornado has detached with ``end``, on the event loop's own
    transport: the socket is duplicated and tornado's copy closed (its descriptor leaves
    tornado's loop), so no byte is lost or read twice. Bytes tornado had already read past
    the upgrade (a client should wait for the 101 before it sends, RFC 6455 4.1; not every
    client does) are the end's first."""
    end.early = _read_past_upgrade(stream)
    fd = stream.fileno()
    duplicate = os.dup(fd if isinstance(fd, int) else fd.fileno())
    stream.close()
    sock = socket.socket(fileno=duplicate)
    try:
        await asyncio.get_running_loop().connect_accepted_socket(lambda: end, sock=sock)
    except BaseException:
        sock.close()
        raise


ServerEnd = SocketServerEnd | SSLSocketEnd


# -- the client end (the bridge, the host agent) -------------------------------------------


class ClientEnd(SocketEnd):
    """The client side: ``await read_message()`` (None once closed; text as str),
    ``write_message``, ``write_many``, ``close``, ``close_code`` and ``close_reason``;
    or ``deliver_to(handler)`` to take each message in the read's own callback.

    ``write_message`` writes at once and returns None, or, while output is queued beyond
    ``WRITE_HIGH_WATER``, a future that resolves when it has drained. With a
    ``ping_interval`` a ping goes out each interval, and a connection from which nothing
    at all came for a whole interval is cut.
    """

    def __init__(
        self, protocol: ClientProtocol, sock: socket.socket, ping_interval: float | None = None
    ) -> None:
        super().__init__(protocol, sock)
        self.ping_interval = ping_interval
        self.handshake: asyncio.Future[None] = self.loop.create_future()
        self._queue: deque[str | bytes] = deque()
        self._queued_bytes = 0
        self._read_paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._drained: asyncio.Future[None] | None = None
        self._pinger: asyncio.TimerHandle | None = None
        self._handler: Callable[[Any], None] | None = None
        self.on_messages = self._deliver
        self.on_pause = self._backlog
        self.on_closed = self._gone

    def start(self) -> None:
        """Send the upgrade request and read the answer."""
        self._flush()
        self._start()

    def received(self, data: bytes) -> None:
        if self.handshake.done():
            super().received(data)
            return
        protocol = cast(ClientProtocol, self.protocol)
        protocol.receive_data(data)
        events = protocol.events_received()
        if protocol.handshake_exc is not None:
            self.handshake.set_exception(_handshake_error(protocol.handshake_exc))
            self._flush()
            self._abort()
            return
        if not events or not isinstance(events[0], Response):
            return  # the response has not fully arrived
        self.handshake.set_result(None)
        if self.ping_interval:
            self._pinger = self.loop.call_later(self.ping_interval, self._ping)
        # Frames that came right behind the response, or a protocol error in them (the
        # library then queued a close frame): handled as in any later read.
        self.handle(events[1:])

    def _peer_eof(self) -> None:
        if not self.handshake.done():
            # A refusal whose body runs to the end of the connection is complete only now.
            protocol = cast(ClientProtocol, self.protocol)
            protocol.receive_eof()
            protocol.events_received()
            if protocol.handshake_exc is not None:
                self.handshake.set_exception(_handshake_error(protocol.handshake_exc))
            self._abort()
            return
        super()._peer_eof()

    def lost(self) -> None:
        if not self.handshake.done():
            self.handshake.set_exception(
                self.error or ConnectionError("the server closed the connection")
            )
        if self._pinger is not None:
            self._pinger.cancel()
        super().lost()

    def _ping(self) -> None:
        if self.closed:
            return
        held = self._read_paused or self.backlogged  # TCP holds one side: pongs wait too
        if not self.heard and not held:  # nothing, not even a pong, for a whole interval
            self._abort()
            return
        self.heard = False
        self.ping()
        self._pinger = self.loop.call_later(self.ping_interval or 0, self._ping)

    # delivery
    def deliver_to(self, handler: Callable[[str | bytes], None]) -> None:
        """Hand every message to ``handler`` as it is read, instead of queueing it for
        ``read_message`` (which then only reports the close, with None). Messages
        already queued go first."""
        self._handler = handler
        while self._queue:
            self._call(handler, self._queue.popleft())
        self._queued_bytes = 0
        if self._read_paused:
            self._read_paused = False
            self._reading(True)

    @staticmethod
    def _call(handler: Callable[[Any], None], message: Any) -> None:
        try:
            handler(message)
        except Exception:
            log.exception("handling a websocket message failed")

    def _deliver(self, messages: list[Message]) -> None:
        decoded: list[str | bytes] = []
        not_utf8 = False
        for opcode, payload in messages:
            if opcode == OP_TEXT:
                try:
                    decoded.append(bytes(payload).decode("utf-8"))
                except UnicodeDecodeError:
                    not_utf8 = True  # what came before it is delivered, then the close
                    break
            else:
                decoded.append(payload)
        self._hand_over(decoded)
        if not_utf8:
            self.close(1007, "a text message that is not UTF-8")

    def _hand_over(self, decoded: list[str | bytes]) -> None:
        handler = self._handler
        if handler is not None:
            for message in decoded:
                self._call(handler, message)
            return
        for message in decoded:
            self._queue.append(message)
            self._queued_bytes += len(message)
        if self._queued_bytes > READ_QUEUE_BYTES and not self._read_paused:
            self._read_paused = True  # the reader is behind: let TCP hold the sender
            self._reading(False)
        self._wake()

    def _gone(self, code: int | None, reason: str | None) -> None:
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _backlog(self, backlogged: bool) -> None:
        if backlogged:
            if self._drained is None:
                self._drained = asyncio.get_running_loop().create_future()
            return
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)

    async def read_message(self) -> str | bytes | None:
        while not self._queue:
            if self.closed:
                return None
            if self._waiter is None or self._waiter.done():
                self._waiter = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._waiter)
        message = self._queue.popleft()
        self._queued_bytes -= len(message)
        if self._read_paused and self._queued_bytes < READ_QUEUE_BYTES // 2:
            self._read_paused = False
            self._reading(True)
        return message

    def write_message(self, message: str | bytes, binary: bool = False) -> Any:
        if self.closing or self.closed:
            raise ConnectionClosed()
        if isinstance(message, str):
            self.send(OP_TEXT, message.encode("utf-8"))
        else:
            self.send(OP_BINARY if binary else OP_TEXT, message)
        return self._drained

    def write_many(self, messages: Sequence[Any]) -> Any:
        """Write binary messages (each bytes-like or a list of parts) in order, with one
        write; like ``write_message`` otherwise."""
        if self.closing or self.closed:
            raise ConnectionClosed()
        self.send_many([(OP_BINARY, message) for message in messages])
        return self._drained


def _handshake_error(error: Exception) -> Exception:
    if isinstance(error, InvalidStatus):
        response = error.response
        body = bytes(response.body or b"")
        message = response.reason_phrase
        try:
            data = json.loads(body)
        except ValueError:
            pass
        else:
            if isinstance(data, dict) and data.get("message"):
                message = str(data["message"])[:500]
        location = response.headers.get("Location") if 300 <= response.status_code < 400 else None
        return HandshakeError(response.status_code, message, body, location)
    return HandshakeError(0, f"not a websocket server: {error}")


async def _ready(loop: asyncio.AbstractEventLoop, sock: socket.socket, write: bool) -> None:
    """Wait until ``sock`` can be read (or written)."""
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    fd = sock.fileno()
    (loop.add_writer if write else loop.add_reader)(fd, wake)
    try:
        await ready
    finally:
        (loop.remove_writer if write else loop.remove_reader)(fd)


async def _open(host: str, port: int, context: ssl.SSLContext | None) -> socket.socket:
    """A connected non-blocking socket to ``host``, Nagle off, TLS handshaken with
    ``context`` (certificate and host name verified as the context says)."""
    loop = asyncio.get_running_loop()
    addresses = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    errors: list[OSError] = []
    for family, kind, proto, _name, address in addresses:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, address)
        except OSError as error:
            sock.close()
            errors.append(error)
            continue
        except BaseException:
            sock.close()
            raise
        break
    else:
        if len(errors) == 1:
            raise errors[0]
        raise OSError(f"cannot connect to {host}:{port}: {'; '.join(map(str, errors))}")
    try:
        if family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if context is None:
            return sock
        sock = context.wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False)
        while True:
            try:
                cast(ssl.SSLSocket, sock).do_handshake()
                return sock
            except ssl.SSLWantReadError:
                await _ready(loop, sock, write=False)
            except ssl.SSLWantWriteError:
                await _ready(loop, sock, write=True)
    except BaseException:
        sock.close()
        raise


async def connect(
    url: str,
    *,
    headers: dict[str, str] | None = None,
    ssl_context: ssl.SSLContext | None = None,
    max_message_size: int = 256 * 1024 * 1024,
    ping_interval: float | None = None,
    connect_timeout: float = 10.0,
    handshake_timeout: float = 30.0,
) -> ClientEnd:
    """Open a websocket to ``url`` (``ws://`` or ``wss://``) with Nagle off.

    Raises :class:`HandshakeError` when the server refuses the upgrade, ``OSError``
    (``ssl.SSLError`` among them) when it cannot be reached, ``TimeoutError`` when it does
    not answer in time.
    """
    uri = parse_uri(url)
    if uri.secure and ssl_context is None:
        ssl_context = ssl.create_default_context()
    protocol = _ClientProtocol(uri, max_size=max_message_size, logger=protocol_log)
    request = protocol.connect()
    for name, value in (headers or {}).items():
        request.headers[name] = value
    protocol.send_request(request)
    sock = await asyncio.wait_for(
        _open(uri.host, uri.port, ssl_context if uri.secure else None), connect_timeout
    )
    end = ClientEnd(protocol, sock, ping_interval)
    end.start()
    try:
        await asyncio.wait_for(asyncio.shield(end.handshake), handshake_timeout)
    except BaseException:
        # What the connection's end sets on the handshake now, nobody awaits.
        end.handshake.add_done_callback(_retrieve)
        end.abort()
        raise
    return end
