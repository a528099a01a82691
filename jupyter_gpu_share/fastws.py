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
import struct
from typing import Any, cast

from tornado import httpclient, httputil
from tornado.iostream import StreamClosedError
from tornado.util import _websocket_mask
from tornado.websocket import (
    WebSocketClientConnection,
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
