"""The bridge's own answer to a fresh kernel's kernel_info_request (kernel/kernel_info.py)."""

from __future__ import annotations

from typing import Any

import pytest
from jupyter_client.session import Session

from jupyter_gpu_share.kernel.kernel_info import (
    MAX_CONTENT_BYTES,
    KernelInfoAnswer,
    request_type,
    valid_content,
)

KEY = "a3c5e0f4-key"
CONTENT = {
    "status": "ok",
    "protocol_version": "5.3",
    "implementation": "ipython",
    "language_info": {"name": "python", "version": "3.11"},
    "banner": "Python",
}


def _request(msg_type: str = "kernel_info_request", key: str = KEY) -> tuple[Session, list[bytes]]:
    client = Session(key=key.encode())
    message = client.msg(msg_type, {})
    return client, client.serialize(message, ident=[b"router-id"])


def _armed() -> KernelInfoAnswer:
    answer = KernelInfoAnswer()
    answer.arm(CONTENT, KEY, "hmac-sha256")
    assert answer.armed
    return answer


def test_a_kernel_info_request_is_answered_as_the_kernel_would() -> None:
    answer = _armed()
    client, frames = _request()
    request_id = client.deserialize(client.feed_identities(frames)[1])["header"]["msg_id"]
    replies: list[list[bytes]] = []
    published: list[list[bytes]] = []
    assert answer.take(frames, replies.append, published.append)

    idents, parts = client.feed_identities(replies[0])
    assert idents == [b"router-id"]  # back to the client that asked
    reply = client.deserialize(parts)  # signed with the kernel's key
    assert reply["header"]["msg_type"] == "kernel_info_reply"
    assert reply["parent_header"]["msg_id"] == request_id
    assert reply["content"] == CONTENT
    states = []
    for frames_out in published:
        topic, parts = client.feed_identities(frames_out)
        assert topic == [b"kernel.gpu-share.status"]
        status = client.deserialize(parts)
        assert status["parent_header"]["msg_id"] == request_id
        states.append(status["content"]["execution_state"])
    assert states == ["busy", "idle"]
    assert answer.armed and answer.answered == 1


def test_any_other_request_ends_the_answers_for_good() -> None:
    answer = _armed()
    _, execute = _request("execute_request")
    sent: list[Any] = []
    assert not answer.take(execute, sent.append, sent.append)
    assert not answer.armed
    _, info = _request()
    assert not answer.take(info, sent.append, sent.append)  # the kernel's to answer now
    assert sent == []


def test_a_request_not_signed_with_the_kernels_key_goes_to_the_kernel() -> None:
    answer = _armed()
    _, frames = _request(key="another-key")
    sent: list[Any] = []
    assert not answer.take(frames, sent.append, sent.append)
    assert not answer.armed and sent == []


@pytest.mark.parametrize(
    "content",
    [
        None,
        "ok",
        {"status": "error"},
        {**CONTENT, "protocol_version": 5},
        {**CONTENT, "language_info": "python"},
        {**CONTENT, "banner": "x" * MAX_CONTENT_BYTES},
    ],
)
def test_no_answer_from_a_reply_a_client_could_not_use(content: Any) -> None:
    answer = KernelInfoAnswer()
    answer.arm(content, KEY, "hmac-sha256")
    assert not answer.armed
    assert valid_content(content) is None


@pytest.mark.parametrize(
    "frames",
    [
        [],
        [b"id", b"<IDS|MSG>", b"sig", b"{}"],  # truncated
        [b"id", b"<IDS|MSG>", b"sig", b"not json", b"{}", b"{}", b"{}"],
        [b"id", b"<IDS|MSG>", b"sig", b"[1]", b"{}", b"{}", b"{}"],
        [b"id", b"<IDS|MSG>", b"sig", b'{"msg_type": 3}', b"{}", b"{}", b"{}"],
        [b"no delimiter", b"{}"],
    ],
)
def test_malformed_requests_have_no_type_and_go_to_the_kernel(frames: list[bytes]) -> None:
    assert request_type(frames) is None
    answer = _armed()
    assert not answer.take(frames, print, print)
    assert not answer.armed


def test_a_replayed_request_goes_to_the_kernel_which_refuses_it() -> None:
    """ipykernel refuses a signature it has seen; answering it here would differ."""
    answer = _armed()
    _, frames = _request()
    sent: list[Any] = []
    assert answer.take(frames, sent.append, sent.append)
    assert not answer.take(list(frames), sent.append, sent.append)
    assert not answer.armed and len(sent) == 3


@pytest.mark.parametrize(
    "content",
    [{**CONTENT, "banner": "\ud800"}, {**CONTENT, "help_links": [float("nan")]}],
)
def test_a_reply_that_would_not_pack_is_never_armed(content: Any) -> None:
    """A lone surrogate from a hostile host published "busy", then failed to pack the
    reply: the client saw the kernel busy for good, and the batch was lost."""
    answer = KernelInfoAnswer()
    answer.arm(content, KEY, "hmac-sha256")
    assert not answer.armed


def test_the_answers_are_signed_as_the_kernel_signs() -> None:
    answer = KernelInfoAnswer()
    answer.arm(CONTENT, KEY, "hmac-sha256", session="kernel-session-id", username="kernel")
    client, frames = _request()
    sent: list[list[bytes]] = []
    assert answer.take(frames, sent.append, sent.append)
    for message in sent:
        header = client.deserialize(client.feed_identities(message)[1])["header"]
        assert (header["session"], header["username"]) == ("kernel-session-id", "kernel")
    answer = KernelInfoAnswer()
    answer.arm(CONTENT, KEY, "hmac-sha256", session="x" * 500, username=7)  # ignored
    assert answer.armed
