"""One renter's ipykernel process on this host, and its ZMQ channels.

Messages travel through unchanged: the agent never parses, verifies or re-signs them. The
HMAC key is the renter's; the host only writes it into the kernel's connection file.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import re
import secrets
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import zmq
import zmq.asyncio
from jupyter_client.connect import write_connection_file

from .. import wire
from ..zmqpump import SocketPump
from . import kernel_startup
from .leftovers import RunDir
from .procfs import group_pids, uid_pids
from .quota import ScratchWatchdog
from .sandbox import WORK_DIR, LaunchPlan, Sandbox, sandbox_child, spawn

log = logging.getLogger(__name__)

MessageCallback = Callable[[int, list[bytes]], None]
ExitCallback = Callable[[int | None], None]

_SAFE_ID = re.compile(r"[^A-Za-z0-9_.-]")
IPC_PATH_MAX = 100
# The largest frame taken from a kernel; libzmq drops a peer that sends a larger one.
MAX_KERNEL_FRAME = 512 * 1024 * 1024
OUTPUT_TAIL_BYTES = 64 * 1024  # a Unix socket's path must fit sockaddr_un (108 bytes on Linux)


def channel_url(info: dict[str, Any], port: int) -> str:
    """A kernel channel's ZMQ address, as jupyter_client builds it from connection info."""
    if info.get("transport", "tcp") == "tcp":
        return f"tcp://{info['ip']}:{port}"
    return f"{info['transport']}://{info['ip']}-{port}"


class KernelStartError(RuntimeError):
    """The kernel process could not be started or never answered."""


def safe_name(text: str, limit: int = 64) -> str:
    """Make a session id safe to use inside a file name."""
    return _SAFE_ID.sub("_", text)[:limit] or "session"


def default_scratch_root() -> str:
    """Return the default root for per-session scratch directories."""
    return os.path.join(tempfile.gettempdir(), f"jupyter-gpu-share-{os.getuid()}")


def install_startup(home: str) -> None:
    """Put the ``%gpu_share`` magic in the kernel's IPython startup folder (its $HOME is
    the scratch folder, fresh and the agent's until the kernel starts)."""
    folder = os.path.join(home, ".ipython", "profile_default", "startup")
    os.makedirs(folder, mode=0o755)
    shutil.copyfile(kernel_startup.__file__, os.path.join(folder, "00-gpu-share.py"))


def kernel_environment(
    session_id: str,
    host_id: str,
    gpu_indices: Sequence[int],
    scratch_dir: str,
    base: dict[str, str] | None = None,
    gpu_uuids: Sequence[str] = (),
) -> dict[str, str]:
    """Build the kernel's scrubbed environment: nothing of the agent's secrets goes in.

    With ``gpu_uuids`` (one per index) CUDA_VISIBLE_DEVICES names the GPUs by UUID, which
    does not depend on CUDA's device ordering or on which device nodes a sandbox shows.
    """
    source = os.environ if base is None else base
    visible = (
        ",".join(gpu_uuids)
        if gpu_uuids and len(gpu_uuids) == len(gpu_indices)
        else ",".join(str(int(i)) for i in gpu_indices)
    )
    env = {
        "PATH": source.get("PATH", os.defpath),
        "HOME": scratch_dir,
        "TMPDIR": scratch_dir,
        "LANG": source.get("LANG", "C.UTF-8"),
        "GPU_SHARE_SESSION_ID": session_id,
        "GPU_SHARE_HOST_ID": host_id,
        "CUDA_VISIBLE_DEVICES": visible,
        # ipykernel exits when this process does, so a crashed agent leaves no orphan kernels.
        "JPY_PARENT_PID": str(os.getpid()),
    }
    if source.get("PYTHONPATH"):
        env["PYTHONPATH"] = source["PYTHONPATH"]
    return env


PROBE_REPLY_MAX_BYTES = 1024 * 1024
PROBE_REPLY_WAIT = 1.0


async def _kernel_info_reply(probe: zmq.asyncio.Socket, session: Any) -> dict[str, Any] | None:
    """The first signed, successful kernel_info_reply on the probe (header and content)."""
    while True:
        frames = await probe.recv_multipart()
        try:
            _idents, parts = session.feed_identities(frames)
            message = session.deserialize(parts)
        except (ValueError, TypeError, KeyError):
            continue
        content = message.get("content")
        if message["header"].get("msg_type") != "kernel_info_reply":
            continue
        if isinstance(content, dict) and content.get("status") == "ok":
            return message


class RemoteKernel:
    """Start, relay to, signal and stop one ipykernel process for a rented session."""

    def __init__(
        self,
        session_id: str,
        host_id: str,
        key: bytes | str,
        on_kernel_message: MessageCallback,
        on_exit: ExitCallback | None = None,
        *,
        signature_scheme: str = "hmac-sha256",
        gpu_indices: Sequence[int] = (),
        gpu_minors: Sequence[int] | None = None,
        gpu_uuids: Sequence[str] = (),
        sandbox: Sandbox | None = None,
        scratch_root: str | None = None,
        python: str = sys.executable,
        transport: str = "ipc" if os.name == "posix" else "tcp",
        ready_timeout: float = 60.0,
        stop_grace: float = 5.0,
        logger: logging.Logger | logging.LoggerAdapter | None = None,
        run_dir: RunDir | None = None,
        scratch_quota_mib: int = 0,
    ) -> None:
        self.session_id = session_id
        self.host_id = host_id
        self.key = key.encode() if isinstance(key, str) else bytes(key)
        self.signature_scheme = signature_scheme
        self.gpu_indices = [int(i) for i in gpu_indices]
        # /dev/nvidiaN numbers (NVML minor numbers; the indices when unknown)
        minors = self.gpu_indices if gpu_minors is None else gpu_minors
        self.gpu_minors = [int(i) for i in minors]
        self.gpu_uuids = list(gpu_uuids)
        self.sandbox = sandbox or Sandbox()
        self.scratch_root = scratch_root or default_scratch_root()
        self.python = python
        self.transport = transport
        self.ready_timeout = ready_timeout
        self.stop_grace = stop_grace
        self.on_kernel_message = on_kernel_message
        self._iopub_flowing = asyncio.Event()
        self.busy = False  # the kernel said "busy" last (a cell is running), not "idle"
        self.was_busy = False  # it said "busy" since the last heartbeat (a short cell)
        # The content of the kernel_info_reply to the start-up probe: the renter's bridge
        # answers its clients' first kernel_info_requests with it (kernel/kernel_info.py).
        self.kernel_info: dict[str, Any] | None = None
        self.kernel_identity: dict[str, str] = {}
        self.on_exit = on_exit
        self.log = logger or log
        # with one, the runtime folder lives in it and the kernel is recorded there
        self.run_dir = run_dir
        self.scratch_quota_mib = scratch_quota_mib
        # Why the host stopped the kernel, for the renter: "out of memory (limit 1024 MiB)",
        # "scratch folder over its 10240 MiB quota (...)". None: it ended by itself.
        self.stop_reason: str | None = None
        self._plan: LaunchPlan | None = None
        self._watchdog: ScratchWatchdog | None = None

        self.process: asyncio.subprocess.Process | None = None
        self.group: int | None = None  # the process group that holds the kernel
        self.exit_code: int | None = None
        self.scratch_dir: str | None = None
        self.runtime_dir: str | None = None
        self.connection_file: str | None = None
        self.ready = False
        self._stopping = False
        self._exited = asyncio.Event()
        self._context: zmq.asyncio.Context | None = None
        self._pumps: dict[int, SocketPump] = {}
        # Set to take each wake-up's messages of one channel at once: (channel, [frames...]).
        self.on_kernel_batch: Callable[[int, list[list[Any]]], None] | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._cleaned = False
        self._output = b""  # the tail of the kernel's stdout and stderr
        self._clean = asyncio.Event()  # set once the clean-up in progress has finished

    # -- lifecycle ----------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """Return the kernel's process id."""
        return self.process.pid if self.process else None

    @property
    def work_dir(self) -> str | None:
        """The kernel's working folder (None before it starts)."""
        return os.path.join(self.scratch_dir, WORK_DIR) if self.scratch_dir else None

    @property
    def owner(self) -> tuple[int, int] | None:
        """The kernel's uid and gid, where it runs as a uid of its own."""
        plan = self._plan
        if plan is None or plan.uid is None:
            return None
        return (plan.uid, plan.gid if plan.gid is not None else plan.uid)

    @property
    def sandboxed(self) -> bool:
        """Tell whether the kernel runs inside a sandbox."""
        return self.sandbox.kind != "none"

    @property
    def alive(self) -> bool:
        """Tell whether the kernel process is still running."""
        return self.process is not None and not self._exited.is_set()

    async def start(self) -> None:
        """Launch the kernel and wait until it answers its heartbeat."""
        os.makedirs(self.scratch_root, mode=0o700, exist_ok=True)
        name = safe_name(self.session_id)
        if self.run_dir is not None:
            self.runtime_dir = self.run_dir.make_runtime_dir()  # 0700, a short path
        else:
            self.runtime_dir = tempfile.mkdtemp(prefix=f"gpu-share-{name}-")  # 0700
        self.scratch_dir = tempfile.mkdtemp(prefix=f"{name}-", dir=self.scratch_root)
        os.chmod(self.scratch_dir, 0o700)
        # The kernel's working folder: the notebook's files arrive there and what the
        # kernel writes there goes back (host/files.py); $HOME and /tmp stay around it.
        os.mkdir(os.path.join(self.scratch_dir, WORK_DIR), 0o755)
        install_startup(self.scratch_dir)
        try:
            self.connection_file, info = write_connection_file(
                os.path.join(self.runtime_dir, "kernel.json"),
                **self._endpoints(),
                key=self.key,
                signature_scheme=self.signature_scheme,
            )
            self._context = zmq.asyncio.Context()  # for the start-up probes
            env = kernel_environment(
                self.session_id,
                self.host_id,
                self.gpu_indices,
                self.scratch_dir,
                gpu_uuids=self.gpu_uuids,
            )
            plan = self.sandbox.plan(
                python=self.python,
                connection_file=self.connection_file,
                scratch_dir=self.scratch_dir,
                runtime_dir=self.runtime_dir,
                env=env,
                gpu_minors=self.gpu_minors,
            )
            self._plan = plan
            # Its output goes to a pipe the agent reads and keeps the tail of (for start
            # errors): a file would let a renter fill the host's disk (or /run's RAM).
            self.process = await spawn(plan, asyncio.subprocess.PIPE)
            self.group = self.process.pid
            self._tasks.append(asyncio.ensure_future(self._read_output()))
            self._record()
            self._tasks.append(asyncio.ensure_future(self._watch()))
            if plan.info_fd is not None:
                self.group = await self._sandbox_child(plan)
                self._record()
            self.log.info(
                "kernel for session %s started (pid %s, %s, gpus [%s])",
                self.session_id,
                self.group,
                f"sandbox {self.sandbox.kind}" if self.sandboxed else "no sandbox",
                ",".join(map(str, self.gpu_indices)),
            )
            await self._wait_ready(info)
            if self.scratch_quota_mib:
                self._watchdog = ScratchWatchdog(
                    self.scratch_dir,
                    self.scratch_quota_mib,
                    on_exceeded=self._over_quota,
                    pids=self._kernel_pids,
                )
                self._watchdog.start()
        except BaseException:
            await self.stop()
            raise
        self.ready = True

    def _kernel_pids(self) -> list[int]:
        """The kernel's processes: those of its own uid, else of its process group."""
        if self._plan is not None and self._plan.uid is not None:
            return uid_pids(self._plan.uid)
        return group_pids(self.group) if self.group else []

    def _over_quota(self, reason: str) -> None:
        """The scratch folder outgrew its quota: stop the kernel, and say why."""
        if self._stopping or not self.alive:
            return
        self.stop_reason = reason
        self.log.warning("stopping the kernel for session %s: %s", self.session_id, reason)
        self.signal(signal.SIGKILL)

    def _record(self) -> None:
        """Write this kernel's record in the run folder, for a clean-up after a crash."""
        if self.run_dir is None or self.runtime_dir is None or self.process is None:
            return
        self.run_dir.record(
            os.path.basename(self.runtime_dir),
            session_id=self.session_id,
            pids=[self.process.pid, self.group or self.process.pid],
            runtime_dir=self.runtime_dir,
            scratch_dir=self.scratch_dir,
        )

    async def _sandbox_child(self, plan: LaunchPlan) -> int:
        """The pid (and process group) of the kernel inside the sandbox."""
        assert self.process is not None
        child = await sandbox_child(self.process, plan, self.ready_timeout)
        if child is None:
            await asyncio.sleep(0.2)  # let the log catch bwrap's complaint
            raise KernelStartError(f"the sandbox did not start{self._log_tail()}")
        return child

    def _endpoints(self) -> dict[str, str]:
        """Where the kernel listens: Unix sockets in a private folder (cheaper than loopback
        TCP per message), or loopback TCP where the path would be too long for one."""
        assert self.runtime_dir is not None
        prefix = os.path.join(self.runtime_dir, "zmq", "kernel")
        if self.transport == "ipc" and len(prefix) + 4 <= IPC_PATH_MAX:
            os.mkdir(os.path.dirname(prefix), 0o700)
            return {"transport": "ipc", "ip": prefix}
        return {"transport": "tcp", "ip": "127.0.0.1"}

    async def _connect_channels(self, info: dict[str, Any]) -> None:
        """Open the four kernel channels once the kernel answers its heartbeat: pyzmq
        sockets served by the event loop (what the renter's kernel writes is parsed by
        libzmq, not by code of ours, in the process that holds the host token)."""
        assert self._context is not None
        ctx = zmq.Context.shadow(self._context.underlying)  # plain sockets for the pumps
        identity = b"gpu-share-" + secrets.token_hex(8).encode()
        plan = [
            (wire.SHELL, zmq.DEALER, info["shell_port"], identity),
            (wire.CONTROL, zmq.DEALER, info["control_port"], None),
            (wire.STDIN, zmq.DEALER, info["stdin_port"], identity),
            (wire.IOPUB, zmq.SUB, info["iopub_port"], None),
        ]
        for channel, kind, port, ident in plan:
            sock = ctx.socket(kind)
            sock.linger = 0
            sock.setsockopt(zmq.MAXMSGSIZE, MAX_KERNEL_FRAME)
            if ident is not None:
                sock.setsockopt(zmq.IDENTITY, ident)
            if kind == zmq.SUB:
                sock.setsockopt(zmq.SUBSCRIBE, b"")
            sock.connect(channel_url(info, port))
            self._pumps[channel] = SocketPump(sock, functools.partial(self._received, channel))

    async def _wait_ready(self, info: dict[str, Any]) -> None:
        assert self._context is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.ready_timeout
        address = channel_url(info, info["hb_port"])
        while True:
            if self._exited.is_set():
                raise KernelStartError(
                    f"kernel exited with code {self.exit_code} before it was ready"
                    f"{self._log_tail()}"
                )
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise KernelStartError(
                    f"kernel did not answer within {self.ready_timeout:g} s{self._log_tail()}"
                )
            hb = self._context.socket(zmq.REQ)
            hb.linger = 0
            try:
                hb.connect(address)
                await hb.send(b"ping")
                if await hb.poll(timeout=int(min(1.0, remaining) * 1000)):
                    await hb.recv()
                    break
            finally:
                hb.close(linger=0)
        await self._connect_channels(info)
        await self._wait_iopub(info, deadline)

    async def _wait_iopub(self, info: dict[str, Any], deadline: float) -> None:
        """Nudge the kernel until its iopub reaches our subscription, as jupyter_client does.

        A PUB socket drops what it sends before the subscription is connected; without this,
        the renter's first output could be lost.
        """
        from jupyter_client.session import Session

        assert self._context is not None
        session = Session(key=self.key, signature_scheme=self.signature_scheme)
        probe = self._context.socket(zmq.DEALER)
        probe.linger = 0
        probe.setsockopt(zmq.MAXMSGSIZE, PROBE_REPLY_MAX_BYTES)
        probe.connect(channel_url(info, info["shell_port"]))
        loop = asyncio.get_running_loop()
        reply = asyncio.ensure_future(_kernel_info_reply(probe, session))
        try:
            while not self._iopub_flowing.is_set() and loop.time() < deadline:
                session.send(probe, "kernel_info_request")
                try:
                    await asyncio.wait_for(self._iopub_flowing.wait(), 0.2)
                except asyncio.TimeoutError:
                    continue
            # The reply follows the status the kernel published for it (ipykernel: busy,
            # reply, idle), so it is here or about to be.
            with contextlib.suppress(asyncio.TimeoutError):
                timeout = max(0.0, min(PROBE_REPLY_WAIT, deadline - loop.time()))
                message = await asyncio.wait_for(reply, timeout)
                if message is not None:
                    header = message["header"]
                    self.kernel_info = message["content"]
                    # Who the kernel signs as: the bridge's answers carry the same.
                    self.kernel_identity = {
                        "session": str(header.get("session", ""))[:128],
                        "username": str(header.get("username", ""))[:128],
                    }
        finally:
            reply.cancel()
            probe.close(linger=0)

    async def _read_output(self) -> None:
        """Keep the last OUTPUT_TAIL_BYTES of what the kernel (and its sandbox) printed."""
        assert self.process is not None and self.process.stdout is not None
        while True:
            chunk = await self.process.stdout.read(65536)
            if not chunk:
                return
            self._output = (self._output + chunk)[-OUTPUT_TAIL_BYTES:]

    def _log_tail(self, lines: int = 5) -> str:
        tail = self._output[-2000:].decode("utf-8", "replace").strip().splitlines()
        return (": " + " | ".join(tail[-lines:])) if tail else ""

    def pause_reading(self, channel: int, paused: bool) -> None:
        """Hold (or resume) reading one of the kernel's channels while the relay drains."""
        pump = self._pumps.get(channel)
        if pump is not None and not pump.closed:
            pump.pause_reading(paused)

    def _received(self, channel: int, batch: list[list[Any]]) -> None:
        """Forward everything the kernel emits on one socket, unchanged and in order."""
        if channel == wire.IOPUB:
            self._iopub_flowing.set()
            for frames in batch:  # busy from an execute_request until its idle: a cell
                state = wire.execution_state(frames)  # (a control request's status, a
                if state is not None and wire.answers_execute(frames):  # usage poll: not)
                    self.busy = state == "busy"
                    self.was_busy = self.was_busy or self.busy
        if self.on_kernel_batch is not None:
            self.on_kernel_batch(channel, batch)
            return
        for frames in batch:
            self.on_kernel_message(channel, frames)

    async def _watch(self) -> None:
        assert self.process is not None
        code: int | None = await self.process.wait()
        if self.sandboxed and code is not None and 128 < code <= 128 + 64:
            code = -(code - 128)  # bwrap reports a child killed by signal N as 128 + N
        self.exit_code = code
        plan = self._plan
        if self.stop_reason is None and code != 0 and plan is not None and plan.stop_reason:
            self.stop_reason = plan.stop_reason()
        self._exited.set()
        if self._stopping or not self.ready:
            return  # stop() or a failed start() cleans up and reports
        if code == 0:  # a shutdown_request from the renter ends the kernel this way
            self.log.info("kernel for session %s exited", self.session_id)
        else:
            self.log.warning("kernel for session %s died with exit code %s", self.session_id, code)
        await self._cleanup()
        if self.on_exit is not None:
            try:
                self.on_exit(code)
            except Exception:
                self.log.exception("kernel exit handler failed")

    async def wait(self) -> int | None:
        """Wait for the kernel process to end; return its exit code."""
        await self._exited.wait()
        return self.exit_code

    # -- traffic ------------------------------------------------------------------------

    async def adopt(self, session_id: str, timeout: float = 10.0) -> None:
        """Hand a warm kernel to a session: set its GPU_SHARE_SESSION_ID, wait for the reply.

        The code runs silently (no execute_input, no history) on a private socket, before the
        renter's relay is connected to this kernel.
        """
        from jupyter_client.session import Session

        assert self._context is not None and self.connection_file is not None
        with open(self.connection_file) as handle:
            info = json.load(handle)
        session = Session(key=self.key, signature_scheme=self.signature_scheme)
        probe = self._context.socket(zmq.DEALER)
        probe.linger = 0
        probe.connect(channel_url(info, info["shell_port"]))
        code = f"import os as _os; _os.environ['GPU_SHARE_SESSION_ID'] = {session_id!r}; del _os"
        try:
            sent = session.send(
                probe,
                "execute_request",
                {
                    "code": code,
                    "silent": True,
                    "store_history": False,
                    "user_expressions": {},
                    "allow_stdin": False,
                    "stop_on_error": False,
                },
            )
            while True:
                if not await probe.poll(int(timeout * 1000)):
                    raise KernelStartError("the warm kernel did not answer")
                _, reply = session.feed_identities(await probe.recv_multipart(), copy=True)
                message = session.deserialize(reply)
                if message["parent_header"].get("msg_id") == sent["header"]["msg_id"]:
                    break
        finally:
            probe.close(linger=0)
        self.session_id = session_id

    def send(self, channel: int | str, frames: Sequence[bytes | memoryview]) -> None:
        """Forward one multipart message from the relay to the kernel, unchanged."""
        if isinstance(channel, str):
            channel = wire.CHANNELS[channel]
        if channel == wire.IOPUB:
            raise ValueError("nothing is sent to a kernel on iopub")
        pump = self._pumps.get(channel)
        if pump is None or pump.closed:
            raise RuntimeError("kernel channels are closed")
        pump.send(frames)

    # -- signals and stop ---------------------------------------------------------------

    def signal(self, signum: int) -> None:
        """Send a signal to the kernel's process group (inside the sandbox, if any).

        bwrap does not forward signals, so they go to the sandboxed process group itself;
        SIGKILL also goes to bwrap, whose death takes the whole sandbox down.
        """
        if not self.alive or self.process is None:
            return
        groups = [self.group or self.process.pid]
        if signum == signal.SIGKILL and self.process.pid not in groups:
            groups.append(self.process.pid)
        for group in groups:
            try:
                os.killpg(group, signum)
            except ProcessLookupError:
                pass
            except PermissionError:
                self.process.send_signal(signum)

    def interrupt(self) -> None:
        """Interrupt the running cell (SIGINT)."""
        self.signal(signal.SIGINT)

    async def stop(self) -> int | None:
        """Terminate the kernel (SIGTERM, then SIGKILL after the grace period) and clean up."""
        self._stopping = True
        if self.process is not None and not self._exited.is_set():
            self.signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self._exited.wait(), self.stop_grace)
            except asyncio.TimeoutError:
                self.log.warning(
                    "kernel for session %s ignored SIGTERM; killing it", self.session_id
                )
                self.signal(signal.SIGKILL)
                await self._exited.wait()
        if self.process is not None and self.exit_code is None:
            self.exit_code = self.process.returncode
        await self._cleanup()
        return self.exit_code

    async def _cleanup(self) -> None:
        if self._cleaned:
            await self._clean.wait()  # a clean-up under way (it awaits the cgroup, the uid)
            return
        self._cleaned = True
        try:
            await self._clean_up()
        finally:
            self._clean.set()

    async def _clean_up(self) -> None:
        if self.process is not None:
            for group in {self.process.pid, self.group or self.process.pid}:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(group, signal.SIGKILL)  # leftovers the renter spawned
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        for pump in self._pumps.values():
            pump.close(linger=0)
        self._pumps.clear()
        if self._context is not None:
            self._context.term()
            self._context = None
        if self._watchdog is not None:
            await self._watchdog.stop()
            self._watchdog = None
        plan, self._plan = self._plan, None
        if plan is not None and plan.release is not None:
            # the cgroup's last processes, then its folders; then the uid is free again
            await asyncio.get_running_loop().run_in_executor(None, plan.release)
        for path in (self.scratch_dir, self.runtime_dir):
            if path:
                shutil.rmtree(path, ignore_errors=True)
        if self.run_dir is not None and self.runtime_dir is not None:
            self.run_dir.forget(os.path.basename(self.runtime_dir))
