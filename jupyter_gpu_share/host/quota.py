"""A disk quota for a session's scratch folder: a measuring watchdog plus ``RLIMIT_FSIZE``.

The scratch folder is an ordinary folder on the host's disk (no per-folder quota exists on
most filesystems without setup), so the agent measures it: :class:`ScratchWatchdog` walks it
every few seconds in a worker thread and reports once when it is over its quota, and the
agent then stops the kernel. A walk's cost is bounded: it stops as soon as the total is over
the limit, and after ``max_files`` entries, which also counts as over quota (a renter could
otherwise make each check arbitrarily slow with millions of empty files).

Between two checks a renter could write fast; :func:`file_size_rlimit` caps any single file
at the quota, so one big write fails with ``EFBIG`` at once instead of filling the disk.

Inside the sandbox ``/tmp`` and ``$HOME`` are this same scratch folder, so they are covered;
``/dev/shm`` and other tmpfs mounts live in memory and are charged to the kernel's memory
cgroup instead (see ``cgroups.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass

log = logging.getLogger(__name__)

MIB = 1024 * 1024
DEFAULT_MAX_FILES = 100_000
DEFAULT_INTERVAL = 2.0


@dataclass(frozen=True)
class ScratchUsage:
    """One measurement of a scratch folder; ``complete`` is False when the walk stopped early."""

    bytes: int
    files: int
    complete: bool
    too_many_files: bool = False
    unreadable: str = ""  # a folder that could not be listed (its content is not counted)

    def over(self, limit_bytes: int) -> bool:
        """Tell whether this usage breaks a quota of ``limit_bytes``."""
        return self.too_many_files or bool(self.unreadable) or self.bytes > limit_bytes

    def reason(self, limit_bytes: int, max_files: int = DEFAULT_MAX_FILES) -> str:
        """Explain in words why this usage is over quota."""
        limit = f"{limit_bytes // MIB} MiB"
        if self.too_many_files:
            return f"scratch folder over its {limit} quota: more than {max_files} files"
        if self.unreadable:
            return (
                f"scratch folder cannot be checked against its {limit} quota: "
                f"{self.unreadable} cannot be read"
            )
        return f"scratch folder over its {limit} quota ({self.bytes // MIB} MiB used)"


def measure_scratch(
    path: str | os.PathLike[str], limit_bytes: int = 0, *, max_files: int = DEFAULT_MAX_FILES
) -> ScratchUsage:
    """Add up the disk blocks under ``path``, stopping once over ``limit_bytes`` (0: never).

    Symbolic links below ``path`` are counted (their own blocks) but not followed, other
    filesystems mounted below it are not entered, and a file with several hard links counts
    once. Cost: one ``lstat`` per entry, at most ``max_files`` (100,000 take about 0.4 s).
    """
    try:
        top = os.stat(path)  # the scratch folder itself may be reached through a link
    except FileNotFoundError:
        return ScratchUsage(0, 0, True)
    total = top.st_blocks * 512
    files = 0
    seen: set[tuple[int, int]] = set()
    stack = [os.fspath(path)] if stat.S_ISDIR(top.st_mode) else []
    while stack:
        folder = stack.pop()
        try:
            entries = os.scandir(folder)
        except FileNotFoundError:
            continue
        except PermissionError:
            return ScratchUsage(total, files, False, unreadable=folder)
        with entries:
            for entry in entries:
                files += 1
                if files > max_files:
                    return ScratchUsage(total, files, False, too_many_files=True)
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                    key = (st.st_dev, st.st_ino)
                    if key in seen:
                        continue
                    seen.add(key)
                total += st.st_blocks * 512
                if limit_bytes and total > limit_bytes:
                    return ScratchUsage(total, files, False)
                if stat.S_ISDIR(st.st_mode) and st.st_dev == top.st_dev:
                    stack.append(entry.path)
    return ScratchUsage(total, files, True)


def scratch_usage(
    path: str | os.PathLike[str], limit_bytes: int = 0, *, max_files: int = DEFAULT_MAX_FILES
) -> int:
    """Return the bytes used under ``path``; more than ``limit_bytes`` when it is over quota.

    The walk stops early once over the limit (the result is then a lower bound), and after
    ``max_files`` entries or at a folder it cannot list; those count as over quota, so the
    result is then at least ``limit_bytes + 1``.
    """
    usage = measure_scratch(path, limit_bytes, max_files=max_files)
    if usage.too_many_files or usage.unreadable:
        return max(usage.bytes, limit_bytes + 1)
    return usage.bytes


def deleted_open_bytes(pids: Iterable[int], path: str) -> int:
    """Disk held by regular files on ``path``'s filesystem that ``pids`` keep open after
    deleting them (``/proc/PID/fd``; each file counted once)."""
    try:
        device = os.stat(path).st_dev
    except OSError:
        return 0
    seen: set[int] = set()
    total = 0
    for pid in pids:
        try:
            entries = list(os.scandir(f"/proc/{pid}/fd"))
        except OSError:
            continue
        for entry in entries:
            try:
                info = os.stat(entry.path)  # the open file itself, deleted or not
            except OSError:
                continue
            if (
                stat.S_ISREG(info.st_mode)
                and info.st_nlink == 0
                and info.st_dev == device
                and info.st_ino not in seen
            ):
                seen.add(info.st_ino)
                total += info.st_blocks * 512
    return total


def file_size_rlimit(limit_mib: int) -> int:
    """Return the ``RLIMIT_FSIZE`` value for a quota of ``limit_mib`` (0: unlimited).

    No file can then grow past the quota between two watchdog checks: a write beyond it
    fails with ``EFBIG``. The kernel also sends ``SIGXFSZ``, whose default action ends the
    process; Python ignores it, so a Python kernel just gets ``OSError(EFBIG)``.
    """
    if limit_mib <= 0:
        return resource.RLIM_INFINITY
    return limit_mib * MIB


class ScratchWatchdog:
    """Measure a scratch folder every ``interval`` seconds and report once when over quota."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        limit_mib: int,
        interval: float = DEFAULT_INTERVAL,
        *,
        on_exceeded: Callable[[str], None],
        max_files: int = DEFAULT_MAX_FILES,
        pids: Callable[[], Iterable[int]] | None = None,
    ) -> None:
        self.path = os.fspath(path)
        # The kernel's processes: a file they deleted but keep open has no name to walk
        # to, and still fills the disk.
        self.pids = pids
        self.limit_mib = limit_mib
        self.interval = interval
        self.on_exceeded = on_exceeded
        self.max_files = max_files
        self.exceeded: str | None = None
        self.task: asyncio.Task[None] | None = None

    @property
    def limit_bytes(self) -> int:
        """Return the quota in bytes."""
        return self.limit_mib * MIB

    async def check(self) -> str | None:
        """Measure once (in a worker thread); return the reason when over quota."""
        loop = asyncio.get_running_loop()
        usage = await loop.run_in_executor(
            None, lambda: measure_scratch(self.path, self.limit_bytes, max_files=self.max_files)
        )
        if usage.over(self.limit_bytes):
            return usage.reason(self.limit_bytes, self.max_files)
        if self.pids is not None:
            hidden = await loop.run_in_executor(
                None, lambda: deleted_open_bytes(self.pids() if self.pids else [], self.path)
            )
            total = usage.bytes + hidden
            if total > self.limit_bytes:
                return (
                    f"scratch folder over its {self.limit_mib} MiB quota ({total // MIB} MiB "
                    f"used, {hidden // MIB} MiB of it in deleted files kept open)"
                )
        return None

    def start(self) -> None:
        """Start checking on the running event loop (nothing to do without a quota)."""
        if self.limit_mib > 0 and self.task is None:
            self.task = asyncio.get_running_loop().create_task(self.run())

    async def stop(self) -> None:
        """Stop checking."""
        task, self.task = self.task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def run(self) -> None:
        """Check until the quota is exceeded, then call ``on_exceeded`` once and end."""
        while True:
            try:
                reason = await self.check()
            except OSError as e:
                log.warning("could not measure scratch folder %s: %s", self.path, e)
                reason = None
            if reason is not None:
                self.exceeded = reason
                try:
                    self.on_exceeded(reason)
                except Exception:
                    log.exception("scratch quota callback failed")
                return
            await asyncio.sleep(self.interval)
