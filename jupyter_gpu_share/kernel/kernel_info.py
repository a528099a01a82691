"""The bridge answers a fresh kernel's ``kernel_info_request`` itself.

A client that connects to a kernel asks for its info before anything else: jupyter_server
once when the websocket opens and again in its nudge (until iopub answers), JupyterLab once
more. On a remote kernel each is a round trip to the host, and jupyter_server's websocket
reads nothing from its client until they are answered, so over a slow link the first cell
waits behind four link round trips that carry the same answer. The host asks the kernel
for its info anyway while it starts it (to know its iopub flows) and sends the reply's
content with ``kernel_ready``.

The bridge answers from that content only while nothing else has gone to the kernel since
it became ready: the kernel is then idle, with no request in flight, so the real kernel
would give the same reply at once (a status ``busy``, the reply, a status ``idle``, the
order ipykernel keeps). The first request of any other type ends it for the session; from
then on every request goes to the kernel, so a reply can never overtake one sent before it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from jupyter_client.session import Session

from .. import wire

# The reply the host sends with kernel_ready: a few KiB for ipykernel (its banner, help
# links, language info); anything far larger is not a kernel_info_reply worth holding.
MAX_CONTENT_BYTES = 64 * 1024
STATUS_TOPIC = b"kernel.gpu-share.status"


def valid_content(content: Any) -> dict[str, Any] | None:
    """The content of a kernel_info_reply, if it is one a client can use; else None."""
    if not isinstance(content, dict) or content.get("status") != "ok":
        return None
    if not isinstance(content.get("protocol_version"), str):
        return None
    if not isinstance(content.get("language_info"), dict):
        return None
    try:  # packed as jupyter_client packs: a lone surrogate, a NaN would fail there
        packed = json.dumps(content, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (ValueError, TypeError, UnicodeEncodeError):
        return None
    if len(packed) > MAX_CONTENT_BYTES:
        return None
    return content


def request_type(frames: Sequence[Any]) -> str | None:
    """The msg_type of a signed request (identities, delimiter, signature, header...)."""
    for index, frame in enumerate(frames):
        if len(frame) == len(wire.DELIMITER) and bytes(frame) == wire.DELIMITER:
            if len(frames) < index + 6:
                return None
            try:
                header = json.loads(bytes(frames[index + 2]))
            except ValueError:
                return None
            kind = header.get("msg_type") if isinstance(header, dict) else None
            return kind if isinstance(kind, str) else None
    return None


class KernelInfoAnswer:
    """Answers kernel_info_requests for one attach of the bridge, until a request of any
    other type goes to the kernel."""

    def __init__(self) -> None:
        self.session: Session | None = None
        self.content: dict[str, Any] | None = None
        self.answered = 0

    @property
    def armed(self) -> bool:
        return self.content is not None

    def arm(
        self,
        content: Any,
        key: str,
        signature_scheme: str,
        *,
        session: Any = None,
        username: Any = None,
    ) -> None:
        """A kernel became ready and idle, with this reply to give, signed as the kernel
        signs (its ``session`` id and ``username``, when the host sent them)."""
        content = valid_content(content)
        if content is None:
            self.disarm()
            return
        identity = {
            name: value
            for name, value in (("session", session), ("username", username))
            if isinstance(value, str) and 0 < len(value) <= 128
        }
        self.session = Session(key=key.encode(), signature_scheme=signature_scheme, **identity)
        self.content = content

    def disarm(self) -> None:
        self.content = None

    def take(
        self,
        frames: Sequence[Any],
        reply: Callable[[list[bytes]], None],
        publish: Callable[[list[bytes]], None],
    ) -> bool:
        """Answer ``frames`` here (True), or leave it for the kernel (False, and from now on
        every request when it is not a kernel_info_request)."""
        if self.content is None or self.session is None:
            return False
        if request_type(frames) != "kernel_info_request":
            self.disarm()
            return False
        session = self.session
        try:
            idents, parts = session.feed_identities([bytes(frame) for frame in frames])
            # With its content, as ipykernel reads it: a replayed signature is refused.
            request = session.deserialize(parts, content=True)
            answer = session.msg("kernel_info_reply", self.content, request)
            messages = (
                self._status(request, "busy"),
                session.serialize(answer, idents),
                self._status(request, "idle"),
            )
        except (ValueError, TypeError, KeyError, UnicodeError):
            # Not signed with the key the bridge knows, a replay, or a reply that does not
            # pack: leave it, and what follows, to the kernel, as before.
            self.disarm()
            return False
        self.answered += 1  # counted first: a client on another thread may read it on reply
        publish(messages[0])
        reply(messages[1])
        publish(messages[2])
        return True

    def _status(self, parent: dict[str, Any], state: str) -> list[bytes]:
        assert self.session is not None
        message = self.session.msg("status", {"execution_state": state}, parent)
        return self.session.serialize(message, [STATUS_TOPIC])
