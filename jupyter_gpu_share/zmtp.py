"""The host agent's kernel channels as ZMTP connections served by the event loop.

With libzmq, every message between the agent and its kernel passed through the agent's
ZMQ I/O thread: a hand-off to that thread and back on top of the socket itself (a DEALER
round trip cost the agent 155 us of CPU that way, 95 us this way). A kernel channel is
one connection from a DEALER (shell, control, stdin) or SUB (iopub) to the kernel's
ROUTER or PUB, with the NULL mechanism, so the agent speaks ZMTP 3.0
(https://rfc.zeromq.org/spec/23/) itself on an asyncio connection. The kernel keeps
libzmq.

:class:`ZmtpChannel` has the interface of :class:`~jupyter_gpu_share.zmqpump.SocketPump`
that the agent uses: ``on_messages(batch)`` with every message of one read, ``send``,
``close`` and ``closed``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import Callable, Sequence
from typing import Any, cast

from .fastws import LargeFrame, ReadBuffer

log = logging.getLogger(__name__)

# signature (0xFF, 8 bytes of padding, 0x7F), version 3.0, mechanism NULL, as-server 0, filler
GREETING = b"\xff" + bytes(8) + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\0") + bytes(32)
GREETING_SIZE = 64
MORE, LONG, COMMAND = 0x01, 0x02, 0x04
PEERS = {b"DEALER": {b"ROUTER", b"DEALER"}, b"SUB": {b"PUB", b"XPUB"}}
LARGE = 64 * 1024  # frame bodies from this size are read into (and written from) their own buffer
MAX_FRAME = 512 * 1024 * 1024
_LONG_SIZE = struct.Struct("!Q")
_PROPERTY_SIZE = struct.Struct("!I")


class ZmtpError(ValueError):
    """The peer broke the protocol."""


def command(name: bytes, body: bytes = b"") -> bytes:
    """One command frame."""
    data = bytes([len(name)]) + name + body
    if len(data) < 256:
        return bytes([COMMAND, len(data)]) + data
    return bytes([COMMAND | LONG]) + _LONG_SIZE.pack(len(data)) + data


def ready_command(socket_type: bytes, identity: bytes | None) -> bytes:
    properties = {b"Socket-Type": socket_type}
    if identity is not None:
        properties[b"Identity"] = identity
    body = b"".join(
        bytes([len(name)]) + name + _PROPERTY_SIZE.pack(len(value)) + value
        for name, value in properties.items()
    )
    return command(b"READY", body)


def parse_properties(data: bytes) -> dict[bytes, bytes]:
    """The metadata of a READY command."""
    properties, position = {}, 0
    while position < len(data):
        size = data[position]
        name = data[position + 1 : position + 1 + size]
        position += 1 + size
        if position + 4 > len(data):
            raise ZmtpError("a READY property is cut short")
        (length,) = _PROPERTY_SIZE.unpack_from(data, position)
        position += 4
        if position + length > len(data):
            raise ZmtpError("a READY property is cut short")
        properties[name.lower()] = data[position : position + length]
        position += length
    return properties


def frame_head(size: int, more: bool) -> bytes:
    if size < 256:
        return bytes([MORE if more else 0, size])
    return bytes([(MORE if more else 0) | LONG]) + _LONG_SIZE.pack(size)


class ZmtpChannel(asyncio.BufferedProtocol):
    """One client connection to a kernel socket (we are the DEALER or the SUB)."""

    def __init__(
        self,
        socket_type: bytes,
        on_messages: Callable[[list[list[Any]]], None] | None,
        identity: bytes | None = None,
    ) -> None:
        self.socket_type = socket_type
        self.on_messages = on_messages
        self.identity = identity
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed = False
        self._read = ReadBuffer()
        self._large: LargeFrame | None = None  # tagged with the frame's flags
        self._greeted = False
        self._parts: list[Any] = []

    # asyncio.BufferedProtocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(GREETING + ready_command(self.socket_type, self.identity))

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._large is not None:
            return self._large.room()
        return self._read.room()

    def buffer_updated(self, nbytes: int) -> None:
        batch: list[list[Any]] = []
        try:
            if self._large is not None:
                if not self._large.add(nbytes):
                    return
                large, self._large = self._large, None
                self._frame(large.tag, large.data, batch)
            else:
                data = self._read.filled(nbytes)
                self._read.keep_from(self._parse(data, batch))
        except ZmtpError as error:
            log.warning("kernel channel closed: %s", error)
            self.close()
            return
        if batch and self.on_messages is not None:
            try:
                self.on_messages(batch)
            except Exception:
                log.exception("handling kernel messages failed")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("the kernel closed the connection"))

    # frames in
    def _parse(self, data: bytes, batch: list[list[Any]]) -> int:
        size = len(data)
        position = 0
        if not self._greeted:
            if size < GREETING_SIZE:
                return 0
            if data[0] != 0xFF or data[9] != 0x7F or data[10] < 3:
                raise ZmtpError("the peer does not speak ZMTP 3")
            if data[12:32].rstrip(b"\0") != b"NULL":
                raise ZmtpError("the peer wants a security mechanism other than NULL")
            self._greeted = True
            position = GREETING_SIZE
        while size - position >= 2:
            flags = data[position]
            if flags & LONG:
                if size - position < 9:
                    break
                (length,) = _LONG_SIZE.unpack_from(data, position + 1)
                start = position + 9
            else:
                length = data[position + 1]
                start = position + 2
            if length > MAX_FRAME:
                raise ZmtpError(f"a frame of {length} bytes")
            end = start + length
            if end > size:
                if length >= LARGE:  # read the rest straight into the frame's own buffer
                    self._large = LargeFrame(length, data[start:], flags)
                    return size
                break
            position = end
            self._frame(flags, data[start:end], batch)
        return position

    def _frame(self, flags: int, body: Any, batch: list[list[Any]]) -> None:
        if flags & COMMAND:
            self._command(bytes(body))
            return
        if not self.ready.done():
            raise ZmtpError("a message before the handshake")
        self._parts.append(body)
        if not flags & MORE:
            batch.append(self._parts)
            self._parts = []

    def _command(self, data: bytes) -> None:
        if not data or data[0] + 1 > len(data):
            raise ZmtpError("a malformed command")
        name, body = data[1 : 1 + data[0]], data[1 + data[0] :]
        if name == b"READY":
            peer = parse_properties(body).get(b"socket-type", b"")
            if peer not in PEERS.get(self.socket_type, set()):
                raise ZmtpError(f"a {self.socket_type.decode()} cannot talk to a {peer!r} socket")
            if not self.ready.done():
                self.ready.set_result(None)
            if self.socket_type == b"SUB":
                self._write([b"\x01"])  # subscribe to everything (a ZMTP 3.0 subscription)
        elif name == b"ERROR":
            raise ZmtpError(f"the peer refused: {body[1:].decode('utf-8', 'replace')}")
        elif name == b"PING" and len(body) >= 2:
            assert self.transport is not None
            self.transport.write(command(b"PONG", body[2:]))

    # frames out
    def _write(self, frames: Sequence[Any]) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        small: list[Any] = []
        last = len(frames) - 1
        for index, frame in enumerate(frames):
            size = frame.nbytes if isinstance(frame, memoryview) else len(frame)
            small.append(frame_head(size, index < last))
            if size < LARGE:
                small.append(frame)
                continue
            transport.write(b"".join(small))
            small = []
            transport.write(frame)  # a large body goes to the socket without a copy
        if small:
            transport.write(b"".join(small))

    def send(self, frames: Sequence[Any]) -> None:
        """Send one multipart message: small frames joined into one write, large ones
        written as they are."""
        if self.closed:
            raise ConnectionError("kernel channel closed")
        if not self.ready.done():
            raise ConnectionError("kernel channel not connected yet")
        self._write(frames)

    def close(self, linger: int = 0) -> None:
        if self.transport is not None:
            if linger:
                self.transport.close()
            else:
                self.transport.abort()
        self.closed = True


async def connect(
    url: str,
    socket_type: bytes,
    on_messages: Callable[[list[list[Any]]], None] | None,
    identity: bytes | None = None,
    timeout: float = 10.0,
) -> ZmtpChannel:
    """Connect to ``ipc://path`` or ``tcp://host:port`` and complete the handshake."""
    loop = asyncio.get_running_loop()

    def factory() -> ZmtpChannel:
        return ZmtpChannel(socket_type, on_messages, identity)

    if url.startswith("ipc://"):
        connecting = loop.create_unix_connection(factory, url[len("ipc://") :])
    elif url.startswith("tcp://"):
        host, _, port = url[len("tcp://") :].rpartition(":")
        connecting = loop.create_connection(factory, host, int(port))
    else:
        raise ValueError(f"cannot connect to {url!r}")
    transport, channel = await asyncio.wait_for(connecting, timeout)
    try:
        await asyncio.wait_for(asyncio.shield(channel.ready), timeout)
    except BaseException:
        transport.abort()
        raise
    if url.startswith("tcp://"):
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return channel
