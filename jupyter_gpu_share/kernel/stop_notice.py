"""Why a remote kernel went, told to the cell it was running (issue 18, item 4); and the
host's notices (its availability window closes soon) shown in the running cell (item 7).

When the broker ends a session (credit exhausted, a quota, the teacher, the host lost...)
its relay closes with the reason. A client that only saw the kernel stop answering got
``DeadKernelError: Kernel died``; so before the bridge lets the kernel's heartbeat go
quiet, it answers each execute request still waiting for its reply as the kernel would
have: an ``error`` output in the cell (nbconvert, nbclient, papermill and the lab show it),
the ``execute_reply`` with status ``error``, and ``idle``; signed with the kernel's key, as
the kernel signs.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from jupyter_client.session import Session

from .. import wire
from .kernel_info import STATUS_TOPIC, request_type

ENAME = "SessionStopped"
MAX_WAITING = 64  # execute requests awaiting their reply that a stop answers
# What each of the broker's end reasons means to the person whose cell it stopped.
REASONS = {
    "stopped": "the session was stopped by you (or by your notebook server)",
    "host lost": "the GPU host stopped answering; its kernel and variables are gone",
    "credit exhausted": "your credit ran out; add credit and start the kernel again",
    "quota reached": "your class quota is used up",
    "session cap reached": "this session reached your spending cap per session; raise it "
    "(jupyter gpu-share caps) to go on",
    "daily cap reached": "your sessions reached your spending cap per day; it resets at "
    "midnight UTC, or raise it (jupyter gpu-share caps)",
    "spending cap reached": "a spending cap of yours was reached (jupyter gpu-share caps)",
    "idle": "the kernel was idle past your idle limit and was stopped (its files came back "
    "first); start it again (jupyter gpu-share caps --idle to change the limit)",
    "stopped by the teacher": "your teacher stopped this kernel",
    "client gone": "no notebook was connected to it for too long",
    "kernel exited": "the kernel process exited on the host",
    "exited": "the kernel process exited on the host",
    "died": "the kernel process died on the host (a crash, or it was killed); its "
    "variables are gone",
    "host_limit": "the host stopped the kernel at one of its limits",
}


def explain(reason: str) -> str:
    """The broker's reason, as the notebook shows it."""
    head = reason.split(":", 1)[0].strip()
    said = REASONS.get(head)
    return f"{said} ({reason})" if said and said != reason else reason


class WaitingReplies:
    """The execute requests sent to the kernel whose execute_reply has not come."""

    def __init__(self, limit: int = MAX_WAITING) -> None:
        self.limit = limit
        self._waiting: OrderedDict[bytes, list[bytes]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._waiting)

    def sent(self, batch: list[list[Any]]) -> None:
        """Note the execute requests among shell messages written to the relay."""
        for frames in batch:
            if request_type(frames) != "execute_request":
                continue
            msg_id = wire.request_id(frames)
            if msg_id is not None:
                self._waiting[msg_id] = [bytes(f) for f in frames]
                if len(self._waiting) > self.limit:
                    self._waiting.popitem(last=False)

    def replied(self, frames: Sequence[Any]) -> None:
        """A shell message from the kernel: the request it answers is not waiting."""
        if not self._waiting:
            return
        msg_id = wire.parent_id(frames)
        if msg_id is not None:
            self._waiting.pop(msg_id, None)

    def answer_all(
        self,
        session: Session,
        reason: str,
        reply: Any,
        publish: Any,
    ) -> int:
        """Answer every waiting request with the stop's reason; how many were answered."""
        answered = 0
        waiting, self._waiting = list(self._waiting.values()), OrderedDict()
        text = explain(reason)
        for frames in waiting:
            try:
                idents, parts = session.feed_identities(frames)
                request = session.deserialize(parts, content=False)
            except (ValueError, TypeError, KeyError, UnicodeError):
                continue  # not signed with the key the bridge knows: not ours to answer
            error = {"ename": ENAME, "evalue": text, "traceback": [f"{ENAME}: {text}"]}
            publish(_serialize(session, "error", error, request, [b"kernel.error"]))
            content = {"status": "error", "execution_count": None, **error}
            reply(_serialize(session, "execute_reply", content, request, idents))
            publish(_serialize(session, "status", {"execution_state": "idle"}, request))
            answered += 1
        return answered

    def tell(self, session: Session, text: str, publish: Any, only: bytes | None = None) -> int:
        """Show a notice (the host's window closes soon) as stderr in the waiting cells
        (``only``: in that one); how many were told."""
        told = 0
        for msg_id, frames in list(self._waiting.items()):
            if only is not None and msg_id != only:
                continue
            try:
                _idents, parts = session.feed_identities(frames)
                request = session.deserialize(parts, content=False)
            except (ValueError, TypeError, KeyError, UnicodeError):
                continue
            content = {"name": "stderr", "text": f"gpu-share: {text}\n"}
            publish(_serialize(session, "stream", content, request, [b"kernel.stream.stderr"]))
            told += 1
        return told

    def oldest(self) -> bytes | None:
        """The msg_id of the oldest execute request still waiting: the running cell."""
        return next(iter(self._waiting), None)

    def clear(self) -> None:
        self._waiting.clear()


def _serialize(
    session: Session,
    msg_type: str,
    content: dict[str, Any],
    parent: dict[str, Any],
    idents: list[bytes] | None = None,
) -> list[bytes]:
    message = session.msg(msg_type, content, parent)
    return session.serialize(message, idents if idents is not None else [STATUS_TOPIC])
