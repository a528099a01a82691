"""A raw websocket server's side of the upgrade, for tests that misbehave after it."""

from __future__ import annotations

import asyncio

from websockets.utils import accept_key


async def upgrade_answer(reader: asyncio.StreamReader) -> bytes:
    """Read a client's upgrade request; return the 101 that accepts it."""
    request = await reader.readuntil(b"\r\n\r\n")
    key = next(
        line.split(b":", 1)[1].strip()
        for line in request.split(b"\r\n")
        if line.lower().startswith(b"sec-websocket-key")
    )
    return (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept_key(key.decode()).encode() + b"\r\n\r\n"
    )
