"""Stops asked for but not yet settled, kept on disk so a broker restart bills them right.

A renter's stop (or a credit, quota or host-lost stop) fixes the instant billing ends. When
the store cannot settle it at once (locked past its busy timeout, its server gone, its disk
full), the broker keeps the session, tells the host to stop the kernel, and retries the
settlement until it commits; the instant is what it was asked for, never the instant the
retry succeeds. A broker killed meanwhile would lose that instant and bill up to the
session's last evidence of life instead: so each pending stop is also one line of this
journal, written and fsynced before the stop is answered, read again at start.

The journal is a JSON-lines file beside the database (``BrokerApp.stop_journal``); lines
that do not parse are skipped with a warning (a torn last line after a crash).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import asdict, dataclass

log = logging.getLogger(__name__)

MAX_JOURNAL_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class PendingStop:
    """A stop whose settlement has not committed yet."""

    session_id: str
    ended_us: int
    end_reason: str
    message: str = ""


class StopJournal:
    """Append pending stops (fsynced), drop settled ones, read them back at start."""

    def __init__(self, path: str | None) -> None:
        self.path = path  # None: memory only (tests, a store that is never down)

    def load(self) -> list[PendingStop]:
        """The pending stops on disk, first ask of each session kept."""
        if not self.path or not os.path.exists(self.path):
            return []
        found: dict[str, PendingStop] = {}
        with open(self.path, "rb") as handle:
            data = handle.read(MAX_JOURNAL_BYTES)
        for number, line in enumerate(data.splitlines(), 1):
            try:
                raw = json.loads(line)
                stop = PendingStop(
                    str(raw["session_id"]),
                    int(raw["ended_us"]),
                    str(raw["end_reason"]),
                    str(raw.get("message", "")),
                )
            except (ValueError, KeyError, TypeError):
                log.warning("stop journal %s: line %d is not a stop; skipped", self.path, number)
                continue
            found.setdefault(stop.session_id, stop)
        return list(found.values())

    def add(self, stop: PendingStop) -> None:
        """Write one pending stop durably (the stop is answered only after this)."""
        if not self.path:
            return
        line = json.dumps(asdict(stop), separators=(",", ":")) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def rewrite(self, pending: list[PendingStop]) -> None:
        """Keep only the stops still pending (atomically); remove the file when none is."""
        if not self.path:
            return
        if not pending:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            return
        temporary = f"{self.path}.tmp"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            for stop in pending:
                handle.write(json.dumps(asdict(stop), separators=(",", ":")) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, self.path)
