"""Reading a kernel's execution state from iopub frames, checked against jupyter_client's own
serialisation of every message a kernel publishes."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from jupyter_client.session import Session

from jupyter_gpu_share import wire

SESSION = Session(key=b"secret")


def _iopub(msg_type: str, content: dict, topic: str | None = None) -> list[bytes]:
    message = SESSION.msg(msg_type, content=content)
    topic = topic or f"kernel.0123.{msg_type}"
    return [topic.encode(), *SESSION.serialize(message)]


def test_status_messages_give_their_state():
    for state in ("busy", "idle", "starting", "restarting", "dead"):
        assert wire.execution_state(_iopub("status", {"execution_state": state})) == state


def test_other_messages_give_none():
    assert wire.execution_state(_iopub("stream", {"name": "stdout", "text": "busy"})) is None
    # A stream whose text mentions execution_state is not a status.
    text = '"execution_state": "busy"'
    assert wire.execution_state(_iopub("stream", {"name": "stdout", "text": text})) is None
    assert wire.execution_state([]) is None
    assert wire.execution_state([b"kernel.1.status"]) is None  # no delimiter
    assert wire.execution_state([b"kernel.1.status", wire.DELIMITER, b"sig"]) is None


@given(st.sampled_from(["busy", "idle"]), st.text(max_size=40), st.binary(max_size=64))
def test_any_status_with_any_parent_and_buffers(state: str, text: str, buffer: bytes):
    parent = SESSION.msg("execute_request", content={"code": text})
    message = SESSION.msg("status", content={"execution_state": state}, parent=parent)
    frames = [b"kernel.x.status", *SESSION.serialize(message), buffer]
    assert wire.execution_state(frames) == state
    views = [memoryview(f) for f in frames]  # as the relay's zero-copy frames come
    assert wire.execution_state(views) == state


def test_answers_execute_reads_the_parent_header():
    from jupyter_client.session import Session

    from jupyter_gpu_share import wire

    session = Session(key=b"k")
    for parent_type, expected in (("execute_request", True), ("usage_request", False)):
        parent = session.msg(parent_type, {})
        status = session.msg("status", {"execution_state": "busy"}, parent=parent)
        assert wire.answers_execute(session.serialize(status, ident=[b"t"])) is expected
