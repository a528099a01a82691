"""What a crashed host agent leaves behind, and how the next one cleans it up.

The agent holds a lock in its run folder (``<scratch_root>/.run``) for its whole life and
writes one record per kernel there: the kernel's process groups (with each leader's start
time, so that a recycled pid is never killed), its runtime folder (connection file with the
renter's HMAC key, Unix sockets, log) and its scratch folder. Runtime folders live under the
run folder too (``.run/rt/<id>``, short enough for Unix socket paths). At start, after taking
the lock, :func:`clean_leftovers` kills what the records name, removes their folders and then
every other folder left in the scratch root and the runtime root.

Records are treated as hostile input: only direct children of the two roots are removed,
symlinks are never followed, and a process is killed only while its start time matches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import stat
import tempfile
import time
from collections.abc import Iterable
from typing import Any

from . import procfs

log = logging.getLogger(__name__)

RUN_DIR_NAME = ".run"
LOCK_NAME = "agent.lock"
KERNELS_NAME = "kernels"
RUNTIME_NAME = "rt"
SESSION_ENV = "GPU_SHARE_SESSION_ID"

_SHORT_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_RECORD_MAX = 64 * 1024  # bytes of one record file
_PATH_MAX = 4096
_PROCESSES_MAX = 8
_PID_MAX = 1 << 22  # the kernel's PID_MAX_LIMIT on 64-bit Linux
KILL_WAIT = 5.0  # seconds to wait for killed processes to go


class AgentAlreadyRunning(RuntimeError):
    """Another host agent holds this run folder's lock."""


@dataclasses.dataclass
class Report:
    """What :func:`clean_leftovers` found and removed."""

    records: int = 0
    kernels_killed: int = 0
    processes_killed: int = 0
    folders_removed: int = 0
    bytes_freed: int = 0
    survivors: list[int] = dataclasses.field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.kernels_killed or self.processes_killed or self.folders_removed)

    def summary(self) -> str:
        """Describe the clean-up in one line, for the agent's log."""
        return (
            f"cleaned up after a previous run: killed {self.kernels_killed} kernel(s)"
            f" ({self.processes_killed} process(es)), removed {self.folders_removed}"
            f" folder(s) ({format_size(self.bytes_freed)})"
        )


def format_size(size: int) -> str:
    """Format a byte count for a log line (B, KiB, MiB, GiB)."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def run_dir_path(scratch_root: str) -> str:
    """Return the agent's run folder for a scratch root."""
    return os.path.join(scratch_root, RUN_DIR_NAME)


# -- /proc ---------------------------------------------------------------------------------


proc_stat = procfs.stat


def proc_start_time(pid: int) -> int | None:
    """Return a running process's start time (/proc/<pid>/stat field 22); None if gone."""
    info = proc_stat(pid)
    return None if info is None or info.gone else info.start


def _session_of(pid: int) -> str | None:
    """Return GPU_SHARE_SESSION_ID from a process's initial environment, if readable."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            raw = handle.read(1 << 20)
    except OSError:
        return None
    prefix = SESSION_ENV.encode() + b"="
    for item in raw.split(b"\0"):
        if item.startswith(prefix):
            return item[len(prefix) :].decode("utf-8", "replace")
    return None


# -- file system ---------------------------------------------------------------------------


def tree_size(path: str) -> int:
    """Sum the sizes of the files under ``path`` (symlinks are not followed)."""
    total = 0
    stack = [path]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISDIR(info.st_mode):
                stack.append(entry.path)
            else:
                total += info.st_size
    return total


def _make_writable(path: str) -> None:
    """Give a folder (never a symlink's target) owner rwx, so its contents can go."""
    try:
        info = os.lstat(path)
    except OSError:
        return
    if stat.S_ISDIR(info.st_mode):
        with contextlib.suppress(OSError):
            os.chmod(path, 0o700)


def remove_tree(path: str) -> int:
    """Remove a folder and everything in it, even read-only or 0000 parts; return bytes freed.

    A symlink is removed itself, never what it points to.
    """
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return 0
    if not stat.S_ISDIR(info.st_mode):
        os.unlink(path)
        return 0
    size = tree_size(path)

    def onerror(_func: Any, failed: str, _exc: Any) -> None:
        _make_writable(failed)
        _make_writable(os.path.dirname(failed))

    for _attempt in range(3):
        _make_writable(path)
        shutil.rmtree(path, onerror=onerror)
        if not os.path.lexists(path):
            return size
    shutil.rmtree(path)  # a last try that raises what still stands in the way
    return size


def _child_path(value: Any, root: str) -> str | None:
    """Return ``value`` when it names a real folder directly inside ``root``, else None.

    ``root`` must already be resolved; the folder itself must not be a symlink.
    """
    if not isinstance(value, str) or not value or len(value) > _PATH_MAX or "\0" in value:
        return None
    if not os.path.isabs(value):
        return None
    parent, name = os.path.split(value)
    if name in ("", ".", "..", RUN_DIR_NAME) or os.path.realpath(parent) != root:
        return None
    path = os.path.join(root, name)
    try:
        info = os.lstat(path)
    except OSError:
        return None
    return path if stat.S_ISDIR(info.st_mode) else None


def _missing(value: Any) -> bool:
    """Tell whether ``value`` is a path with nothing at it."""
    if not isinstance(value, str) or "\0" in value or len(value) > _PATH_MAX:
        return False
    return not os.path.lexists(value)


def _write_private(path: str, data: bytes) -> None:
    """Write a file atomically (temporary file, then rename), mode 0600."""
    folder, name = os.path.split(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _private_folder(path: str, mode: int = 0o700) -> None:
    """Create a folder of ``mode`` (0700, or 0711: others may pass through to a kernel's own
    folder, not list it), or check that the existing one is a real folder with that mode."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, mode)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise RuntimeError(f"{path} is not a folder (a symlink?): remove it")
    if info.st_mode & 0o777 != mode:
        os.chmod(path, mode)


# -- the run folder ------------------------------------------------------------------------


class RunDir:
    """The agent's run folder: its lock, one record per kernel, and the runtime folders."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.lock_path = os.path.join(self.root, LOCK_NAME)
        self.kernels_dir = os.path.join(self.root, KERNELS_NAME)
        self.runtime_root = os.path.join(self.root, RUNTIME_NAME)
        self._lock_fd: int | None = None

    @classmethod
    def for_scratch_root(cls, scratch_root: str) -> RunDir:
        """Return the run folder that belongs to a scratch root."""
        return cls(run_dir_path(scratch_root))

    @property
    def held(self) -> bool:
        """Tell whether this object holds the lock."""
        return self._lock_fd is not None

    def acquire(self) -> None:
        """Take the run folder's lock for this process; raise AgentAlreadyRunning if held."""
        if self._lock_fd is not None:
            return
        parent = os.path.dirname(self.root)
        os.makedirs(parent, mode=0o711, exist_ok=True)
        info = os.stat(parent)
        if info.st_uid == os.geteuid() and not info.st_mode & 0o001:
            os.chmod(parent, (info.st_mode & 0o7777) | 0o111)  # kernels' uids pass through
        # The root and the runtime root: 0711, so a kernel that runs as a uid of its own
        # reaches its own runtime folder (0700, its own) but cannot list anyone else's.
        _private_folder(self.root, 0o711)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            try:
                text = os.read(fd, 32).decode("ascii", "replace").strip()
            finally:
                os.close(fd)
            who = f"pid {text}" if text.isdigit() else "pid unknown"
            raise AgentAlreadyRunning(
                f"another host agent ({who}) uses {self.root}: stop it or give this one its"
                " own --scratch-root"
            ) from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            _private_folder(self.kernels_dir)
            _private_folder(self.runtime_root, 0o711)
        except BaseException:
            os.close(fd)
            raise
        self._lock_fd = fd

    def close(self) -> None:
        """Release the lock (the records and folders stay for the next run to check)."""
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)

    def __enter__(self) -> RunDir:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def make_runtime_dir(self) -> str:
        """Create a kernel's private runtime folder (0700); its name is the kernel's id."""
        _private_folder(self.runtime_root, 0o711)
        return tempfile.mkdtemp(prefix="k", dir=self.runtime_root)

    def _record_path(self, short_id: str) -> str:
        if not isinstance(short_id, str) or not _SHORT_ID.fullmatch(short_id):
            raise ValueError(f"bad kernel id {short_id!r}")
        return os.path.join(self.kernels_dir, f"{short_id}.json")

    def record(
        self,
        short_id: str,
        *,
        session_id: str,
        pids: Iterable[int],
        runtime_dir: str | None,
        scratch_dir: str | None,
    ) -> None:
        """Write (or rewrite) one kernel's record: its process groups and its folders.

        ``pids`` are process-group leaders (the kernel, or bwrap and its child); each one's
        group and start time are read from /proc now. Ones already gone are left out.
        """
        processes = []
        for pid in dict.fromkeys(int(p) for p in pids):
            info = proc_stat(pid)
            if info is not None and not info.gone:
                processes.append({"pid": pid, "pgid": info.pgrp, "start": info.start})
        body = {
            "session_id": session_id,
            "processes": processes,
            "runtime_dir": runtime_dir,
            "scratch_dir": scratch_dir,
            "created_us": time.time_ns() // 1000,
            "agent_pid": os.getpid(),
        }
        _private_folder(self.kernels_dir)
        _write_private(self._record_path(short_id), json.dumps(body).encode())

    def forget(self, short_id: str) -> None:
        """Remove a kernel's record (its kernel has ended and its folders are gone)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._record_path(short_id))

    def records(self) -> list[tuple[str, str, dict[str, Any] | None]]:
        """List (short id, file, parsed record or None when unreadable) for every record."""
        found: list[tuple[str, str, dict[str, Any] | None]] = []
        try:
            entries = list(os.scandir(self.kernels_dir))
        except FileNotFoundError:
            return found
        for entry in sorted(entries, key=lambda e: e.name):
            short_id = entry.name.removesuffix(".json")
            body: dict[str, Any] | None = None
            if entry.name.endswith(".json") and _SHORT_ID.fullmatch(short_id):
                body = _read_record(entry.path)
            found.append((short_id, entry.path, body))
        return found


def _read_record(path: str) -> dict[str, Any] | None:
    """Parse and check one record; None when it is not one this module wrote."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        with os.fdopen(fd, "rb", closefd=False) as handle:
            raw = handle.read(_RECORD_MAX + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(raw) > _RECORD_MAX:
        return None
    try:
        body = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(body, dict):
        return None
    session = body.get("session_id")
    if not isinstance(session, str) or not 0 < len(session) <= 1024:
        return None
    processes = body.get("processes")
    if not isinstance(processes, list) or len(processes) > _PROCESSES_MAX:
        return None
    checked = []
    for item in processes:
        if not isinstance(item, dict):
            return None
        values = [item.get(k) for k in ("pid", "pgid", "start")]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            return None
        pid, pgid, start = values
        if not (1 < pid < _PID_MAX and 1 < pgid < _PID_MAX and 0 <= start < 1 << 63):
            return None
        checked.append({"pid": pid, "pgid": pgid, "start": start})
    return {
        "session_id": session,
        "processes": checked,
        "runtime_dir": body.get("runtime_dir"),
        "scratch_dir": body.get("scratch_dir"),
    }


# -- clean-up ------------------------------------------------------------------------------


def _kill_targets(
    session_id: str, processes: list[dict[str, int]]
) -> tuple[set[int], dict[int, int]]:
    """Decide what to kill for one record: (process groups, {single pid: start time}).

    A process still running with the recorded start time is killed, with its whole group
    when it leads one (the recorded pgid may predate bwrap's setsid). When a recorded
    process has gone, the members left of the group it led are killed one by one, but only
    those started after it that carry the record's session id in their environment.
    """
    mine = {os.getpid(), os.getpgrp(), os.getsid(0), 1}
    groups: set[int] = set()
    singles: dict[int, int] = {}
    orphan_groups: dict[int, int] = {}
    for item in processes:
        pid, pgid, start = item["pid"], item["pgid"], item["start"]
        if pid in mine or pgid in mine:
            continue
        info = proc_stat(pid)
        if info is not None and info.start == start:
            if info.pgrp == pid:
                groups.add(pid)
            elif not info.gone:
                singles[pid] = start
        elif info is None:
            orphan_groups[pid] = start
    if orphan_groups:
        for pid in procfs.pids():
            info = proc_stat(pid)
            if info is None or info.gone or info.pgrp not in orphan_groups or pid in mine:
                continue
            if info.start >= orphan_groups[info.pgrp] and _session_of(pid) == session_id:
                singles[pid] = info.start
    return groups, singles


def _members(groups: set[int], singles: dict[int, int]) -> set[int]:
    """Return the live processes in ``groups``, and those of ``singles`` (same start time)."""
    alive = set()
    for pid in procfs.pids() if groups else ():
        info = proc_stat(pid)
        if info is not None and not info.gone and info.pgrp in groups:
            alive.add(pid)
    for pid, start in singles.items():
        info = proc_stat(pid)
        if info is not None and not info.gone and info.start == start:
            alive.add(pid)
    return alive


def kill_processes(
    session_id: str, processes: list[dict[str, int]], wait: float = KILL_WAIT
) -> tuple[int, list[int]]:
    """SIGKILL a record's processes (see _kill_targets); return (killed, still alive)."""
    groups, singles = _kill_targets(session_id, processes)
    seen: set[int] = set()
    deadline = time.monotonic() + wait
    while True:
        alive = _members(groups, singles)
        seen |= alive
        if not alive or time.monotonic() >= deadline:
            break
        # again each round: a process forking while its group was killed leaves a child
        for group in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, signal.SIGKILL)
        for pid in alive & singles.keys():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)
    return len(seen) - len(alive), sorted(alive)


def clean_leftovers(
    run_dir: RunDir,
    scratch_root: str,
    logger: logging.Logger | logging.LoggerAdapter | None = None,
) -> Report:
    """Kill the kernels a previous agent left running and remove their folders.

    Call it once at start, after ``run_dir.acquire()`` and before any kernel starts: every
    folder in the scratch root (but the run folder) and in the runtime root goes.
    """
    logger = logger or log
    if not run_dir.held:
        raise RuntimeError("acquire the run folder's lock before cleaning up")
    report = Report()
    scratch = os.path.realpath(scratch_root)
    runtime = os.path.realpath(run_dir.runtime_root)

    def remove(path: str) -> None:
        try:
            report.bytes_freed += remove_tree(path)
            report.folders_removed += 1
        except OSError as err:
            logger.warning("could not remove %s: %s", path, err)

    for short_id, path, body in run_dir.records():
        report.records += 1
        if body is None:
            logger.warning("ignoring an unreadable kernel record %s", path)
        else:
            killed, alive = kill_processes(body["session_id"], body["processes"])
            if killed:
                report.kernels_killed += 1
                report.processes_killed += killed
            if alive:
                report.survivors += alive
                logger.warning("left kernel processes %s still running", alive)
            for value, root in ((body["runtime_dir"], runtime), (body["scratch_dir"], scratch)):
                folder = _child_path(value, root)
                if folder is not None:
                    remove(folder)
                elif value is not None and not _missing(value):
                    text = repr(value)[:200]
                    logger.warning("kernel record %s names %s: not removed", short_id, text)
        with contextlib.suppress(OSError):
            if os.path.isdir(path) and not os.path.islink(path):
                remove_tree(path)
            else:
                os.unlink(path)

    for root, skip in ((scratch, RUN_DIR_NAME), (runtime, None)):
        try:
            entries = list(os.scandir(root))
        except FileNotFoundError:
            continue
        for entry in entries:
            if entry.name == skip:
                continue
            if entry.is_dir(follow_symlinks=False):
                remove(entry.path)
            elif entry.is_symlink():
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)  # the link only, never its target
    return report
