"""What a remote kernel's cells printed, kept on the user's server for a browser that
comes back (a refresh, a closed laptop, a flaky network).

A browser that reconnects to a running kernel gets only what the kernel publishes from
then on: jupyter_server drops what it buffered for the old page (a new page is a new
session), and the notebook cannot tell whose outputs they are anyway. So the bridge
keeps, per execution of a lab cell (JupyterLab names the cell in the execute_request's
metadata, ``cellId``), the output messages its kernel published, bounded; the lab
extension asks for them when it opens the notebook again, puts them in their cells and
streams a running cell's new output into it. Requests without a cell (nbclient,
papermill, a console) cost a header's parse and keep nothing.
"""

from __future__ import annotations

import json
import re
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import wire

MAX_EXECUTIONS = 200
MAX_CELL_ID = 128
# What a cell shows; update_display_data is not kept (a progress bar updating 20,000
# times would push every other run out: the page shows the display as last published).
KEPT = frozenset({"stream", "display_data", "execute_result", "error", "clear_output"})
ENTRY_BYTES = 128  # what keeping one message costs besides its content (counted)
_COUNT = re.compile(rb'"execution_count"\s*:\s*(\d{1,12})')


@dataclass
class Execution:
    """One execute_request of a cell and what its kernel published for it."""

    msg_id: str
    cell_id: str
    started: float
    outputs: deque[tuple[str, str, bytes]] = field(default_factory=deque)  # msg_id, type, content
    size: int = 0
    done: bool = False
    execution_count: int | None = None
    dropped: int = 0  # outputs given up to the limit, from the start


# The parent's msg_id, found without parsing the parent header (kept messages only: a
# match is looked up among the executions, and a false one finds none).
_PARENT_ID = re.compile(rb'"msg_id"\s*:\s*"([^"\\]{1,256})"')
_MSG_TYPE = re.compile(rb'"msg_type"\s*:\s*"([a-z_]{1,40})"')


def _json(data: bytes | None) -> dict[str, Any]:
    if not data:
        return {}
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):  # a hostile host's nesting too
        return {}
    return value if isinstance(value, dict) else {}


class OutputLog:
    """The outputs of a kernel's recent cell executions, at most ``max_bytes`` of them."""

    def __init__(self, max_bytes: int = 16 * 1024 * 1024) -> None:
        self.max_bytes = max_bytes
        self.size = 0
        self.executions: OrderedDict[str, Execution] = OrderedDict()

    def requested(self, frames: Sequence[Any]) -> None:
        """A shell message on its way to the kernel: an execute_request of a cell opens
        an execution."""
        if self.max_bytes <= 0:
            return
        at = wire.delimiter_at(frames)
        if at is None or len(frames) < at + 5:
            return
        raw = bytes(frames[at + 2])
        if b'"execute_request"' not in raw:  # completions, inspections...: not parsed
            return
        header = _json(raw)
        if header.get("msg_type") != "execute_request":
            return
        msg_id = header.get("msg_id")
        cell_id = _json(bytes(frames[at + 4])).get("cellId")
        if not isinstance(msg_id, str) or not isinstance(cell_id, str):
            return
        if not 0 < len(cell_id) <= MAX_CELL_ID or len(msg_id) > wire.MAX_ID_BYTES:
            return
        self.executions[msg_id] = Execution(msg_id, cell_id, time.time())
        while len(self.executions) > MAX_EXECUTIONS:
            self._forget_oldest()

    def published(self, frames: Sequence[Any]) -> None:
        """An iopub message from the kernel: kept when it answers a known execution.
        Never raises: what the kernel sent goes on to the clients whatever this makes
        of it."""
        if not self.executions:
            return
        try:
            self._published(frames)
        except Exception:  # a message this cannot read is not kept, and that is all
            return

    def _published(self, frames: Sequence[Any]) -> None:
        at = wire.delimiter_at(frames)
        if at is None or len(frames) < at + 6:
            return
        parent = _PARENT_ID.search(bytes(frames[at + 3][:512]))
        execution = self.executions.get(parent.group(1).decode()) if parent else None
        if execution is None:
            return
        header = bytes(frames[at + 2][:1024])
        found = _MSG_TYPE.search(header)
        kind = found.group(1).decode() if found else None
        if kind == "status":
            if wire.execution_state(frames) == "idle":
                execution.done = True
            return
        content = bytes(frames[at + 5])
        if kind == "execute_input" or kind == "execute_result":
            count = _COUNT.search(content[:4096] if kind == "execute_input" else content[-4096:])
            if count:
                execution.execution_count = int(count.group(1))
            if kind == "execute_input":
                return
        if kind not in KEPT or not content:
            return
        found = _PARENT_ID.search(header)  # the header's own msg_id, the same way
        msg_id = found.group(1).decode() if found else ""
        execution.outputs.append((msg_id, kind, content))
        cost = len(content) + ENTRY_BYTES
        execution.size += cost
        self.size += cost
        self._bound(execution)

    def _bound(self, current: Execution) -> None:
        """Over the limit: forget whole executions, oldest first, then the current one's
        earliest outputs."""
        while self.size > self.max_bytes and len(self.executions) > 1:
            oldest = next(iter(self.executions.values()))
            if oldest is current:
                break
            self._forget_oldest()
        while self.size > self.max_bytes and current.outputs:
            _, _, content = current.outputs.popleft()
            cost = len(content) + ENTRY_BYTES
            current.size -= cost
            self.size -= cost
            current.dropped += 1

    def _forget_oldest(self) -> None:
        _, oldest = self.executions.popitem(last=False)
        self.size -= oldest.size

    def snapshot(self) -> list[dict[str, Any]]:
        """The latest execution of each cell, oldest first, for the lab."""
        latest: dict[str, Execution] = {}
        for execution in self.executions.values():
            latest.pop(execution.cell_id, None)
            latest[execution.cell_id] = execution
        return [
            {
                "msg_id": execution.msg_id,
                "cell_id": execution.cell_id,
                "started": execution.started,
                "done": execution.done,
                "execution_count": execution.execution_count,
                "dropped": execution.dropped,
                "outputs": [
                    {"msg_id": msg_id, "msg_type": kind, "content": _json(content)}
                    for msg_id, kind, content in execution.outputs
                ],
            }
            for execution in latest.values()
        ]
