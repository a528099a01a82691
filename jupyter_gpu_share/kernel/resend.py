"""The requests the bridge sent to a remote kernel that it has seen no sign of.

A relay write is in the socket's buffer, not at the host: when the broker dies (``kill
-9``), what was written to it just before is lost. So the bridge keeps each shell and
control request it sent until something of the kernel's names it as parent (its ``busy``
status comes first, then its outputs and reply), and after the relay reconnects sends
the ones still unseen again, in order. The host agent drops a request whose ``msg_id``
it has already passed to the kernel (``host/agent.py``), so one that did arrive (only its
answer was lost) is not run twice.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from .. import wire

MAX_UNANSWERED = 256  # the oldest are forgotten beyond this (a client flooding requests)


class Unanswered:
    """Shell and control requests sent, by ``msg_id``, until the kernel answers one."""

    def __init__(self, limit: int = MAX_UNANSWERED) -> None:
        self.limit = limit
        self._sent: OrderedDict[bytes, tuple[int, list[Any]]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sent)

    def sent(self, channel: int, batch: list[list[Any]]) -> None:
        """Note requests written to the relay."""
        for frames in batch:
            msg_id = wire.request_id(frames)
            if msg_id is None:
                continue
            self._sent[msg_id] = (channel, frames)
            if len(self._sent) > self.limit:
                self._sent.popitem(last=False)

    def seen(self, frames: Any) -> None:
        """A message from the kernel: the requests it names as parent have arrived."""
        if not self._sent:
            return
        msg_id = wire.parent_id(frames)
        if msg_id is not None:
            self._sent.pop(msg_id, None)

    def pending(self) -> list[tuple[int, list[Any]]]:
        """What to send again, oldest first."""
        return list(self._sent.values())

    def clear(self) -> None:
        self._sent.clear()
