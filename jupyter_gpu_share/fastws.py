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
import logging
import os
import socket
import struct
from collections import deque
from collections.abc import Callable, Iterable, Iterator
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

log = logging.getLogger(__name__)

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
                # A large frame: read exactly what is missing, in pieces the stream can
                # hold (over TLS tornado reads: a 20 MiB message in one read_bytes passed
                # the broker's 17 MiB read buffer and killed the relay).
                missing = end - len(buffer)
                self._wire_bytes_in += missing
                piece = max(READ_CHUNK, self.stream.max_buffer_size // 2)
                while missing > 0:
                    chunk = await self.stream.read_bytes(min(missing, piece))
                    buffer += chunk
                    missing -= len(chunk)
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
# Websockets as plain asyncio protocols, after tornado's upgrade.
#
# Even with batched reads, each message through a tornado IOStream costs a future, a
# callback hop and a retried read; on the broker that is most of the CPU per relayed
# message and per host heartbeat. After the handshake, the socket is handed to an asyncio
# protocol: the event loop reads into our buffer, every complete frame in it is handled in
# that one call, and what goes out is written once per batch.
#
# Large messages are never copied whole. Touching a fresh 20 MiB buffer costs more (page
# faults) than copying into it, and the old path made five per relayed message. Now a
# frame that has not fully arrived is read straight into a buffer of its own size (the
# only large buffer on a receiving end), and a large message goes out in pieces of
# ``CHUNK`` bytes, masked or unmasked piece by piece as the socket takes them, so the
# broker forwards a host's 20 MiB output without building a second copy of it.

OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
CLOSE_TIMEOUT = 5.0
WRITE_HIGH_WATER = 4 * 1024 * 1024  # queued output above which the source is held
READ_SIZE = 256 * 1024
LARGE = 64 * 1024  # payloads from this size are read into their own buffer and written in pieces
CHUNK = 256 * 1024  # a multiple of 4: every piece of a masked payload starts at mask phase 0
UPFRONT = 32 * 1024 * 1024  # a larger frame's buffer grows as it arrives (a header costs nothing)
_HEAD16 = struct.Struct("!BBH")
_HEAD64 = struct.Struct("!BBQ")

Buffer = bytes | bytearray | memoryview
FIRST_READ_SIZE = 4 * 1024


class ReadBuffer:
    """Bytes read but not parsed yet, for a ``BufferedProtocol``. It starts at a few KiB (an
    idle connection, of which a broker holds thousands, keeps no more) and doubles, up to
    ``READ_SIZE``, whenever a read fills all the room it was offered."""

    def __init__(self) -> None:
        self.data = bytearray(FIRST_READ_SIZE)
        self.end = 0  # bytes held
        self._offered = 0
        self._filled_all = False

    def room(self) -> memoryview:
        """Where the next read goes (asyncio's ``get_buffer``)."""
        size = len(self.data)
        if size < READ_SIZE and (self.end == size or self._filled_all):
            grown = bytearray(min(READ_SIZE, 2 * size))
            grown[: self.end] = memoryview(self.data)[: self.end]
            self.data = grown
        self._offered = len(self.data) - self.end
        return memoryview(self.data)[self.end :]

    def filled(self, nbytes: int) -> bytes:
        """Count a read in; return everything held, as bytes to parse."""
        self._filled_all = nbytes == self._offered
        self.end += nbytes
        return bytes(memoryview(self.data)[: self.end])

    def keep_from(self, used: int) -> None:
        """Drop the first ``used`` bytes (parsed); keep the rest for the next read."""
        left = self.end - used
        if used and left:
            self.data[:left] = memoryview(self.data)[used : self.end]
        self.end = left


class LargeFrame:
    """The body of one large frame, read straight into a buffer of its own. Up to
    ``UPFRONT`` bytes are allocated at once; a longer body's buffer grows as it arrives, so
    a header announcing a huge frame costs nothing until its bytes come."""

    def __init__(self, length: int, arrived: Any, tag: Any = None) -> None:
        arrived = memoryview(arrived)
        self.length = length
        self.tag = tag  # what the reader needs once the body is whole (flags, key, ...)
        self.data = bytearray(min(length, max(UPFRONT, arrived.nbytes)))
        self.data[: arrived.nbytes] = arrived
        self.filled = arrived.nbytes

    def room(self) -> memoryview:
        """Where the next read goes (asyncio's ``get_buffer``)."""
        data = self.data
        if self.filled == len(data):
            data += bytes(min(len(data), self.length - len(data)))
        return memoryview(data)[self.filled :]

    def add(self, nbytes: int) -> bool:
        """Count a read in; True once the body is whole."""
        self.filled += nbytes
        return self.filled >= self.length


class Masked:
    """A large payload as a client sent it: still masked. The broker only forwards it, so
    it is unmasked piece by piece on the way out instead of into a second buffer."""

    __slots__ = ("data", "key")

    def __init__(self, data: bytearray, key: bytes) -> None:
        self.data = data
        self.key = key

    def __len__(self) -> int:
        return len(self.data)

    def pieces(self) -> Iterator[bytes]:
        view = memoryview(self.data)
        for start in range(0, len(view), CHUNK):
            yield _websocket_mask(self.key, bytes(view[start : start + CHUNK]))

    def tobytes(self) -> bytes:
        return b"".join(self.pieces())


def as_bytes(payload: Any) -> bytes:
    """A received or queued payload as one bytes object."""
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, Masked):
        return payload.tobytes()
    if isinstance(payload, (list, tuple)):
        return b"".join(payload)
    return bytes(payload)


def _nbytes(part: Any) -> int:
    return part.nbytes if isinstance(part, memoryview) else len(part)


def payload_length(payload: Any) -> int:
    if isinstance(payload, (list, tuple)):
        return sum(map(_nbytes, payload))
    return _nbytes(payload)


def _parts(payload: Any) -> Iterable[Any]:
    if isinstance(payload, Masked):
        return payload.pieces()
    if isinstance(payload, (list, tuple)):
        return payload
    return (payload,)


def _byte_view(part: Any) -> memoryview:
    view = memoryview(part)
    return view if view.itemsize == 1 and view.ndim == 1 else view.cast("B")


def _frame_pieces(header: bytes, parts: Iterable[Any], key: bytes | None) -> Iterator[Any]:
    """One large frame as writes of ``CHUNK`` payload bytes: small parts joined, large
    ones cut, each piece masked as it is made. Every piece but the last carries exactly
    ``CHUNK`` payload bytes, so each starts at mask phase 0."""
    prefix = header
    group: list[Any] = []
    room = CHUNK
    for part in parts:
        size = _nbytes(part)
        offset = 0
        view = _byte_view(part) if size >= room else None
        while size - offset >= room:  # the part fills the piece being made
            group.append(cast(memoryview, view)[offset : offset + room])
            offset += room
            yield _piece(prefix, group, key)
            prefix, group, room = b"", [], CHUNK
        if offset < size:
            group.append(part if view is None else view[offset:])
            room -= size - offset
    if group or prefix:
        yield _piece(prefix, group, key)


def _piece(prefix: bytes, group: list[Any], key: bytes | None) -> Any:
    """One write: bytes, or a list of buffers for ``writelines`` (uvloop hands them to
    ``writev`` as they are; asyncio joins them once), so the frame header is not copied
    in front of a large payload."""
    if key is not None:
        payload = _websocket_mask(key, b"".join(group))
        return [prefix, payload] if prefix else payload
    if prefix:
        return [prefix, *group]
    return group[0] if len(group) == 1 else group


def frame_header(opcode: int, length: int, mask: bytes | None = None) -> bytes:
    """The header of one final frame (with its masking key, if any)."""
    first = 0x80 | opcode
    masked = 0x80 if mask else 0
    if length < 126:
        header = bytes((first, masked | length))
    elif length < 65536:
        header = _HEAD16.pack(first, masked | 126, length)
    else:
        header = _HEAD64.pack(first, masked | 127, length)
    return header + mask if mask else header


_SHORT_HEADERS = {
    opcode: [bytes((0x80 | opcode, length)) for length in range(126)]
    for opcode in (0x0, 0x1, 0x2, 0x8, 0x9, 0xA)
}


def close_payload(code: int | None, reason: str | None) -> bytes:
    if code is None:
        return b""
    return struct.pack("!H", code) + (reason or "").encode("utf-8")[:123]


class FrameEnd(asyncio.BufferedProtocol):
    """One end of a websocket after the handshake: frames in, messages out.

    Every complete message of one read goes to ``_deliver`` at once (opcode 1 text, 2
    binary; fragments already joined; a large payload as a ``bytearray``, or as
    :class:`Masked` where it came masked); ``_lost`` runs once when the connection is
    gone, and ``_backlog(True/False)`` when output queues beyond ``WRITE_HIGH_WATER`` and
    when it has drained again. Pings are answered here. Subclasses say whether incoming
    frames are masked, and outgoing ones are masked exactly when incoming ones are not.
    """

    MASKED_IN = True  # a server reads masked frames; a client reads unmasked ones

    def __init__(self, max_message_size: int) -> None:
        self.max_message_size = max_message_size
        self.transport: asyncio.Transport | None = None
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self._read = ReadBuffer()
        self._large: LargeFrame | None = None  # tagged (first byte, opcode, masking key)
        self._fragments: list[Any] | None = None
        self._fragments_opcode = 0
        self._fragments_bytes = 0
        self._pending: deque[Any] = deque()  # pieces, or iterators of pieces, not yet written
        self._pending_bytes = 0
        self._socket_full = False
        self._backlogged = False
        self._close_when_sent = False
        self._close_sent = False
        self._closed = False
        self._close_timer: asyncio.TimerHandle | None = None
        self.early = b""  # bytes read before this protocol had the socket (see adopt)

    # asyncio.BufferedProtocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        # Our own queue holds what the socket cannot take; the transport buffers one piece.
        self.transport.set_write_buffer_limits(high=CHUNK, low=0)
        self._started()
        early, self.early = self.early, b""
        if early:  # before any read: some event loops (uvloop) read as soon as they can
            self.feed(early)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._large is not None:
            return self._large.room()
        return self._read.room()

    def buffer_updated(self, nbytes: int) -> None:
        self._heard()
        messages: list[tuple[int, Any]] = []
        if self._large is not None:
            if not self._large.add(nbytes):
                return
            self._finish_large(messages)
        else:
            data = self._read.filled(nbytes)
            self._read.keep_from(self._parse(data, messages))
        if messages and not self._close_sent:
            self._deliver(messages)

    def feed(self, data: bytes) -> None:
        """Take bytes read before this protocol had the socket."""
        view = memoryview(data)
        while view.nbytes and not self._closed:
            target = self.get_buffer(view.nbytes)
            count = min(target.nbytes, view.nbytes)
            target[:count] = view[:count]
            del target
            self.buffer_updated(count)
            view = view[count:]

    def connection_lost(self, exc: Exception | None) -> None:
        if self._close_timer is not None:
            self._close_timer.cancel()
        self._pending.clear()
        self._pending_bytes = 0
        if not self._closed:
            self._closed = True
            self._lost()

    def pause_writing(self) -> None:
        self._socket_full = True

    def resume_writing(self) -> None:
        self._socket_full = False
        self._feed()

    # hooks
    def _started(self) -> None:
        """The transport is ours; no byte has been read yet."""

    def _deliver(self, messages: list[tuple[int, Any]]) -> None:
        """Take the messages of one read (ServerEnd: a callback; ClientEnd: a queue)."""

    def _lost(self) -> None:
        """The connection is gone (after the close handshake, or dropped)."""

    def _backlog(self, backlogged: bool) -> None:
        """Output is queued beyond ``WRITE_HIGH_WATER`` (True), or has drained (False)."""

    def _heard(self) -> None:
        """Bytes arrived."""

    # frames in
    def _parse(self, data: bytes, messages: list[tuple[int, Any]]) -> int:
        """Handle the complete frames at the start of the read buffer; return the bytes used.

        A large frame that has not fully arrived moves to its own buffer, which the
        following reads fill directly.
        """
        size = len(data)
        position = 0
        while size - position >= 2:
            first, second = data[position], data[position + 1]
            opcode = first & 0x0F
            length = second & 0x7F
            header = 2
            if length == 126:
                if size - position < 4:
                    break
                length = _SHORT.unpack_from(data, position + 2)[0]
                header = 4
            elif length == 127:
                if size - position < 10:
                    break
                length = _LONG.unpack_from(data, position + 2)[0]
                header = 10
            if first & 0x70 or bool(second & 0x80) != self.MASKED_IN:
                self._fail(1002, "frames are masked from a client only, and use no extension")
                return size
            if opcode & 0x8 and (length >= 126 or not first & 0x80):
                self._fail(1002, "control frames are short and never fragmented")
                return size
            if length + self._fragments_bytes > self.max_message_size:
                self._fail(1009, "message too big")
                return size
            mask_at = position + header
            start = mask_at + 4 if self.MASKED_IN else mask_at
            end = start + length
            if end > size:
                if length >= LARGE and start <= size:
                    key = data[mask_at:start] if self.MASKED_IN else None
                    self._large = LargeFrame(length, data[start:], (first, opcode, key))
                    return size
                break  # the rest of a small frame comes with the next read
            if self.MASKED_IN:
                payload = _websocket_mask(data[mask_at:start], data[start:end])
            else:
                payload = data[start:end]
            position = end
            if not self._frame(first & 0x80, opcode, payload, messages):
                return size
        return position

    def _finish_large(self, messages: list[tuple[int, Any]]) -> None:
        large, self._large = cast(LargeFrame, self._large), None
        first, opcode, key = large.tag
        data = large.data
        payload: Any = data if key is None else Masked(data, key)
        self._frame(first & 0x80, opcode, payload, messages)

    def _frame(self, final: int, opcode: int, payload: Any, out: list[tuple[int, Any]]) -> bool:
        if opcode in (OP_TEXT, OP_BINARY):
            if self._fragments is not None:
                self._fail(1002, "a new message inside a fragmented one")
                return False
            if final:
                out.append((opcode, payload))
            else:
                self._fragments, self._fragments_opcode = [payload], opcode
                self._fragments_bytes = len(payload)
            return True
        if opcode == OP_CONTINUATION:
            if self._fragments is None:
                self._fail(1002, "a continuation frame with no message to continue")
                return False
            self._fragments.append(payload)
            self._fragments_bytes += len(payload)
            if final:
                out.append((self._fragments_opcode, b"".join(map(as_bytes, self._fragments))))
                self._fragments, self._fragments_bytes = None, 0
            return True
        if opcode == OP_PING:
            self._send_control(OP_PONG, as_bytes(payload))
            return True
        if opcode == OP_PONG:
            return True
        if opcode == OP_CLOSE:
            payload = as_bytes(payload)
            if len(payload) >= 2:
                self.close_code = _SHORT.unpack_from(payload)[0]
                self.close_reason = payload[2:].decode("utf-8", "replace")
            if not self._close_sent:
                self._close_sent = True
                self._send_control(OP_CLOSE, close_payload(self.close_code, None))
            self._close_when_sent = True
            self._feed()
            return False
        self._fail(1002, f"unknown opcode {opcode}")
        return False

    def _fail(self, code: int, reason: str) -> None:
        self.close(code, reason)

    # frames out
    def _mask(self) -> bytes | None:
        return None if self.MASKED_IN else os.urandom(4)

    def _send_control(self, opcode: int, payload: bytes) -> None:
        key = self._mask()
        body = _websocket_mask(key, payload) if key else payload
        self._queue([frame_header(opcode, len(payload), key) + body])

    def _queue(self, pieces: list[Any]) -> None:
        """Write pieces (buffers, or iterators of buffers) after everything before them."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        for piece in pieces:
            if not isinstance(piece, Iterator):  # an iterator's bytes are counted by its sender
                self._pending_bytes += _nbytes(piece)
            self._pending.append(piece)
        self._feed()

    def _feed(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        pending = self._pending
        while pending and not self._socket_full:
            head = pending[0]
            if isinstance(head, Iterator):
                piece = next(head, None)
                if piece is None:
                    pending.popleft()
                    continue
            else:
                piece = pending.popleft()
            if type(piece) is list:
                self._pending_bytes -= payload_length(piece)
                transport.writelines(piece)  # may pause writing, when the socket is full
            else:
                self._pending_bytes -= _nbytes(piece)
                transport.write(piece)
        if not pending:
            self._pending_bytes = 0
            if self._close_when_sent:
                transport.close()
                return
        backlog = self._pending_bytes
        if backlog > WRITE_HIGH_WATER and not self._backlogged:
            self._backlogged = True
            self._backlog(True)
        elif backlog <= WRITE_HIGH_WATER // 4 and self._backlogged:
            self._backlogged = False
            self._backlog(False)

    # what the application calls
    def send(self, opcode: int, payload: Any) -> None:
        """Write one message as one frame (``payload``: bytes-like, or a list of parts)."""
        self.send_many([(opcode, payload)])

    def send_many(self, messages: list[tuple[int, Any]]) -> None:
        """Write several messages: small ones joined into one write, large ones in pieces."""
        if self._close_sent or self.transport is None:
            return
        joined: list[Any] = []
        pieces: list[Any] | None = None  # only once a large message is among them
        masking = not self.MASKED_IN
        for opcode, payload in messages:
            length = len(payload) if type(payload) is bytes else payload_length(payload)
            key = os.urandom(4) if masking else None
            if length < LARGE:
                if key is not None:
                    joined.append(frame_header(opcode, length, key))
                    joined.append(_websocket_mask(key, as_bytes(payload)))
                    continue
                if length < 126:
                    joined.append(_SHORT_HEADERS[opcode][length])
                else:
                    joined.append(_HEAD16.pack(0x80 | opcode, 126, length))
                if isinstance(payload, (list, tuple)):
                    joined.extend(payload)
                else:
                    joined.append(payload)
                continue
            if pieces is None:
                pieces = []
            if joined:
                pieces.append(b"".join(joined))
                joined = []
            header = frame_header(opcode, length, key)
            pieces.append(_frame_pieces(header, _parts(payload), key))
            self._pending_bytes += len(header) + length
        if pieces is None:
            if not self._pending and not self._socket_full:
                if not self.transport.is_closing():
                    self.transport.write(b"".join(joined))  # the common case: one write
                return
            pieces = []
        if joined:
            pieces.append(b"".join(joined))
        self._queue(pieces)

    def pause_reading(self, paused: bool) -> None:
        """Stop (or resume) reading from this peer, while what it sends cannot go on."""
        if self.transport is None or self.transport.is_closing():
            return
        if paused:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()

    def close(self, code: int | None = 1000, reason: str | None = None) -> None:
        """Send a close frame, then close the connection when the peer answers (or soon)."""
        if self.transport is None or self._close_sent:
            return
        self._close_sent = True
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason
        self._send_control(OP_CLOSE, close_payload(code, reason))
        if not self.transport.is_closing():
            self.transport.resume_reading()  # to see the peer's close frame
        loop = asyncio.get_running_loop()
        self._close_timer = loop.call_later(CLOSE_TIMEOUT, self.transport.abort)


class ServerEnd(FrameEnd):
    """The server side: ``on_messages(end, messages)`` gets each batch of one read,
    ``on_closed(end, code, reason)`` the end, ``on_pause(end, paused)`` back-pressure."""

    def __init__(
        self,
        on_messages: Any,
        on_closed: Any,
        max_message_size: int,
        on_pause: Any = None,
        on_started: Any = None,
    ) -> None:
        super().__init__(max_message_size)
        self.on_messages = on_messages
        self.on_closed = on_closed
        self.on_pause = on_pause
        self.on_started = on_started

    def _started(self) -> None:
        if self.on_started is not None:
            self.on_started(self)

    def _deliver(self, messages: list[tuple[int, Any]]) -> None:
        self.on_messages(self, messages)

    def _lost(self) -> None:
        self.on_closed(self, self.close_code, self.close_reason)

    def _backlog(self, backlogged: bool) -> None:
        if self.on_pause is not None:
            self.on_pause(self, backlogged)


READ_QUEUE_BYTES = 16 * 1024 * 1024


class ClientEnd(FrameEnd):
    """The client side, with the part of tornado's ``WebSocketClientConnection`` we use:
    ``await read_message()`` (None once closed; a large binary message is a bytearray),
    ``write_message``, ``close``, ``close_code`` and ``close_reason``.

    Messages of one read are queued together, so a reader drains a burst without a wait
    per message. ``write_message`` writes at once and returns None, or, while output is
    queued beyond ``WRITE_HIGH_WATER``, a future that resolves when it has drained.
    """

    MASKED_IN = False

    def __init__(self, max_message_size: int, ping_interval: float | None = None) -> None:
        super().__init__(max_message_size)
        self.ping_interval = ping_interval
        self._queue_in: deque[str | bytes | bytearray] = deque()
        self._queued_bytes = 0
        self._reading_paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._drained: asyncio.Future[None] | None = None
        self._pinger: asyncio.TimerHandle | None = None
        self._heard_since_ping = True
        self._handler: Callable[[Any], None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.ping_interval:
            self._pinger = asyncio.get_running_loop().call_later(self.ping_interval, self._ping)

    def _ping(self) -> None:
        if self._closed or self.transport is None:
            return
        if not self._heard_since_ping:  # nothing, not even a pong, for a whole interval
            self.transport.abort()
            return
        self._heard_since_ping = False
        self._send_control(OP_PING, b"")
        self._pinger = asyncio.get_running_loop().call_later(self.ping_interval or 0, self._ping)

    def _heard(self) -> None:
        self._heard_since_ping = True

    def deliver_to(self, handler: Callable[[str | bytes | bytearray], None]) -> None:
        """Hand every message to ``handler`` as it is read, in this read's callback, instead
        of queueing it for ``read_message`` (which then only reports the close, with None).
        Saves a task wake-up per read; messages already queued go first."""
        self._handler = handler
        while self._queue_in:
            message = self._queue_in.popleft()
            self._call(handler, message)
        self._queued_bytes = 0
        if self._reading_paused and self.transport is not None and not self._closed:
            self._reading_paused = False
            self.transport.resume_reading()

    @staticmethod
    def _call(handler: Callable[[Any], None], message: Any) -> None:
        try:
            handler(message)
        except Exception:
            log.exception("handling a websocket message failed")

    def _deliver(self, messages: list[tuple[int, Any]]) -> None:
        handler = self._handler
        if handler is not None:
            for opcode, payload in messages:
                self._call(handler, payload.decode("utf-8") if opcode == OP_TEXT else payload)
            return
        for opcode, payload in messages:
            self._queue_in.append(payload.decode("utf-8") if opcode == OP_TEXT else payload)
            self._queued_bytes += len(payload)
        if self._queued_bytes > READ_QUEUE_BYTES and self.transport is not None:
            self._reading_paused = True  # the reader is behind: let TCP hold the sender
            self.transport.pause_reading()
        self._wake()

    def _lost(self) -> None:
        if self._pinger is not None:
            self._pinger.cancel()
        self._wake()
        self._backlog(False)

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

    async def read_message(self) -> str | bytes | bytearray | None:
        while not self._queue_in:
            if self._closed:
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        message = self._queue_in.popleft()
        self._queued_bytes -= len(message.encode()) if isinstance(message, str) else len(message)
        if self._reading_paused and self._queued_bytes < READ_QUEUE_BYTES // 2:
            self._reading_paused = False
            if self.transport is not None and not self._closed:
                self.transport.resume_reading()
        return message

    def write_message(self, message: str | Buffer, binary: bool = False) -> Any:
        if self._close_sent or self._closed:
            raise WebSocketClosedError()
        if isinstance(message, str):
            self.send(OP_TEXT, message.encode("utf-8"))
        else:
            self.send(OP_BINARY if binary else OP_TEXT, message)
        return self._drained

    def write_many(self, messages: list[Any]) -> Any:
        """Write binary messages (each bytes-like or a list of parts) in order, small ones
        with one write; like ``write_message`` otherwise."""
        if self._close_sent or self._closed:
            raise WebSocketClosedError()
        self.send_many([(OP_BINARY, message) for message in messages])
        return self._drained

    def set_nodelay(self, value: bool) -> None:
        sock = self.transport.get_extra_info("socket") if self.transport else None
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, int(value))


async def adopt(stream: Any, factory: Any) -> Any:
    """Move a connected websocket from a tornado IOStream to an asyncio protocol.

    The socket is duplicated, tornado's copy closed (its descriptor unregistered), and the
    duplicate given to the event loop, so no byte is lost or read twice: the bytes tornado
    had already read past the handshake are the protocol's first, before any read.
    """
    await stream.write(b"")  # what tornado still had to write (the handshake) is out
    leftover = bytes(stream._read_buffer)
    duplicate = os.dup(stream.socket.fileno())
    stream.close()
    sock = socket.socket(fileno=duplicate)

    def make() -> Any:
        protocol = factory()
        protocol.early = leftover
        return protocol

    try:
        _transport, protocol = await asyncio.get_running_loop().connect_accepted_socket(
            make, sock=sock
        )
    except BaseException:
        sock.close()
        raise
    return protocol


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
            end = await adopt(
                self.stream,
                lambda: ClientEnd(self.params.max_message_size, self.params.ping_interval),
            )
        except (StreamClosedError, OSError) as error:
            self.handed_over.set_exception(error)
            return
        finally:
            _stop_pinging(self)
        self.handed_over.set_result(end)


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
            await adopt(stream, self._make_end)
        except (StreamClosedError, OSError):
            self.on_ws_connection_close(None, None)

    def _make_end(self) -> ServerEnd:
        return ServerEnd(
            self._messages, self._closed, self.max_message_size, self.on_pause, self._started
        )

    def _started(self, end: ServerEnd) -> None:
        self.end = end
        self.on_taken_over()

    def _messages(self, end: ServerEnd, messages: list[tuple[int, Any]]) -> None:
        self.on_messages(messages)

    def _closed(self, end: ServerEnd, code: int | None, reason: str | None) -> None:
        self.end = None
        self.on_ws_connection_close(code, reason)

    def on_taken_over(self) -> None:
        """The connection is served by ``self.end``: messages can be written."""

    def on_pause(self, end: ServerEnd, paused: bool) -> None:
        """This client's outgoing buffer is full (``paused``) or drained again."""

    def on_messages(self, messages: list[tuple[int, Any]]) -> None:
        for opcode, payload in messages:
            data = as_bytes(payload)
            self.on_message(data.decode("utf-8") if opcode == OP_TEXT else data)

    def send_many(self, messages: list[tuple[int, bytes]]) -> None:
        """Write several messages, with one write where the connection is ours."""
        if self.end is not None:
            self.end.send_many(messages)
        elif self.ws_connection is not None and not self.ws_connection.is_closing():
            for opcode, payload in messages:
                super().write_message(as_bytes(payload), binary=opcode == OP_BINARY)

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
            message = message.encode("utf-8")
        self.end.send(OP_BINARY if binary else OP_TEXT, message)
        return None

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        if self.end is not None:
            self.end.close(code if code is not None else 1000, reason)
        elif self.ws_connection is not None:
            super().close(code, reason)
