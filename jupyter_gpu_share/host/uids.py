"""A uid of its own for each kernel, when the agent runs as root.

Linux counts ``RLIMIT_NPROC`` per real user and does not enforce it for root, and a kernel
whose real uid is root is root on the host for every file a sandbox escape would reach. So
an agent that runs as root gives each kernel a uid from a range nobody else uses
(``HostAgent.kernel_uids``, by default ``1900000000-1900000999``): no account has it, no
``/etc/subuid`` range of any user covers it (a user with such a subordinate range could
enter a user namespace as that uid and read a renter's files), and a uid is lent to one
kernel at a time. A lease is an ``flock`` on ``<lock_dir>/<uid>.lock`` held while the kernel
runs, so two agents on one machine never share one, and a uid is lent only when no process
runs under it (a kernel left by a crashed agent keeps its uid out of use until it is gone).

Plain functions, and :class:`UidPool` as the thin shell that takes the locks.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass

from .procfs import running_uids, uid_pids

DEFAULT_RANGE = "1900000000-1900000999"
MAX_UID = 4_294_967_294  # (uid_t)-1 is "no uid"
MIN_UID = 100_000  # above useradd's UID_MAX (60000) and nobody: never a person's uid
SUBID_FILES = ("/etc/subuid", "/etc/subgid")


class UidError(ValueError):
    """A uid range that cannot be used, or no uid free; the text says what to change."""


def parse_range(text: str) -> range:
    """Parse ``FIRST-LAST`` (inclusive) into a range of uids."""
    first, sep, last = text.strip().partition("-")
    try:
        low, high = int(first), int(last if sep else first)
    except ValueError:
        raise UidError(
            f"kernel_uids must be FIRST-LAST, e.g. {DEFAULT_RANGE}, not {text!r}"
        ) from None
    if not MIN_UID <= low <= high <= MAX_UID:
        raise UidError(
            f"kernel_uids must lie within {MIN_UID}-{MAX_UID} (above every account's range), "
            "first before last"
        )
    if high - low >= 1_000_000:
        raise UidError("kernel_uids: at most 1000000 uids")
    return range(low, high + 1)


def subid_ranges(paths: Iterable[str] = SUBID_FILES) -> list[tuple[str, range]]:
    """Read the subordinate id ranges of ``/etc/subuid`` and ``/etc/subgid``."""
    out = []
    for path in paths:
        try:
            with open(path, encoding="utf-8", errors="replace") as handle:
                lines = handle.read(1 << 20).splitlines()
        except OSError:
            continue
        for line in lines:
            parts = line.strip().split(":")
            if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
                start, count = int(parts[1]), int(parts[2])
                out.append((f"{parts[0]} in {path}", range(start, start + count)))
    return out


def overlaps(a: range, b: range) -> bool:
    """Tell whether two ranges share a value."""
    return a.start < b.stop and b.start < a.stop


def check_range(uids: range, subids: Iterable[tuple[str, range]]) -> None:
    """Refuse a range that a user's subordinate ids or an account cover."""
    for owner, taken in subids:
        if overlaps(uids, taken):
            raise UidError(
                f"kernel_uids {uids.start}-{uids.stop - 1} overlaps the subordinate ids of "
                f"{owner} ({taken.start}-{taken.stop - 1}): pick a range no one is given"
            )
    for account in pwd.getpwall():
        if account.pw_uid in uids:
            raise UidError(
                f"kernel_uids {uids.start}-{uids.stop - 1} holds the uid of the account "
                f"{account.pw_name!r} ({account.pw_uid}): pick a range no account uses"
            )


def kill_uid(uid: int, timeout: float = 5.0) -> bool:
    """SIGKILL every process of ``uid`` until none is left (bounded); True when none is."""
    if uid < 1000:
        raise ValueError("refusing to kill the processes of a system uid")
    deadline = time.monotonic() + timeout
    while True:
        pids = uid_pids(uid)
        if not pids:
            return True
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)


@dataclass
class UidLease:
    """One kernel's uid (and gid, the same number), lent until :meth:`release`."""

    uid: int
    fd: int

    @property
    def gid(self) -> int:
        """The kernel's group: its own, with the uid's number."""
        return self.uid

    def release(self, timeout: float = 5.0) -> bool:
        """Kill what still runs as the uid (it is this kernel's alone: a process it left,
        one that left its process group), then give the uid back; idempotent. False: some
        process outlived the timeout, and the uid stays out of use until it is gone."""
        if self.fd < 0:
            return True
        gone = kill_uid(self.uid, timeout)
        os.close(self.fd)  # drops the flock; acquire() skips a uid that still has processes
        self.fd = -1
        return gone


class UidPool:
    """Lend each kernel a uid of the range that no process and no other agent uses."""

    def __init__(self, uids: range, lock_dir: str = "/run/jupyter-gpu-share/uids") -> None:
        self.uids = uids
        self.lock_dir = lock_dir
        self._next = 0

    def check(self) -> None:
        """Raise UidError when the range or its lock folder cannot be used."""
        check_range(self.uids, subid_ranges())
        try:
            os.makedirs(self.lock_dir, mode=0o700, exist_ok=True)
        except OSError as err:
            raise UidError(f"cannot create {self.lock_dir}: {err.strerror}") from None

    def acquire(self) -> UidLease:
        """Lend a free uid; raise UidError when every uid of the range is in use."""
        busy = running_uids()
        count = len(self.uids)
        os.makedirs(self.lock_dir, mode=0o700, exist_ok=True)
        for step in range(count):
            uid = self.uids[(self._next + step) % count]
            if uid in busy:
                continue
            path = os.path.join(self.lock_dir, f"{uid}.lock")
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self._next = (self._next + step + 1) % count
            return UidLease(uid, fd)
        raise UidError(
            f"all {count} kernel uids ({self.uids.start}-{self.uids.stop - 1}) are in use: "
            "widen kernel_uids"
        )
