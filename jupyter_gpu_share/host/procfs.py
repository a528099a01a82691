"""The one reader of /proc on the host: which processes exist, and what each says of itself.

The agent looks for processes by process group (a kernel's), by owner (a kernel's own uid),
by pid namespace (the kernel bwrap started under pasta) and by start time (a leftover from a
crash, not a new process that reuses its pid). Each lookup walks /proc with these functions;
a process that ends during the walk is skipped, never an error.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

PROC = "/proc"


def pids(proc: str = PROC) -> Iterator[int]:
    """Every process's pid (an unreadable /proc gives none)."""
    with contextlib.suppress(OSError):
        for name in os.listdir(proc):
            if name.isdigit():
                yield int(name)


@dataclass(frozen=True)
class ProcStat:
    """The fields of /proc/<pid>/stat that identify a process and its group."""

    pid: int
    state: str
    pgrp: int
    session: int
    start: int  # field 22: clock ticks after boot

    @property
    def gone(self) -> bool:
        """Tell whether the process has ended (a zombie or a dead task)."""
        return self.state in ("Z", "X", "x")


def stat(pid: int, proc: str = PROC) -> ProcStat | None:
    """Read /proc/<pid>/stat; None when there is no such process."""
    try:
        with open(f"{proc}/{int(pid)}/stat", "rb") as handle:
            raw = handle.read()
    except OSError:
        return None
    # comm (field 2) is in parentheses and may itself hold ')' or spaces
    rest = raw[raw.rfind(b")") + 2 :].split()
    try:
        return ProcStat(pid, rest[0].decode(), int(rest[2]), int(rest[3]), int(rest[19]))
    except (IndexError, ValueError):
        return None


def owner(pid: int, proc: str = PROC) -> int | None:
    """The uid that owns a process (its real uid); None when it is gone."""
    try:
        return os.stat(f"{proc}/{int(pid)}").st_uid
    except OSError:
        return None


def parent_and_nspids(pid: int, proc: str = PROC) -> tuple[int, list[int]] | None:
    """A process's parent and its pids from our pid namespace inward (``NSpid``)."""
    try:
        with open(f"{proc}/{int(pid)}/status", "rb") as handle:
            text = handle.read(8192).decode("ascii", "replace")
    except OSError:
        return None
    ppid, nspids = -1, [pid]
    for line in text.splitlines():
        with contextlib.suppress(IndexError, ValueError):
            if line.startswith("PPid:"):
                ppid = int(line.split()[1])
            elif line.startswith("NSpid:"):
                nspids = [int(v) for v in line.split()[1:]]
    return ppid, nspids


def group_pids(pgid: int, proc: str = PROC) -> list[int]:
    """The processes of a process group."""
    out = []
    for pid in pids(proc):
        info = stat(pid, proc)
        if info is not None and info.pgrp == pgid:
            out.append(pid)
    return out


def uid_pids(uid: int, proc: str = PROC) -> list[int]:
    """The processes whose owner is ``uid``."""
    return [pid for pid in pids(proc) if owner(pid, proc) == uid]


def running_uids(proc: str = PROC) -> set[int]:
    """The real uids of every process on the machine."""
    return {uid for uid in (owner(pid, proc) for pid in pids(proc)) if uid is not None}
