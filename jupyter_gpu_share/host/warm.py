"""Warm kernels: started ahead of demand, each handed to exactly one renter, never reused.

A warm kernel is started with a key made here (the renter's key is not known yet); the
host sends that key to the renter's bridge with ``kernel_ready``, and the bridge's kernel
manager adopts it. After a kernel is handed over, a fresh one is started in its place.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .agent import HostSession
    from .kernels import RemoteKernel


class WarmKernel:
    """A started kernel waiting for its one renter."""

    def __init__(self, gpu_indices: tuple[int, ...]):
        self.gpu_indices = gpu_indices
        self.key = str(uuid.uuid4())
        self.name = "warm-" + secrets.token_hex(6)
        self.kernel: RemoteKernel | None = None
        self.owner: HostSession | None = None
        self.on_unowned_exit: Callable[[WarmKernel], None] | None = None

    def route_message(self, channel: int, frames: list[bytes]) -> None:
        """Kernel output goes to its renter; before that, it has no reader."""
        if self.owner is not None:
            self.owner._from_kernel(channel, frames)

    def route_exit(self, exit_code: int | None) -> None:
        """A warm kernel that dies is reported by its renter, or dropped from the pool."""
        if self.owner is not None:
            self.owner._kernel_exited(exit_code)
        elif self.on_unowned_exit is not None:
            self.on_unowned_exit(self)


class WarmPool:
    """``size`` ready kernels per offer (per set of GPU indices)."""

    def __init__(self, size: int, start: Callable[[WarmKernel], Any], log: Any):
        self.size = size
        self._start = start  # an async callable that builds and starts warm.kernel
        self.log = log
        self.ready: dict[tuple[int, ...], list[WarmKernel]] = {}
        self._starting: dict[tuple[int, ...], int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.closed = False

    def take(self, gpu_indices: list[int]) -> WarmKernel | None:
        """A ready kernel for these GPUs, removed from the pool, or None."""
        key = tuple(gpu_indices)
        kernels = self.ready.get(key) or []
        while kernels:
            warm = kernels.pop(0)
            if warm.kernel is not None and warm.kernel.alive:
                self.fill(key)
                return warm
        self.fill(key)
        return None

    def fill(self, key: tuple[int, ...]) -> None:
        """Start kernels until ``size`` are ready or starting for these GPUs."""
        if self.closed or self.size <= 0:
            return
        missing = self.size - len(self.ready.get(key, [])) - self._starting.get(key, 0)
        for _ in range(max(0, missing)):
            self._starting[key] = self._starting.get(key, 0) + 1
            task = asyncio.ensure_future(self._start_one(key))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _start_one(self, key: tuple[int, ...]) -> None:
        warm = WarmKernel(key)
        warm.on_unowned_exit = self._discard
        try:
            await self._start(warm)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            self.log.warning("a warm kernel failed to start: %s", error)
            return
        finally:
            self._starting[key] -= 1
        if self.closed:
            await self._stop(warm)
            return
        self.ready.setdefault(key, []).append(warm)
        self.log.info("warm kernel %s ready", warm.name)

    def _discard(self, warm: WarmKernel) -> None:
        kernels = self.ready.get(warm.gpu_indices, [])
        if warm in kernels:
            kernels.remove(warm)
            self.log.warning("warm kernel %s exited; starting another", warm.name)
            self.fill(warm.gpu_indices)

    @staticmethod
    async def _stop(warm: WarmKernel) -> None:
        if warm.kernel is not None:
            await warm.kernel.stop()

    async def close(self) -> None:
        """Stop every waiting kernel (the agent is stopping)."""
        self.closed = True
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        kernels = [warm for group in self.ready.values() for warm in group]
        self.ready.clear()
        await asyncio.gather(*(self._stop(w) for w in kernels), return_exceptions=True)

    def count(self) -> int:
        """Ready kernels in the pool."""
        return sum(len(group) for group in self.ready.values())
