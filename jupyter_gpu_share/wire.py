"""Relay framing: one Jupyter ZMQ multipart message <-> one binary websocket message.

The broker never decodes these; only the user-side bridge and the host agent do.
Layout (network byte order):

    u8 channel | u32 frame_count | frame_count x u32 length | frame bytes, concatenated

Channels follow the Jupyter names. Text websocket messages on the same relay carry
small JSON control records (``hello``, ``signal``, ``kernel_ready``, ...), see
docs/protocol.md.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Sequence
from typing import Any

SHELL, IOPUB, STDIN, CONTROL = 0, 1, 2, 3
CHANNELS = {"shell": SHELL, "iopub": IOPUB, "stdin": STDIN, "control": CONTROL}
CHANNEL_NAMES = {number: name for name, number in CHANNELS.items()}
# Not a kernel channel: the notebook's files between the bridge and the host (files/).
FILES = 4

_HEAD = struct.Struct("!BI")
MAX_FRAMES = 4096
# Below this size copying a message into ZMQ costs less CPU than lending it; above it, the
# copy's buffer comes from mmap and its page faults cost more (measured: tcp, ipc, inproc).
ZERO_COPY_ABOVE = 128 * 1024


def total_size(frames: Sequence[bytes | memoryview]) -> int:
    """Bytes in a multipart message."""
    return sum(len(frame) for frame in frames)


class FrameError(ValueError):
    """A relay message that does not follow the framing."""


def encode_parts(channel: int, frames: Sequence[Any]) -> list[Any]:
    """One multipart message for the relay, as parts to be written one after another
    (the frames themselves are not copied)."""
    count = len(frames)
    lengths = struct.pack(f"!{count}I", *(len(f) for f in frames))
    return [_HEAD.pack(channel, count) + lengths, *frames]


def encode(channel: int, frames: Sequence[Any]) -> bytes:
    """Pack one multipart message for the relay into one bytes object."""
    return b"".join(encode_parts(channel, frames))


def decode(data: bytes | bytearray | memoryview) -> tuple[int, list[memoryview]]:
    """Unpack a relay message into its channel and zero-copy frame views."""
    view = memoryview(data)
    if len(view) < _HEAD.size:
        raise FrameError("relay message shorter than its header")
    channel, count = _HEAD.unpack_from(view)
    if channel not in CHANNEL_NAMES and channel != FILES:
        raise FrameError(f"unknown channel {channel}")
    if count > MAX_FRAMES:
        raise FrameError(f"too many frames: {count}")
    offset = _HEAD.size + 4 * count
    if len(view) < offset:
        raise FrameError("relay message shorter than its frame table")
    lengths = struct.unpack_from(f"!{count}I", view, _HEAD.size)
    frames = []
    for length in lengths:
        end = offset + length
        if end > len(view):
            raise FrameError("frame runs past the end of the relay message")
        frames.append(view[offset:end])
        offset = end
    if offset != len(view):
        raise FrameError("trailing bytes after the last frame")
    return channel, frames


DELIMITER = b"<IDS|MSG>"
_STATE = re.compile(rb'"execution_state"\s*:\s*"([a-z]{1,16})"')


def execution_state(frames: Sequence[Any]) -> str | None:
    """The ``execution_state`` of an iopub ``status`` message ("busy", "idle"...), else None.

    Cheap on every other message: only a topic ending in ``.status`` (what ipykernel
    publishes status on) is looked into, and then only its content frame is searched.
    """
    if not frames or not bytes(frames[0][-7:]).endswith(b".status"):
        return None
    for index, frame in enumerate(frames):
        if len(frame) == len(DELIMITER) and bytes(frame) == DELIMITER:
            if len(frames) > index + 5:
                found = _STATE.search(bytes(frames[index + 5][:256]))
                return found.group(1).decode() if found else None
            return None
    return None


DELIMITER = b"<IDS|MSG>"
MAX_ID_BYTES = 256


def delimiter_at(frames: Sequence[Any]) -> int | None:
    """Where a Jupyter message's delimiter frame is (None: nowhere)."""
    for index, frame in enumerate(frames[:MAX_FRAMES]):
        if len(frame) == len(DELIMITER) and bytes(frame) == DELIMITER:
            return index
    return None


def part_after_delimiter(frames: Sequence[Any], offset: int) -> bytes | None:
    """The frame ``offset`` places after a Jupyter message's delimiter (1: its signature,
    2: its header, 3: its parent header, 4: metadata, 5: content), or None."""
    index = delimiter_at(frames)
    if index is None or index + offset >= len(frames):
        return None
    return bytes(frames[index + offset])


def _header_field(frames: Sequence[Any], name: str) -> Any:
    """A field of a Jupyter message's header (None: no header, or not readable)."""
    header = part_after_delimiter(frames, 2)
    if header is None:
        return None
    try:
        return json.loads(header).get(name)
    except (ValueError, AttributeError, RecursionError):
        return None


def request_id(frames: Sequence[Any]) -> bytes | None:
    """The ``msg_id`` of a Jupyter message's header (None: none, or not readable)."""
    msg_id = _header_field(frames, "msg_id")
    if not isinstance(msg_id, str) or not 0 < len(msg_id) <= MAX_ID_BYTES:
        return None
    return msg_id.encode()


def parent_header(frames: Sequence[Any]) -> bytes | None:
    """A Jupyter message's parent header, as the bytes it was sent in."""
    return part_after_delimiter(frames, 3)


def parent_id(frames: Sequence[Any]) -> bytes | None:
    """The ``msg_id`` of a Jupyter message's parent header (exactly: ids share prefixes)."""
    parent = parent_header(frames)
    if not parent:
        return None
    try:
        msg_id = json.loads(parent).get("msg_id")
    except (ValueError, AttributeError):
        return None
    return msg_id.encode() if isinstance(msg_id, str) and msg_id else None


def message_type(frames: Sequence[Any]) -> str | None:
    """The ``msg_type`` of a Jupyter message's header (None: none, or not readable)."""
    kind = _header_field(frames, "msg_type")
    return kind if isinstance(kind, str) else None


def answers_execute(frames: Sequence[Any]) -> bool:
    """Whether a kernel message's parent is an execute_request (a cell's run), read from
    the parent header's bytes without parsing them."""
    parent = parent_header(frames)
    return parent is not None and b'"execute_request"' in parent[:2048]
