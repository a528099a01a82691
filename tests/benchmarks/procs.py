"""Processes for the benchmarks: servers beside the e2e Cluster, CPU accounting, fd limits."""

from __future__ import annotations

import contextlib
import os
import resource
import secrets
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.e2e.harness import ROOT_FLAG, Cluster, Process, eventually, free_port

CLK_TCK = os.sysconf("SC_CLK_TCK")

# jupyter_server drops iopub output above 1 MB/s by default; both sides of every ratio go
# through the same server, but the throughput figures must measure the path, not the limiter.
NO_RATE_LIMIT = ["--ZMQChannelsWebsocketConnection.limit_rate=False"]

# Turns Nagle off on every tornado socket of the process (server and client side), as the
# issue's "gateway mode with TCP_NODELAY" figure assumes. Loaded as a config file. Setting
# the option once is not enough: tornado's HTTP1Connection.finish() turns Nagle back on
# after every response, the websocket handshake's included, to leave the stream in its
# default state for the next request; so set_nodelay(False) is made to keep it off.
NODELAY_EVERYWHERE = """
import socket
import tornado.iostream

_original_init = tornado.iostream.IOStream.__init__
_original_set_nodelay = tornado.iostream.IOStream.set_nodelay


def _init_with_nodelay(self, sock, *args, **kwargs):
    _original_init(self, sock, *args, **kwargs)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        pass


def _always_nodelay(self, value):
    _original_set_nodelay(self, True)


tornado.iostream.IOStream.__init__ = _init_with_nodelay
tornado.iostream.IOStream.set_nodelay = _always_nodelay
"""

WITHOUT_GPU_SHARE_EXTENSION = """
c.ServerApp.jpserver_extensions = {"jupyter_gpu_share.kernel": False}
"""


def raise_fd_limit() -> int:
    """Raise this process's (and its children's) open-file limit to the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def cpu_seconds(pid: int) -> float:
    """CPU seconds of one process so far, summed over its threads, to the nanosecond where
    the kernel keeps scheduler statistics (/proc/PID/stat counts 10 ms ticks, too coarse
    for a window of a few seconds or a per-message figure)."""
    total_ns = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as handle:
                total_ns += int(handle.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # a thread that ended between the listing and the read
    if total_ns:
        return total_ns / 1e9
    return sum(cpu_split(pid))


def cpu_split(pid: int) -> tuple[float, float]:
    """A process's CPU seconds so far, (in user space, in the kernel), counted in clock
    ticks (the only place the kernel splits them)."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def cpu_seconds_tree(pid: int) -> float:
    """CPU seconds of a process and its live children."""
    import psutil

    total = 0.0
    try:
        proc = psutil.Process(pid)
        for p in [proc, *proc.children(recursive=True)]:
            try:
                times = p.cpu_times()
                total += times.user + times.system
            except psutil.Error:
                pass
    except psutil.Error:
        pass
    return total


def children(pid: int) -> list[int]:
    import psutil

    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def find_descendant(pid: int, needle: str) -> int | None:
    """The deepest descendant Python process whose command line contains ``needle``.

    (A sandbox launcher such as bwrap carries the kernel's command line in its own.)
    """
    import psutil

    found = None
    try:
        for child in psutil.Process(pid).children(recursive=True):
            try:
                cmdline = child.cmdline()
                if (
                    cmdline
                    and "python" in os.path.basename(cmdline[0])
                    and any(needle in part for part in cmdline)
                ):
                    found = child.pid
            except psutil.Error:
                pass
    except psutil.Error:
        pass
    return found


def machine() -> dict[str, Any]:
    """nproc, CPU model, memory, Python: for the table header."""
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gib = None
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemTotal"):
                    mem_gib = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": mem_gib,
        "python": sys.version.split()[0],
        "load_1m": round(os.getloadavg()[0], 2),
    }


def _answers(url: str, token: str | None, path: str) -> bool:
    headers = {"Authorization": f"token {token}"} if token else {}
    request = urllib.request.Request(url + path, headers=headers)
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.status == 200


def config_dir(workdir: Path, name: str, files: dict[str, str]) -> Path:
    """A JUPYTER_CONFIG_DIR holding the given config files."""
    path = workdir / f"config-{name}"
    path.mkdir(parents=True, exist_ok=True)
    for filename, text in files.items():
        (path / filename).write_text(text)
    return path


def spawn_user_server(
    cluster: Cluster,
    name: str,
    env: dict[str, str],
    extra: list[str] = (),  # type: ignore[assignment]
) -> tuple[Process, str, str]:
    """Start a jupyter_server (not waiting for it); return the process, its URL and token."""
    port = free_port()
    token = secrets.token_hex(16)
    root = cluster.workdir / "notebooks"
    root.mkdir(exist_ok=True)
    process = cluster.spawn(
        name,
        [
            sys.executable,
            "-m",
            "jupyter_server",
            f"--port={port}",
            "--ServerApp.ip=127.0.0.1",
            "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={token}",
            f"--ServerApp.root_dir={root}",
            "--ServerApp.open_browser=False",
            *NO_RATE_LIMIT,
            *ROOT_FLAG,
            *extra,
        ],
        env,
    )
    return process, f"http://127.0.0.1:{port}", token


def spawn_kernel_gateway(cluster: Cluster, name: str, env: dict[str, str]) -> tuple[Process, str]:
    """Start a Jupyter Kernel Gateway on loopback; return the process and its URL."""
    port = free_port()
    process = cluster.spawn(
        name,
        [
            sys.executable,
            "-m",
            "kernel_gateway",
            "--KernelGatewayApp.ip=127.0.0.1",
            f"--KernelGatewayApp.port={port}",
            "--KernelGatewayApp.port_retries=0",
            # A gateway-mode jupyter_server lists the gateway's kernels (its /api/status too).
            "--JupyterWebsocketPersonality.list_kernels=True",
            *NO_RATE_LIMIT,
        ],
        env,
    )
    return process, f"http://127.0.0.1:{port}"


def wait_server(
    url: str, token: str | None, path: str = "/api/status", timeout: float = 90
) -> None:
    eventually(lambda: _answers(url, token, path), timeout, 0.2, f"{url}{path}")


def stop_pid(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, 15)


def run_capture(args: list[str], timeout: float = 60) -> str:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout).stdout


def settle(seconds: float) -> None:
    time.sleep(seconds)
