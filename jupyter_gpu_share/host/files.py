"""The host's side of a session's files: the notebook's folder written into the kernel's
working folder, and what the kernel wrote there sent back (files/transfer.py).

The kernel runs while this reads and writes its folder, and may be hostile: files are
written and read through ``files/archive.py`` (no link followed, nothing written through
one); with a uid of its own, only the kernel's own files are read, and what is written is
given to it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from ..files import rules, transfer
from ..files.transfer import Receiver, TransferError

MAX_RECEIVING = 2  # transfers in flight at once, per session


def valid_id(value: Any) -> int | None:
    """A transfer id from a record, or None."""
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value if 0 <= value < transfer.MAX_TRANSFER_ID else None


class SessionFiles:
    """The file transfers of one session."""

    def __init__(
        self,
        session_id: str,
        work_dir: Callable[[], str | None],
        owner: Callable[[], tuple[int, int] | None],
        write: Callable[[bytes], Awaitable[None]],
        send_record: Callable[[dict[str, Any]], None],
        max_bytes: int,
        spool_dir: Callable[[], str | None],
        log: logging.Logger | logging.LoggerAdapter[Any],
    ) -> None:
        self.session_id = session_id
        self._work_dir = work_dir
        self._owner = owner
        self._write = write
        self._send_record = send_record
        self.max_bytes = max_bytes
        self._spool_dir = spool_dir
        self.log = log
        # What each file of the working folder was when it arrived or last went back:
        # a file in that state is not sent back again.
        self.manifest: dict[str, tuple[int, int]] = {}
        self._receiving: dict[int, Receiver] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sending: int | None = None  # the files_get in progress (one at a time)
        self._unconfirmed: dict[int, dict[str, tuple[int, int]]] = {}  # sent, not yet got
        self._errors = 0

    def _error(self, transfer_id: int | None, message: str) -> None:
        self._errors += 1
        if self._errors <= 5 or self._errors % 100 == 0:  # a flood is logged, not each
            self.log.warning("session %s: files: %s", self.session_id, message)
        self._send_record({"type": "files_error", "id": transfer_id, "message": message})

    def _spawn(self, coroutine: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def record(self, record: dict[str, Any]) -> None:
        """A ``files_*`` record from the renter's side."""
        kind = record.get("type")
        transfer_id = valid_id(record.get("id"))
        if transfer_id is None:
            self._error(None, "a files record without a valid id")
            return
        work = self._work_dir()
        if work is None:
            self._error(transfer_id, "this host's kernels take no files (they run on a gateway)")
            return
        if kind == "files_put":
            if transfer_id in self._receiving or len(self._receiving) >= MAX_RECEIVING:
                self._error(transfer_id, "too many transfers at once")
                return
            try:
                receiver = Receiver(transfer_id, self.max_bytes, spool_dir=self._spool_dir())
            except OSError as error:
                self._error(transfer_id, f"no room on the host: {error.strerror or error}")
                return
            receiver.start(work, owner=self._owner())
            self._receiving[transfer_id] = receiver
        elif kind == "files_end":
            receiver = self._receiving.pop(transfer_id, None)
            if receiver is None:
                self._error(transfer_id, "the end of a transfer that did not begin")
                return
            self._spawn(self._unpack(receiver))
        elif kind == "files_abort":
            receiver = self._receiving.pop(transfer_id, None)
            if receiver is not None:
                receiver.close()
        elif kind == "files_get":
            if self._sending is not None:
                self._error(transfer_id, "files are already going back")
                return
            wanted = record.get("max_bytes")
            limit = self.max_bytes
            if isinstance(wanted, int) and not isinstance(wanted, bool) and wanted > 0:
                limit = min(limit, wanted)
            self._sending = transfer_id
            self._spawn(self._send_back(transfer_id, work, limit))
        elif kind == "files_got":
            self.manifest.update(self._unconfirmed.pop(transfer_id, {}))
        else:
            self._error(transfer_id, f"an unknown files record {str(kind)[:40]!r}")

    def chunk(self, frames: list[memoryview]) -> None:
        """A chunk of an incoming transfer."""
        try:
            transfer_id, data = transfer.decode_chunk(frames)
        except TransferError as error:
            self._error(None, str(error))
            return
        receiver = self._receiving.get(transfer_id)
        if receiver is None:
            return  # a transfer refused or dropped: its chunks go nowhere
        receiver.feed(data)

    async def _unpack(self, receiver: Receiver) -> None:
        try:
            result = await receiver.finish()
        except TransferError as error:
            self._error(receiver.transfer_id, f"the files were not written: {error}")
            return
        self.manifest.update(result.written)
        self._errors = 0
        self.log.info(
            "session %s: %d file(s), %s, written to the kernel's folder",
            self.session_id,
            len(result.written),
            rules.mib(result.bytes),
        )
        self._send_record(
            {
                "type": "files_done",
                "id": receiver.transfer_id,
                "files": len(result.written),
                "bytes": result.bytes,
                "skipped": result.skipped[:20],
            }
        )

    async def _send_back(self, transfer_id: int, work: str, limit: int) -> None:
        try:
            await self._send_changed(transfer_id, work, limit)
        finally:
            self._sending = None

    async def _send_changed(self, transfer_id: int, work: str, limit: int) -> None:
        """Send what is new or changed in the working folder since it arrived or last went
        (and the renter confirmed it: ``files_got``)."""
        owner = self._owner()
        uid = owner[0] if owner is not None else None
        try:
            entries, skipped = await transfer.in_thread(
                lambda: rules.scan(work, max_bytes=2**62, max_files=rules.MAX_FILES * 5, owner=uid)
            )
        except rules.TooLarge as error:
            self._error(transfer_id, f"the kernel's folder holds too many files ({error.files})")
            return
        changed = [entry for entry in entries if self.manifest.get(entry.path) != entry.state]
        total = sum(entry.size for entry in changed)
        if total > limit:
            largest = sorted(changed, key=lambda entry: -entry.size)[:3]
            self._error(
                transfer_id,
                f"the kernel wrote {rules.mib(total)} of new or changed files, over the "
                f"limit of {rules.mib(limit)} for one transfer (largest: "
                + ", ".join(f"{entry.path} {rules.mib(entry.size)}" for entry in largest)
                + ")",
            )
            return
        try:
            result = await transfer.send(transfer_id, work, changed, self._write, owner=uid)
        except (TransferError, OSError) as error:
            self._error(transfer_id, f"the files did not go back: {error}")
            return
        self._unconfirmed = {transfer_id: result.sent}
        self._send_record(
            {
                "type": "files_end",
                "id": transfer_id,
                "files": len(result.sent),
                "bytes": result.bytes,
                "skipped": [*skipped, *result.skipped][:20],
            }
        )

    def close(self) -> None:
        """The session ended: drop what is in flight."""
        for receiver in self._receiving.values():
            receiver.close()
        self._receiving.clear()
        for task in list(self._tasks):
            task.cancel()
