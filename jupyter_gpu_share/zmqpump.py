"""ZMQ sockets served by the asyncio loop without a future per message.

``zmq.asyncio`` makes a future, a callback and a loop hop for every send and receive; on
the relay path (the host agent and the user-side bridge copy every kernel message) that
was most of their CPU per message. A :class:`SocketPump` keeps a plain socket, watches
its descriptor, and on each wake-up hands every message that has arrived to its callback
as one batch; sends go out at once. ZMQ's descriptor signals edges only, so after every
operation the socket's events are read again, as tornado's ``ZMQStream`` does.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import zmq

log = logging.getLogger(__name__)

Frames = Sequence[Any]
MAX_BATCH = 256
WATCHDOG_SECONDS = 0.5


class SocketPump:
    """One ZMQ socket on the running event loop.

    ``on_messages(batch)`` gets every multipart message readable at one wake-up (a list
    of frame lists, in order); ``None`` for a socket that is only written. ``send`` never
    waits: a message the socket cannot take yet (its high-water mark) is queued, in order.
    """

    def __init__(
        self,
        sock: zmq.Socket,
        on_messages: Callable[[list[list[Any]]], None] | None,
        copy: bool = True,
    ) -> None:
        self.sock = sock
        self.on_messages = on_messages
        self.copy = copy
        self.closed = False
        self.reading_paused = False
        self._out: deque[tuple[Frames, bool]] = deque()
        self._scheduled = False
        self._loop = asyncio.get_running_loop()
        self._fd = sock.getsockopt(zmq.FD)
        self._loop.add_reader(self._fd, self._ready)
        self._schedule()  # anything that arrived before we watched
        self.missed = 0  # times the watchdog found messages no wake-up had announced
        self._watchdog = self._loop.call_later(WATCHDOG_SECONDS, self._watch)

    def _watch(self) -> None:
        """A slow safety net: ZMQ's descriptor reports edges, and one lost edge would
        leave messages unread until the next one."""
        if self.closed:
            return
        try:
            events = self.sock.getsockopt(zmq.EVENTS)
        except zmq.ZMQError:
            return
        if (events & zmq.POLLIN and self.on_messages is not None and not self.reading_paused) or (
            self._out and events & zmq.POLLOUT
        ):
            self.missed += 1
            log.warning("ZMQ socket had unannounced messages (%d so far)", self.missed)
            self._schedule()
        self._watchdog = self._loop.call_later(WATCHDOG_SECONDS, self._watch)

    def _schedule(self) -> None:
        if not self._scheduled and not self.closed:
            self._scheduled = True
            self._loop.call_soon(self._run)

    def _run(self) -> None:
        self._scheduled = False
        self._ready()

    def _ready(self) -> None:
        if self.closed:
            return
        try:
            events = self.sock.getsockopt(zmq.EVENTS)
            if self._out and events & zmq.POLLOUT:
                self._flush()
            if events & zmq.POLLIN and self.on_messages is not None and not self.reading_paused:
                batch = []
                recv = self.sock.recv_multipart
                while len(batch) < MAX_BATCH:
                    try:
                        batch.append(recv(zmq.NOBLOCK, copy=self.copy))
                    except zmq.Again:
                        break
                if batch:
                    try:
                        self.on_messages(batch)
                    except Exception:
                        log.exception("handling ZMQ messages failed")
            self._recheck()
        except zmq.ZMQError as error:
            if not self.closed:
                log.debug("ZMQ socket error: %s", error)

    def _recheck(self) -> None:
        """Run again soon if the socket has more for us (its descriptor may not say so)."""
        if self.closed:
            return
        events = self.sock.getsockopt(zmq.EVENTS)
        if (events & zmq.POLLIN and self.on_messages is not None and not self.reading_paused) or (
            self._out and events & zmq.POLLOUT
        ):
            self._schedule()

    def _flush(self) -> None:
        while self._out:
            frames, copy = self._out[0]
            try:
                self.sock.send_multipart(frames, zmq.NOBLOCK, copy=copy)
            except zmq.Again:
                return
            self._out.popleft()

    def send(self, frames: Frames, copy: bool = True) -> None:
        """Send one multipart message now, or queue it behind those still waiting."""
        if self.closed:
            raise zmq.ZMQError(zmq.ENOTSOCK, "socket closed")
        if self._out:
            self._out.append((frames, copy))
        else:
            try:
                self.sock.send_multipart(frames, zmq.NOBLOCK, copy=copy)
            except zmq.Again:
                self._out.append((frames, copy))
        self._recheck()

    def pause_reading(self, paused: bool) -> None:
        """Hold (or resume) reading, while whatever the messages go to drains."""
        self.reading_paused = paused
        if not paused:
            self._schedule()

    @property
    def waiting(self) -> int:
        """Messages queued because the socket was full."""
        return len(self._out)

    def close(self, linger: int = 0) -> None:
        if self.closed:
            return
        self.closed = True
        self._watchdog.cancel()
        self._loop.remove_reader(self._fd)
        self.sock.close(linger=linger)
