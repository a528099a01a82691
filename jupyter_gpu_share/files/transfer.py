"""Files across the relay, between the user's bridge and the host agent.

A transfer is a tar stream cut in chunks of 256 KiB, each a binary relay message on the
``FILES`` channel (``wire.py``): ``u32 transfer id | u8 flags`` then the chunk, compressed
with zlib when a sample of it compresses (text, CSV, notebooks) and sent as it is when it
does not (images, archives, weights). Text records frame it (docs/protocol.md):

    user -> host   files_put {id, bytes, files}  chunks...  files_end {id}
    host -> user   files_done {id, files, bytes} | files_error {id, message}
    user -> host   files_get {id}
    host -> user   chunks...  files_end {id, files, bytes} | files_error {id, message}

The packing and the compression run in a thread; the sender waits for the relay to drain
after each chunk, so a kernel's messages never queue behind more than a chunk or two.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import struct
import tempfile
import threading
import zlib
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from .. import wire
from . import archive
from .archive import CHUNK, ArchiveError, PackResult, UnpackResult
from .rules import MAX_FILES, Entry, mib

_HEAD = struct.Struct("!IB")
COMPRESSED = 1
_SAMPLE = 32 * 1024
# A chunk that comes compressed may inflate to at most this (a zlib bomb stops here).
MAX_CHUNK = CHUNK
MAX_TRANSFER_ID = 2**31


class TransferError(RuntimeError):
    """A transfer that failed, with a reason for people."""


# The threads that pack, unpack and list files: their own, so that transfers (however
# many sessions run them) never take the loop's default executor from the rest.
EXECUTOR = concurrent.futures.ThreadPoolExecutor(
    max_workers=8, thread_name_prefix="gpu-share-files"
)
IDLE_S = 60.0  # an incoming transfer with no chunk for this long is dropped


async def in_thread(function: Callable[..., Any], *args: Any) -> Any:
    """Run ``function(*args)`` on the files' threads."""
    return await asyncio.get_running_loop().run_in_executor(EXECUTOR, lambda: function(*args))


def encode_chunk(transfer_id: int, data: bytes, compress: bool = True) -> bytes:
    """One relay message for a chunk: compressed (with ``compress``) only when that pays."""
    flags, payload = 0, data
    sample = data[:_SAMPLE]
    if compress and sample and len(zlib.compress(sample, 1)) < 0.9 * len(sample):
        packed = zlib.compress(data, 1)
        if len(packed) < len(data):
            flags, payload = COMPRESSED, packed
    return wire.encode(wire.FILES, [_HEAD.pack(transfer_id, flags), payload])


def decode_chunk(frames: list[memoryview]) -> tuple[int, bytes]:
    """A chunk's transfer id and bytes; TransferError for anything malformed."""
    if len(frames) != 2 or len(frames[0]) != _HEAD.size:
        raise TransferError("a malformed file chunk")
    transfer_id, flags = _HEAD.unpack(frames[0])
    data = bytes(frames[1])
    if flags & ~COMPRESSED:
        raise TransferError("a file chunk with unknown flags")
    if flags & COMPRESSED:
        inflate = zlib.decompressobj()
        try:
            data = inflate.decompress(data, MAX_CHUNK)
        except zlib.error:
            raise TransferError("a file chunk that does not inflate") from None
        if inflate.unconsumed_tail or not inflate.eof:
            raise TransferError(f"a file chunk larger than {MAX_CHUNK} bytes")
    elif len(data) > MAX_CHUNK:
        raise TransferError(f"a file chunk larger than {MAX_CHUNK} bytes")
    return transfer_id, data


async def send(
    transfer_id: int,
    root: str,
    entries: list[Entry],
    write: Callable[[bytes], Awaitable[None]],
    progress: Callable[[int], None] | None = None,
    owner: int | None = None,
) -> PackResult:
    """Pack ``entries`` in a thread and ``write`` each chunk's message, in order, waiting
    for each write (the relay's drain) before the next. ``progress(bytes)`` after each.

    Chunks are compressed only while the link is the bottleneck: while ``write`` keeps
    having to wait for the relay to drain. zlib's fastest level takes about 70 MB/s of
    text here; a link faster than that (loopback, a LAN) gets the bytes as they are."""
    loop = asyncio.get_running_loop()
    chunks: asyncio.Queue[bytes | None] = asyncio.Queue()
    room = threading.Semaphore(8)  # chunks packed ahead of the relay, at most
    stop = threading.Event()
    slow_link = threading.Event()

    def hand_over(message: bytes | None) -> None:
        while not room.acquire(timeout=0.2):
            if stop.is_set():
                raise TransferError("stopped")
        loop.call_soon_threadsafe(chunks.put_nowait, message)

    def put(data: bytes) -> None:
        hand_over(encode_chunk(transfer_id, data, compress=slow_link.is_set()))

    def produce() -> PackResult:
        try:
            return archive.pack(root, entries, put, owner)
        finally:
            with contextlib.suppress(TransferError):
                hand_over(None)

    producer = loop.run_in_executor(EXECUTOR, produce)
    sent = 0
    waits: deque[bool] = deque(maxlen=8)  # whether each of the last writes had to wait
    try:
        while (message := await chunks.get()) is not None:
            room.release()
            started = loop.time()
            await write(message)
            waits.append(loop.time() - started > 0.002)
            if sum(waits) >= 4:
                slow_link.set()
            elif not any(list(waits)[-4:]):
                slow_link.clear()
            sent += len(message)
            if progress is not None:
                progress(sent)
    except BaseException:
        stop.set()
        with contextlib.suppress(Exception):
            await producer
        raise
    return await producer


async def drained(connection: Any, written: asyncio.Future[Any] | None) -> None:
    """Wait until a connection's output has drained (``written``: the future a write gave,
    None when it went at once); TransferError if the connection closes first. Between
    chunks the loop turns once either way, so kernel messages go between them."""
    if written is None:
        await asyncio.sleep(0)
        return
    while not written.done():
        await asyncio.wait({written}, timeout=0.5)
        if getattr(connection, "closed", False) and not written.done():
            raise TransferError("the relay dropped")
    if not written.cancelled() and written.exception() is not None:
        raise TransferError("the relay dropped")


class _Growing:
    """The spool as a file tarfile reads while it is still written: a read waits for
    bytes, and ends (b"") once the transfer has ended or failed."""

    def __init__(self, receiver: Receiver) -> None:
        self.receiver, self.offset = receiver, 0

    def read(self, count: int = -1) -> bytes:
        receiver = self.receiver
        with receiver.grown:
            while receiver.written <= self.offset and not receiver.ended:
                if not receiver.grown.wait(timeout=IDLE_S):
                    receiver.failed = receiver.failed or f"no data for {IDLE_S:.0f} s"
                    receiver.ended = True
            if receiver.failed is not None or receiver.spool.closed:
                return b""
            count = receiver.written - self.offset if count < 0 else count
            count = min(count, receiver.written - self.offset)
        data = os.pread(receiver.spool.fileno(), count, self.offset) if count else b""
        self.offset += len(data)
        return data


class Receiver:
    """One incoming transfer: chunks spooled to a private temporary file (bounded) and
    unpacked by a thread as they come (``start``), so the writing overlaps the transfer."""

    def __init__(self, transfer_id: int, max_bytes: int, spool_dir: str | None = None) -> None:
        self.transfer_id = transfer_id
        self.max_bytes = max_bytes
        self.bytes = 0
        self.spool = tempfile.TemporaryFile(dir=spool_dir)  # noqa: SIM115 - closed in finish
        self.failed: str | None = None
        self.grown = threading.Condition()
        self.written = 0
        self.ended = False
        self._unpacking: asyncio.Future[UnpackResult] | None = None

    def start(
        self,
        root: str,
        decide: archive.Decide | None = None,
        owner: tuple[int, int] | None = None,
    ) -> None:
        """Begin unpacking under ``root`` what has come and what comes."""
        reader = _Growing(self)
        self._unpacking = asyncio.ensure_future(
            in_thread(archive.unpack, reader, root, decide, owner, MAX_FILES, self.max_bytes)
        )

    def feed(self, data: bytes) -> None:
        """Take one chunk's bytes (after a failure, drop them)."""
        if self.failed is not None or self.ended:
            return
        self.bytes += len(data)
        if self.bytes > self.max_bytes:
            self.failed = f"more than the limit of {mib(self.max_bytes)}"
            self._end()
            return
        try:
            os.pwrite(self.spool.fileno(), data, self.written)
        except (OSError, ValueError) as error:  # a full disk; a closed spool
            self.failed = f"cannot keep the files: {getattr(error, 'strerror', None) or error}"
            self._end()
            return
        with self.grown:
            self.written += len(data)
            self.grown.notify_all()

    def _end(self) -> None:
        with self.grown:
            self.ended = True
            self.grown.notify_all()

    async def finish(self) -> UnpackResult:
        """The transfer's end: wait for the unpacking; TransferError with the reason if it
        could not be done."""
        self._end()
        try:
            if self._unpacking is None:
                raise TransferError("the transfer was not started")
            try:
                result = await self._unpacking
            except ArchiveError as error:
                raise TransferError(self.failed or str(error)) from None
            except OSError as error:
                message = f"cannot write the files: {error.strerror or error}"
                raise TransferError(self.failed or message) from None
            if self.failed is not None:
                raise TransferError(self.failed)
            return result
        finally:
            self.spool.close()

    def close(self) -> None:
        """Drop the transfer (an unpacking in progress sees its end)."""
        self._end()
        if self._unpacking is not None and not self._unpacking.done():
            self._unpacking.add_done_callback(lambda _: self.spool.close())
        else:
            self.spool.close()
