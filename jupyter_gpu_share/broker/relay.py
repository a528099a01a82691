"""Pairing a renter's relay websocket with its host's and copying messages between them.

The broker treats kernel traffic as opaque: a message that arrives on one side is written,
unchanged, to the other. Until both sides are present, messages wait in a bounded buffer.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

log = logging.getLogger(__name__)

USER, HOST = "user", "host"
OTHER_SIDE = {USER: HOST, HOST: USER}

# The session's host moved to another broker: both ends reconnect (1012, "service
# restart": not a 4000 code, which tells the ends the session ended).
CLOSE_MOVED = 1012
CLOSE_STOPPED = 4000
CLOSE_HOST_LOST = 4001
CLOSE_CREDIT_EXHAUSTED = 4002
CLOSE_KERNEL_ENDED = 4003
CLOSE_START_FAILED = 4004
CLOSE_REPLACED = 4005
CLOSE_BUFFER_FULL = 4006
CLOSE_QUOTA_REACHED = 4007
CLOSE_CLIENT_GONE = 4008
CLOSE_CAP_REACHED = 4009
CLOSE_IDLE = 4010


Message = tuple[int, bytes]  # (websocket opcode: 1 text, 2 binary; payload)


class RelayEnd(Protocol):
    """The part of a websocket handler the relay uses."""

    def send_many(self, messages: list[Message]) -> None: ...

    def pause_reading(self, paused: bool) -> None: ...

    def close(self, code: int | None = None, reason: str | None = None) -> None: ...


class RelayPair:
    """The two ends of one session's relay."""

    def __init__(self, session_id: str, max_buffer_bytes: int):
        self.session_id = session_id
        self.max_buffer_bytes = max_buffer_bytes
        self.ends: dict[str, RelayEnd | None] = {USER: None, HOST: None}
        self._waiting: dict[str, list[Message]] = {USER: [], HOST: []}
        self._waiting_bytes = {USER: 0, HOST: 0}
        self._full = {USER: False, HOST: False}  # whose output is over its high-water mark
        self.messages = 0
        # Since when (time.monotonic) each side has had no connection; None: connected.
        now = time.monotonic()
        self.absent_since: dict[str, float | None] = {USER: now, HOST: now}

    def attach(self, side: str, end: RelayEnd) -> None:
        """Connect one side, replacing a stale connection, and flush what waited for it."""
        previous = self.ends[side]
        self.ends[side] = end
        self.absent_since[side] = None
        if previous is not None and previous is not end:
            previous.close(CLOSE_REPLACED, "replaced by a new connection")
        if self._full[OTHER_SIDE[side]]:
            end.pause_reading(True)  # the other side cannot take more yet
        waiting = self._waiting[side]
        if waiting:
            self._waiting[side] = []
            end.send_many(waiting)
        self._waiting_bytes[side] = 0

    def detach(self, side: str, end: RelayEnd) -> None:
        """Forget a side whose connection closed (it may reconnect)."""
        if self.ends[side] is end:
            self.ends[side] = None
            self.absent_since[side] = time.monotonic()
            self.backlogged(side, False)  # nothing waits for this side's buffer any more

    def forward(self, from_side: str, messages: list[Message]) -> bool:
        """Copy messages to the other side; False when the buffer for an absent side is full."""
        self.messages += len(messages)
        to_side = OTHER_SIDE[from_side]
        peer = self.ends[to_side]
        if peer is not None:
            peer.send_many(messages)
            return True
        size = self._waiting_bytes[to_side] + sum(len(payload) for _, payload in messages)
        if size > self.max_buffer_bytes:
            return False
        self._waiting[to_side].extend(messages)
        self._waiting_bytes[to_side] = size
        return True

    def backlogged(self, side: str, full: bool) -> None:
        """``side``'s outgoing buffer is full (or drained): hold (or resume) the other side."""
        self._full[side] = full
        other = self.ends[OTHER_SIDE[side]]
        if other is not None:
            other.pause_reading(full)

    def close(self, code: int, reason: str) -> None:
        """Close both sides with a code the bridge understands."""
        for side, end in self.ends.items():
            if end is not None:
                end.close(code, reason)
            self.ends[side] = None
        for side in self._waiting:
            self._waiting[side] = []
            self._waiting_bytes[side] = 0


class Relays:
    """All live relay pairs of this broker process."""

    def __init__(self, max_buffer_bytes: int):
        self.max_buffer_bytes = max_buffer_bytes
        self.pairs: dict[str, RelayPair] = {}

    def pair(self, session_id: str) -> RelayPair:
        """Return the session's pair, creating it on first use."""
        found = self.pairs.get(session_id)
        if found is None:
            found = self.pairs[session_id] = RelayPair(session_id, self.max_buffer_bytes)
        return found

    def close(self, session_id: str, code: int, reason: str) -> None:
        """Close and forget a session's relay."""
        found = self.pairs.pop(session_id, None)
        if found is not None:
            found.close(code, reason)
