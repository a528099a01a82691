"""The requests a bridge sends again after its relay reconnects: those the kernel has
not named as parent yet, in order, bounded."""

from __future__ import annotations

import json

from jupyter_gpu_share import wire
from jupyter_gpu_share.kernel.resend import Unanswered


def _message(msg_id: str, parent_id: str = "", identity: bytes = b"client") -> list[bytes]:
    header = json.dumps({"msg_id": msg_id, "msg_type": "execute_request"}).encode()
    parent = json.dumps({"msg_id": parent_id} if parent_id else {}).encode()
    return [identity, wire.DELIMITER, b"sig", header, parent, b"{}", b"{}"]


def test_a_request_is_kept_until_the_kernel_names_it_as_parent():
    unanswered = Unanswered()
    first, second = _message("a-1"), _message("b-2")
    unanswered.sent(wire.SHELL, [first, second])
    assert [frames for _, frames in unanswered.pending()] == [first, second]
    # The kernel's busy status for the first (iopub frames: a topic, no identity).
    unanswered.seen([memoryview(f) for f in _message("st-1", "a-1", identity=b"kernel.status")])
    assert unanswered.pending() == [(wire.SHELL, second)]
    unanswered.seen(_message("r-2", "b-2"))
    assert len(unanswered) == 0


def test_messages_that_are_no_jupyter_message_are_ignored():
    unanswered = Unanswered()
    unanswered.sent(wire.SHELL, [[b"no delimiter"], [b"x", wire.DELIMITER, b"sig", b"not json"]])
    unanswered.sent(wire.SHELL, [[b"x", wire.DELIMITER, b"sig", b'{"msg_id": 7}']])
    assert len(unanswered) == 0
    unanswered.sent(wire.CONTROL, [_message("c-1")])
    unanswered.seen([b"garbage"])  # no parent to read: nothing is taken as answered
    assert len(unanswered) == 1


def test_it_is_bounded_the_oldest_go_first():
    unanswered = Unanswered(limit=3)
    unanswered.sent(wire.SHELL, [_message(f"m-{i}") for i in range(5)])
    assert [wire.request_id(f) for _, f in unanswered.pending()] == [b"m-2", b"m-3", b"m-4"]


def test_request_id_and_parent_header_read_after_the_delimiter():
    frames = _message("abc", "xyz", identity=b"id1")
    assert wire.request_id([b"id0", *frames]) == b"abc"
    assert json.loads(wire.parent_header(frames)) == {"msg_id": "xyz"}
    assert wire.request_id([b"x", wire.DELIMITER]) is None
    long_id = json.dumps({"msg_id": "x" * 300}).encode()
    assert wire.request_id([wire.DELIMITER, b"sig", long_id]) is None


def test_an_id_that_is_a_prefix_of_another_is_not_taken_as_answered():
    """jupyter_client's ids are SESSION_PID_N: ..._1 is a substring of ..._10's header."""
    unanswered = Unanswered()
    unanswered.sent(wire.SHELL, [_message("s_9_1")])
    unanswered.seen(_message("st", "s_9_10", identity=b"kernel.status"))
    assert len(unanswered) == 1
    unanswered.seen(_message("st", "s_9_1", identity=b"kernel.status"))
    assert len(unanswered) == 0
