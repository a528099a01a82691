"""The idle workload: a host's own command (a miner, a folding client) that runs while no
renter's kernel does, is stopped before one starts, and is started again after the last ends.

It is the host's own program, but it runs while the host is away, often with GPUs and the
internet, so by default it runs in the same sandbox as a kernel (``HostAgent.idle_sandbox``):
the same network, a uid of its own, the same limits, and its own work folder as its home.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import shutil
import signal
import tempfile
from collections.abc import Sequence

from .sandbox import LaunchPlan, Sandbox, sandbox_child, spawn

log = logging.getLogger(__name__)


SANDBOXED_ENV_PREFIXES = ("LANG", "LC_", "CUDA_", "NVIDIA_", "TZ")


def idle_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """The agent's environment without its secrets (GPU_SHARE_*: the host token)."""
    source = os.environ if base is None else base
    return {k: v for k, v in source.items() if not k.startswith("GPU_SHARE_")}


def sandboxed_idle_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """What a sandboxed idle command gets of the agent's environment: locale, time zone and
    CUDA settings only (the sandbox sets HOME, PATH, USER itself)."""
    source = os.environ if base is None else base
    return {k: v for k, v in source.items() if k.startswith(SANDBOXED_ENV_PREFIXES)}


class IdleWorkload:
    """Start, stop (SIGTERM to its process group, SIGKILL after a grace) and restart a command."""

    def __init__(
        self,
        command: str | Sequence[str],
        *,
        stop_grace: float = 10.0,
        cwd: str | None = None,
        logger: logging.Logger | logging.LoggerAdapter | None = None,
        sandbox: Sandbox | None = None,
        work_dir: str | None = None,
        gpu_minors: Sequence[int] = (),
    ) -> None:
        argv = shlex.split(command) if isinstance(command, str) else list(command)
        if not argv:
            raise ValueError("the idle command is empty")
        self.argv = argv
        self.stop_grace = stop_grace
        self.cwd = cwd
        self.log = logger or log
        # With a sandbox (not "none"): its home is work_dir, kept between runs.
        self.sandbox = sandbox if sandbox is not None and sandbox.kind != "none" else None
        self.work_dir = work_dir
        self.gpu_minors = list(gpu_minors)
        self.process: asyncio.subprocess.Process | None = None
        self.group: int | None = None  # the process group to signal (inside the sandbox)
        self._plan: LaunchPlan | None = None
        self._runtime_dir: str | None = None
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
                if self.sandbox is not None:
                    await self._start_sandboxed()
                else:
                    self.process = await asyncio.create_subprocess_exec(
                        *self.argv,
                        cwd=self.cwd,
                        env=idle_environment(),
                        stdin=asyncio.subprocess.DEVNULL,
                        stdout=asyncio.subprocess.DEVNULL,
                        stderr=asyncio.subprocess.DEVNULL,
                        start_new_session=True,
                    )
                    self.group = self.process.pid
            except Exception as err:  # OSError, SandboxError: the agent keeps serving
                self.log.warning("idle command %s could not start: %s", self.argv[0], err)
                await self._release()
                self.process = None
                return
            self.log.info(
                "idle command started (pid %s%s): %s",
                self.group,
                f", {self.sandbox.kind} sandbox" if self.sandbox is not None else ", unsandboxed",
                self.argv[0],
            )
            self._watcher = asyncio.ensure_future(self._watch(self.process))

    async def _start_sandboxed(self) -> None:
        """Start the command in the sandbox, its work folder as its home."""
        assert self.sandbox is not None
        work = self.work_dir or tempfile.mkdtemp(prefix="gpu-share-idle-")
        os.makedirs(work, mode=0o700, exist_ok=True)
        self._runtime_dir = tempfile.mkdtemp(prefix="gpu-share-idle-run-")
        plan = self.sandbox.plan_command(
            self.argv,
            scratch_dir=work,
            runtime_dir=self._runtime_dir,
            env=sandboxed_idle_environment(),
            gpu_minors=self.gpu_minors,
            binds=self._program_binds(),
        )
        self._plan = plan
        if plan.uid is not None:  # a uid of its own this time: the work folder is its
            for root, dirs, files in os.walk(work):
                for name in [root, *(os.path.join(root, n) for n in dirs + files)]:
                    os.lchown(name, plan.uid, plan.uid)
        self.process = await spawn(plan, asyncio.subprocess.DEVNULL)
        self.group = self.process.pid
        self.group = await sandbox_child(self.process, plan, 60) or self.process.pid

    def _program_binds(self) -> list[str]:
        """The command's own folder, read-only, where it is not a system folder."""
        found = shutil.which(self.argv[0])
        if found is None:
            return []
        folder = os.path.dirname(os.path.realpath(found))
        if folder.split(os.sep)[1:2] in (["usr"], ["bin"], ["sbin"], ["lib"]):
            return []
        return ["--ro-bind", folder, folder]

    async def _release(self) -> None:
        """Give back the sandbox's uid and cgroup, and remove its runtime folder."""
        plan, self._plan = self._plan, None
        if plan is not None and plan.release is not None:
            await asyncio.get_running_loop().run_in_executor(None, plan.release)
        if self._runtime_dir is not None:
            shutil.rmtree(self._runtime_dir, ignore_errors=True)
            self._runtime_dir = None

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
            group = self.group or process.pid
            if process.returncode is None:
                self._killpg(group, signal.SIGTERM)
                try:
                    await asyncio.wait_for(process.wait(), self.stop_grace)
                except asyncio.TimeoutError:
                    self.log.warning(
                        "idle command ignored SIGTERM for %g s; killing it", self.stop_grace
                    )
                    self._killpg(group, signal.SIGKILL)
                    self._killpg(process.pid, signal.SIGKILL)
                    await process.wait()
            for pgid in {group, process.pid}:
                self._killpg(pgid, signal.SIGKILL)  # leftovers in its group
            await self._release()
            if self._watcher is not None:
                self._watcher.cancel()
                self._watcher = None
            self.log.info("idle command stopped (exit code %s)", process.returncode)
            return process.returncode

    @staticmethod
    def _killpg(pgid: int, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signum)
