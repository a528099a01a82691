"""Which asyncio event loop a server process runs on: uvloop where it is installed."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

EVENT_LOOPS = ("auto", "uvloop", "asyncio")


class EventLoopError(RuntimeError):
    """The event loop asked for cannot be used here."""


def install_event_loop(choice: str) -> str:
    """Make the loops this process creates from now on ``choice``'s; return the one used.

    ``auto`` takes uvloop where it is installed (every platform but Windows) and the
    standard loop elsewhere; ``uvloop`` insists on it; ``asyncio`` keeps the standard loop.
    """
    if choice not in EVENT_LOOPS:
        raise EventLoopError(f"event loop {choice!r} is not one of {', '.join(EVENT_LOOPS)}")
    if choice == "asyncio":
        return "asyncio"
    try:
        import uvloop
    except ImportError as error:
        if choice == "uvloop":
            raise EventLoopError("uvloop is not installed (pip install uvloop)") from error
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


def choice_in_argv(argv: Sequence[str], names: Sequence[str]) -> str | None:
    """The last ``--NAME=VALUE`` or ``--NAME VALUE`` among ``names``, as traitlets reads it."""
    found = None
    for index, arg in enumerate(argv):
        for name in names:
            flag = f"--{name}"
            if arg.startswith(flag + "="):
                found = arg[len(flag) + 1 :]
            elif arg == flag and index + 1 < len(argv):
                found = argv[index + 1]
    return found.strip("'\"") if found is not None else None


def loop_in_use() -> str:
    """``uvloop`` or ``asyncio``: what this process's loops are."""
    policy = asyncio.get_event_loop_policy()
    return "uvloop" if type(policy).__module__.startswith("uvloop") else "asyncio"
