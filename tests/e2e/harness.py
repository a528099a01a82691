"""Real processes on loopback for end-to-end tests: a broker, host agents, a jupyter_server."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

from jupyter_gpu_share.client import BrokerClient, BrokerError

T = TypeVar("T")
CLI = [sys.executable, "-m", "jupyter_gpu_share.cli"]
ROOT_FLAG = ["--ServerApp.allow_root=True"] if os.geteuid() == 0 else []


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def eventually(
    check: Callable[[], T], timeout: float = 30, interval: float = 0.1, what: str = ""
) -> T:
    """Poll until ``check`` returns something truthy (exceptions count as not yet)."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except (BrokerError, OSError, AssertionError, KeyError, IndexError) as error:
            last_error = error
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what or check}: last error {last_error!r}")


def clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment without any GPU_SHARE_ variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_SHARE_")}
    env.update(extra)
    return env


class Process:
    """A child process whose output goes to a log file, shown when a test fails."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], logdir: Path):
        self.name = name
        self.log_path = logdir / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.popen = subprocess.Popen(args, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self.token: str | None = None  # a host's token, for tests that look for it

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL, as a crash or a pulled plug."""
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait()

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM, then SIGKILL."""
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._log.close()


class Cluster:
    """A broker with its admin client, and whatever hosts and servers a test starts."""

    def __init__(self, workdir: Path, **broker_traits: Any):
        self.workdir = workdir
        # The database may live elsewhere (a small file system, to fill it).
        self.db_path = Path(broker_traits.pop("db_path", workdir / "broker.sqlite"))
        # Or a PostgreSQL database that several clusters' brokers share.
        self.db_url = broker_traits.pop("db_url", f"sqlite:///{self.db_path}")
        # TLS at the broker: (certfile, keyfile, the CA file its clients trust).
        tls = broker_traits.pop("tls", None)
        # Or only a CA its processes trust (a TLS proxy in front of its peers).
        trusted = broker_traits.pop("ca_file", None)
        self.ca_file = str(tls[2]) if tls else (str(trusted) if trusted else None)
        self.processes: list[Process] = []
        self.admin_token = secrets.token_urlsafe(24)
        self.port = free_port()
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        traits = {
            "heartbeat_interval": 0.5,
            "checkpoint_interval": 1.0,
            "receipt_key_file": workdir / "receipt-key.pem",  # not the user's data dir
            "public_url": self.url,  # where its peers send users' requests on
            **broker_traits,
        }
        self._broker_args = [
            *CLI,
            "broker",
            f"--port={self.port}",
            "--ServerApp.ip=127.0.0.1",
            "--ServerApp.port_retries=0",
            f"--db={self.db_url}",
            f"--ServerApp.root_dir={workdir}",
            *ROOT_FLAG,
            *(f"--BrokerApp.{k}={v}" for k, v in traits.items()),
            *((f"--certfile={tls[0]}", f"--keyfile={tls[1]}") if tls else ()),
        ]
        self.admin = BrokerClient(self.url, self.admin_token, timeout=10, ca_file=self.ca_file)
        self.start_broker()

    def start_broker(self) -> None:
        """Start (or restart) the broker on the same port and database."""
        count = sum(1 for p in self.processes if p.name.startswith("broker"))
        name = "broker" if count == 0 else f"broker-{count + 1}"
        env = clean_env(GPU_SHARE_ADMIN_TOKEN=self.admin_token)
        self.broker = self.spawn(name, self._broker_args, env)
        if self.ca_file:  # its certificate may be one a test wants refused: read its log
            broker = self.broker
            eventually(lambda: "gpu-share broker ready" in broker.output(), 60, 0.2, "the broker")
        else:
            eventually(lambda: self.admin.request("GET", "/me"), 60, 0.2, "the broker to answer")

    def spawn(self, name: str, args: list[str], env: dict[str, str]) -> Process:
        if self.ca_file:  # every client of a TLS broker trusts its test CA
            env = {**env, "GPU_SHARE_CA_FILE": self.ca_file}
        process = Process(name, args, env, self.workdir)
        self.processes.append(process)
        return process

    def client(self, token: str) -> BrokerClient:
        return BrokerClient(self.url, token, timeout=10, ca_file=self.ca_file)

    def account(self, name: str, role: str, credits_micro: int = 0) -> str:
        """Create an account with some credit; return a fresh token for it."""
        self.admin.request("POST", "/accounts", {"name": name, "role": role})
        if credits_micro:
            self.admin.request("POST", f"/accounts/{name}/credit", {"amount_micro": credits_micro})
        return self.admin.request("POST", f"/accounts/{name}/tokens")["token"]

    def start_host(
        self,
        name: str,
        price_per_hour: str = "3.6",
        *extra: str,
        token_file: bool = False,
        broker_url: str | None = None,
    ) -> Process:
        """Start a host agent and wait until its offer is online.

        It connects to ``broker_url`` (a proxy in front of the broker), else to the broker.
        Its token is never on the command line: in GPU_SHARE_TOKEN, or with ``token_file``
        in a file of mode 0600 named by --token-file.
        """
        token = self.account(name, "host")
        env = clean_env(GPU_SHARE_TOKEN=token)
        if token_file:
            path = self.workdir / f"{name}.token"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(token + "\n")
            extra = ("--token-file", str(path), *extra)
            env = clean_env()
        process = self.spawn(
            f"host-{name}",
            [
                *CLI,
                "host",
                "--broker",
                broker_url or self.url,
                "--price-per-hour",
                price_per_hour,
                "--heartbeat-interval=0.5",
                f"--scratch-root={self.workdir / ('scratch-' + name)}",
                *extra,
            ],
            env,
        )
        process.token = token
        eventually(
            lambda: any(o["host_id"] == name for o in self.admin.request("GET", "/offers")),
            60,
            0.2,
            f"host {name} to come online",
        )
        return process

    def start_user_server(self, token: str) -> tuple[str, str]:
        """Start a jupyter_server with the user-side extension; return its URL and token."""
        port = free_port()
        server_token = secrets.token_hex(16)
        root = self.workdir / "notebooks"
        root.mkdir(exist_ok=True)
        self.spawn(
            "user-server",
            [
                sys.executable,
                "-m",
                "jupyter_server",
                f"--port={port}",
                "--ServerApp.ip=127.0.0.1",
                "--ServerApp.port_retries=0",
                f"--IdentityProvider.token={server_token}",
                f"--ServerApp.root_dir={root}",
                "--ServerApp.open_browser=False",
                *ROOT_FLAG,
            ],
            clean_env(GPU_SHARE_BROKER_URL=self.url, GPU_SHARE_TOKEN=token),
        )
        url = f"http://127.0.0.1:{port}"
        import urllib.request

        def answers() -> bool:
            request = urllib.request.Request(
                f"{url}/api/status", headers={"Authorization": f"token {server_token}"}
            )
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status == 200

        eventually(answers, 60, 0.2, "the user's jupyter_server")
        return url, server_token

    def session_of(self, token: str, state: str | None = None) -> dict[str, Any]:
        """The newest session of a renter (optionally in a state)."""
        sessions = self.client(token).request("GET", "/sessions")
        sessions = [s for s in sessions if state is None or s["state"] == state]
        assert sessions, f"no session in state {state}"
        return sessions[0]

    def close(self) -> None:
        for process in reversed(self.processes):
            process.stop()

    def logs(self) -> str:
        return "\n".join(f"===== {p.name} =====\n{p.output()[-6000:]}" for p in self.processes)


@asynccontextmanager
async def remote_kernel(timeout: float = 60) -> AsyncIterator[tuple[Any, Any]]:
    """A ``gpu-share`` kernel started in this process (GPU_SHARE_BROKER_URL and _TOKEN from
    the environment) and a client whose channels answer: ``(kernel manager, client)``;
    shut down with a shutdown_request when the block ends."""
    from jupyter_client.manager import AsyncKernelManager

    km = AsyncKernelManager(kernel_name="gpu-share")
    await km.start_kernel()
    client = km.client()
    client.start_channels()
    try:
        await client.wait_for_ready(timeout=timeout)
        yield km, client
    finally:
        client.stop_channels()
        await km.shutdown_kernel(now=False)
