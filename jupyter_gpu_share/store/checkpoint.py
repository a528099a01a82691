"""WAL checkpoints of a SQLite database, run by a background thread.

With ``synchronous = NORMAL`` (see ``engine.py``) a commit writes its pages to the WAL
without an fsync; they reach the disk at the next checkpoint, which fsyncs the WAL, copies
the newest version of each page into the database file and fsyncs that. The fsync of the
WAL is nearly all of it, about 10 us per 4 KiB page here, so 0.2 s for the 20 000 pages
the writers let the WAL grow to. Left to SQLite's autocheckpoint, it runs inside the
commit that crosses that size, so one call of the store (on the broker's event loop)
stalls for it.

``WalCheckpointer`` runs PASSIVE checkpoints, which block neither readers nor writers,
every fraction of a second from a thread of its own, on a connection of the store's reader
engine. The writers' ``wal_autocheckpoint`` stays as the backstop: under sustained writes
the WAL can only start over once a checkpoint has caught up with every frame, and then
the writer's checkpoint finds little left to copy. Durability is unchanged: the same
fsyncs happen, only in another thread.
"""

from __future__ import annotations

import logging
import threading

from sqlalchemy import Engine

log = logging.getLogger(__name__)

CHECKPOINT_INTERVAL_S = 0.05
"""Time between checkpoints while the database is written to."""
IDLE_INTERVAL_S = 0.5
"""The longest time between checkpoints, reached by doubling while nothing is written."""
MAX_PASSES = 16
"""Checkpoints in a row while writers keep adding frames, each shorter than the last."""


class WalCheckpointer:
    """A daemon thread that checkpoints the WAL of a file SQLite database."""

    def __init__(self, engine: Engine, interval_s: float = CHECKPOINT_INTERVAL_S) -> None:
        """Prepare to checkpoint through connections of ``engine`` every ``interval_s``."""
        self._engine = engine
        self._interval_s = interval_s
        self._stopped = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="gpu-share-wal-checkpoint", daemon=True
        )

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread, after the checkpoint under way if any."""
        self._stopped.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def checkpoint(self) -> tuple[int, int, int]:
        """Checkpoint until caught up or busy; return SQLite's last (busy, log, checkpointed)."""
        connection = self._engine.raw_connection()
        try:
            cursor = connection.cursor()
            try:
                for _ in range(MAX_PASSES):
                    busy, frames, copied = cursor.execute(
                        "PRAGMA wal_checkpoint(PASSIVE)"
                    ).fetchone()
                    # Busy: another connection is checkpointing. Caught up: the next writer
                    # starts the WAL over.
                    if busy or copied >= frames:
                        break
            finally:
                cursor.close()
        finally:
            connection.close()
        return busy, frames, copied

    def _run(self) -> None:
        delay = self._interval_s
        last_frames = None
        failures = 0
        while not self._stopped.wait(delay):
            try:
                _busy, frames, _copied = self.checkpoint()
            except Exception:  # the writers' autocheckpoint still runs; try again later
                failures += 1
                if failures == 1:
                    log.warning("background WAL checkpoint failed", exc_info=True)
                delay = min(60.0, self._interval_s * 2**failures)
                continue
            failures = 0
            # The WAL's length is unchanged when nothing was written: wait longer then.
            idle = frames == last_frames
            delay = min(IDLE_INTERVAL_S, delay * 2) if idle else self._interval_s
            last_frames = frames
