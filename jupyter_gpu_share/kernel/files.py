"""The user side of a session's files: the notebook's folder sent to the host at start,
and what the kernel wrote brought back (at shutdown and on demand), never over a local
file changed meanwhile: that one stays, and the kernel's copy is put beside it
(``results.gpu-share.csv``) and named in the summary.

Runs on the bridge's loop; the bridge hands it the ``files_*`` records and chunks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from ..files import archive, rules, transfer
from ..files.rules import Entry
from ..files.transfer import Receiver, TransferError

log = logging.getLogger("jupyter_gpu_share.files")

Write = Callable[[bytes], Awaitable[None]]


class BridgeFiles:
    """One kernel's folder: what went to the host, and what came back."""

    def __init__(self, write: Write, send_record: Callable[[dict[str, Any]], Awaitable[None]]):
        self._write = write
        self._send_record = send_record
        self.root: str | None = None
        self.max_bytes = 200 * 1024 * 1024
        # Each file's (size, mtime_ns) here when it last went to the host or came back: a
        # local file still in that state may be replaced by the kernel's copy.
        self.manifest: dict[str, tuple[int, int]] = {}
        self._next_id = 1
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._receiving: dict[int, Receiver] = {}
        self._lock = asyncio.Lock()

    def _new(self) -> tuple[int, asyncio.Future[dict[str, Any]]]:
        transfer_id, self._next_id = self._next_id, self._next_id + 1
        future = self._waiting[transfer_id] = asyncio.get_running_loop().create_future()
        return transfer_id, future

    async def put(
        self,
        root: str,
        entries: list[Entry],
        timeout: float = 600.0,
        progress: Callable[[int], None] | None = None,
    ) -> dict[str, Any]:
        """Send ``entries`` of ``root`` into the kernel's working folder; the host's answer
        (``files``, ``bytes``). TransferError with the reason when they did not arrive."""
        async with self._lock:
            self.root = root
            transfer_id, answer = self._new()
            try:
                total = sum(entry.size for entry in entries)
                await self._send_record(
                    {"type": "files_put", "id": transfer_id, "bytes": total, "files": len(entries)}
                )
                try:
                    sent = await transfer.send(transfer_id, root, entries, self._write, progress)
                except BaseException:
                    with contextlib.suppress(TransferError):  # the host drops what came
                        await self._send_record({"type": "files_abort", "id": transfer_id})
                    raise
                await self._send_record({"type": "files_end", "id": transfer_id})
                record = await asyncio.wait_for(answer, timeout)
            except asyncio.TimeoutError:
                raise TransferError(f"the host did not answer within {timeout:.0f} s") from None
            finally:
                self._waiting.pop(transfer_id, None)
            self.manifest.update(sent.sent)
            if sent.short:
                log.warning(
                    "gpu-share: changed while sent, so sent in part: %s", ", ".join(sent.short[:10])
                )
            return record

    async def get(self, timeout: float = 600.0) -> dict[str, Any]:
        """Bring back what is new or changed in the kernel's working folder. A summary:
        ``files``, ``bytes``, ``conflicts`` (path -> where the kernel's copy went, beside a
        local file changed meanwhile), ``skipped``."""
        root = self.root
        if root is None:
            raise TransferError("this kernel was started without a folder")
        async with self._lock:
            transfer_id, answer = self._new()
            try:
                receiver = Receiver(transfer_id, self.max_bytes)
            except OSError as error:
                raise TransferError(f"no room for the files: {error.strerror or error}") from None
            self._receiving[transfer_id] = receiver
            receiver.start(root, self._decide(root))
            try:
                await self._send_record(
                    {"type": "files_get", "id": transfer_id, "max_bytes": self.max_bytes}
                )
                end = await asyncio.wait_for(answer, timeout)
                result = await receiver.finish()
            except asyncio.TimeoutError:
                raise TransferError(f"the host did not answer within {timeout:.0f} s") from None
            finally:
                self._waiting.pop(transfer_id, None)
                self._receiving.pop(transfer_id, None)
                receiver.close()
            # The host counts them as back only now (files_got): had this failed, they
            # would be offered again.
            with contextlib.suppress(TransferError):
                await self._send_record({"type": "files_got", "id": transfer_id})
            for path, state in result.written.items():
                if path not in result.renamed.values():
                    self.manifest[path] = state
            skipped = [*result.skipped, *(end.get("skipped") or [])]
            summary = {
                "files": len(result.written),
                "bytes": result.bytes,
                "conflicts": dict(result.renamed),
                "skipped": len(skipped),
                "skipped_names": [str(name)[:200] for name in skipped[:20]],
            }
            for path, beside in result.renamed.items():
                log.warning(
                    "gpu-share: %s changed here and on the host: the host's copy is %s",
                    path,
                    beside,
                )
            return summary

    def _decide(self, root: str) -> archive.Decide:
        """Where each file from the host goes. Nothing the ignore rules name, and no new
        dotfile or dot folder (``.git/hooks``, ``.ssh``, ``.config/autostart``): a host
        must not plant what runs on the user's machine; nothing comes back executable
        that was not so here. A local file changed since it went or came stays, and the
        kernel's copy goes beside it; the check is made again just before the file is
        put in place."""
        spec = rules.ignore_spec(root)

        def decide(path: str) -> archive.Place | None:
            known = path in self.manifest
            if spec.match_file(path) or (rules.hidden(path) and not known):
                return None

            def beside() -> str:
                return rules.conflict_name(path, lambda name: archive.taken(root, name))

            here = archive.local_state(root, path)
            if here is None and not archive.taken(root, path):
                return archive.Place(path, expect=None, executable=False, conflict=beside)
            if here is not None and self.manifest.get(path) == here:
                executable = archive.local_executable(root, path)
                return archive.Place(path, expect=here, executable=executable, conflict=beside)
            return archive.Place(beside(), expect=None, executable=False, conflict=beside)

        return decide

    def record(self, record: dict[str, Any]) -> None:
        """A ``files_done``, ``files_end`` or ``files_error`` record from the host."""
        transfer_id = record.get("id")
        future = self._waiting.get(transfer_id) if isinstance(transfer_id, int) else None
        if future is None or future.done():
            if record.get("type") == "files_error":
                log.warning("gpu-share: files: %s", str(record.get("message", ""))[:300])
            return
        if record.get("type") == "files_error":
            message = str(record.get("message") or "the host refused the files")[:500]
            future.set_exception(TransferError(message))
        else:
            future.set_result(record)

    def chunk(self, frames: list[memoryview]) -> None:
        """A chunk of a transfer from the host."""
        try:
            transfer_id, data = transfer.decode_chunk(frames)
        except TransferError as error:
            log.warning("gpu-share: files: %s", error)
            return
        receiver = self._receiving.get(transfer_id)
        if receiver is not None:
            receiver.feed(data)

    def ended(self, reason: str) -> None:
        """The session ended: what waits fails with why."""
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(TransferError(f"the session ended ({reason})"))


def describe(summary: dict[str, Any]) -> str:
    """One line about what came back."""
    text = f"{summary['files']} file(s), {rules.mib(summary['bytes'])}, came back"
    if summary.get("skipped"):
        names = ", ".join(summary.get("skipped_names") or [])
        text += f"; {summary['skipped']} left on the host (links, ignored or hidden: {names})"
    conflicts = summary.get("conflicts") or {}
    if conflicts:
        text += "; changed here meanwhile, so kept beside: " + ", ".join(
            f"{path} -> {beside}" for path, beside in list(conflicts.items())[:5]
        )
    return text
