"""Websockets that read frames in batches: the relay's hot path.

Tornado's ``WebSocketProtocol13`` awaits the stream three or four times per frame (header,
length, mask, payload), and each await registers and unregisters the socket with the
selector. On a relay that copies small kernel messages, that bookkeeping is most of the
CPU. This protocol reads whatever has arrived in one call and parses every complete frame
in it; a large frame's remainder is read in one exact read. Everything else (writing,
closing, pings, control frames, callbacks) is tornado's.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
from collections import deque
from typing import Any, cast

from tornado import httpclient, httputil
from tornado.iostream import SSLIOStream, StreamClosedError
from tornado.util import _websocket_mask
from tornado.websocket import (
    WebSocketClientConnection,
    WebSocketClosedError,
    WebSocketHandler,
    WebSocketProtocol,
    WebSocketProtocol13,
)

READ_CHUNK = 256 * 1024
_YIELD_EVERY_BYTES = 1024 * 1024
_SHORT = struct.Struct("!H")
_LONG = struct.Struct("!Q")


class BatchedWebSocketProtocol(WebSocketProtocol13):
    """RFC 6455 frames parsed from batched reads (no compression)."""

    async def _receive_frame_loop(self) -> None:
        if self._decompressor is not None:  # compression is never negotiated by our peers
            await super()._receive_frame_loop()
            return
        buffer = bytearray()
        since_yield = 0
        try:
            while not self.client_terminated:
                chunk = await self.stream.read_bytes(READ_CHUNK, partial=True)
                self._wire_bytes_in += len(chunk)
                buffer += chunk
                consumed = await self._parse_frames(buffer)
                if consumed:
                    del buffer[:consumed]
                since_yield += len(chunk)
                if since_yield >= _YIELD_EVERY_BYTES:
                    since_yield = 0
                    await asyncio.sleep(0)
        except StreamClosedError:
            self._abort()
        finally:
            self.handler.on_ws_connection_close(self.close_code, self.close_reason)

    async def _parse_frames(self, buffer: bytearray) -> int:
        """Handle every complete frame at the start of ``buffer``; return the bytes used."""
        position = 0
        while not self.client_terminated:
            available = len(buffer) - position
            if available < 2:
                return position
            first, second = buffer[position], buffer[position + 1]
            final = first & 0x80
            opcode = first & 0x0F
            if first & 0x70:  # reserved bits: an extension we did not negotiate
                self._abort()
                return len(buffer)
            masked = second & 0x80
            length = second & 0x7F
            header = 2
            if length == 126:
                if available < 4:
                    return position
                length = _SHORT.unpack_from(buffer, position + 2)[0]
                header = 4
            elif length == 127:
                if available < 10:
                    return position
                length = _LONG.unpack_from(buffer, position + 2)[0]
                header = 10
            if opcode & 0x8 and (length >= 126 or not final):
                self._abort()  # control frames are short and never fragmented
                return len(buffer)
            pending = len(self._fragmented_message_buffer or b"")
            if length + pending > self.params.max_message_size:
                self.close(1009, "message too big")
                self._abort()
                return len(buffer)
            mask_start = position + header
            if masked:
                header += 4
            end = position + header + length
            if len(buffer) < end:
                if length < READ_CHUNK:
                    return position  # a small frame: wait for the next batch
                # A large frame: read exactly what is missing, in one call.
                missing = end - len(buffer)
                buffer += await self.stream.read_bytes(missing)
                self._wire_bytes_in += missing
            with memoryview(buffer) as view:
                payload = bytes(view[position + header : end])
                mask = bytes(view[mask_start : mask_start + 4]) if masked else None
            if mask is not None:
                payload = _websocket_mask(mask, payload)
            position = end
            handled = self._frame(final, opcode, payload)
            if handled is not None:
                await handled
        return position

    def _frame(self, final: int, opcode: int, payload: bytes) -> Any:
        """Reassemble fragments and hand complete messages to tornado's handling."""
        if opcode & 0x8:
            return self._handle_message(opcode, payload)
        if opcode == 0:
            if self._fragmented_message_buffer is None:
                self._abort()
                return None
            self._fragmented_message_buffer.extend(payload)
            if not final:
                return None
            opcode = cast(int, self._fragmented_message_opcode)
            payload = bytes(self._fragmented_message_buffer)
            self._fragmented_message_buffer = None
        elif self._fragmented_message_buffer is not None:
            self._abort()
            return None
        elif not final:
            self._fragmented_message_opcode = opcode
            self._fragmented_message_buffer = bytearray(payload)
            return None
        return self._handle_message(opcode, payload)


class BatchedWebSocketHandler(WebSocketHandler):
    """A server websocket handler using the batched protocol."""

    def get_websocket_protocol(self) -> WebSocketProtocol | None:
        protocol = super().get_websocket_protocol()
        if type(protocol) is WebSocketProtocol13:
            protocol.__class__ = BatchedWebSocketProtocol
        return protocol


class BatchedClientConnection(WebSocketClientConnection):
    """A client websocket connection using the batched protocol."""

    def get_websocket_protocol(self) -> WebSocketProtocol:
        return BatchedWebSocketProtocol(self, mask_outgoing=True, params=self.params)


def connect(
    request: httpclient.HTTPRequest, max_message_size: int, **kwargs: Any
) -> asyncio.Future[WebSocketClientConnection]:
    """Like ``tornado.websocket.websocket_connect``, with batched frame reads."""
    request.headers = httputil.HTTPHeaders(request.headers)
    proxied = cast(
        httpclient.HTTPRequest,
        httpclient._RequestProxy(request, httpclient.HTTPRequest._DEFAULTS),  # type: ignore[arg-type]
    )
    connection = BatchedClientConnection(proxied, max_message_size=max_message_size, **kwargs)
    return connection.connect_future  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------
# Server websockets as plain asyncio protocols, after tornado's upgrade.
#
# Even with batched reads, each message through a tornado IOStream costs a future, a
# callback hop and a retried read; on the broker that is most of the CPU per relayed
# message and per host heartbeat. After the handshake, the socket is handed to an asyncio
# protocol: the event loop calls ``data_received`` with what arrived, every complete frame
# in it is handled in that one call, and what goes out is written once per batch.

OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
CLOSE_TIMEOUT = 5.0
WRITE_HIGH_WATER = 4 * 1024 * 1024


def frame_header(opcode: int, length: int) -> bytes:
    """The header of one unmasked, final server frame."""
    first = 0x80 | opcode
    if length < 126:
        return bytes((first, length))
    if length < 65536:
        return struct.pack("!BBH", first, 126, length)
    return struct.pack("!BBQ", first, 127, length)


def close_payload(code: int | None, reason: str | None) -> bytes:
    if code is None:
        return b""
    return struct.pack("!H", code) + (reason or "").encode("utf-8")[:123]


class FrameEnd(asyncio.Protocol):
    """One end of a websocket after the handshake: frames in, messages out.

    Every complete message of one read goes to ``_deliver`` at once (opcode 1 text, 2
    binary; fragments already joined); ``_lost`` runs once when the connection is gone.
    Pings are answered here. Subclasses say whether incoming frames are masked.
    """

    MASKED_IN = True  # a server reads masked frames; a client reads unmasked ones

    def __init__(self, max_message_size: int) -> None:
        self.max_message_size = max_message_size
        self.transport: asyncio.Transport | None = None
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self._buffer = bytearray()
        self._need = 0  # bytes the frame at the start of the buffer needs before parsing
        self._fragments: bytearray | None = None
        self._fragments_opcode = 0
        self._close_sent = False
        self._closed = False
        self._close_timer: asyncio.TimerHandle | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)

    def data_received(self, data: bytes) -> None:
        if self._buffer:
            self._buffer += data
            if len(self._buffer) < self._need:
                return  # a large frame still arriving
            data = bytes(self._buffer)
            self._buffer.clear()
        messages: list[tuple[int, bytes]] = []
        used = self._parse(data, messages)
        if used < len(data):
            with memoryview(data) as view:
                self._buffer += view[used:]
        if messages and not self._close_sent:
            self._deliver(messages)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._close_timer is not None:
            self._close_timer.cancel()
        if not self._closed:
            self._closed = True
            self._lost()

    def _deliver(self, messages: list[tuple[int, bytes]]) -> None:
        """Take the messages of one read (ServerEnd: a callback; ClientEnd: a queue)."""

    def _lost(self) -> None:
        """The connection is gone (after the close handshake, or dropped)."""

    def _frame_out(self, opcode: int, payload: bytes) -> bytes:
        return frame_header(opcode, len(payload)) + payload

    # frames
    def _parse(self, data: bytes, messages: list[tuple[int, bytes]]) -> int:
        """Handle the complete frames at the start of ``data``; return the bytes used."""
        position = 0
        size = len(data)
        self._need = 2
        while size - position >= 2:
            first, second = data[position], data[position + 1]
            opcode = first & 0x0F
            length = second & 0x7F
            header = 2
            if length == 126:
                if size - position < 4:
                    self._need = 4
                    break
                length = _SHORT.unpack_from(data, position + 2)[0]
                header = 4
            elif length == 127:
                if size - position < 10:
                    self._need = 10
                    break
                length = _LONG.unpack_from(data, position + 2)[0]
                header = 10
            if first & 0x70 or bool(second & 0x80) != self.MASKED_IN:
                self._fail(1002, "frames are masked from a client only, and use no extension")
                return size
            if opcode & 0x8 and (length >= 126 or not first & 0x80):
                self._fail(1002, "control frames are short and never fragmented")
                return size
            pending = len(self._fragments) if self._fragments is not None else 0
            if length + pending > self.max_message_size:
                self._fail(1009, "message too big")
                return size
            mask_at = position + header
            start = mask_at + 4 if self.MASKED_IN else mask_at
            end = start + length
            if end > size:
                self._need = end - position
                break
            if self.MASKED_IN:
                payload = _websocket_mask(data[mask_at:start], data[start:end])
            else:
                payload = data[start:end]
            position = end
            if not self._frame(first & 0x80, opcode, payload, messages):
                return size
        return position

    def _frame(self, final: int, opcode: int, payload: bytes, out: list[tuple[int, bytes]]) -> bool:
        if opcode in (OP_TEXT, OP_BINARY):
            if self._fragments is not None:
                self._fail(1002, "a new message inside a fragmented one")
                return False
            if final:
                out.append((opcode, payload))
            else:
                self._fragments, self._fragments_opcode = bytearray(payload), opcode
            return True
        if opcode == OP_CONTINUATION:
            if self._fragments is None:
                self._fail(1002, "a continuation frame with no message to continue")
                return False
            self._fragments += payload
            if final:
                out.append((self._fragments_opcode, bytes(self._fragments)))
                self._fragments = None
            return True
        if opcode == OP_PING:
            self._write(self._frame_out(OP_PONG, payload))
            return True
        if opcode == OP_PONG:
            return True
        if opcode == OP_CLOSE:
            if len(payload) >= 2:
                self.close_code = _SHORT.unpack_from(payload)[0]
                self.close_reason = payload[2:].decode("utf-8", "replace")
            if not self._close_sent:
                self._close_sent = True
                self._write(self._frame_out(OP_CLOSE, close_payload(self.close_code, None)))
            if self.transport is not None:
                self.transport.close()
            return False
        self._fail(1002, f"unknown opcode {opcode}")
        return False

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _fail(self, code: int, reason: str) -> None:
        self.close(code, reason)

    # what the application calls
    def send(self, opcode: int, payload: bytes) -> None:
        """Write one message as one frame."""
        if not self._close_sent:
            self._write(self._frame_out(opcode, payload))

    def send_many(self, messages: list[tuple[int, bytes]]) -> None:
        """Write several messages with one write."""
        if self._close_sent:
            return
        if len(messages) == 1:
            self._write(self._frame_out(*messages[0]))
            return
        self._write(b"".join([self._frame_out(opcode, payload) for opcode, payload in messages]))

    def pause_reading(self, paused: bool) -> None:
        """Stop (or resume) reading from this client, while its peer's buffer drains."""
        if self.transport is None or self.transport.is_closing():
            return
        if paused:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()

    def close(self, code: int | None = 1000, reason: str | None = None) -> None:
        """Send a close frame, then close the connection when the client answers (or soon)."""
        if self.transport is None or self._close_sent:
            return
        self._close_sent = True
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason
        self._write(self._frame_out(OP_CLOSE, close_payload(code, reason)))
        self.transport.resume_reading()  # to see the client's close frame
        loop = asyncio.get_running_loop()
        self._close_timer = loop.call_later(CLOSE_TIMEOUT, self.transport.abort)


class ServerEnd(FrameEnd):
    """The server side: ``on_messages(end, messages)`` gets each batch of one read,
    ``on_closed(end, code, reason)`` the end, ``on_pause(end, paused)`` back-pressure."""

    def __init__(
        self, on_messages: Any, on_closed: Any, max_message_size: int, on_pause: Any = None
    ) -> None:
        super().__init__(max_message_size)
        self.on_messages = on_messages
        self.on_closed = on_closed
        self.on_pause = on_pause

    def _deliver(self, messages: list[tuple[int, bytes]]) -> None:
        self.on_messages(self, messages)

    def _lost(self) -> None:
        self.on_closed(self, self.close_code, self.close_reason)

    def pause_writing(self) -> None:
        if self.on_pause is not None:
            self.on_pause(self, True)

    def resume_writing(self) -> None:
        if self.on_pause is not None:
            self.on_pause(self, False)


READ_QUEUE_BYTES = 16 * 1024 * 1024


class ClientEnd(FrameEnd):
    """The client side, with the part of tornado's ``WebSocketClientConnection`` we use:
    ``await read_message()`` (None once closed), ``write_message``, ``close``,
    ``close_code`` and ``close_reason``.

    Messages of one read are queued together, so a reader drains a burst without a wait
    per message. ``write_message`` writes at once and returns None, or, while the socket's
    buffer is over its limit, a future that resolves when it has drained.
    """

    MASKED_IN = False

    def __init__(self, max_message_size: int, ping_interval: float | None = None) -> None:
        super().__init__(max_message_size)
        self.ping_interval = ping_interval
        self._queue: deque[str | bytes] = deque()
        self._queued_bytes = 0
        self._reading_paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._drained: asyncio.Future[None] | None = None
        self._pinger: asyncio.TimerHandle | None = None
        self._heard = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.ping_interval:
            self._pinger = asyncio.get_running_loop().call_later(self.ping_interval, self._ping)

    def _ping(self) -> None:
        if self._closed or self.transport is None:
            return
        if not self._heard:  # nothing, not even a pong, for a whole interval
            self.transport.abort()
            return
        self._heard = False
        self._write(self._frame_out(OP_PING, b""))
        self._pinger = asyncio.get_running_loop().call_later(self.ping_interval or 0, self._ping)

    def data_received(self, data: bytes) -> None:
        self._heard = True
        super().data_received(data)

    def _frame_out(self, opcode: int, payload: bytes) -> bytes:
        mask = os.urandom(4)
        length = len(payload)
        first = 0x80 | opcode
        if length < 126:
            header = bytes((first, 0x80 | length))
        elif length < 65536:
            header = struct.pack("!BBH", first, 0xFE, length)
        else:
            header = struct.pack("!BBQ", first, 0xFF, length)
        return header + mask + _websocket_mask(mask, payload)

    def _deliver(self, messages: list[tuple[int, bytes]]) -> None:
        for opcode, payload in messages:
            self._queue.append(payload.decode("utf-8") if opcode == OP_TEXT else payload)
            self._queued_bytes += len(payload)
        if self._queued_bytes > READ_QUEUE_BYTES and self.transport is not None:
            self._reading_paused = True  # the reader is behind: let TCP hold the sender
            self.transport.pause_reading()
        self._wake()

    def _lost(self) -> None:
        if self._pinger is not None:
            self._pinger.cancel()
        self._wake()
        self.resume_writing()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def pause_writing(self) -> None:
        if self._drained is None:
            self._drained = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)

    async def read_message(self) -> str | bytes | None:
        while not self._queue:
            if self._closed:
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        message = self._queue.popleft()
        self._queued_bytes -= len(message) if isinstance(message, bytes) else len(message.encode())
        if self._reading_paused and self._queued_bytes < READ_QUEUE_BYTES // 2:
            self._reading_paused = False
            if self.transport is not None and not self._closed:
                self.transport.resume_reading()
        return message

    def write_message(self, message: str | bytes, binary: bool = False) -> Any:
        if self._close_sent or self._closed:
            raise WebSocketClosedError()
        if isinstance(message, str):
            self._write(self._frame_out(OP_TEXT, message.encode("utf-8")))
        else:
            self._write(self._frame_out(OP_BINARY if binary else OP_TEXT, message))
        return self._drained

    def write_many(self, messages: list[bytes]) -> Any:
        """Write binary messages with one write; like ``write_message`` otherwise."""
        if self._close_sent or self._closed:
            raise WebSocketClosedError()
        self.send_many([(OP_BINARY, message) for message in messages])
        return self._drained

    def set_nodelay(self, value: bool) -> None:
        sock = self.transport.get_extra_info("socket") if self.transport else None
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, int(value))


async def adopt(stream: Any, factory: Any) -> tuple[Any, bytes]:
    """Move a connected websocket from a tornado IOStream to an asyncio protocol.

    Returns the protocol and the bytes tornado had already read past the handshake. The
    socket is duplicated, tornado's copy closed (its descriptor unregistered), and the
    duplicate given to the event loop, so no byte is lost or read twice.
    """
    await stream.write(b"")  # what tornado still had to write (the handshake) is out
    leftover = bytes(stream._read_buffer)
    duplicate = os.dup(stream.socket.fileno())
    stream.close()
    sock = socket.socket(fileno=duplicate)
    try:
        _transport, protocol = await asyncio.get_running_loop().connect_accepted_socket(
            factory, sock=sock
        )
    except BaseException:
        sock.close()
        raise
    return protocol, leftover


def _stop_pinging(protocol: WebSocketProtocol13) -> None:
    """Tornado's pings would write to the stream it no longer has."""
    pinging = getattr(protocol, "_ping_coroutine", None)
    if pinging is not None:
        pinging.cancel()


class _HandOverClientProtocol(BatchedWebSocketProtocol):
    """A client protocol that gives its socket to a :class:`ClientEnd` after the handshake
    (over TLS it keeps it, reading frames in batches)."""

    handed_over: asyncio.Future[ClientEnd | None]

    async def _receive_frame_loop(self) -> None:
        if isinstance(self.stream, SSLIOStream):
            self.handed_over.set_result(None)
            await super()._receive_frame_loop()
            return
        try:
            end, leftover = await adopt(
                self.stream,
                lambda: ClientEnd(self.params.max_message_size, self.params.ping_interval),
            )
        except (StreamClosedError, OSError) as error:
            self.handed_over.set_exception(error)
            return
        finally:
            _stop_pinging(self)
        self.handed_over.set_result(end)
        if leftover:
            end.data_received(leftover)


class _HandOverClientConnection(WebSocketClientConnection):
    def get_websocket_protocol(self) -> WebSocketProtocol:
        protocol = _HandOverClientProtocol(self, mask_outgoing=True, params=self.params)
        protocol.handed_over = asyncio.get_running_loop().create_future()
        return protocol


RelayConnection = ClientEnd | WebSocketClientConnection


async def connect_end(
    request: httpclient.HTTPRequest,
    max_message_size: int,
    ping_interval: float | None = None,
) -> RelayConnection:
    """Connect with tornado (its handshake, redirects and HTTP errors), then serve the
    connection with a :class:`ClientEnd`; over TLS, tornado's connection is returned.
    Either way TCP_NODELAY is set."""
    request.headers = httputil.HTTPHeaders(request.headers)
    proxied = cast(
        httpclient.HTTPRequest,
        httpclient._RequestProxy(request, httpclient.HTTPRequest._DEFAULTS),  # type: ignore[arg-type]
    )
    connection = _HandOverClientConnection(
        proxied, max_message_size=max_message_size, ping_interval=ping_interval
    )
    conn = await connection.connect_future
    protocol = cast(_HandOverClientProtocol, conn.protocol)
    protocol.set_nodelay(True)
    end = await protocol.handed_over
    if end is None:
        return conn
    end.set_nodelay(True)
    return end


class _HandOverProtocol(BatchedWebSocketProtocol):
    """Tornado's protocol up to the handshake; then the handler takes the socket.

    Over TLS the bytes on the socket are not frames, so tornado keeps the connection (with
    batched frame reads) and the handler's methods go through it.
    """

    async def _receive_frame_loop(self) -> None:
        handler = cast("ProtocolWebSocketHandler", self.handler)
        if isinstance(self.stream, SSLIOStream):
            handler.on_taken_over()
            await super()._receive_frame_loop()
            return
        try:
            await handler._take_over(self.stream)
        finally:
            _stop_pinging(self)


class ProtocolWebSocketHandler(WebSocketHandler):
    """A websocket handler whose connection is served by :class:`ServerEnd` after ``open``.

    Subclasses use ``write_message``, ``close``, ``on_message`` and ``on_close`` as with
    tornado, and may override ``on_messages`` to take a whole batch at once and
    ``on_taken_over`` to start work once messages can flow.
    """

    end: ServerEnd | None = None

    def get_websocket_protocol(self) -> WebSocketProtocol | None:
        protocol = super().get_websocket_protocol()
        if type(protocol) is WebSocketProtocol13:
            protocol.__class__ = _HandOverProtocol
        return protocol

    async def _take_over(self, stream: Any) -> None:
        try:
            end, leftover = await adopt(stream, self._make_end)
        except (StreamClosedError, OSError):
            self.on_ws_connection_close(None, None)
            return
        self.end = end
        self.on_taken_over()
        if leftover:
            end.data_received(leftover)

    def _make_end(self) -> ServerEnd:
        return ServerEnd(self._messages, self._closed, self.max_message_size, self.on_pause)

    def _messages(self, end: ServerEnd, messages: list[tuple[int, bytes]]) -> None:
        self.on_messages(messages)

    def _closed(self, end: ServerEnd, code: int | None, reason: str | None) -> None:
        self.end = None
        self.on_ws_connection_close(code, reason)

    def on_taken_over(self) -> None:
        """The connection is served by ``self.end``: messages can be written."""

    def on_pause(self, end: ServerEnd, paused: bool) -> None:
        """This client's outgoing buffer is full (``paused``) or drained again."""

    def on_messages(self, messages: list[tuple[int, bytes]]) -> None:
        for opcode, payload in messages:
            self.on_message(payload.decode("utf-8") if opcode == OP_TEXT else payload)

    def send_many(self, messages: list[tuple[int, bytes]]) -> None:
        """Write several messages, with one write where the connection is ours."""
        if self.end is not None:
            self.end.send_many(messages)
        elif self.ws_connection is not None and not self.ws_connection.is_closing():
            for opcode, payload in messages:
                super().write_message(payload, binary=opcode == OP_BINARY)

    def pause_reading(self, paused: bool) -> None:
        """Hold (or resume) reading from this client while a peer's buffer drains."""
        if self.end is not None:
            self.end.pause_reading(paused)

    def write_message(self, message: Any, binary: bool = False) -> Any:
        if self.end is None:
            return super().write_message(message, binary=binary)  # TLS: tornado's connection
        if self.end._close_sent:
            raise WebSocketClosedError()
        if isinstance(message, dict):
            message = json.dumps(message)
        if isinstance(message, str):
            self.end.send(OP_BINARY if binary else OP_TEXT, message.encode("utf-8"))
        else:
            self.end.send(OP_BINARY if binary else OP_TEXT, bytes(message))
        return None

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        if self.end is not None:
            self.end.close(code if code is not None else 1000, reason)
        elif self.ws_connection is not None:
            super().close(code, reason)
