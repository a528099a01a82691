"""The idle workload: a host's own command (a miner, a folding client) that runs while no
renter's kernel does, is stopped before one starts, and is started again after the last ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import signal
from collections.abc import Sequence

log = logging.getLogger(__name__)


def idle_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """The agent's environment without its secrets (GPU_SHARE_*: the host token)."""
    source = os.environ if base is None else base
    return {k: v for k, v in source.items() if not k.startswith("GPU_SHARE_")}


class IdleWorkload:
    """Start, stop (SIGTERM to its process group, SIGKILL after a grace) and restart a command."""

    def __init__(
        self,
        command: str | Sequence[str],
        *,
        stop_grace: float = 10.0,
        cwd: str | None = None,
        logger: logging.Logger | logging.LoggerAdapter | None = None,
    ) -> None:
        argv = shlex.split(command) if isinstance(command, str) else list(command)
        if not argv:
            raise ValueError("the idle command is empty")
        self.argv = argv
        self.stop_grace = stop_grace
        self.cwd = cwd
        self.log = logger or log
        self.process: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()
        self._watcher: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        """Tell whether the command is running."""
        return self.process is not None and self.process.returncode is None

    async def start(self) -> None:
        """Start the command unless it runs already."""
        async with self._lock:
            if self.running:
                return
            try:
                self.process = await asyncio.create_subprocess_exec(
                    *self.argv,
                    cwd=self.cwd,
                    env=idle_environment(),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.DEVNULL,
                    start_new_session=True,
                )
            except OSError as err:
                self.log.warning("idle command %s could not start: %s", self.argv[0], err)
                self.process = None
                return
            self.log.info("idle command started (pid %s): %s", self.process.pid, self.argv[0])
            self._watcher = asyncio.ensure_future(self._watch(self.process))

    async def _watch(self, process: asyncio.subprocess.Process) -> None:
        code = await process.wait()
        if self.process is process:
            self.log.warning("idle command exited on its own with code %s", code)

    async def stop(self) -> int | None:
        """Stop the command: SIGTERM to its process group, SIGKILL after the grace period."""
        async with self._lock:
            process, self.process = self.process, None
            if process is None:
                return None
            if process.returncode is None:
                self._killpg(process.pid, signal.SIGTERM)
                try:
                    await asyncio.wait_for(process.wait(), self.stop_grace)
                except asyncio.TimeoutError:
                    self.log.warning(
                        "idle command ignored SIGTERM for %g s; killing it", self.stop_grace
                    )
                    self._killpg(process.pid, signal.SIGKILL)
                    await process.wait()
            self._killpg(process.pid, signal.SIGKILL)  # leftovers in its group
            if self._watcher is not None:
                self._watcher.cancel()
                self._watcher = None
            self.log.info("idle command stopped (exit code %s)", process.returncode)
            return process.returncode

    @staticmethod
    def _killpg(pgid: int, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signum)
